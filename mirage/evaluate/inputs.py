"""A run's predictions, ground truth and class tables, found and checked before any image
is decoded.

What is read (docs/segmentation_tuning.md, "Evaluation (run_seg_eval.py)")::

    <model_path> = .../<dataset>/<run name>/        the run directory
    <model_path>/preds/<scan>_<slice>.png           or preds_<external>/, or *_pred.png
    <datasets_path>/<dataset>/INFO.json             class values and labels, and the
                                                    optional pixel spacing ("spacing")
    <datasets_path>/<dataset>/test/semseg/*.png     ground truth (or <external>/semseg/)

or an output folder of run_seg_predict.py (an ensemble, or one run with --tta flip) as
``<model_path>``: its PNGs are the predictions, its prediction_record.json names the runs
(the dataset is theirs) and the B-scans predicted (prepare_prediction_folder).
"""
import json
from dataclasses import dataclass
from pathlib import Path

from mirage.data.classes import ClassTable, Spacing, read_class_table, read_spacing, \
    spacing_from_values
from mirage.data.layout import parse_slice_name
from mirage.errors import UserError
from mirage.evaluate.class_plan import ClassPlan, plan_classes
from mirage.fileio import checked_image_size, file_sha256, list_images
from mirage.run.catalog import find_run_dirs
from mirage.run.folder import CONFIG, RunFolder, runs_named
from mirage.run.predictions import (MANIFEST, PREDICTION_RECORD, changed_data,
                                    check_predictions, data_record, file_entry,
                                    prediction_source)

_SHOW_MISSING = 5  # how many missing predictions an error message lists


@dataclass
class RunInputs:
    """Everything found and checked before any image is decoded.

    volumes: {scan_id: [(slice number, ground-truth path, prediction path), ...]} with
    slices in numerical order. spacing: the evaluated dataset's INFO.json "spacing" (a
    Spacing), or None.
    """

    run_dir: Path
    dataset: str
    external: str
    gt_dir: Path
    pred_dir: Path
    plan: ClassPlan
    volumes: dict
    unscored_predictions: int = 0
    note: str = ""  # a caveat about where the predictions come from
    spacing: object = None

    @property
    def num_slices(self):
        return sum(len(slices) for slices in self.volumes.values())


def _prediction_files(pred_dir):
    """{slice id: path} of a predictions folder; accepts <id>.png and older <id>_pred.png."""
    found = {}
    for path in list_images(pred_dir):
        stem = path.stem[:-len("_pred")] if path.stem.endswith("_pred") else path.stem
        if stem in found:
            raise UserError(f"{found[stem]} and {path} are both predictions for slice {stem}; "
                            "delete the stale one")
        found[stem] = path
    return found


def pair_slices(gt_dir, pred_dir):
    """Match every ground-truth mask with its prediction and group them into volumes.

    Returns ({scan_id: [(slice, gt_path, pred_path), ...]}, number of predictions that
    have no mask). Raises UserError for bad slice names, duplicate slices and masks
    without a prediction (never skipped silently).
    """
    masks = list_images(gt_dir)
    if not masks:
        raise UserError(f"no mask images in {gt_dir}; expected <scan_id>_<slice>.png files")
    predictions = _prediction_files(pred_dir)
    missing = [p.name for p in masks if p.stem not in predictions]
    if missing:
        shown = ", ".join(missing[:_SHOW_MISSING]) + (", ..." if len(missing) > _SHOW_MISSING
                                                      else "")
        raise UserError(f"{len(missing)} of {len(masks)} ground-truth slices have no "
                        f"prediction in {pred_dir} ({shown}); run inference on the whole "
                        "test set again")
    volumes = {}
    for mask in masks:
        scan_id, number = parse_slice_name(mask.stem, mask)
        volumes.setdefault(scan_id, []).append((number, mask, predictions[mask.stem]))
    for scan_id, slices in volumes.items():
        slices.sort(key=lambda s: s[0])
        for (a, path_a, _), (b, path_b, _) in zip(slices, slices[1:]):
            if a == b:
                raise UserError(f"{path_a.name} and {path_b.name} are both slice {a} of "
                                f"volume {scan_id}; rename one")
    unscored = len(predictions) - len(masks)
    return dict(sorted(volumes.items())), unscored


