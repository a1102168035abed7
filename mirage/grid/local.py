"""Running commands on this machine: the job pool, one GPU per job, retries, timeouts, signals.

:class:`LocalPool` runs the grid's jobs as child processes, ``--runners`` at a time, each
optionally given one free GPU through ``CUDA_VISIBLE_DEVICES``; :func:`run_one_command`
runs one command with retries and a time limit, and is the body of each SLURM array task
(:mod:`mirage.grid.slurm` pickles this module by value, so what it uses must live here).
Both append each attempt to the job's log file and stop a job's whole process group. Also
here: :class:`JobResult`, what became of one job, and how exit codes are worded.

Inside a SLURM array task, SIGTERM (cancelled, time limit, preemption, requeue, node going
down) stops the command and ends the task without a result, so that the runner takes the
task's fate from SLURM's queue; the early warning submitit asks SLURM for (SIGUSR2) is only
noted in the log (see :func:`_slurm_signals`).
"""
import contextlib
import datetime
import math
import os
import shlex
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

from mirage.units import format_duration

EXIT_USER_ERROR = 2  # the project's scripts (and argparse) exit 2 for bad input
STOP_GRACE_S = 10.0  # after Ctrl-C or a timeout, how long a job may take to exit before SIGKILL
SIGNAL_SETTLE_S = 1.0  # in a SLURM task, the pause before a retry (see run_one_command)
# A job's output goes to its log file, where every redraw of a progress bar is kept: the
# children's tqdm bars (tqdm >= 4.66 reads TQDM_* variables as its defaults) show only
# once a bar has run this long, and redraw at most this often. Set them yourself to
# override.
LOG_BAR_ENV = {"TQDM_DELAY": "30", "TQDM_MININTERVAL": "30"}


# The statuses of a job that did not succeed, in the order the report lists them: failed
# (non-zero exit), timed out (--runner-timeout, or SLURM's time limit), cancelled (scancel,
# preemption), lost (gone from SLURM's queue without a result, or its node failed) and
# stopped (Ctrl-C).
BAD_STATUSES = ("failed", "timed out", "cancelled", "lost", "stopped")


@dataclass
class JobResult:
    """What became of one job. ``status``: done, one of BAD_STATUSES, or not started; a
    look at a detached grid (``--runner-status``) also finds jobs pending or running."""

    job: object  # mirage.grid.expand.Job
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
    log.write(f"==== runner: attempt {attempt}/{attempts}, {stamp}{where}{_slurm_place()} "
              f"====\n$ {shlex.join(command)}\n")
    log.flush()


def _slurm_place():
    """', SLURM job 7_2 on node-3 (restart 1)' inside a SLURM job, else ''; a requeued task
    appends to the same log, and the restart count tells its runs apart."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return ""
    if os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ.get('SLURM_ARRAY_JOB_ID')}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    again = f" (restart {restarts})" if restarts not in ("", "0") else ""
    return f", SLURM job {job} on {os.environ.get('SLURMD_NODENAME', '?')}{again}"


def _child_env(gpu=None):
    """The environment of a job whose output goes to a log file."""
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")  # Python children write their logs as they go
    for name, value in LOG_BAR_ENV.items():
        env.setdefault(name, value)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    return env


def format_seconds(seconds):
    """3600 -> '1h', 90 -> '90s', 5400 -> '90m': the unit --runner-timeout was likely given in."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def format_exit(code):
    """'exit 1', 'exit -9 (SIGKILL)' or 'no exit code': a job's exit status in words."""
    if code is None:
        return "no exit code"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"exit {code} ({signal.Signals(-code).name})"
    return f"exit {code}"


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
    started: float  # time.monotonic() at its start
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
        self.done_seconds = []  # how long each job that succeeded ran (for the estimate)

    def run(self):
        """Run every job; returns (results in grid order, interrupted?)."""
        interrupted = False
        bar = progress_bar(self.total)
        try:
            while self.pending or self.running:
                self._start_ready()
                self._enforce_timeouts()
                self._reap()
                show_progress(bar, self.results.values(), len(self.running),
                              self._estimate())
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
            self.running[proc] = _Running(job, attempt, gpu, log, deadline,
                                          started=time.monotonic())

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
            if proc.returncode == 0:
                self.done_seconds.append(time.monotonic() - run.started)
            self._finish(run.job, run.attempt, proc.returncode, run.gpu, timed_out)

    def _estimate(self):
        """The time-left words of the progress line (see time_left_estimate); None once
        nothing is left."""
        if not (self.pending or self.running):
            return None
        now = time.monotonic()
        left = time_left_estimate(self.done_seconds,
                                  [now - run.started for run in self.running.values()],
                                  len(self.pending), self.parallel)
        if left is None:
            return "no estimate before the first job is done"
        mean = sum(self.done_seconds) / len(self.done_seconds)
        return f"estimate: {format_duration(left)} left (mean job {format_duration(mean)})"

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
                                            note=failure_note(code, log_path, self.retries))
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


