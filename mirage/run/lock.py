"""The run directory's lock: one process writes into a run directory at a time.

``.lock`` holds the writer's pid, host and start time. Another live holder is an error
naming it; a lock left by a dead process on this host is replaced with a notice; a lock of
another host cannot be checked, so the error says how to remove it. A run directory that
the lock created and that is still empty when the lock is released (a run that failed
before writing anything: bad weights, a dataset error) is removed again.
"""
import contextlib
import json
import os
import socket
import time
from pathlib import Path

from mirage.errors import UserError
from mirage.run.folder import LOCK


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def run_lock(run_dir):
    """Hold ``run_dir/.lock`` for the duration of the block.

    Another live holder is an error naming its pid and host; a lock left by a dead
    process on this host is replaced (with a notice). A lock of another host cannot be
    checked: the error says how to remove it. If this call created ``run_dir`` and it
    holds nothing when the block ends (e.g. the weights could not be loaded), it is
    removed again.
    """
    run_dir = Path(run_dir)
    created = _make_run_dir(run_dir)
    path = run_dir / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": time.strftime("%Y-%m-%d %H:%M:%S")}
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


def _acquire(path, me):
    """Create the lock file ``path`` holding ``me``, replacing a stale lock of this host;
    True if its folder had to be made anew on the way."""
    run_dir, remade = path.parent, False
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            pid = holder.get("pid")
            if holder.get("host") == me["host"] and isinstance(pid, int) \
                    and not _pid_alive(pid):
                print(f">> note: removing a stale lock of process {holder.get('pid')} "
                      f"(no longer running) in {run_dir}", flush=True)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                continue
            raise UserError(
                f"{run_dir} is in use by process {holder.get('pid')} on "
                f"{holder.get('host')} (since {holder.get('started')}); wait for it to "
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