def prepare_run(model_path, datasets_path, external=None, ignore_bg=True,
                foreign_predictions=False):
    """Find and check a run's predictions, ground truth and class tables (no decoding).

    model_path: the run directory ``.../<dataset>/<run name>/``; the dataset is its parent
    folder's name. external: evaluate ``preds_<external>/`` against dataset ``external``.
    The predictions must carry the manifest of the run's current best checkpoint, with
    unchanged files, made from the B-scans of the dataset scored (mirage/run/predictions.py),
    unless ``foreign_predictions`` (made by another tool). Their pixel values are read
    with the class table the manifest records. The evaluated dataset's INFO.json
    "spacing", if any, becomes ``spacing`` (apply_spacing replaces it).
    """
    run_dir = Path(model_path).expanduser()
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} not found; pass -m/--model_path "
                        "<output>/<version>/<dataset>/<run name>/")
    run_dir = run_dir.resolve()
    if (run_dir / PREDICTION_RECORD).is_file() and not (run_dir / CONFIG).is_file():
        return prepare_prediction_folder(run_dir, datasets_path, external, ignore_bg,
                                         foreign_predictions)
    if not (run_dir / CONFIG).is_file() and _looks_like_data(run_dir):
        raise UserError(f"{run_dir} is not a run folder (no {CONFIG}; it looks like a "
                        "dataset folder): pass -m <output>/<version>/<dataset>/<run name>/ "
                        "as run_seg_tuning.py wrote it, and -d the folder holding the datasets")
    found = _locate(run_dir, Path(datasets_path).expanduser(), external)
    gt_table = read_class_table(found.gt_info)
    train_table = read_class_table(found.train_info) if external else None
    volumes, unscored = pair_slices(found.gt_dir, found.pred_dir)
    bscans = _bscans_of(found.gt_dir, volumes)
    check_mask_sizes(volumes, bscans)
    if foreign_predictions:
        note = "foreign predictions: not checked against the run's checkpoint"
    else:
        data = None if bscans is None else data_record(bscans_dir(found.gt_dir).parent,
                                                       bscans, found.gt_info)
        manifest, note = check_predictions(found.pred_dir, run_dir,
                                           found.hint.replace(" first", " again"), data)
        train_table = _prediction_classes(manifest, found.pred_dir, gt_table, train_table)
    plan = plan_classes(gt_table, train_table, ignore_bg)
    return RunInputs(run_dir=run_dir, dataset=external or found.dataset,
                     external=external or "", gt_dir=found.gt_dir, pred_dir=found.pred_dir,
                     plan=plan, volumes=volumes, unscored_predictions=unscored, note=note,
                     spacing=read_spacing(found.gt_info))


_DATA_MARKS = ("INFO.json", "bscan", "semseg", "train", "val", "test")  # benchmark layout


def _looks_like_data(folder):
    """True for a dataset folder in the benchmark layout, or a folder of them."""
    if any((folder / mark).exists() for mark in _DATA_MARKS):
        return True
    return any((child / "INFO.json").is_file() for child in folder.iterdir() if child.is_dir())


def _is_run_folder(folder):
    """A folder run_seg_tuning.py wrote (config.yaml), or one holding predictions or
    results (runs of other tools, and older runs, may have no config.yaml)."""
    return (folder / CONFIG).is_file() or any(
        child.name.startswith(("preds", "results")) for child in folder.iterdir())


def expand_run_paths(paths, external=None, need_predictions=True):
    """The run folders ``paths`` stand for: ([run folder, ...], [skipped run folder, ...],
    [note, ...]).

    A run folder, and any path that is not a folder, stays as given (prepare_run says
    what is wrong with it). A run name without its ``_s<seed>_<hash>`` ending, as the
    MIRAGE guide writes it, stands for every run folder of that name (a note says which).
    A folder that is not a run folder but holds run folders (an output root, as
    run_seg_report.py takes) stands for those of them that have predictions to score
    (``preds/``, or ``preds_<external>/``; all of them without ``need_predictions``); the
    others are skipped.
    """
    found, skipped, notes = [], [], []
    for given in paths:
        path = Path(given).expanduser()
        named = runs_named(path)
        if named and named != [path]:
            notes.append(f"{given} names {len(named)} run folder(s): "
                         f"{', '.join(p.name for p in named)}")
            found += named
            continue
        if not path.is_dir() or _is_run_folder(path):
            found.append(given)
            continue
        runs = find_run_dirs(path)
        if not runs or not need_predictions:
            found += runs or [given]  # none: prepare_run names the problem
            continue
        ready = [run for run in runs if RunFolder(run).preds_dir(external or "").is_dir()]
        if not ready:
            preds = f"preds_{external}/" if external else "preds/"
            raise UserError(f"{path} holds {len(runs)} run folder(s) but none has {preds} "
                            "to score; run run_seg_tuning.py ... --infer_only --test first")
        found += ready
        skipped += [run for run in runs if run not in ready]
    return found, skipped, notes


