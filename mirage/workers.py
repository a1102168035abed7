"""Worker processes that end with their parent.

A parent killed with SIGKILL (by a user, a scheduler or the OOM killer) cannot shut its
process pool down; without this its workers would go on computing for nobody, holding
CPUs and memory. Usage::

    ProcessPoolExecutor(max_workers=n, mp_context=context, **dying_with_parent())
"""
import ctypes
import os
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
POLL_S = 1.0  # where prctl is missing: how often a worker checks that its parent lives


def dying_with_parent():
    """Keyword arguments for ``ProcessPoolExecutor`` / ``multiprocessing.Pool``: an
    initializer that ends each worker when the process creating the pool dies."""
    return {"initializer": die_with_parent, "initargs": (os.getpid(),)}


def die_with_parent(parent_pid):
    """Pool initializer: SIGKILL this worker when ``parent_pid`` dies.

    Linux: the kernel sends the signal (``prctl(PR_SET_PDEATHSIG)``). Elsewhere: a daemon
    thread polls the parent pid once a second.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
        if armed:
            if os.getppid() != parent_pid:  # the parent died before prctl took effect
                os._exit(1)
            return
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True,
                     name="die-with-parent").start()


def _watch_parent(parent_pid):
    while os.getppid() == parent_pid:
        time.sleep(POLL_S)
    os._exit(1)
