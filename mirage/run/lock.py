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

The lock appears only whole: its content is written to a temporary file beside it and
hard-linked to ``.lock``, which, like ``O_EXCL``, fails when ``.lock`` exists, so two
processes can never both take it. A full disk or a folder that cannot be written is an
error naming the run directory, and leaves no ``.lock`` behind: an empty one would name no
owner, and every later command on the run would have to refuse it. On a file system
without hard links the lock is created with ``O_EXCL`` and written, and removed again if
the write fails. A lock that is empty or not what this module writes (damaged by hand, or
by a crash of the machine) names itself and says how to clear it.
"""
import contextlib
import errno
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from mirage.errors import UserError
from mirage.run.folder import LOCK

# squeue states in which a job's processes may still be alive (COMPLETING: being stopped).
SLURM_LIVE_STATES = {"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED",
                     "SIGNALING", "RESIZING", "STAGE_OUT"}

# link() errors of a file system that has no hard links (FAT, some FUSE and SMB mounts).
_NO_HARD_LINKS = {errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}
# fsync() errors of a file system that does not sync (nothing was lost).
_NO_FSYNC = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}
# How long an empty lock may still be being written (on a file system without hard links,
# where it is created before it is written) before it counts as left behind.
SETTLE_S = 0.5


def _file_mode():
    mask = os.umask(0)
    os.umask(mask)
    return 0o644 & ~mask


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
    me, taken = _identity(), False
    try:
        created = _acquire(path, me) or created
        taken = True
        yield
    finally:
        # Only a lock this call took, and still ours: a refused call must not remove the
        # holder's lock, even one of the same pid (on another node, or in this process).
        if taken and _read_lock(path)[0] == me:
            with contextlib.suppress(FileNotFoundError):
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
            if _publish(path, json.dumps(me).encode("utf-8")):
                return remade
        except FileNotFoundError:
            # The folder was just removed again by a process whose start failed (it
            # created the folder, found it empty on exit): make it anew and retry.
            remade = _make_run_dir(run_dir) or remade
            continue
        except OSError as err:
            raise _lock_error(run_dir, err) from None
        holder = _holder(path)
        if holder is None:
            continue  # released in between
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
            f"finish, or delete {path} if that process is gone")
    raise UserError(f"cannot take the lock {path}: it keeps changing; is another process "
                    f"starting in {run_dir}?")


def _publish(path, content):
    """Make ``path`` hold ``content``, appearing only whole: False if ``path`` exists.
    Raises OSError (a full disk, a folder that cannot be written) leaving no file behind."""
    fd, tmp = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            os.fchmod(fd, _file_mode())  # mkstemp's file is its owner's only
            _write_all(fd, content)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as err:
            if err.errno not in _NO_HARD_LINKS:
                raise
            return _create_and_write(path, content)
        return True
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def _create_and_write(path, content):
    """``_publish`` without hard links: create ``path`` exclusively, then write it; on any
    failure it is removed again. False if ``path`` exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, _file_mode())
    except FileExistsError:
        return False
    try:
        try:
            _write_all(fd, content)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(path)
        raise
    return True


def _write_all(fd, content):
    """Write ``content`` to ``fd`` and sync it, so that after a crash of the machine the
    lock is not an empty file (the link can reach the disk before the data)."""
    view = memoryview(content)
    while view:
        view = view[os.write(fd, view):]
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in _NO_FSYNC:
            raise


def _lock_error(run_dir, err):
    """One line for a lock that cannot be written: a full disk, a read-only or a
    not writable folder."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(f"cannot lock the run directory {run_dir}: no space left on its "
                         "disk (or quota exceeded); free some space and run again")
    return UserError(f"cannot lock the run directory {run_dir}: {err.strerror or err}; "
                     "check that the folder is writable")


def _holder(path):
    """What the lock ``path`` says of its holder, or None if it is gone. A lock that holds
    no owner is an error naming it: it may be written this instant only where there are no
    hard links, so it is read again for :data:`SETTLE_S` before that."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        holder, problem = _read_lock(path)
        if problem is None or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    if problem is None:
        return holder
    raise UserError(f"the lock {path} {problem}, so it names no owner; delete {path} if no "
                    f"run_seg_tuning.py is running on {path.parent}")


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
    """``(holder, problem)``: the lock's content, ``(None, None)`` when there is no lock, or
    ``({}, what is wrong with it)`` when it holds no owner."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, None
    except OSError as err:
        return {}, f"cannot be read ({err.strerror or err})"
    except ValueError:
        return {}, "is not text"
    if not text.strip():
        return {}, "is empty"
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if not isinstance(data, dict) or "pid" not in data:
        return {}, "is not a lock this tool wrote"
    return data, None