def failure_note(code, log_path, retries):
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


# The runner's progress line: finished/total, elapsed time and the counts. tqdm's own rate
# and time left ({rate}, {remaining}) are left out: its rate over jobs of very different
# lengths jumps (a few quick failures make a long grid look nearly done).
PROGRESS_FORMAT = "{desc}: {n_fmt}/{total_fmt} jobs finished |{bar}| {elapsed} elapsed{postfix}"


def progress_bar(total):
    """The runner's live progress line (on stderr)."""
    return tqdm(total=total, desc="runner", unit="job", dynamic_ncols=True,
                bar_format=PROGRESS_FORMAT)


def show_progress(bar, results, running, estimate=None):
    """Redraw the line when a count changed, else at most once a second (elapsed time).
    ``estimate``: words on the time left, or None for none (e.g. a SLURM queue)."""
    results = list(results)
    counts = {status: sum(r.status == status for r in results)
              for status in ("done", "failed", "timed out", "cancelled", "lost")}
    state = (tuple(counts.values()), running)
    now = time.monotonic()
    if state == getattr(bar, "runner_state", None) and now - bar.runner_shown < 1.0:
        return
    bar.runner_state, bar.runner_shown = state, now
    # done and failed always, the rarer outcomes once they happen
    text = "".join(f"{status} {count}, " for status, count in counts.items()
                   if count or status in ("done", "failed")) + f"running {running}"
    bar.set_postfix_str(text + (f"; {estimate}" if estimate else ""), refresh=False)
    bar.update(len(results) - bar.n)  # redraws, also when the count is unchanged
    bar.refresh()


def time_left_estimate(done_seconds, running_seconds, pending, parallel):
    """Seconds until every job is finished, from the mean time of the jobs done so far:
    a mean job for each pending job, the rest of one for each running job (none once it
    ran longer), the sum shared by the jobs that can run at once. None before the first
    job is done (nothing measured: no guess)."""
    if not done_seconds:
        return None
    mean = sum(done_seconds) / len(done_seconds)
    work = pending * mean + sum(max(mean - seconds, 0.0) for seconds in running_seconds)
    slots = max(1, min(parallel, pending + len(running_seconds)))
    return work / slots


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


# ----------------------------------------------------------------------------- one command


def run_one_command(command, log_path, retries=0, timeout_s=None, grace_s=STOP_GRACE_S):
    """Body of one array task: run ``command`` (a list, no shell), appending its output to
    ``log_path``, up to ``retries`` more times until it exits with 0 (never again after
    exit 2, a user error). With ``timeout_s`` an attempt that runs longer has its process
    group stopped (SIGTERM, SIGKILL after ``grace_s``). On SLURM, a SIGTERM to the task
    stops the command the same way and ends the task with exit status 143 and no result.

    Returns {"exit_code": int, "attempts": int, "timed_out": bool}. Uses only the standard
    library because it is pickled by value and runs on the cluster node.
    """
    env = _child_env()
    attempts = retries + 1
    code, attempt, timed_out = 127, 0, False
    with _slurm_signals(log_path) as warning:
        try:
            for attempt in range(1, attempts + 1):
                with open(log_path, "a", encoding="utf-8") as log:
                    _write_attempt_header(log, command, attempt, attempts,
                                          os.environ.get("CUDA_VISIBLE_DEVICES"))
                    code, timed_out = _run_attempt(command, log, env, timeout_s, grace_s,
                                                   ignore=warning)
                if code == 0 or code == EXIT_USER_ERROR:
                    break
                if warning is not None and attempt < attempts:
                    # SLURM signals every process of the task; the command may have died of
                    # it a moment before the SIGTERM reaches this process. No retry then.
                    time.sleep(SIGNAL_SETTLE_S)
        except _EndedBySlurm as ended:
            name = signal.Signals(ended.signum).name
            _append_line(log_path, f"==== runner: ended by SLURM ({name}: the task was "
                                   "cancelled, reached its time limit, was preempted or "
                                   "requeued, or its node is going down) ====")
            raise SystemExit(128 + ended.signum) from None
    return {"exit_code": code, "attempts": attempt, "timed_out": timed_out}


