"""Run a grid of commands (built by :mod:`mirage.grid`) and report what failed.

Two ways to run the grid:

- locally, ``--runners N`` commands at a time, each optionally given one free GPU through
  ``CUDA_VISIBLE_DEVICES`` (``--runner-gpus``);
- on a cluster, as a SLURM job array submitted with submitit (``--runner-slurm``).

Either way each job's output goes to its own log file, failed commands can be retried, a
progress line shows done / failed / running, and the end shows a table of the commands
that failed with their exit codes and logs. The exit status is 0 only if every command
succeeded. Commands are argument lists run without a shell. See ``docs/runner.md``.
"""
import contextlib
import datetime
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from mirage.errors import UserError, exit_on_user_error
from mirage.grid import USAGE, build_grid

# For tests and dry runs on machines without GPUs: comma-separated GPU ids that "exist".
FAKE_GPUS_ENV = "MIRAGE_RUNNER_FAKE_GPUS"
# For tests: the submitit cluster used by --runner-slurm ("local" runs the array here).
CLUSTER_ENV = "MIRAGE_RUNNER_CLUSTER"

EXIT_FAILED = 1  # some command failed
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGTERM, as a shell reports SIGINT
STOP_GRACE_S = 10.0  # after Ctrl-C, how long a job may take to exit before SIGKILL
SUMMARY_NAME = "runner_summary.json"


@dataclass
class JobResult:
    """What became of one job. ``status``: done, failed, stopped or not started."""

    job: object  # mirage.grid.Job
    status: str
    exit_code: Optional[int]  # None when the command never exited by itself
    attempts: int
    log_path: Path
    gpu: Optional[int] = None
    note: str = ""  # e.g. why a cluster job died


def _write_attempt_header(log, command, attempt, attempts, gpus):
    """One header per attempt, so retries and re-runs append to the same log readably."""
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    where = f", CUDA_VISIBLE_DEVICES={gpus}" if gpus is not None else ""
    log.write(f"==== runner: attempt {attempt}/{attempts}, {stamp}{where} ====\n"
              f"$ {shlex.join(command)}\n")
    log.flush()


def _child_env(gpu=None):
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")  # Python children write their logs as they go
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    return env


# ----------------------------------------------------------------------------- local pool


class LocalPool:
    """Run jobs as child processes, ``parallel`` at a time, one GPU slot each if given.

    Each child gets its own session (process group), so a Ctrl-C in the terminal reaches
    only the runner, which then stops every child's whole process tree itself.
    """

    def __init__(self, jobs, log_paths, parallel, gpu_slots=None, retries=0,
                 poll_s=0.05, stop_grace_s=STOP_GRACE_S):
        self.log_paths = dict(zip((job.index for job in jobs), log_paths))
        self.parallel = parallel
        self.free_gpus = list(gpu_slots) if gpu_slots else None
        self.retries = retries
        self.poll_s = poll_s
        self.stop_grace_s = stop_grace_s
        self.pending = deque((job, 1) for job in jobs)  # (job, attempt number)
        self.running = {}  # Popen -> (job, attempt, gpu, open log file)
        self.results = {}  # job index -> JobResult
        self.total = len(jobs)

    def run(self):
        """Run every job; returns (results in grid order, interrupted?)."""
        interrupted = False
        bar = tqdm(total=self.total, desc="runner", unit="job", dynamic_ncols=True)
        try:
            while self.pending or self.running:
                self._start_ready()
                self._reap()
                _show_progress(bar, self.results.values(), len(self.running))
                if self.pending or self.running:
                    time.sleep(self.poll_s)
        except KeyboardInterrupt:
            interrupted = True
            tqdm.write(f"runner: interrupted; stopping {len(self.running)} running job(s)",
                       file=sys.stdout)
            self._stop_running()
        finally:
            bar.close()
        for job, attempt in self.pending:
            self.results[job.index] = JobResult(job, "not started", None, attempt - 1,
                                                 self.log_paths[job.index])
        return [self.results[i] for i in sorted(self.results)], interrupted

    def _start_ready(self):
        while (self.pending and len(self.running) < self.parallel
               and (self.free_gpus is None or self.free_gpus)):  # None: no GPU bookkeeping
            job, attempt = self.pending.popleft()
            gpu = self.free_gpus.pop(0) if self.free_gpus is not None else None
            log = open(self.log_paths[job.index], "a", encoding="utf-8")
            _write_attempt_header(log, job.command, attempt, self.retries + 1, gpu)
            try:
                proc = subprocess.Popen(job.command, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, env=_child_env(gpu),
                                        start_new_session=True)
            except OSError as err:
                log.write(f"runner: could not start the command: {err}\n")
                log.close()
                self._finish(job, attempt, 127, gpu)
                continue
            self.running[proc] = (job, attempt, gpu, log)

    def _reap(self):
        for proc in [p for p in self.running if p.poll() is not None]:
            job, attempt, gpu, log = self.running.pop(proc)
            log.close()
            self._finish(job, attempt, proc.returncode, gpu)

    def _finish(self, job, attempt, code, gpu):
        if gpu is not None:
            self.free_gpus.append(gpu)
        log_path = self.log_paths[job.index]
        if code == 0:
            self.results[job.index] = JobResult(job, "done", 0, attempt, log_path, gpu)
        elif attempt <= self.retries:
            tqdm.write(f"runner: job {job.index} exited with {format_exit(code)}; retry "
                       f"{attempt}/{self.retries}", file=sys.stdout)
            self.pending.append((job, attempt + 1))
        else:
            self.results[job.index] = JobResult(job, "failed", code, attempt, log_path, gpu)
            tqdm.write(f"runner: job {job.index} failed with {format_exit(code)}; log: "
                       f"{log_path}", file=sys.stdout)

    def _stop_running(self):
        """SIGINT to every job's process group, SIGKILL to those still alive after the grace
        period (or at a second Ctrl-C); the jobs are recorded as stopped."""
        for proc in self.running:
            _signal_group(proc, signal.SIGINT)
        deadline = time.monotonic() + self.stop_grace_s
        try:
            while (any(p.poll() is None for p in self.running)
                   and time.monotonic() < deadline):
                time.sleep(0.05)
        except KeyboardInterrupt:
            pass  # a second Ctrl-C: no more waiting
        for proc, (job, attempt, gpu, log) in self.running.items():
            if proc.poll() is None:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
            log.write(f"==== runner: stopped by the user ({format_exit(proc.returncode)}) "
                      "====\n")
            log.close()
            self.results[job.index] = JobResult(job, "stopped", proc.returncode, attempt,
                                                self.log_paths[job.index], gpu)
        self.running.clear()