@dataclass
class _Located:
    dataset: str
    gt_dir: Path
    gt_info: Path
    train_info: Path
    pred_dir: Path
    hint: str


def _locate(run_dir, datasets_path, external, pred_dir=None):
    """The folders and class tables of a run's evaluation; UserError naming a missing one.
    ``pred_dir``: the predictions, in place of the run's preds/ (or preds_<external>/)."""
    dataset = run_dir.parent.name
    given_preds = pred_dir
    train_dir = datasets_path / dataset
    if not train_dir.is_dir():
        raise UserError(f"dataset folder {train_dir} not found (the dataset is the name of the "
                        f"run directory's parent folder, {dataset!r}); "
                        "set -d/--datasets_path to the folder holding it")
    if external:
        eval_dir = datasets_path / external
        if not eval_dir.is_dir():
            raise UserError(f"external dataset folder {eval_dir} not found; check -e/--external "
                            "and -d/--datasets_path")
        candidates = [eval_dir / "test" / "semseg", eval_dir / "semseg"]
        pred_dir = RunFolder(run_dir).preds_dir(external)
        hint = f"run inference on {external} first (predictions go to preds_{external}/)"
    else:
        eval_dir = train_dir
        candidates = [eval_dir / "test" / "semseg"]
        pred_dir = RunFolder(run_dir).preds_dir()
        hint = "run run_seg_tuning.py --infer_only --test on this run first"
    gt_dir = next((c for c in candidates if c.is_dir()), None)
    if gt_dir is None:
        raise UserError(f"ground-truth folder {' or '.join(map(str, candidates))} not found; "
                        "only datasets with test masks can be evaluated")
    pred_dir = Path(pred_dir) if given_preds else pred_dir
    if not pred_dir.is_dir():
        raise UserError(f"predictions folder {pred_dir} not found; {hint}")
    gt_info = eval_dir / "INFO.json"
    if not gt_info.is_file():
        raise UserError(f"{gt_info} not found; the dataset's class table is needed to read "
                        "its masks (see docs/segmentation_benchmark.md)")
    train_info = train_dir / "INFO.json"
    if external and not train_info.is_file():
        raise UserError(f"{train_info} not found; it gives the pixel values of the "
                        f"predictions in {pred_dir.name}/ (the training dataset's classes)")
    return _Located(dataset=dataset, gt_dir=gt_dir, gt_info=gt_info, train_info=train_info,
                    pred_dir=pred_dir, hint=hint)


def bscans_dir(gt_dir):
    """The B-scans of a masks folder: ``bscan/`` beside ``semseg/``."""
    return Path(gt_dir).parent / "bscan"


def _bscans_of(gt_dir, volumes):
    """{slice id: path} of the B-scans of the masks scored, or None for a dataset without
    a bscan/ folder (masks only)."""
    folder = bscans_dir(gt_dir)
    if not folder.is_dir():
        return None
    scored = {mask.stem for slices in volumes.values() for _, mask, _ in slices}
    return {p.stem: p for p in list_images(folder) if p.stem in scored}


def check_mask_sizes(volumes, bscans):
    """UserError naming the first mask whose size is not its B-scan's (headers only).

    Predictions are written at the B-scan's size, and training and run_seg_check_data.py
    refuse such a mask: scoring it would resize one of them and give another number than
    the dataset's own pairs. bscans: {slice id: path} (None: no B-scans to compare with).
    """
    if not bscans:
        return
    for slices in volumes.values():
        for _, mask, _ in slices:
            bscan = bscans.get(mask.stem)
            if bscan is None:
                continue
            (width, height) = checked_image_size(mask)
            (b_width, b_height) = checked_image_size(bscan)
            if (width, height) != (b_width, b_height):
                raise UserError(f"{mask} is {width}x{height} but its B-scan {bscan} is "
                                f"{b_width}x{b_height}; masks must match their B-scans "
                                "(predictions are at the B-scan's size): re-export the mask "
                                "at its B-scan's size, then check the dataset with "
                                "run_seg_check_data.py")


