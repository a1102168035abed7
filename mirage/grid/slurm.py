"""The SLURM backend: the grid submitted with submitit as one job array, and waited for.

Each array task runs :func:`mirage.grid.local.run_one_command` (retries, time limit) on
its node; that module is pickled by value, so the node needs no copy of this repository.
submitit and cloudpickle are imported only here, and only when ``--runner-slurm`` is given.
"""
import contextlib
import os
import subprocess
import sys
import time

from tqdm import tqdm

from mirage.errors import UserError
from mirage.grid.local import (JobResult, failure_note, format_exit, progress_bar,
                               run_one_command, show_progress)


def make_executor(options, folder, cluster, parallel):
    """A submitit executor for the array (``cluster``: slurm, or local/debug for tests)."""
    import submitit  # deferred: submitit is optional (needed only for --runner-slurm)

    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    params = {"name": "runner", "timeout_min": options.slurm_time_min,
              "gpus_per_node": options.slurm_gpus, "tasks_per_node": 1, "nodes": 1}
    if options.slurm_cpus is not None:
        params["cpus_per_task"] = options.slurm_cpus
    if options.slurm_mem_gb is not None:
        params["mem_gb"] = options.slurm_mem_gb
    if options.slurm_partition:
        params["slurm_partition"] = options.slurm_partition
    if parallel is not None:
        params["slurm_array_parallelism"] = parallel
    if options.slurm_account:
        params["slurm_additional_parameters"] = {"account": options.slurm_account}
    executor.update_parameters(**params)
    return executor


def submit_array(jobs, log_paths, options, log_dir, cluster, parallel):
    """Submit the jobs as one job array; returns the submitit jobs in grid order."""
    import cloudpickle  # deferred: comes with submitit, needed only for --runner-slurm

    # Pickle run_one_command's module by value: the cluster node then needs no import of
    # mirage (the job's working directory or PYTHONPATH may not contain this repository).
    cloudpickle.register_pickle_by_value(sys.modules[run_one_command.__module__])
    # Absolute paths: a task's working directory is up to the cluster.
    executor = make_executor(options, os.path.abspath(log_dir / "submitit"), cluster, parallel)
    commands = [job.command for job in jobs]
    try:
        return executor.map_array(run_one_command, commands,
                                  [os.path.abspath(p) for p in log_paths],
                                  [options.retry] * len(jobs),
                                  [options.timeout_s] * len(jobs))
    except (OSError, subprocess.CalledProcessError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"--runner-slurm: the submission failed: {first}") from None


def wait_for_array(sub_jobs, jobs, log_paths, poll_s, retries=0):
    """Wait for the array with a progress line; Ctrl-C cancels the unfinished tasks.

    Returns (results in grid order, interrupted?).
    """
    results, waiting = {}, dict(enumerate(sub_jobs))
    interrupted = False
    # No time-left estimate: how long the tasks wait in the queue is not known here.
    bar = progress_bar(len(jobs))
    try:
        while waiting:
            for i, sub in list(waiting.items()):
                if sub.done():
                    del waiting[i]
                    results[i] = _array_result(sub, jobs[i], log_paths[i], retries)
                    if results[i].status != "done":
                        what = ("timed out" if results[i].status == "timed out" else
                                f"failed with {format_exit(results[i].exit_code)}")
                        tqdm.write(f"runner: job {jobs[i].index} {what}; log: "
                                   f"{log_paths[i]}", file=sys.stdout)
            running = sum(sub.state == "RUNNING" for sub in waiting.values())
            show_progress(bar, results.values(), running)
            if waiting:
                time.sleep(poll_s)
    except KeyboardInterrupt:
        interrupted = True
        tqdm.write(f"runner: interrupted; cancelling {len(waiting)} unfinished job(s)",
                   file=sys.stdout)
        for i, sub in waiting.items():
            with contextlib.suppress(Exception):  # best effort: scancel may be unreachable
                sub.cancel(check=False)
            results[i] = JobResult(jobs[i], "stopped", None, 0, log_paths[i],
                                   note=f"cancelled (submitit job {sub.job_id})")
    finally:
        bar.close()
    return [results[i] for i in sorted(results)], interrupted


def _array_result(sub, job, log_path, retries):
    try:
        outcome = sub.result()
    except Exception as err:  # submitit raises for a task that died: timeout, OOM, node
        text = str(err).strip().splitlines()
        why = text[0] if text else type(err).__name__
        return JobResult(job, "failed", None, 0, log_path,
                         note=f"{why[:200]} (submitit log: {sub.paths.stderr})")
    code = outcome["exit_code"]
    if code == 0:
        return JobResult(job, "done", 0, outcome["attempts"], log_path)
    status = "timed out" if outcome.get("timed_out") else "failed"
    return JobResult(job, status, code, outcome["attempts"], log_path,
                     note=failure_note(code, log_path, retries))


def run_on_cluster(grid, log_paths, log_dir, cluster, poll_s):
    """Submit the grid's jobs and wait for them unless ``--runner-detach``.

    Returns (results in grid order, interrupted?), or (None, False) when detached.
    """
    options = grid.options
    parallel = options.runners  # None: submitit's default array parallelism
    sub_jobs = submit_array(grid.jobs, log_paths, options, log_dir, cluster, parallel)
    array_id = str(sub_jobs[0].job_id).split("_")[0]
    limit = f", at most {parallel} at a time" if parallel and cluster == "slurm" else ""
    print(f"runner: submitted {len(sub_jobs)} job(s) as array {array_id} ({cluster}{limit}); "
          f"logs in {log_dir}", flush=True)
    if options.detach:
        print(f"runner: --runner-detach given, not waiting; follow the jobs with "
              f"squeue -j {array_id} and sacct -j {array_id}", flush=True)
        return None, False
    if poll_s is None:
        poll_s = 10.0 if cluster == "slurm" else 0.2  # sacct is not for tight loops
    return wait_for_array(sub_jobs, grid.jobs, log_paths, poll_s, options.retry)
