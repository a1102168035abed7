"""Run a grid of commands (built by :mod:`mirage.grid`) and report what failed.

Two ways to run the grid:

- locally, ``--runners N`` commands at a time, each optionally given one free GPU through
  ``CUDA_VISIBLE_DEVICES`` (``--runner-gpus``);
- on a cluster, as a SLURM job array submitted with submitit (``--runner-slurm``).

Either way each job's output goes to its own log file, failed commands can be retried
(never after exit 2, a user error), a job can be given a time limit (its whole process
group is stopped), a progress line shows done / failed / running, and the end shows a
table of the commands that failed with their exit codes and logs. The exit status is 0
only if every command succeeded. Before a grid of ``run_seg_tuning.py`` trainings starts,
each job's run directory is resolved and a grid in which two jobs share one is refused.
Commands are argument lists run without a shell. See ``docs/runner.md``.
"""
import contextlib
import datetime
import io
import json
import math
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
EXIT_USER_ERROR = 2  # the project's scripts (and argparse) exit 2 for bad input
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGTERM, as a shell reports SIGINT
STOP_GRACE_S = 10.0  # after Ctrl-C or a timeout, how long a job may take to exit before SIGKILL
SUMMARY_NAME = "runner_summary.json"
# A job whose base command runs this program gets its run directory checked (dry resolution).
TUNING_SCRIPT = "run_seg_tuning.py"


@dataclass
class JobResult:
    """What became of one job. ``status``: done, failed, timed out, stopped or not started."""

    job: object  # mirage.grid.Job
    status: str
    exit_code: Optional[int]  # None when the command never exited by itself
    attempts: int
    log_path: Path
    gpu: Optional[int] = None
    note: str = ""  # e.g. why a cluster job died, or the error line of a user error


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


