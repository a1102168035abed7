"""The SLURM backend: the grid submitted with submitit as one job array, then waited for,
or left to run and looked at later (``./runner --runner-status DIR``).

Each array task runs :func:`mirage.grid.one_command.run_one_command` (retries, time limit)
on its node; that module is pickled by value, so the node needs no copy of this repository.
What became of each task is read from SLURM's queue and the task's result file
(:mod:`mirage.grid.queue`), never from submitit's sacct-based status checks. The array's
tasks are recorded in ``runner_array.json`` in the log folder, for ``--runner-status``.
submitit and cloudpickle are imported only here, and only when ``--runner-slurm`` is given.
"""
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from mirage.errors import UserError
from mirage.grid.expand import Job
from mirage.grid.local import JobResult
from mirage.grid.one_command import run_one_command
from mirage.grid.progress import progress_bar, show_progress
from mirage.grid.queue import SlurmArray, Task, describe, read_result, result_of_task

ARRAY_RECORD = "runner_array.json"  # in the log folder: the array's id and tasks


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
    extra = {}
    if options.slurm_account:
        extra["account"] = options.slurm_account
    if options.slurm_requeue:
        extra["requeue"] = True  # sbatch --requeue: also where the cluster's default is not
    if extra:
        params["slurm_additional_parameters"] = extra
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


def tasks_of(sub_jobs, jobs, log_paths):
    """The array's tasks (submitit jobs paired with the grid's jobs), in grid order."""
    return [Task(position, job, str(sub.job_id), Path(log_path).absolute(),
                 Path(sub.paths.result_pickle), Path(sub.paths.stderr))
            for position, (sub, job, log_path) in enumerate(zip(sub_jobs, jobs, log_paths))]


# ----------------------------------------------------------------------------- the record


def write_array_record(log_dir, array_id, tasks, options):
    """``runner_array.json``: what ``--runner-status`` needs to find the tasks again."""
    # deferred: heavy, mirage.fileio loads OpenCV and numpy, which ./runner -h must not
    from mirage.fileio import write_text

    record = {"array_id": array_id, "time_min": options.slurm_time_min,
              "retry": options.retry, "submitted": time.strftime("%Y-%m-%d %H:%M:%S"),
              "tasks": [{"job": t.job.index, "name": t.job.name, "command": t.job.command,
                         "task_id": t.task_id, "log": str(t.log_path),
                         "result": str(t.result_file), "submitit_log": str(t.submitit_log)}
                        for t in tasks]}
    write_text(Path(log_dir) / ARRAY_RECORD, json.dumps(record, indent=1) + "\n")


def read_array_record(log_dir):
    """(array id, tasks, time limit in minutes, retries) of the grid submitted into the
    log folder ``log_dir``. Raises UserError."""
    path = Path(log_dir) / ARRAY_RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        tasks = [Task(position, Job(t["job"], t["command"], (), t["name"]), t["task_id"],
                      Path(t["log"]), Path(t["result"]), Path(t["submitit_log"]))
                 for position, t in enumerate(record["tasks"])]
        return str(record["array_id"]), tasks, record["time_min"], record["retry"]
    except FileNotFoundError:
        raise UserError(f"--runner-status: {log_dir} holds no {ARRAY_RECORD}; give the "
                        "--runner-log folder of a grid submitted with --runner-slurm") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"--runner-status: cannot read {path}: {err}") from None


# ----------------------------------------------------------------------------- waiting


class LocalArray:
    """The tasks run by submitit's local executor (tests, dry runs without SLURM): its
    own done() and state, which need no SLURM; the same interface as SlurmArray."""

    def __init__(self, sub_jobs, tasks, retries):
        self.unfinished = {task.position: (sub, task) for sub, task in zip(sub_jobs, tasks)}
        self.retries = retries
        self.running = 0
        self.error = None
        self.notices = []

    def poll(self):
        finished = {}
        for position, (sub, task) in list(self.unfinished.items()):
            if sub.done():
                outcome = read_result(task.result_file) or (
                    "error", "the task ended without a result")
                finished[position] = result_of_task(task, outcome, self.retries)
                del self.unfinished[position]
        self.running = sum(sub.state == "RUNNING" for sub, _ in self.unfinished.values())
        return finished

    def cancel(self):
        results = {}
        for position, (sub, task) in self.unfinished.items():
            with contextlib.suppress(Exception):  # best effort: the process may be gone
                sub.cancel(check=False)
            results[position] = JobResult(task.job, "stopped", None, 0, task.log_path,
                                          note=f"cancelled (submitit job {sub.job_id})")
        return results


