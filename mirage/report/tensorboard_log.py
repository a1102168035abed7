"""Training curves as TensorBoard event files, converted from log.txt (optional).

    write_tensorboard(run_dir, log_entries=None) -> the folder written, or None

Only when the ``tensorboard`` package is installed (``pip install tensorboard``); nothing
else needs it. Every number of log.txt becomes a scalar of the same name and unit
(``train/loss``, ``val/mIoU`` as a fraction, ``val/IoU/<class>`` ...), with the epoch as
the step; test lines (``test/mIoU``, ``test/IoU/<class>`` ...) go in at their
``test_epoch``, the epoch of the checkpoint tested. Events are written in step order: the
test line comes last in log.txt but its step is usually earlier, and TensorBoard drops
data that arrives out of step order. The folder ``<run>/tensorboard/`` is
rebuilt from the whole log each time (in a temporary folder, then swapped in), so calling
this after every epoch or after the fact gives the same files. View with
``tensorboard --logdir <base_output_dir>``.
"""
import importlib.util
import time

from mirage.fileio import atomic_folder
from mirage.run.folder import RunFolder
_EVENT_PREFIX = "events.out.tfevents."


def available():
    return importlib.util.find_spec("tensorboard") is not None


def _scalars(entry, prefix=""):
    """{tag: float} of one log entry; nested dicts (per-class IoU) become tag/key."""
    out = {}
    for key, value in entry.items():
        tag = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[tag] = float(value)
        elif isinstance(value, dict):
            out.update(_scalars(value, tag + "/"))
    return out


def _is_ours(folder):
    return all(p.is_file() and p.name.startswith(_EVENT_PREFIX) for p in folder.iterdir())


def write_tensorboard(run_dir, log_entries=None):
    """Write ``<run_dir>/tensorboard/`` from ``log_entries`` (default: the run's log.txt).

    Returns the folder, or None when tensorboard is not installed, the log has no
    entries, or the folder holds files this function did not write (left alone).
    """
    if not available():
        return None
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    folder = RunFolder(run_dir)
    entries = folder.read_log() if log_entries is None else list(log_entries)
    if not entries:
        return None
    target = folder.tensorboard_dir
    if target.exists() and not (target.is_dir() and _is_ours(target)):
        return None
    config = folder.config_file
    wall = config.stat().st_mtime if config.is_file() else time.time()
    events = []
    for entry in entries:
        step = _step(entry)
        wall += float(entry.get("time", 0) or 0) if step is not None else 0.0
        if step is not None:
            values = {tag: v for tag, v in _scalars(entry).items()
                      if tag not in ("epoch", "test_epoch", "time")}
            events.append((step, wall, values))
    with atomic_folder(target) as staging:
        writer = EventFileWriter(str(staging))
        for step, when, values in sorted(events, key=lambda e: e[0]):  # stable
            summary = Summary(value=[Summary.Value(tag=tag, simple_value=v)
                                     for tag, v in sorted(values.items())])
            writer.add_event(Event(wall_time=when, step=step, summary=summary))
        writer.close()
    return target


def _step(entry):
    """The step of a log entry: its epoch, or for a test line the epoch tested; None for
    lines with neither."""
    step = entry.get("epoch", entry.get("test_epoch"))
    return step if isinstance(step, int) and not isinstance(step, bool) else None