def format_seconds(seconds):
    """3600 -> '1h', 90 -> '90s', 5400 -> '90m': the unit --runner-timeout was likely given in."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _may_retry(code, attempt, retries):
    """Exit 2 means bad input (a missing file, a wrong option): running again cannot help."""
    return code != 0 and code != EXIT_USER_ERROR and attempt <= retries


# ----------------------------------------------------------------------------- local pool


@dataclass
class _Running:
    job: object
    attempt: int
    gpu: Optional[int]
    log: object  # open log file
    deadline: float  # time.monotonic() at which --runner-timeout stops it (inf: never)
    kill_at: Optional[float] = None  # set when the timeout fired: SIGKILL after the grace


class LocalPool:
    """Run jobs as child processes, ``parallel`` at a time, one GPU slot each if given.

    Each child gets its own session (process group), so a Ctrl-C in the terminal reaches
    only the runner, which then stops every child's whole process tree itself; a job that
    runs past ``timeout_s`` has its whole process group stopped the same way.
    """

    def __init__(self, jobs, log_paths, parallel, gpu_slots=None, retries=0,
                 poll_s=0.05, stop_grace_s=STOP_GRACE_S, timeout_s=None):
        self.log_paths = dict(zip((job.index for job in jobs), log_paths))
        self.parallel = parallel
        self.free_gpus = list(gpu_slots) if gpu_slots else None
        self.retries = retries
        self.poll_s = poll_s
        self.stop_grace_s = stop_grace_s
        self.timeout_s = timeout_s
        self.pending = deque((job, 1) for job in jobs)  # (job, attempt number)
        self.running = {}  # Popen -> _Running
        self.results = {}  # job index -> JobResult
        self.total = len(jobs)

    def run(self):
        """Run every job; returns (results in grid order, interrupted?)."""
        interrupted = False
        bar = tqdm(total=self.total, desc="runner", unit="job", dynamic_ncols=True)
        try:
            while self.pending or self.running:
                self._start_ready()
                self._enforce_timeouts()
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
            deadline = (time.monotonic() + self.timeout_s if self.timeout_s is not None
                        else math.inf)
            self.running[proc] = _Running(job, attempt, gpu, log, deadline)

    def _enforce_timeouts(self):
        """SIGTERM to the process group of a job past its time, SIGKILL after the grace."""
        now = time.monotonic()
        for proc, run in self.running.items():
            if run.kill_at is None and now >= run.deadline:
                limit = format_seconds(self.timeout_s)
                run.log.write(f"\n==== runner: timed out after {limit} (--runner-timeout); "
                              "stopping the job's process group ====\n")
                run.log.flush()
                tqdm.write(f"runner: job {run.job.index} ran past --runner-timeout {limit}; "
                           "stopping it", file=sys.stdout)
                _signal_group(proc, signal.SIGTERM)
                run.kill_at = now + self.stop_grace_s
            elif run.kill_at is not None and now >= run.kill_at:
                _signal_group(proc, signal.SIGKILL)

    def _reap(self):
        for proc in [p for p in self.running if p.poll() is not None]:
            run = self.running.pop(proc)
            timed_out = run.kill_at is not None
            if timed_out:
                # Whatever of the job outlived its main process (workers that ignored
                # SIGTERM) would hold its GPU: the group goes entirely.
                _signal_group(proc, signal.SIGKILL)
            run.log.close()
            self._finish(run.job, run.attempt, proc.returncode, run.gpu, timed_out)

    def _finish(self, job, attempt, code, gpu, timed_out=False):
        if gpu is not None:
            self.free_gpus.append(gpu)
        log_path = self.log_paths[job.index]
        if code == 0:
            self.results[job.index] = JobResult(job, "done", 0, attempt, log_path, gpu)
            return
        what = (f"timed out after {format_seconds(self.timeout_s)}" if timed_out
                else f"failed with {format_exit(code)}")
        if _may_retry(code, attempt, self.retries):
            tqdm.write(f"runner: job {job.index} {what}; retry {attempt}/{self.retries}",
                       file=sys.stdout)
            self.pending.append((job, attempt + 1))
            return
        self.results[job.index] = JobResult(job, "timed out" if timed_out else "failed", code,
                                            attempt, log_path, gpu,
                                            note=_failure_note(code, log_path, self.retries))
        tqdm.write(f"runner: job {job.index} {what}; log: {log_path}", file=sys.stdout)

    def _stop_running(self):
        """SIGINT to every job's process group, SIGKILL to what is left of each group after
        the grace period (or at a second Ctrl-C); the jobs are recorded as stopped."""
        for proc in self.running:
            _signal_group(proc, signal.SIGINT)
        deadline = time.monotonic() + self.stop_grace_s
        try:
            while (any(p.poll() is None for p in self.running)
                   and time.monotonic() < deadline):
                time.sleep(0.05)
        except KeyboardInterrupt:
            pass  # a second Ctrl-C: no more waiting
        for proc, run in self.running.items():
            # Also when the main process has exited: members of its group that are
            # still there (e.g. a grandchild that ignores SIGINT) must not outlive the sweep.
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
            run.log.write(f"==== runner: stopped by the user ({format_exit(proc.returncode)}) "
                          "====\n")
            run.log.close()
            self.results[run.job.index] = JobResult(run.job, "stopped", proc.returncode,
                                                    run.attempt, self.log_paths[run.job.index],
                                                    run.gpu)
        self.running.clear()


def _failure_note(code, log_path, retries):
    """For a user error (exit 2): why it was not retried and the error line from its log."""
    if code != EXIT_USER_ERROR:
        return ""
    line = _last_error_line(log_path)
    why = "exit 2 is a user error, not retried" if retries else "exit 2 is a user error"
    return f"{why}; fix the input and rerun" + (f": {line}" if line else "")


def _last_error_line(log_path, tail_bytes=65536):
    """The last ``error: ...`` line of a log (the one line the project's scripts print)."""
    try:
        with open(log_path, "rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - tail_bytes))
            text = log.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in text.splitlines() if line.startswith("error:")]
    return lines[-1][:300] if lines else ""


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


def run_one_command(command, log_path, retries=0, timeout_s=None, grace_s=STOP_GRACE_S):
    """Body of one array task: run ``command`` (a list, no shell), appending its output to
    ``log_path``, up to ``retries`` more times until it exits with 0 (never again after
    exit 2, a user error). With ``timeout_s`` an attempt that runs longer has its process
    group stopped (SIGTERM, SIGKILL after ``grace_s``).

    Returns {"exit_code": int, "attempts": int, "timed_out": bool}. Uses only the standard
    library because it is pickled by value and runs on the cluster node.
    """
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    attempts = retries + 1
    code, attempt, timed_out = 127, 0, False
    for attempt in range(1, attempts + 1):
        timed_out = False
        with open(log_path, "a", encoding="utf-8") as log:
            _write_attempt_header(log, command, attempt, attempts,
                                  os.environ.get("CUDA_VISIBLE_DEVICES"))
            try:
                # A process group of its own only when it may have to be stopped as a whole.
                proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, env=env,
                                        start_new_session=timeout_s is not None)
            except OSError as err:
                log.write(f"runner: could not start the command: {err}\n")
                code = 127
            else:
                try:
                    code = proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    timed_out = True
                    log.write(f"\n==== runner: timed out after {format_seconds(timeout_s)} "
                              "(--runner-timeout); stopping the job's process group ====\n")
                    log.flush()
                    _signal_group(proc, signal.SIGTERM)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=grace_s)
                    _signal_group(proc, signal.SIGKILL)
                    code = proc.wait()
                except BaseException:  # the task itself is being cancelled
                    if timeout_s is not None:
                        _signal_group(proc, signal.SIGKILL)
                    else:
                        proc.kill()
                    raise
        if code == 0 or code == EXIT_USER_ERROR:
            break
    return {"exit_code": code, "attempts": attempt, "timed_out": timed_out}


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
    bar = tqdm(total=len(jobs), desc="runner", unit="job", dynamic_ncols=True)
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
                     note=_failure_note(code, log_path, retries))


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


