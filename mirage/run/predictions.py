"""Prediction folders sealed to the checkpoint and the data that made them.

``run_seg_tuning.py --infer_only --test`` writes every PNG into a temporary folder next to
``preds/`` and, once all are written, adds ``config_infer.yaml`` (the options of that
inference) and ``manifest.json``, and swaps the folder in: a killed inference leaves the
previous ``preds/`` untouched, never a mix. The manifest records

- the checkpoint (file name, epoch, SHA-256) and its class table,
- the data predicted: the test split's folder, the class table file's SHA-256 and, per
  B-scan, its file size and SHA-256,
- every prediction file's size and SHA-256,
- the test-time augmentation (``tta``: 'none' or 'flip'; manifests written before it
  existed are 'none').

``run_seg_eval.py`` calls :func:`check_predictions` and refuses a folder whose manifest is
missing or from an earlier version, whose files were changed, added or removed, whose
B-scans are not the ones of the dataset being scored, or whose checkpoint is not the run's
current ``checkpoint-best.pth``. Inference calls :func:`up_to_date` and predicts again
when anything it would write differs.
"""
import json
import time
from pathlib import Path

from mirage.errors import UserError
from mirage.fileio import file_sha256, write_text

MANIFEST = "manifest.json"
INFERENCE_RECORD = "config_infer.yaml"  # the options of the inference, inside its folder
FORMAT = 2  # 1: slice list only (no file or data hashes)
# run_seg_predict.py's record of its output folder (mirage/predict_cli.py spells it too)
PREDICTION_RECORD = "prediction_record.json"


def file_entry(path):
    """``[size in bytes, SHA-256]`` of a file."""
    return [Path(path).stat().st_size, file_sha256(path)]


def data_record(split_dir, bscans, class_table_file):
    """What a prediction folder was predicted from: the split folder, the SHA-256 of its
    class table (INFO.json or --mapping_fn) and ``{slice id: [size, SHA-256]}`` of the
    B-scans (``bscans``: ``{slice id: path}``)."""
    return {"split": str(Path(split_dir).resolve()),
            "class_table_sha256": file_sha256(class_table_file),
            "bscans": {slice_id: file_entry(path) for slice_id, path in sorted(bscans.items())}}


def _prediction_files(folder):
    """``{file name: path}`` of the files a manifest seals (all but its own records)."""
    return {p.name: p for p in Path(folder).iterdir()
            if p.is_file() and p.name not in (MANIFEST, INFERENCE_RECORD)
            and not p.name.startswith(".")}


