"""The run directory's lock: one process writes into a run directory at a time.

``.lock`` holds the writer's pid, host and start time. Another live holder is an error
naming it; a lock left by a dead process on this host is replaced with a notice; a lock of
another host cannot be checked, so the error says how to remove it.
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
    checked: the error says how to remove it.
    """
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the run directory {run_dir}: "
                        f"{err.strerror or err}") from None
    path = run_dir / LOCK
    host = socket.gethostname()
    me = {"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            pid = holder.get("pid")
            if holder.get("host") == host and isinstance(pid, int) and not _pid_alive(pid):
                print(f">> note: removing a stale lock of process {holder.get('pid')} "
                      f"(no longer running) in {run_dir}", flush=True)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                continue
            raise UserError(
                f"{run_dir} is in use by process {holder.get('pid')} on "
                f"{holder.get('host')} (since {holder.get('started')}); wait for it to "
                f"finish, or delete {path} if that process is gone") from None
        except OSError as err:
            raise UserError(f"cannot write {path}: {err.strerror or err}") from None
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(me, handle)
        break
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            if _read_lock(path).get("pid") == me["pid"]:
                os.remove(path)


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
