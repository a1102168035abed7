"""Prediction folders tied to the checkpoint that made them.

``run_seg_tuning.py --infer_only --test`` writes every PNG into a temporary folder next to
``preds/`` and, once all are written, adds ``manifest.json`` and swaps the folder in: a
killed inference leaves the previous ``preds/`` untouched, never a mix. The manifest
records the checkpoint (file name, epoch, SHA-256), the class table and the slice list.

``run_seg_eval.py`` calls :func:`check_predictions` and refuses a folder whose manifest is
missing, whose files differ from its slice list, or whose checkpoint is not the run's
current ``checkpoint-best.pth``.
"""
import json
import time
from pathlib import Path

from mirage.errors import UserError
from mirage.fileio import write_text
from mirage.fileio import file_sha256

MANIFEST = "manifest.json"


def write_manifest(folder, checkpoint, epoch, classes, slice_ids):
    """``manifest.json`` for predictions of ``checkpoint`` (a path) over ``slice_ids``."""
    checkpoint = Path(checkpoint)
    manifest = {
        "checkpoint": checkpoint.name,
        "checkpoint_sha256": file_sha256(checkpoint),
        "epoch": epoch,
        "classes": [[int(v), str(label)] for v, label in zip(classes.values, classes.labels)],
        "slices": sorted(slice_ids),
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    write_text(Path(folder) / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_manifest(folder):
    """The manifest of a predictions folder, or None if it has none (or an unreadable one)."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) and "slices" in manifest else None


def up_to_date(folder, checkpoint, slice_ids):
    """True when ``folder`` holds ``checkpoint``'s predictions of exactly ``slice_ids``."""
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("checkpoint_sha256") != file_sha256(checkpoint):
        return False
    on_disk = {p.stem for p in Path(folder).glob("*.png")}
    return sorted(slice_ids) == manifest["slices"] and on_disk == set(manifest["slices"])


def check_predictions(pred_dir, run_dir, rerun_hint):
    """Refuse predictions that cannot be tied to the run's current best checkpoint.

    Returns a note (str) when the check passes with a caveat (the checkpoint is gone),
    else None. ``rerun_hint``: the command that rewrites the predictions.
    """
    pred_dir, run_dir = Path(pred_dir), Path(run_dir)
    manifest = read_manifest(pred_dir)
    if manifest is None:
        raise UserError(f"{pred_dir} has no {MANIFEST}: it was not (completely) written by "
                        f"run_seg_tuning.py --infer_only --test; {rerun_hint}, or pass "
                        "--foreign_predictions to score predictions made by another tool")
    on_disk = {p.stem for p in pred_dir.iterdir()
               if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")}
    listed = set(manifest["slices"])
    if on_disk != listed:
        extra, missing = sorted(on_disk - listed), sorted(listed - on_disk)
        detail = (f"{len(missing)} listed file(s) missing, e.g. {missing[0]}" if missing
                  else f"{len(extra)} file(s) not in the manifest, e.g. {extra[0]}")
        raise UserError(f"{pred_dir}: its files differ from its {MANIFEST} ({detail}); "
                        f"{rerun_hint}")
    best = run_dir / manifest.get("checkpoint", "checkpoint-best.pth")
    if not best.is_file():
        return (f"{best.name} is no longer in {run_dir}: the predictions' checkpoint "
                f"(epoch {manifest.get('epoch')}) cannot be verified")
    if file_sha256(best) != manifest.get("checkpoint_sha256"):
        raise UserError(f"{pred_dir} holds predictions of an earlier {best.name} (epoch "
                        f"{manifest.get('epoch')}); the run has a newer one: {rerun_hint}")
    return None