def _exit_cell(code):
    """The exit column: '-', '1', '-9 (SIGKILL)', '2 (user error)'."""
    if code is None:
        return "-"
    if code == EXIT_USER_ERROR:
        return f"{code} (user error)"
    return format_exit(code)[len("exit "):] if code < 0 else str(code)


def report(results, total):
    """Print the counts and the table of failed / timed-out / stopped commands."""
    counts = {}
    for result in results:
        counts[result.status] = counts.get(result.status, 0) + 1
    not_started = total - sum(r.status != "not started" for r in results)
    parts = [f"{counts.get('done', 0)} done", f"{counts.get('failed', 0)} failed"]
    for status in ("timed out", "stopped"):
        if counts.get(status):
            parts.append(f"{counts[status]} {status}")
    if not_started:
        parts.append(f"{not_started} not started")
    print(f"runner: {total} commands: {', '.join(parts)}", flush=True)
    bad = [r for r in results if r.status in ("failed", "timed out", "stopped")]
    if not bad:
        return
    rows = [("job", "status", "exit", "tries", "log", "command")]
    for r in bad:
        rows.append((str(r.job.index), r.status, _exit_cell(r.exit_code), str(r.attempts),
                     str(r.log_path), shlex.join(r.job.command)))
    widths = [max(len(row[col]) for row in rows) for col in range(5)]
    kinds = sorted({r.status for r in bad}, key=["failed", "timed out", "stopped"].index)
    heading = kinds[-1] if len(kinds) == 1 else f"{', '.join(kinds[:-1])} or {kinds[-1]}"
    print(f"{heading} commands:")
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


# ----------------------------------------------------------------------------- run directories


def tuning_args(command):
    """The arguments after ``run_seg_tuning.py`` in ``command`` (python, torchrun or the
    script itself), or None when the command runs another program."""
    for i, token in enumerate(command):
        if os.path.basename(token) == TUNING_SCRIPT:
            return command[i + 1:]
    return None


def _choice_text(choice):
    return " ".join(f"{option} {value}" for option, value in choice)