def wait_for_array(watch, total, poll_s):
    """Wait for every task with a progress line; Ctrl-C cancels the unfinished tasks.

    ``watch``: a SlurmArray or LocalArray. Returns (results in grid order, interrupted?).
    """
    results, interrupted, last_error = {}, False, None
    # No time-left estimate: how long the tasks wait in the queue is not known here.
    bar = progress_bar(total)
    try:
        while len(results) < total:
            for position, result in watch.poll().items():
                results[position] = result
                if result.status != "done":
                    tqdm.write(f"runner: job {result.job.index} {describe(result)}; log: "
                               f"{result.log_path}", file=sys.stdout)
            for line in watch.notices:
                tqdm.write(line, file=sys.stdout)
            watch.notices.clear()
            if watch.error and watch.error != last_error:  # once per outage, not per poll
                tqdm.write(f"runner: squeue failed ({watch.error}); asking again every "
                           f"{poll_s:g} s", file=sys.stdout)
            last_error = watch.error
            show_progress(bar, results.values(), watch.running)
            if len(results) < total:
                time.sleep(poll_s)
    except KeyboardInterrupt:
        interrupted = True
        tqdm.write(f"runner: interrupted; cancelling {total - len(results)} unfinished "
                   "job(s)", file=sys.stdout)
        results.update(watch.cancel())
    finally:
        bar.close()
    return [results[p] for p in sorted(results)], interrupted


def run_on_cluster(grid, log_paths, log_dir, cluster, poll_s):
    """Submit the grid's jobs and wait for them unless ``--runner-detach``.

    Returns (results in grid order, interrupted?), or (None, False) when detached.
    """
    options = grid.options
    parallel = options.runners  # None: submitit's default array parallelism
    sub_jobs = submit_array(grid.jobs, log_paths, options, log_dir, cluster, parallel)
    tasks = tasks_of(sub_jobs, grid.jobs, log_paths)
    array_id = str(sub_jobs[0].job_id).split("_")[0]
    limit = f", at most {parallel} at a time" if parallel and cluster == "slurm" else ""
    if cluster == "slurm":
        write_array_record(log_dir, array_id, tasks, options)
    print(f"runner: submitted {len(sub_jobs)} job(s) as array {array_id} ({cluster}{limit}); "
          f"logs in {log_dir}", flush=True)
    if options.detach:
        print(f"runner: --runner-detach given, not waiting; see how the jobs are doing with "
              f"./runner --runner-status {log_dir} (or squeue -r -j {array_id})", flush=True)
        return None, False
    if cluster != "slurm":
        watch = LocalArray(sub_jobs, tasks, options.retry)
        return wait_for_array(watch, len(tasks), 0.2 if poll_s is None else poll_s)
    watch = SlurmArray(array_id, tasks, options.slurm_time_min, options.retry)
    if not watch.accounting.check(array_id):
        print(f"runner: no SLURM accounting here (sacct: {watch.accounting.why_not}); the "
              "jobs' states come from squeue and their result files", flush=True)
    # squeue asks the controller: not for tight loops
    return wait_for_array(watch, len(tasks), 10.0 if poll_s is None else poll_s)


def look_at_array(log_dir):
    """``--runner-status``: one look at a grid submitted earlier into ``log_dir``; returns
    (results in grid order, unfinished ones 'pending' or 'running'; the array id)."""
    array_id, tasks, time_min, retries = read_array_record(log_dir)
    watch = SlurmArray(array_id, tasks, time_min, retries, grace_s=0)
    finished = watch.poll()
    if watch.error:
        raise UserError(f"--runner-status: cannot ask SLURM about array {array_id}: "
                        f"{watch.error}")
    results = {**finished, **watch.unfinished_results()}
    return [results[p] for p in sorted(results)], array_id