def _signal_group(proc, sig):
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _show_progress(bar, results, running):
    """Redraw the line when a count changed, else at most once a second (elapsed time)."""
    done = sum(r.status == "done" for r in results)
    failed = sum(r.status == "failed" for r in results)
    state = (done, failed, running)
    now = time.monotonic()
    if state == getattr(bar, "runner_state", None) and now - bar.runner_shown < 1.0:
        return
    bar.runner_state, bar.runner_shown = state, now
    bar.set_postfix_str(f"done {done}, failed {failed}, running {running}", refresh=False)
    bar.update(done + failed - bar.n)  # redraws, also when the count is unchanged
    bar.refresh()


# ----------------------------------------------------------------------------- SLURM


def run_one_command(command, log_path, retries=0):
    """Body of one array task: run ``command`` (a list, no shell), appending its output to
    ``log_path``, up to ``retries`` more times until it exits with 0.

    Returns {"exit_code": int, "attempts": int}. Uses only the standard library because
    it is pickled by value and runs on the cluster node.
    """
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    attempts = retries + 1
    code, attempt = 127, 0
    for attempt in range(1, attempts + 1):
        with open(log_path, "a", encoding="utf-8") as log:
            _write_attempt_header(log, command, attempt, attempts,
                                  os.environ.get("CUDA_VISIBLE_DEVICES"))
            try:
                code = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=log,
                                      stderr=subprocess.STDOUT, env=env).returncode
            except OSError as err:
                log.write(f"runner: could not start the command: {err}\n")
                code = 127
        if code == 0:
            break
    return {"exit_code": code, "attempts": attempt}


def make_executor(options, folder, cluster, parallel):
    """A submitit executor for the array (``cluster``: slurm, or local/debug for tests)."""
    import submitit

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
    import cloudpickle

    # Pickle run_one_command by value: the cluster node then needs no import of mirage
    # (the job's working directory or PYTHONPATH may not contain this repository).
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # Absolute paths: a task's working directory is up to the cluster.
    executor = make_executor(options, os.path.abspath(log_dir / "submitit"), cluster, parallel)
    commands = [job.command for job in jobs]
    try:
        return executor.map_array(run_one_command, commands,
                                  [os.path.abspath(p) for p in log_paths],
                                  [options.retry] * len(jobs))
    except (OSError, subprocess.CalledProcessError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"--runner-slurm: the submission failed: {first}") from None