def _quietly(func, *args):
    """Call ``func``; argparse's usage text and exit become one UserError line."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(io.StringIO()):
            return func(*args)
    except SystemExit:
        lines = [line for line in captured.getvalue().splitlines() if line.strip()]
        raise UserError(lines[-1] if lines else "invalid arguments") from None


class RunDirCheck:
    """Dry resolution of each job's run directory, to refuse a grid in which two training
    jobs of ``run_seg_tuning.py`` would write into one directory (one would skip, resume or
    overwrite the other's run). Jobs with ``--test``/``--infer_only`` only read their run
    and are not compared; commands of other programs are not looked at.
    """

    def __init__(self):
        self.by_dir = {}  # real path of a run directory -> [(job index, choice)]
        self.resolve = None

    def add(self, job):
        args = tuning_args(job.command)
        if args is None:
            return
        if self.resolve is None:
            from mirage.identity import run_dir_for_argv
            self.resolve = run_dir_for_argv
        try:
            run_dir = _quietly(self.resolve, args)
            if run_dir is None or not _trains(args):
                return  # None: a --demo whose inputs are written when it starts
        except UserError as err:
            where = f" ({_choice_text(job.choice)})" if job.choice else ""
            raise UserError(f"job {job.index}{where} has bad arguments, so the grid is not "
                            f"started: {err}") from None
        key = os.path.realpath(run_dir)
        self.by_dir.setdefault(key, []).append((job.index, job.choice))

    def check(self):
        """Raise a UserError naming the first jobs that share a directory."""
        groups = [(path, jobs) for path, jobs in self.by_dir.items() if len(jobs) > 1]
        if not groups:
            return
        path, jobs = groups[0]
        numbers = [str(index) for index, _ in jobs]
        named = ", ".join(numbers[:-1]) + " and " + numbers[-1]
        differ = [(i, option) for i, (option, _) in enumerate(jobs[0][1])
                  if len({choice[i][1] for _, choice in jobs}) > 1]
        values = "; ".join(f"{option} " + " vs ".join(choice[i][1] for _, choice in jobs)
                           for i, option in differ)
        values = f" ({values})" if values else ""
        more = (f"; {len(groups) - 1} more group(s) of jobs collide as well"
                if len(groups) > 1 else "")
        raise UserError(
            f"jobs {named}{values} would {'both' if len(jobs) == 2 else 'all'} train into "
            f"one run directory {path}, as "
            "these values do not change the run identity; drop the duplicates, or give the "
            f"jobs distinct run directories (e.g. a --version per job; docs/runner.md){more}")


def _trains(args):
    """Whether a run_seg_tuning.py argument list trains (no --test / --infer_only, also
    not through its -c YAML file)."""
    from mirage.config import parse_config

    config = _quietly(parse_config, args)[0]
    return not (config.get("test") or config.get("infer_only"))


# ----------------------------------------------------------------------------- main


def _describe_grid(grid, count=None):
    """The first line: combinations, axes, flags; and the number of commands if known."""
    varying = [f"{axis.option} x{len(axis.values)}" for axis in grid.axes if axis.values]
    flags = [axis.option for axis in grid.axes if not axis.values]
    text = f"runner: {grid.num_combinations} combination(s)"
    if varying:
        text += f" of {', '.join(varying)}"
    if flags:
        text += f" (flags in every command: {' '.join(flags)})"
    if count is not None:
        text += "; " + _count_text(grid, count)
    return text


def _count_text(grid, count):
    text = f"{count} command(s)"
    if grid.options.filters:
        text += f", {grid.num_combinations - count} removed by --runner-filter"
    return text


def print_info(grid):
    """``--runner-info``: stream the commands (a huge grid is never held in memory) and
    check their run directories; returns the exit status."""
    print(_describe_grid(grid), flush=True)
    check, count = RunDirCheck(), 0
    try:
        for job in grid.iter_jobs():
            print(f"[{job.index}] {shlex.join(job.command)}")
            check.add(job)
            count = job.index
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. ./runner ... --runner-info | head
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    print(f"runner: {_count_text(grid, count)}", flush=True)
    check.check()
    print("runner: --runner-info given, nothing was run", flush=True)
    return 0


@exit_on_user_error
def main(argv=None, poll_s=None, stop_grace_s=STOP_GRACE_S):
    """Entry point of ``./runner``; returns the exit status (0: every command succeeded)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    grid = build_grid(argv)
    options = grid.options
    if options.info:
        return print_info(grid)
    print(_describe_grid(grid, len(grid.jobs)), flush=True)
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
    check = RunDirCheck()
    for job in grid.jobs:
        check.add(job)
    check.check()
    if check.by_dir:
        print(f"runner: {len(check.by_dir)} training job(s), each with its own run directory",
              flush=True)
    log_dir = make_log_dir(options.log_dir)
    log_paths = log_paths_for(grid.jobs, log_dir)
    with sigterm_as_interrupt():
        if options.slurm:
            results, interrupted = _run_on_cluster(grid, log_paths, log_dir, cluster, poll_s)
            if results is None:
                return 0  # detached
        else:
            where = f" on GPUs {','.join(map(str, options.gpus))}" if options.gpus else ""
            limit = (f", each stopped after {format_seconds(options.timeout_s)}"
                     if options.timeout_s is not None else "")
            print(f"runner: running {len(grid.jobs)} command(s), {parallel} at a time{where}"
                  f"{limit}; logs in {log_dir}", flush=True)
            pool = LocalPool(grid.jobs, log_paths, parallel, options.gpus, options.retry,
                             poll_s=0.1 if poll_s is None else poll_s,
                             stop_grace_s=stop_grace_s, timeout_s=options.timeout_s)
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
    return wait_for_array(sub_jobs, grid.jobs, log_paths, poll_s, options.retry)