def _prediction_classes(manifest, pred_dir, gt_table, train_table):
    """The class table of the predictions' pixel values: the one their manifest records.

    Scoring on the run's own test set (``train_table`` None) needs the dataset's INFO.json
    to be that same table; returns None then (masks and predictions share it). Manifests
    that record no classes keep the INFO.json tables.
    """
    entries = [list(e) for e in manifest.get("classes") or []]
    if not entries:
        return train_table
    if train_table is None:
        if gt_table.entries() != entries:
            raise UserError(f"{gt_table.source} does not hold the classes the predictions in "
                            f"{pred_dir.name}/ were made with ({_difference(entries, gt_table)}); "
                            "restore it, or run inference again with this class table")
        return None
    return ClassTable.from_entries(entries, Path(pred_dir) / MANIFEST)


def _difference(entries, table):
    """The first difference between manifest class entries and a ClassTable, as text."""
    recorded = {int(v): str(label) for v, label in entries}
    current = dict(zip(table.values, table.labels))
    for value in sorted(set(recorded) | set(current)):
        if value not in current:
            return f"value {value} ({recorded[value]!r}) is not in it"
        if value not in recorded:
            return f"value {value} ({current[value]!r}) was not a class of the predictions"
        if recorded[value] != current[value]:
            return (f"value {value} is {current[value]!r} there but was "
                    f"{recorded[value]!r} for the predictions")
    return "the classes are in another order"


def apply_spacing(prepared, spacing):
    """Give every run's inputs (RunInputs) the spacing of run_seg_eval.py --spacing, in
    place of their datasets' INFO.json spacing; returns it as a Spacing (None: none given,
    INFO.json's kept). ``spacing``: (axial, lateral[, B-scan]) micrometres, a Spacing, or
    None. UserError for bad numbers, and for runs scoring several datasets: one spacing
    for datasets of different devices would give wrong micrometres.
    """
    if spacing is None:
        return None
    if not isinstance(spacing, Spacing):
        spacing = spacing_from_values(spacing)
    datasets = sorted({inputs.dataset for inputs in prepared})
    if len(datasets) > 1:
        raise UserError(f"--spacing gives one spacing but the runs score {len(datasets)} "
                        f"datasets ({', '.join(datasets)}); score each dataset on its own, "
                        'or give each its "spacing" in its INFO.json')
    for inputs in prepared:
        inputs.spacing = spacing
    return spacing


def prepare_prediction_folder(folder, datasets_path, external=None, ignore_bg=True,
                              foreign_predictions=False):
    """RunInputs of an output folder of run_seg_predict.py scored as a run (``run_seg_eval.py
    -m OUT``): its PNGs against the test masks of its runs' dataset (or ``external``).

    UserError (one line) when its prediction_record.json names no runs, runs of different
    datasets, a run whose checkpoint is not the one that predicted (its checkpoint-best.pth
    changed since), or B-scans other than the ones of the split scored; unless
    ``foreign_predictions``, which skips the checkpoint and data checks.
    """
    folder = Path(folder).resolve()
    source = prediction_source(folder)
    runs = [r for r in (source or {}).get("runs") or [] if isinstance(r, dict)]
    if not runs or not all(r.get("run_dir") for r in runs):
        raise UserError(f"{folder / PREDICTION_RECORD} names no runs that made the "
                        "predictions; predict again with run_seg_predict.py --run_dir ...")
    run_dirs = [Path(r["run_dir"]) for r in runs]
    datasets = sorted({d.parent.name for d in run_dirs})
    if len(datasets) > 1:
        raise UserError(f"{folder}: its runs were trained on different datasets "
                        f"({', '.join(datasets)}); score the predictions of one dataset's runs")
    record = _read_record(folder)
    found = _locate(run_dirs[0], Path(datasets_path).expanduser(), external, pred_dir=folder)
    gt_table = read_class_table(found.gt_info)
    train_table = read_class_table(found.train_info) if external else None
    volumes, unscored = pair_slices(found.gt_dir, folder)
    bscans = _bscans_of(found.gt_dir, volumes)
    check_mask_sizes(volumes, bscans)
    what = (f"ensemble of {len(runs)} runs ({', '.join(d.name for d in run_dirs)})"
            if len(runs) > 1 else f"run {run_dirs[0].name}")
    notes = [f"{what}, tta {source.get('tta') or 'none'}"]
    if foreign_predictions:
        notes.append("foreign predictions: not checked against the runs' checkpoints")
    else:
        notes += [n for n in (_check_member(folder, r) for r in runs) if n]
        _check_inputs(folder, record, volumes, bscans, found.gt_info)
        train_table = _prediction_classes(record, folder, gt_table, train_table)
    plan = plan_classes(gt_table, train_table, ignore_bg)
    return RunInputs(run_dir=folder, dataset=external or found.dataset,
                     external=external or "", gt_dir=found.gt_dir, pred_dir=folder,
                     plan=plan, volumes=volumes, unscored_predictions=unscored,
                     note="; ".join(notes), spacing=read_spacing(found.gt_info))