def wait_for_array(sub_jobs, jobs, log_paths, poll_s):
    """Wait for the array with a progress line; Ctrl-C cancels the unfinished tasks.

    Returns (results in grid order, interrupted?).
    """
    results, waiting = {}, dict(enumerate(sub_jobs))
    interrupted = False
    bar = tqdm(total=len(jobs), desc="runner", unit="job", dynamic_ncols=True)
    try:
        while waiting:
            for i, sub in list(waiting.items()):
                if sub.done():
                    del waiting[i]
                    results[i] = _array_result(sub, jobs[i], log_paths[i])
                    if results[i].status != "done":
                        tqdm.write(f"runner: job {jobs[i].index} failed with "
                                   f"{format_exit(results[i].exit_code)}; log: "
                                   f"{log_paths[i]}", file=sys.stdout)
            running = sum(sub.state == "RUNNING" for sub in waiting.values())
            _show_progress(bar, results.values(), running)
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


def _array_result(sub, job, log_path):
    try:
        outcome = sub.result()
    except Exception as err:  # submitit raises for a task that died: timeout, OOM, node
        text = str(err).strip().splitlines()
        why = text[0] if text else type(err).__name__
        return JobResult(job, "failed", None, 0, log_path,
                         note=f"{why[:200]} (submitit log: {sub.paths.stderr})")
    code = outcome["exit_code"]
    return JobResult(job, "done" if code == 0 else "failed", code, outcome["attempts"],
                     log_path)


# ----------------------------------------------------------------------------- checks


def detect_gpu_ids():
    """GPU ids of this machine and where they come from.

    ``$MIRAGE_RUNNER_FAKE_GPUS`` (testing) wins, then ``nvidia-smi -L``, then torch.
    """
    fake = os.environ.get(FAKE_GPUS_ENV)
    if fake is not None:
        items = [item.strip() for item in fake.split(",") if item.strip()]
        if not all(item.isdigit() for item in items):
            raise UserError(f"${FAKE_GPUS_ENV} must be GPU ids separated by commas, got "
                            f"'{fake}'")
        return sorted({int(item) for item in items}), f"${FAKE_GPUS_ENV}"
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
        if out.returncode == 0:
            count = sum(line.startswith("GPU ") for line in out.stdout.splitlines())
            return list(range(count)), "nvidia-smi -L"
    except (OSError, subprocess.SubprocessError):
        pass  # no driver tools: ask torch instead
    try:
        import torch
    except ImportError:
        return [], "no nvidia-smi and no torch"
    return list(range(torch.cuda.device_count())), "torch.cuda.device_count()"


def check_gpus(requested):
    """Every requested GPU id must exist on this machine."""
    existing, source = detect_gpu_ids()
    for gpu in requested:
        if gpu not in existing:
            have = (f"GPUs {','.join(map(str, existing))}" if existing
                    else "no GPU")
            raise UserError(f"--runner-gpus: GPU {gpu} does not exist (this machine has "
                            f"{have}, according to {source}); pick ids from that list")


def check_program(program):
    """The base command's program must be runnable here, or every job would fail."""
    if os.sep in program:
        if not (os.path.isfile(program) and os.access(program, os.X_OK)):
            raise UserError(f"base command '{program}' is not an executable file; check the "
                            "first word before '--'")
    elif shutil.which(program) is None:
        raise UserError(f"base command '{program}' is not found on PATH; check the first "
                        "word before '--' (activate the environment that provides it?)")


def local_parallelism(options):
    """How many jobs run at once locally: --runners, else one per GPU slot, else 1."""
    slots = options.gpus
    if options.runners is None:
        return len(slots) if slots else 1
    if slots and options.runners > len(slots):
        raise UserError(
            f"--runners {options.runners} is more than the {len(slots)} GPU slot(s) of "
            f"--runner-gpus {','.join(map(str, slots))}: each job needs a free GPU (list an "
            "id twice, e.g. 0,0,1,1, to run two jobs on one GPU)")
    return options.runners


def make_log_dir(requested):
    """The log folder: --runner-log, or a new __output/runner/<date-time> folder."""
    if requested:
        path = Path(requested)
    else:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path("__output") / "runner" / stamp
        suffix = 2
        while path.exists():  # two sweeps started in the same second
            path = Path("__output") / "runner" / f"{stamp}-{suffix}"
            suffix += 1
    if path.exists() and not path.is_dir():
        raise UserError(f"--runner-log {path} is a file; give a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--runner-log: cannot create folder {path}: "
                        f"{err.strerror or err}") from None
    return path


def log_paths_for(jobs, log_dir):
    """``<log_dir>/<index>_<values>.log``: the index keeps names unique and sorted."""
    width = max(3, len(str(len(jobs))))
    return [log_dir / f"{job.index:0{width}d}_{job.name}.log" for job in jobs]


# ----------------------------------------------------------------------------- reporting


def format_exit(code):
    if code is None:
        return "no exit code"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"exit {code} ({signal.Signals(-code).name})"
    return f"exit {code}"


