"""Running the grid on this machine: the job pool, one GPU per job, retries, timeouts, Ctrl-C.

:class:`LocalPool` runs the grid's jobs as child processes, ``--runners`` at a time, each
optionally given one free GPU through ``CUDA_VISIBLE_DEVICES``. It appends each attempt to
the job's log file and stops a job's whole process group as :mod:`mirage.grid.one_command`
does for one command (the body of each SLURM array task). Also here: :class:`JobResult`,
what became of one job (locally or on SLURM), and how exit codes are worded.
"""
import contextlib
import math
import os
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

from mirage.grid.one_command import (EXIT_USER_ERROR, STOP_GRACE_S, child_env, format_seconds,
                                     signal_group, write_attempt_header)
from mirage.grid.progress import progress_bar, show_progress, time_left_estimate
from mirage.units import format_duration



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
            write_attempt_header(log, job.command, attempt, self.retries + 1, gpu)
            try:
                proc = subprocess.Popen(job.command, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, env=child_env(gpu),
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
                signal_group(proc, signal.SIGTERM)
                run.kill_at = now + self.stop_grace_s
            elif run.kill_at is not None and now >= run.kill_at:
                signal_group(proc, signal.SIGKILL)

    def _reap(self):
        for proc in [p for p in self.running if p.poll() is not None]:
            run = self.running.pop(proc)
            timed_out = run.kill_at is not None
            if timed_out:
                # Whatever of the job outlived its main process (workers that ignored
                # SIGTERM) would hold its GPU: the group goes entirely.
                signal_group(proc, signal.SIGKILL)
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
            signal_group(proc, signal.SIGINT)
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
            signal_group(proc, signal.SIGKILL)
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
