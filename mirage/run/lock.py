"""The run directory's lock: one process writes into a run directory at a time.

``.lock`` holds the writer's pid, host and start time and, inside a SLURM job, the job
(``<array id>_<task>`` for an array task) and how often SLURM has restarted it. Another
live holder is an error naming it. A lock is stale, and replaced with a notice, when its
holder cannot be running any more:

- it names a process of this host that no longer exists;
- it was written by an earlier run of this very SLURM job (a lower restart count: SLURM
  requeued the job, on this node or another, after a preemption or a node failure);
- it names a SLURM job (of this cluster) that ``squeue`` does not show running: finished,
  forgotten, or pending again after a requeue.

A lock of another host that names no SLURM job (or when ``squeue`` cannot be asked) cannot
be checked, so the error says how to remove it. A run directory that the lock created and
that is still empty when the lock is released (a run that failed before writing anything:
bad weights, a dataset error) is removed again.
"""
import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from mirage.errors import UserError
from mirage.run.folder import LOCK

# squeue states in which a job's processes may still be alive (COMPLETING: being stopped).
SLURM_LIVE_STATES = {"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED",
                     "SIGNALING", "RESIZING", "STAGE_OUT"}


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def slurm_job_here():
    """This process's SLURM job as ``squeue -j`` takes it, or None outside SLURM. An array
    task is named ``<array id>_<task id>``: its own job id may equal the array's id, which
    ``squeue -j`` reads as every task of the array."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else job


def slurm_job_running(job, timeout_s=30):
    """Whether SLURM job ``job`` may still have processes running: True or False, or None
    when SLURM cannot be asked (no squeue here, no answer)."""
    if shutil.which("squeue") is None:
        return None
    try:
        out = subprocess.run(["squeue", "--noheader", "--states=all", "--format=%T",
                              f"--jobs={job}"], capture_output=True, text=True,
                             timeout=timeout_s)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        # A job SLURM no longer remembers (finished more than MinJobAge ago) is "invalid".
        return False if "Invalid job id" in out.stderr else None
    return any(state.strip() in SLURM_LIVE_STATES for state in out.stdout.splitlines())


def _identity():
    """What the lock says about its holder."""
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    job = slurm_job_here()
    if job:
        me["slurm_job"] = job
        me["slurm_restart"] = _int(os.environ.get("SLURM_RESTART_COUNT"), 0)
        me["slurm_cluster"] = os.environ.get("SLURM_CLUSTER_NAME", "")
    return me


def _int(value, default):
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


@contextlib.contextmanager
def run_lock(run_dir):
    """Hold ``run_dir/.lock`` for the duration of the block.

    Another live holder is an error naming its pid and host (and SLURM job); a stale lock
    (see the module's docstring) is replaced with a notice. If this call created
    ``run_dir`` and it holds nothing when the block ends (e.g. the weights could not be
    loaded), it is removed again.
    """
    run_dir = Path(run_dir)
    created = _make_run_dir(run_dir)
    path = run_dir / LOCK
    me = _identity()
    try:
        created = _acquire(path, me) or created
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            if _read_lock(path).get("pid") == me["pid"]:
                os.remove(path)
        if created:
            # A start that failed before writing anything (bad weights, a dataset error)
            # must not leave an empty run directory behind: it would look like a run.
            # rmdir removes only an empty folder, so what another process put there stays.
            with contextlib.suppress(OSError):
                run_dir.rmdir()


def stale_reason(holder, me):
    """Why the lock ``holder`` wrote is stale (its writer cannot be running), or None when
    it may be alive. ``me``: the identity of the process that wants the lock."""
    pid, job = holder.get("pid"), holder.get("slurm_job")
    if holder.get("host") == me["host"] and isinstance(pid, int) and not _pid_alive(pid):
        return f"process {pid} is no longer running"
    if not isinstance(job, str) or not job:
        return None
    theirs, ours = holder.get("slurm_cluster"), os.environ.get("SLURM_CLUSTER_NAME")
    if theirs and ours and theirs != ours:
        return None  # job numbers of another cluster: this one cannot tell
    if job == me.get("slurm_job"):
        # SLURM runs one instance of a job at a time: a lock of an earlier run of this job
        # was left by a run that SLURM ended (pid numbers of another node mean nothing).
        if _int(holder.get("slurm_restart"), 0) < me.get("slurm_restart", 0):
            return f"it was left by an earlier run of SLURM job {job}, requeued since"
        return None
    if slurm_job_running(job) is False:
        return f"SLURM job {job} that held it is no longer running"
    return None


def _acquire(path, me):
    """Create the lock file ``path`` holding ``me``, replacing a stale lock; True if its
    folder had to be made anew on the way."""
    run_dir, remade = path.parent, False
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            why = stale_reason(holder, me)
            if why:
                print(f">> note: removing a stale lock of process {holder.get('pid')} on "
                      f"{holder.get('host')} in {run_dir}: {why}", flush=True)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                continue
            job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
            raise UserError(
                f"{run_dir} is in use by process {holder.get('pid')} on "
                f"{holder.get('host')}{job} (since {holder.get('started')}); wait for it to "
                f"finish, or delete {path} if that process is gone") from None
        except FileNotFoundError:
            # The folder was just removed again by a process whose start failed (it
            # created the folder, found it empty on exit): make it anew and retry.
            remade = _make_run_dir(run_dir) or remade
            continue
        except OSError as err:
            raise UserError(f"cannot write {path}: {err.strerror or err}") from None
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(me, handle)
        return remade
    raise UserError(f"cannot take the lock {path}: it keeps changing; is another process "
                    f"starting in {run_dir}?")


def _make_run_dir(run_dir):
    """Create ``run_dir`` (and its parents); True if this call created the folder itself,
    False if it existed already."""
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        run_dir.mkdir()
        return True
    except FileExistsError:
        if run_dir.is_dir():
            return False
        raise UserError(f"cannot create the run directory {run_dir}: a file of that name "
                        "exists; move it away") from None
    except OSError as err:
        raise UserError(f"cannot create the run directory {run_dir}: "
                        f"{err.strerror or err}") from None


def _read_lock(path):
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except FileNotFoundError:
        return {"pid": -1, "host": socket.gethostname()}
    except (OSError, ValueError):
        # Being written right now by its holder, or damaged: treat as held by a live
        # process of unknown identity.
        return {"pid": "?", "host": "?"}