def report(results, total):
    """Print the counts and the table of failed / stopped commands."""
    counts = {}
    for result in results:
        counts[result.status] = counts.get(result.status, 0) + 1
    not_started = total - sum(r.status != "not started" for r in results)
    parts = [f"{counts.get('done', 0)} done", f"{counts.get('failed', 0)} failed"]
    if counts.get("stopped"):
        parts.append(f"{counts['stopped']} stopped")
    if not_started:
        parts.append(f"{not_started} not started")
    print(f"runner: {total} commands: {', '.join(parts)}", flush=True)
    bad = [r for r in results if r.status in ("failed", "stopped")]
    if not bad:
        return
    rows = [("job", "status", "exit", "tries", "log", "command")]
    for r in bad:
        code = "-" if r.exit_code is None else str(r.exit_code)
        rows.append((str(r.job.index), r.status, code, str(r.attempts), str(r.log_path),
                     shlex.join(r.job.command)))
    widths = [max(len(row[col]) for row in rows) for col in range(5)]
    stopped = any(r.status == "stopped" for r in bad)
    print("failed or stopped commands:" if stopped else "failed commands:")
    for row in rows:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[5])
    for r in bad:
        if r.note:
            print(f"  job {r.job.index}: {r.note}")
    sys.stdout.flush()


def write_summary(results, log_dir):
    """``runner_summary.json`` in the log folder: every job's command and outcome."""
    from mirage.fileio import write_text

    rows = [{"job": r.job.index, "status": r.status, "exit_code": r.exit_code,
             "attempts": r.attempts, "gpu": r.gpu, "log": str(r.log_path),
             "command": r.job.command, "note": r.note} for r in results]
    write_text(Path(log_dir) / SUMMARY_NAME, json.dumps(rows, indent=1) + "\n")


@contextlib.contextmanager
def sigterm_as_interrupt():
    """While running jobs, SIGTERM (e.g. from kill or a scheduler) stops them like Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ----------------------------------------------------------------------------- main


def _describe_grid(grid):
    varying = [f"{axis.option} x{len(axis.values)}" for axis in grid.axes if axis.values]
    flags = [axis.option for axis in grid.axes if not axis.values]
    text = f"runner: {grid.num_combinations} combination(s)"
    if varying:
        text += f" of {', '.join(varying)}"
    if flags:
        text += f" (flags in every command: {' '.join(flags)})"
    removed = grid.num_combinations - len(grid.jobs)
    text += f"; {len(grid.jobs)} command(s)"
    if grid.options.filters:
        text += f", {removed} removed by --runner-filter"
    return text


@exit_on_user_error
def main(argv=None, poll_s=None):
    """Entry point of ``./runner``; returns the exit status (0: every command succeeded)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    grid = build_grid(argv)
    options = grid.options
    print(_describe_grid(grid), flush=True)
    if options.info:
        for job in grid.jobs:
            print(f"[{job.index}] {shlex.join(job.command)}")
        print("runner: --runner-info given, nothing was run", flush=True)
        return 0
    if not grid.jobs:
        raise UserError(f"--runner-filter removes all {grid.num_combinations} combinations; "
                        "nothing is left to run")
    if options.slurm:
        cluster = os.environ.get(CLUSTER_ENV, "slurm")
        if cluster not in ("slurm", "local", "debug"):
            raise UserError(f"${CLUSTER_ENV} must be slurm, local or debug, got '{cluster}'")
        if cluster == "slurm" and shutil.which("sbatch") is None:
            raise UserError("--runner-slurm: sbatch is not found; run the runner on a SLURM "
                            "login node (or drop --runner-slurm to run here)")
    else:
        check_program(grid.base[0])
        if options.gpus is not None:
            check_gpus(options.gpus)
        parallel = local_parallelism(options)
    log_dir = make_log_dir(options.log_dir)
    log_paths = log_paths_for(grid.jobs, log_dir)
    with sigterm_as_interrupt():
        if options.slurm:
            results, interrupted = _run_on_cluster(grid, log_paths, log_dir, cluster, poll_s)
            if results is None:
                return 0  # detached
        else:
            where = f" on GPUs {','.join(map(str, options.gpus))}" if options.gpus else ""
            print(f"runner: running {len(grid.jobs)} command(s), {parallel} at a time{where};"
                  f" logs in {log_dir}", flush=True)
            pool = LocalPool(grid.jobs, log_paths, parallel, options.gpus, options.retry,
                             poll_s=0.1 if poll_s is None else poll_s)
            results, interrupted = pool.run()
    report(results, len(grid.jobs))
    write_summary(results, log_dir)
    if interrupted:
        print("runner: interrupted by the user", flush=True)
        return EXIT_INTERRUPTED
    return EXIT_FAILED if any(r.status != "done" for r in results) else 0


def _run_on_cluster(grid, log_paths, log_dir, cluster, poll_s):
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
    return wait_for_array(sub_jobs, grid.jobs, log_paths, poll_s)