def _read_record(folder):
    try:
        record = json.loads((folder / PREDICTION_RECORD).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        record = None
    return record if isinstance(record, dict) else {}


def _check_member(folder, entry):
    """UserError when a run's checkpoint changed since it predicted ``folder``; a note
    (str) when it is gone, else ""."""
    run_dir = Path(entry["run_dir"])
    best = run_dir / str(entry.get("checkpoint") or "checkpoint-best.pth")
    if not best.is_file():
        return (f"{best.name} is no longer in {run_dir}: its checkpoint (epoch "
                f"{entry.get('epoch')}) cannot be verified")
    if file_sha256(best) != entry.get("checkpoint_sha256"):
        raise UserError(f"{folder} holds predictions of an earlier {best.name} of run "
                        f"{run_dir} (epoch {entry.get('epoch')}); that run has a newer one: "
                        "predict again with run_seg_predict.py")
    return ""


def _check_inputs(folder, record, volumes, bscans, class_table_file):
    """UserError unless the B-scans prediction_record.json says were predicted are the
    scored split's: each input's size and SHA-256 as it was predicted (``input_files``)
    against the split's files now; a record written before those were kept, the input
    files as they are now where they are not the split's own (changed_data)."""
    inputs = record.get("inputs")
    if not isinstance(inputs, dict) or bscans is None:
        return  # an older record, or masks without B-scans: nothing to compare
    scored = [mask.stem for slices in volumes.values() for _, mask, _ in slices]
    unknown = [stem for stem in scored if stem not in inputs]
    if unknown:
        raise UserError(f"{folder}: {PREDICTION_RECORD} records no input B-scan for "
                        f"{len(unknown)} scored slice(s), e.g. {unknown[0]}; predict the "
                        "test split's bscan/ folder again with run_seg_predict.py")
    sealed = record.get("input_files")
    if isinstance(sealed, dict):
        predicted = {stem: sealed[stem] for stem in scored
                     if stem in bscans and stem in sealed}
    else:
        differ = {stem: Path(inputs[stem]) for stem in scored if stem in bscans
                  and Path(inputs[stem]).resolve() != Path(bscans[stem]).resolve()}
        gone = next((path for path in differ.values() if not path.is_file()), None)
        if gone is not None:
            raise UserError(f"{folder} was predicted from {gone}, which is gone: it cannot "
                            "be checked to be the scored split's B-scan; predict the test "
                            "split again with run_seg_predict.py")
        predicted = {stem: file_entry(path) for stem, path in differ.items()}
    if not predicted:
        return
    split = bscans_dir(next(iter(volumes.values()))[0][1].parent).parent
    problem = changed_data(
        {"data": {"split": f"the inputs in {PREDICTION_RECORD}", "bscans": predicted}},
        data_record(split, {stem: bscans[stem] for stem in predicted}, class_table_file))
    if problem:
        raise UserError(f"{folder} was predicted from other data: {problem}; predict the "
                        "test split of the dataset you score with run_seg_predict.py")