def write_manifest(folder, checkpoint, epoch, classes, slice_ids, data=None, tta="none"):
    """``manifest.json`` for predictions of ``checkpoint`` (a path) over ``slice_ids``,
    sealing every file now in ``folder``; ``data``: :func:`data_record` of the B-scans
    predicted (None: not recorded, so scoring cannot check which data was predicted);
    ``tta``: the test-time augmentation they were predicted with."""
    checkpoint = Path(checkpoint)
    manifest = {
        "format": FORMAT,
        "checkpoint": checkpoint.name,
        "checkpoint_sha256": file_sha256(checkpoint),
        "epoch": epoch,
        "classes": classes.entries(),
        "slices": sorted(slice_ids),
        "files": {name: file_entry(path)
                  for name, path in sorted(_prediction_files(folder).items())},
        "data": data,
        "tta": tta,
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    write_text(Path(folder) / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def foreign_entries(folder):
    """Names of what a predictions folder holds that inference did not write there: not
    its records, not a file its manifest seals (without a readable manifest: not a PNG).
    Re-inference replaces the folder whole, so these would be lost."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    sealed = set((read_manifest(folder) or {}).get("files") or {})

    def written_by_inference(path):
        if path.name in (MANIFEST, INFERENCE_RECORD) or path.name in sealed:
            return True
        return not sealed and path.is_file() and path.suffix.lower() == ".png"

    return sorted(p.name for p in folder.iterdir() if not written_by_inference(p))


def read_manifest(folder):
    """The manifest of a predictions folder, or None if it has none (or an unreadable one)."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) and "slices" in manifest else None


def changed_file(folder, manifest):
    """The first way ``folder``'s files differ from what ``manifest`` sealed, as text
    ("<name> was changed", ...), or None when they are exactly the sealed files."""
    sealed = manifest.get("files")
    if not isinstance(sealed, dict):
        return "its manifest is from an earlier version and seals no file contents"
    on_disk = _prediction_files(folder)
    for name in sorted(set(sealed) | set(on_disk)):
        if name not in on_disk:
            return f"{name} is missing"
        if name not in sealed:
            return f"{name} is not in the manifest"
        if file_entry(on_disk[name]) != list(sealed[name]):
            return f"{name} was changed after it was written"
    return None


def changed_data(manifest, data):
    """The first way ``data`` (a :func:`data_record`) differs from the data the manifest's
    predictions were made from, as text, or None. Only the B-scans that both hold are
    compared; a manifest without a data record cannot be checked (None)."""
    sealed = manifest.get("data")
    if not isinstance(sealed, dict) or data is None:
        return None
    predicted, current = sealed.get("bscans") or {}, data["bscans"]
    for slice_id in sorted(set(predicted) & set(current)):
        if list(predicted[slice_id]) != list(current[slice_id]):
            return (f"B-scan {slice_id} of {data['split']} is not the one predicted (from "
                    f"{sealed.get('split')})")
    return None


def prediction_tta(manifest):
    """The test-time augmentation a manifest (or ``prediction_record.json``) records:
    'none' for one written before TTA existed."""
    return str((manifest or {}).get("tta") or "none")


def prediction_source(folder):
    """What made a prediction folder, read leniently (None when neither record is
    readable): ``{"runs": [{run_dir, checkpoint, checkpoint_sha256, epoch}], "tta",
    "ensemble"}`` from the ``manifest.json`` of ``--infer_only --test`` (the run is the
    folder's parent) or the ``prediction_record.json`` of ``run_seg_predict.py`` (several
    runs: an ensemble; a record written before ensembles existed names one run).
    For the catalog and scoring, so that a score says what it scores."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is not None:
        runs = [{"run_dir": str(folder.resolve().parent),
                 "checkpoint": manifest.get("checkpoint"),
                 "checkpoint_sha256": manifest.get("checkpoint_sha256"),
                 "epoch": manifest.get("epoch")}]
        return {"runs": runs, "tta": prediction_tta(manifest), "ensemble": False}
    try:
        record = json.loads((folder / PREDICTION_RECORD).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict):
        return None
    runs = record.get("runs")
    if not isinstance(runs, list):
        runs = ([{"run_dir": record["run_dir"], "epoch": record.get("epoch")}]
                if "run_dir" in record else [])
    return {"runs": runs, "tta": prediction_tta(record), "ensemble": len(runs) > 1}


def up_to_date(folder, checkpoint, slice_ids, classes, data, tta="none"):
    """True when ``folder`` holds, unchanged, ``checkpoint``'s predictions of exactly
    ``slice_ids`` in ``classes``, made from ``data`` (a :func:`data_record`) with the
    test-time augmentation ``tta``."""
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("checkpoint_sha256") != file_sha256(checkpoint):
        return False
    return (sorted(slice_ids) == manifest["slices"] and prediction_tta(manifest) == tta
            and manifest.get("classes") == classes.entries()
            and (manifest.get("data") or {}).get("bscans") == data["bscans"]
            and (manifest.get("data") or {}).get("class_table_sha256")
            == data["class_table_sha256"]
            and changed_file(folder, manifest) is None)


def check_predictions(pred_dir, run_dir, rerun_hint, data=None):
    """Refuse predictions that cannot be tied to the run's current best checkpoint, whose
    files changed after inference, or that were predicted from other B-scans than ``data``
    (a :func:`data_record` of the dataset being scored; None: not checked).

    Returns ``(manifest, note)``: note (str) when the check passes with a caveat (the
    checkpoint is gone), else "". ``rerun_hint``: the command that rewrites the predictions.
    """
    pred_dir, run_dir = Path(pred_dir), Path(run_dir)
    manifest = read_manifest(pred_dir)
    if manifest is None:
        raise UserError(f"{pred_dir} has no {MANIFEST}: it was not (completely) written by "
                        f"run_seg_tuning.py --infer_only --test; {rerun_hint}, or pass "
                        "--foreign_predictions to score predictions made by another tool")
    on_disk = {p.stem for p in _prediction_files(pred_dir).values()}
    listed = set(manifest["slices"])
    if on_disk != listed:
        extra, missing = sorted(on_disk - listed), sorted(listed - on_disk)
        detail = (f"{len(missing)} listed file(s) missing, e.g. {missing[0]}" if missing
                  else f"{len(extra)} file(s) not in the manifest, e.g. {extra[0]}")
        raise UserError(f"{pred_dir}: its files differ from its {MANIFEST} ({detail}); "
                        f"{rerun_hint}")
    problem = changed_file(pred_dir, manifest)
    if problem:
        raise UserError(f"{pred_dir}: {problem}; {rerun_hint}, or pass "
                        "--foreign_predictions to score the files as they are")
    problem = changed_data(manifest, data)
    if problem:
        raise UserError(f"{pred_dir} was predicted from other data: {problem}; {rerun_hint} "
                        "with --data_path set to the dataset you score")
    best = run_dir / manifest.get("checkpoint", "checkpoint-best.pth")
    if not best.is_file():
        return manifest, (f"{best.name} is no longer in {run_dir}: the predictions' "
                          f"checkpoint (epoch {manifest.get('epoch')}) cannot be verified")
    if file_sha256(best) != manifest.get("checkpoint_sha256"):
        raise UserError(f"{pred_dir} holds predictions of an earlier {best.name} (epoch "
                        f"{manifest.get('epoch')}); the run has a newer one: {rerun_hint}")
    return manifest, ""
