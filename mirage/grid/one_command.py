"""Running one command: retries, a time limit, its log header and environment, SLURM's signals.

:func:`run_one_command` runs one command with retries and a time limit, appending each
attempt to the job's log file and stopping the command's whole process group when it runs
too long; it is the body of each SLURM array task (:mod:`mirage.grid.slurm` pickles this
module by value, so what it uses must live here, and it imports only the standard
library). The local pool (:mod:`mirage.grid.local`) gives its children the same log header
and environment (:func:`write_attempt_header`, :func:`child_env`) and stops a job's
process group with :func:`signal_group`.

Inside a SLURM array task, SIGTERM (cancelled, time limit, preemption, requeue, node going
down) stops the command and ends the task without a result, so that the runner takes the
task's fate from SLURM's queue; the early warning submitit asks SLURM for (SIGUSR2) is only
noted in the log (see :func:`_slurm_signals`).
"""
import contextlib
import datetime
import os
import shlex
import signal
import subprocess
import threading
import time

EXIT_USER_ERROR = 2  # the project's scripts (and argparse) exit 2 for bad input
STOP_GRACE_S = 10.0  # after Ctrl-C or a timeout, how long a job may take to exit before SIGKILL
SIGNAL_SETTLE_S = 1.0  # in a SLURM task, the pause before a retry (see run_one_command)
# A job's output goes to its log file, where every redraw of a progress bar is kept: the
# children's tqdm bars (tqdm >= 4.66 reads TQDM_* variables as its defaults) show only
# once a bar has run this long, and redraw at most this often. Set them yourself to
# override.
LOG_BAR_ENV = {"TQDM_DELAY": "30", "TQDM_MININTERVAL": "30"}


def write_attempt_header(log, command, attempt, attempts, gpus):
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


def child_env(gpu=None):
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


def signal_group(proc, sig):
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def run_one_command(command, log_path, retries=0, timeout_s=None, grace_s=STOP_GRACE_S):
    """Body of one array task: run ``command`` (a list, no shell), appending its output to
    ``log_path``, up to ``retries`` more times until it exits with 0 (never again after
    exit 2, a user error). With ``timeout_s`` an attempt that runs longer has its process
    group stopped (SIGTERM, SIGKILL after ``grace_s``). On SLURM, a SIGTERM to the task
    stops the command the same way and ends the task with exit status 143 and no result.

    Returns {"exit_code": int, "attempts": int, "timed_out": bool}. Uses only the standard
    library because it is pickled by value and runs on the cluster node.
    """
    env = child_env()
    attempts = retries + 1
    code, attempt, timed_out = 127, 0, False
    with _slurm_signals(log_path) as warning:
        try:
            for attempt in range(1, attempts + 1):
                with open(log_path, "a", encoding="utf-8") as log:
                    write_attempt_header(log, command, attempt, attempts,
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
            signal_group(proc, signal.SIGKILL)
        else:
            proc.kill()
        raise


def _stop_child(proc, own_group, grace_s):
    """SIGTERM to the command (its whole group if it has one), SIGKILL after ``grace_s``;
    returns its exit code."""
    stop = signal_group if own_group else (lambda p, sig: p.send_signal(sig))
    stop(proc, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    if own_group:
        signal_group(proc, signal.SIGKILL)  # also what of the group outlived the command
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