def _run_attempt(command, log, env, timeout_s, grace_s, ignore=None):
    """One run of ``command`` with its output in ``log``; (exit code, timed out?).
    ``ignore``: a signal the command (and what it starts) ignores, unless it handles it."""

    def ignore_signal():  # in the child, before exec: SIG_IGN, unlike a handler, persists
        signal.signal(ignore, signal.SIG_IGN)

    try:
        # A process group of its own only when it may have to be stopped as a whole.
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=env,
                                start_new_session=timeout_s is not None,
                                preexec_fn=ignore_signal if ignore is not None else None)
    except OSError as err:
        log.write(f"runner: could not start the command: {err}\n")
        return 127, False
    own_group = timeout_s is not None
    try:
        return proc.wait(timeout=timeout_s), False
    except subprocess.TimeoutExpired:
        log.write(f"\n==== runner: timed out after {format_seconds(timeout_s)} "
                  "(--runner-timeout); stopping the job's process group ====\n")
        log.flush()
        return _stop_child(proc, own_group, grace_s), True
    except _EndedBySlurm:
        # SLURM's proctrack usually signals the command itself too, but not one in a
        # session of its own (proctrack/pgid): pass it on, and give it the grace to exit.
        _stop_child(proc, own_group, grace_s)
        raise
    except BaseException:  # the task itself is being cancelled
        if own_group:
            _signal_group(proc, signal.SIGKILL)
        else:
            proc.kill()
        raise


def _stop_child(proc, own_group, grace_s):
    """SIGTERM to the command (its whole group if it has one), SIGKILL after ``grace_s``;
    returns its exit code."""
    stop = _signal_group if own_group else (lambda p, sig: p.send_signal(sig))
    stop(proc, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    if own_group:
        _signal_group(proc, signal.SIGKILL)  # also what of the group outlived the command
    elif proc.poll() is None:
        proc.kill()
    return proc.wait()


def _append_line(path, line):
    with contextlib.suppress(OSError), open(path, "a", encoding="utf-8") as log:
        log.write(f"\n{line}\n")


class _EndedBySlurm(BaseException):
    """SLURM sent the task SIGTERM. Not an Exception, so that submitit writes no result for
    the task: its fate is then read from SLURM's queue (cancelled, timed out), and a task
    that SLURM requeues is not taken for a finished one while it waits to run again."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _slurm_signals(log_path):
    """Inside a submitit task on SLURM, for the duration of the block: SIGTERM raises
    _EndedBySlurm (once; a second SIGTERM is ignored while the command is being stopped),
    and the block gets submitit's warning signal (SIGUSR2), else None.

    submitit asks SLURM to send that signal 90 s before the time limit (at once when the
    limit is shorter) to every process of the task. Its own handler would end a task that
    is not checkpointable there and then, 90 s early and reported as failed instead of
    timed out, and the command would die of it (the default action of SIGUSR2): so the
    task only notes it in the log, and the command ignores it. Elsewhere (here, or in
    submitit's local executor) nothing changes.
    """
    if (os.environ.get("SUBMITIT_EXECUTOR") != "slurm"
            or threading.current_thread() is not threading.main_thread()):
        yield None
        return
    warning = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"),
                      signal.SIGUSR2)

    def note(signum, frame):
        _append_line(log_path, f"==== runner: SLURM sent {signal.Signals(signum).name} (its "
                               "time limit is near, or preemption); the command goes on ====")

    def end(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise _EndedBySlurm(signum)

    previous = {warning: signal.signal(warning, note),
                signal.SIGTERM: signal.signal(signal.SIGTERM, end)}
    try:
        yield warning
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
