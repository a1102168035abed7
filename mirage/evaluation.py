"""Per-volume evaluation of a run's test predictions: Dice, IoU and HD95 into CSV files.

    evaluate_run(model_path, datasets_path, ...)  -> RunEvaluation (rows, means, files)
    write_summary(evaluations, path)              -> one row per run and class group

What is read (docs/segmentation_tuning.md, "Evaluation (run_seg_eval.py)")::

    <model_path> = .../<dataset>/<run name>/        the run directory
    <model_path>/preds/<scan>_<slice>.png           or preds_<external>/, or *_pred.png
    <datasets_path>/<dataset>/INFO.json             class values and labels
    <datasets_path>/<dataset>/test/semseg/*.png     ground truth (or <external>/semseg/)

Scores are per volume (all B-scans sharing ``<scan>``) and per foreground class, one CSV
row each. The arithmetic lives in mirage.metrics; this module finds and checks the files,
maps pixel values to classes, spreads the B-scans over worker processes, aggregates per
volume, and writes and prints the results.
"""
import contextlib
import math
import multiprocessing
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from mirage.data import UNKNOWN_CLASS, parse_slice_name, read_class_table
from mirage.errors import UserError
from mirage.fileio import atomic_path, list_images, read_gray
from mirage.metrics import dice_score, hd95_per_class, iou_score
from mirage.workers import dying_with_parent
from mirage.identity import identity_hash, read_identity
from mirage.predictions import check_predictions

# Labels are compared lower-cased and stripped.
BACKGROUND_LIKE = ("bg", "background", "above ilm")  # not scored unless --no_ignore_bg
INVALID_LABEL = "invalid"  # truth pixels of this class are never scored
LESION_LABELS = ("fluid", "cyst", "ped", "srf", "irf")  # reported apart from layers

# Models tested on a dataset with another class table: training label -> evaluated label
# (docs/segmentation_benchmark.md). A table applies when it covers every training label.
CLASS_TRANSLATIONS = {
    "AROI -> Duke iAMD": {
        "above ilm": "above ilm",
        "ilm-ipl/inl": "ilm-inner rpedc",
        "ipl/inl-rpe": "ilm-inner rpedc",
        "rpe-bm": "inner rpedc-outer bm",
        "under bm": "below bm",
        "cyst": "invalid",
        "ped": "invalid",
        "srf": "invalid",
    },
}

METRICS = ("Dice", "IoU", "HD95")
CSV_COLUMNS = ("ID", "Class") + METRICS
EMPTY_VOLUME_MODES = ("zero", "nan")
_SHOW_MISSING = 5  # how many missing predictions an error message lists


def _norm(label):
    return label.strip().lower()


# ----------------------------------------------------------------------------- classes
@dataclass(frozen=True)
class ClassPlan:
    """How mask and prediction pixel values become the classes that are scored.

    gt_lut, pred_lut: (65536,) uint8 lookup tables, pixel value -> class index of the
    evaluated dataset's INFO.json (UNKNOWN_CLASS for values not in the table).
    invalid: (K,) bool, classes labelled "invalid". scored: class indices to score.
    groups: {"all": scored} or {"layers": ..., "lesions": ...} when both kinds exist.
    """

    labels: tuple
    gt_lut: np.ndarray
    pred_lut: np.ndarray
    invalid: np.ndarray
    scored: tuple
    groups: dict
    gt_source: str
    pred_source: str
    translation: str = ""

    @property
    def num_classes(self):
        return len(self.labels)


def _label_translation(train_table, gt_table):
    """(name, {training label -> evaluated label}) mapping every training class by label.

    Uses a known translation (CLASS_TRANSLATIONS) when one covers all training labels,
    else the identity on labels; raises UserError when a label has no counterpart.
    """
    train_labels = [_norm(label) for label in train_table.labels]
    gt_labels = {_norm(label) for label in gt_table.labels}
    for name, table in CLASS_TRANSLATIONS.items():
        if all(label in table for label in train_labels) and \
                all(table[label] in gt_labels for label in train_labels):
            return name, {label: table[label] for label in train_labels}
    missing = [label for label in train_labels if label not in gt_labels]
    if missing:
        raise UserError(
            f"cannot score predictions in the classes of {train_table.source} against "
            f"{gt_table.source}: no class labelled {', '.join(map(repr, missing))} there and "
            f"no known translation (known: {', '.join(CLASS_TRANSLATIONS)}); evaluate on a "
            "dataset with the same class labels")
    return "", {label: label for label in train_labels}


def plan_classes(gt_table, train_table=None, ignore_bg=True):
    """The ClassPlan for masks in ``gt_table``'s classes and predictions in ``train_table``'s.

    train_table: the class table of the dataset the model was trained on (external
    evaluation); None when predictions use ``gt_table``'s values.
    """
    labels = tuple(gt_table.labels)
    norm = [_norm(label) for label in labels]
    gt_lut = gt_table.value_to_index()
    translation = ""
    if train_table is None:
        pred_lut, pred_source = gt_lut, gt_table.source
    else:
        translation, mapping = _label_translation(train_table, gt_table)
        gt_index = {label: norm.index(label) for label in set(norm)}
        pred_lut = np.full(1 << 16, UNKNOWN_CLASS, dtype=np.uint8)
        for value, label in zip(train_table.values, train_table.labels):
            pred_lut[value] = gt_index[mapping[_norm(label)]]
        pred_source = train_table.source
    invalid = np.array([label == INVALID_LABEL for label in norm], dtype=bool)
    scored = tuple(i for i, label in enumerate(norm) if label != INVALID_LABEL
                   and not (ignore_bg and label in BACKGROUND_LIKE))
    if not scored:
        raise UserError(f"{gt_table.source} has no class to score (all are background or "
                        "invalid); pass --no_ignore_bg to score background classes")
    lesions = tuple(i for i in scored if norm[i] in LESION_LABELS)
    layers = tuple(i for i in scored if norm[i] not in LESION_LABELS)
    groups = {"layers": layers, "lesions": lesions} if lesions and layers else {"all": scored}
    return ClassPlan(labels=labels, gt_lut=gt_lut, pred_lut=pred_lut, invalid=invalid,
                     scored=scored, groups=groups, gt_source=gt_table.source,
                     pred_source=pred_source, translation=translation)


# ----------------------------------------------------------------------------- inputs
@dataclass
class RunInputs:
    """Everything found and checked before any image is decoded.

    volumes: {scan_id: [(slice number, ground-truth path, prediction path), ...]} with
    slices in numerical order.
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
    The predictions must carry the manifest of the run's current best checkpoint
    (mirage/predictions.py) unless ``foreign_predictions`` (made by another tool).
    """
    run_dir = Path(model_path).expanduser()
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} not found; pass -m/--model_path "
                        "<output>/<version>/<dataset>/<run name>/")
    run_dir = run_dir.resolve()
    datasets_path = Path(datasets_path).expanduser()
    dataset = run_dir.parent.name
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
        pred_dir = run_dir / f"preds_{external}"
        hint = f"run inference on {external} first (predictions go to preds_{external}/)"
    else:
        eval_dir = train_dir
        candidates = [eval_dir / "test" / "semseg"]
        pred_dir = run_dir / "preds"
        hint = "run run_seg_tuning.py --infer_only --test on this run first"
    gt_dir = next((c for c in candidates if c.is_dir()), None)
    if gt_dir is None:
        raise UserError(f"ground-truth folder {' or '.join(map(str, candidates))} not found; "
                        "only datasets with test masks can be evaluated")
    if not pred_dir.is_dir():
        raise UserError(f"predictions folder {pred_dir} not found; {hint}")
    gt_info = eval_dir / "INFO.json"
    if not gt_info.is_file():
        raise UserError(f"{gt_info} not found; the dataset's class table is needed to read "
                        "its masks (see docs/segmentation_benchmark.md)")
    gt_table = read_class_table(gt_info)
    train_table = None
    if external:
        train_info = train_dir / "INFO.json"
        if not train_info.is_file():
            raise UserError(f"{train_info} not found; it gives the pixel values of the "
                            f"predictions in {pred_dir.name}/ (the training dataset's classes)")
        train_table = read_class_table(train_info)
    plan = plan_classes(gt_table, train_table, ignore_bg)
    volumes, unscored = pair_slices(gt_dir, pred_dir)
    if foreign_predictions:
        note = "foreign predictions: not checked against the run's checkpoint"
    else:
        note = check_predictions(pred_dir, run_dir, hint.replace(" first", " again")) or ""
    return RunInputs(run_dir=run_dir, dataset=external or dataset, external=external or "",
                     gt_dir=gt_dir, pred_dir=pred_dir, plan=plan, volumes=volumes,
                     unscored_predictions=unscored, note=note)


# ----------------------------------------------------------------------------- one B-scan
def resize_nearest(labels, shape):
    """(h, w) label image -> ``shape`` by pixel-centre-aligned nearest neighbour.

    Output pixel i takes input pixel floor((i + 0.5) * h_in / h_out), exactly as
    scikit-image's order-0 resize (OpenCV's INTER_NEAREST is shifted by half a pixel,
    its INTER_NEAREST_EXACT breaks ties differently). Integer arithmetic, so no rounding.
    """
    in_h, in_w = labels.shape
    out_h, out_w = shape
    rows = ((2 * np.arange(out_h) + 1) * in_h) // (2 * out_h)
    cols = ((2 * np.arange(out_w) + 1) * in_w) // (2 * out_w)
    return labels[rows[:, None], cols[None, :]]


def _to_classes(image, lut, path, table_source):
    """Pixel values -> class indices; UserError naming the file and the unknown values."""
    # OpenCV's table look-up is ~5x faster than numpy indexing for 8-bit images.
    classes = cv2.LUT(image, lut[:256]) if image.dtype == np.uint8 else np.take(lut, image)
    unknown = classes == UNKNOWN_CLASS
    if unknown.any():
        values = np.unique(image[unknown])
        shown = ", ".join(str(v) for v in values[:10]) + (", ..." if values.size > 10 else "")
        raise UserError(f"{path} has pixel values {shown} that are not in {table_source}; "
                        "masks and predictions must only hold the INFO.json class values")
    return classes


def score_slice(paths, plan, empty_sets_nan=True):
    """Decode one B-scan's mask and prediction and score it.

    paths: (ground-truth path, prediction path). Returns (intersection, pred_count,
    true_count), each (K,) int64 pixel counts per class, and (len(plan.scored),) float64
    HD95 per scored class.
    """
    gt_path, pred_path = paths
    truth = _to_classes(read_gray(gt_path), plan.gt_lut, gt_path, plan.gt_source)
    pred = _to_classes(read_gray(pred_path), plan.pred_lut, pred_path, plan.pred_source)
    if pred.shape != truth.shape:
        pred = resize_nearest(pred, truth.shape)
    if plan.invalid.any():
        if plan.translation:
            # The original's translation rule: where the translated prediction is invalid
            # (e.g. an AROI lesion, which Duke iAMD does not annotate), so is the truth.
            where = plan.invalid[pred]
            truth[where] = pred[where]
        # Where the truth is invalid the prediction is made invalid too: never counted.
        where = plan.invalid[truth]
        pred[where] = truth[where]
    k = plan.num_classes  # <= 255, so truth * k + pred fits in 16 bits
    confusion = np.bincount((truth.astype(np.uint16) * k + pred).ravel(),
                            minlength=k * k).reshape(k, k)
    height, width = truth.shape
    one_empty = float("nan") if empty_sets_nan else math.sqrt(height ** 2 + width ** 2)
    hd = hd95_per_class(pred, truth, plan.scored, one_empty)
    return (np.diagonal(confusion).copy(), confusion.sum(axis=0), confusion.sum(axis=1)), hd


def _map_in_workers(func, items, workers):
    """``map(func, items)`` in order, spread over ``workers`` processes when > 1."""
    if workers <= 1 or len(items) < 2:
        yield from map(func, items)
        return
    # fork starts workers instantly with everything imported (spawn would re-import
    # torch, ~2 s per worker); the workers only run numpy/OpenCV/scipy code.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    # dying_with_parent: a killed evaluation must not leave its workers running.
    executor = ProcessPoolExecutor(max_workers=workers, mp_context=context,
                                   **dying_with_parent())
    try:
        yield from executor.map(func, items, chunksize=max(1, len(items) // (8 * workers)))
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- volumes
@dataclass
class RunEvaluation:
    """The result of evaluating one run.

    rows: DataFrame, one row per (volume, scored class): ID, Class, Group, Dice, IoU (fractions),
    HD95 (pixels). files: the CSV files written. groups: {group: [class labels]}.
    """

    run_dir: Path
    dataset: str
    external: str
    rows: pd.DataFrame
    groups: dict
    num_slices: int
    files: list = field(default_factory=list)
    note: str = ""  # a caveat about where the predictions come from

    def group_rows(self, group):
        return self.rows if group == "all" else self.rows[self.rows["Group"] == group]


def _nanmean(values):
    """Mean over the non-NaN values (NaN when there are none), as numpy.nanmean."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "Mean of empty slice"
        return float(np.nanmean(np.ascontiguousarray(values)))


def volume_scores(plan, slice_results, empty_volume="zero"):
    """Aggregate one volume's per-B-scan results into rows (class label, Dice, IoU, HD95).

    slice_results: [(counts, hd), ...] from score_slice, in slice order. Dice and IoU use
    the pixel counts summed over the volume; HD95 is the NaN-ignoring mean over B-scans.
    With empty_volume="nan", classes absent from both volumes get NaN for all three.
    """
    inter, pred_count, true_count = (sum(r[0][i] for r in slice_results) for i in range(3))
    hd = np.stack([r[1] for r in slice_results])  # (S, len(scored))
    dice = dice_score(inter, pred_count, true_count)
    iou = iou_score(inter, pred_count, true_count)
    rows = []
    for j, c in enumerate(plan.scored):
        values = [float(dice[c]), float(iou[c]), _nanmean(hd[:, j])]
        if empty_volume == "nan" and pred_count[c] + true_count[c] == 0:
            values = [float("nan")] * 3
        rows.append((plan.labels[c], *values))
    return rows


def _check_options(empty_volume, workers):
    if empty_volume not in EMPTY_VOLUME_MODES:
        raise UserError(f"--empty_volume must be one of {', '.join(EMPTY_VOLUME_MODES)}, "
                        f"not {empty_volume!r}")
    if int(workers) < 1:
        raise UserError(f"--workers must be at least 1, not {workers}")


def evaluate_prepared(inputs, empty_sets_nan=True, empty_volume="zero", workers=1,
                      quiet=False):
    """Score every volume of ``inputs`` (a RunInputs); returns the rows as a RunEvaluation.

    Writes nothing; see evaluate_run.
    """
    _check_options(empty_volume, workers)
    plan = inputs.plan
    tasks = [(gt, pred) for slices in inputs.volumes.values() for _, gt, pred in slices]
    score = partial(score_slice, plan=plan, empty_sets_nan=empty_sets_nan)
    results = []
    with tqdm(total=len(tasks), desc=f"evaluating {inputs.run_dir.name}", unit="B-scan",
              disable=quiet, leave=False, file=sys.stderr) as bar:
        for result in _map_in_workers(score, tasks, int(workers)):
            results.append(result)
            bar.update()
    group_of = {plan.labels[c]: g for g, members in plan.groups.items() for c in members}
    rows, start = [], 0
    for scan_id, slices in inputs.volumes.items():
        for label, *values in volume_scores(plan, results[start:start + len(slices)],
                                            empty_volume):
            rows.append((scan_id, label, group_of[label], *values))
        start += len(slices)
    frame = pd.DataFrame(rows, columns=["ID", "Class", "Group", *METRICS])
    groups = {g: [plan.labels[c] for c in members] for g, members in plan.groups.items()}
    return RunEvaluation(run_dir=inputs.run_dir, dataset=inputs.dataset,
                         external=inputs.external, rows=frame, groups=groups,
                         num_slices=len(tasks))


# ----------------------------------------------------------------------------- outputs
def result_files(evaluation):
    """{file path: group} of the CSVs for a run: results.csv, or one per class group."""
    suffix = f"_{evaluation.external}" if evaluation.external else ""
    if list(evaluation.groups) == ["all"]:
        return {evaluation.run_dir / f"results{suffix}.csv": "all"}
    return {evaluation.run_dir / f"results_{group}{suffix}.csv": group
            for group in evaluation.groups}


def write_results(evaluation):
    """Write the run's CSV files (ID, Class, Dice, IoU, HD95); all of them or none.

    Each file goes to a temporary name first; all are renamed only once every one of
    them has been written, so an existing results file is never replaced by a partial one.
    """
    files = result_files(evaluation)
    with contextlib.ExitStack() as stack:
        for path, group in files.items():
            tmp = stack.enter_context(atomic_path(path))
            evaluation.group_rows(group).to_csv(tmp, columns=list(CSV_COLUMNS), index=False,
                                                na_rep="NaN")
    evaluation.files = list(files)
    return evaluation.files


def _percent_table(frame):
    """Dice and IoU x100, HD95 as is."""
    frame = frame.copy()
    frame[["Dice", "IoU"]] *= 100
    return frame


def results_table(evaluation):
    """DataFrame for printing: per-class means over volumes, then each group and overall.

    Dice and IoU in percent, HD95 in pixels; group rows are means over all (volume, class)
    rows of the group, NaN ignored.
    """
    rows = _percent_table(evaluation.rows)
    per_class = rows.groupby("Class", sort=False)[list(METRICS)].mean()
    means = {f"[{group}]": evaluation.group_rows(group) for group in evaluation.groups}
    if len(evaluation.groups) > 1:
        means["[all]"] = evaluation.rows
    group_means = pd.DataFrame({name: _percent_table(part)[list(METRICS)].mean()
                                for name, part in means.items()}).T
    return pd.concat([per_class, group_means])


def print_results(evaluation, stream=None):
    """Print the per-class table and the group means of one run."""
    stream = stream or sys.stdout
    volumes = evaluation.rows["ID"].nunique()
    target = f" on {evaluation.external}" if evaluation.external else ""
    print(f"\n{evaluation.run_dir}{target}: {volumes} volume(s), {evaluation.num_slices} "
          "B-scans. Dice and IoU in %, HD95 in pixels; means over volumes", file=stream)
    table = results_table(evaluation)
    width = max(len("class"), *(len(name) for name in table.index))
    print(f"{'class':<{width}}" + "".join(f"{m:>9}" for m in METRICS), file=stream)
    for name, row in table.iterrows():
        cells = "".join("      n/a" if np.isnan(v) else f"{v:9.2f}" for v in row)
        print(f"{name:<{width}}{cells}", file=stream)
    if evaluation.files:
        names = ", ".join(path.name for path in evaluation.files)
        print(f"wrote {names} in {evaluation.run_dir}", file=stream)


def evaluate_run(model_path, datasets_path, external=None, ignore_bg=True,
                 empty_sets_nan=True, empty_volume="zero", workers=1, quiet=False,
                 foreign_predictions=False):
    """Evaluate one run directory, write its CSV files and print its tables.

    model_path: ``.../<dataset>/<run name>/`` holding ``preds/`` (or ``preds_<external>/``).
    datasets_path: the folder holding ``<dataset>/`` (and ``<external>/``).
    ignore_bg: leave background-like classes (bg, background, above ilm) unscored.
    empty_sets_nan: HD95 of a B-scan where exactly one mask is empty is NaN (True) or the
    image diagonal (False). empty_volume: "zero" (Dice = IoU = 0 when a class is absent from
    both volumes, as the original tool) or "nan" (such pairs left out of the means).
    workers: processes scoring B-scans in parallel. foreign_predictions: score predictions
    that carry no manifest of the run's best checkpoint (made by another tool).
    Returns a RunEvaluation (``.rows`` is the DataFrame of all rows, ``.files`` the CSVs).
    """
    return evaluate_runs([model_path], datasets_path, external, ignore_bg, empty_sets_nan,
                         empty_volume, workers, quiet=quiet,
                         foreign_predictions=foreign_predictions)[0]


def _note_unscored(inputs):
    if inputs.unscored_predictions > 0:
        print(f"note: {inputs.unscored_predictions} prediction(s) in {inputs.pred_dir} have no "
              "ground-truth mask and were not scored", file=sys.stderr)


# ----------------------------------------------------------------------------- summary
def summary_table(evaluations):
    """One row per run and class group (and "all" where there are several groups).

    Mean: over all (volume, class) rows of the group, NaN ignored (as printed). Std: the
    sample standard deviation over volumes of each volume's mean over the group's classes.
    Dice and IoU in percent, HD95 in pixels; the text columns read "mean ± std". Each row
    names its run's seed and identity hash (identity.json), so seeds of one configuration
    are told apart and runs of different options are never mistaken for one another.
    """
    records = []
    for ev in evaluations:
        identity = read_identity(ev.run_dir) or {}  # none for runs of the first version
        groups = list(ev.groups) + (["all"] if len(ev.groups) > 1 else [])
        for group in groups:
            rows = _percent_table(ev.group_rows(group))
            per_volume = rows.groupby("ID")[list(METRICS)].mean()
            record = {"run": ev.run_dir.name, "dataset": ev.dataset, "group": group,
                      "seed": identity.get("seed"),
                      "identity": identity_hash(identity) if identity else "",
                      "volumes": len(per_volume), "path": str(ev.run_dir), "note": ev.note}
            for metric in METRICS:
                mean, std = rows[metric].mean(), per_volume[metric].std()
                spread = "n/a" if np.isnan(std) else f"{std:.2f}"  # n/a: one volume
                record[metric] = f"{mean:.2f} ± {spread}"
                record[f"{metric}_mean"], record[f"{metric}_std"] = mean, std
            records.append(record)
    return pd.DataFrame(records)


def write_summary(evaluations, path):
    """Write summary_table(evaluations) to the CSV file ``path`` (atomically); returns it."""
    table = summary_table(evaluations)
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, na_rep="NaN")
    return table


def evaluate_runs(model_paths, datasets_path, external=None, ignore_bg=True,
                  empty_sets_nan=True, empty_volume="zero", workers=1, summary=None,
                  quiet=False, report=False, foreign_predictions=False):
    """Evaluate several runs (what run_seg_eval.py does); returns their RunEvaluations.

    Every run's files are checked before any is scored, so a typo in the last path fails
    at once. Each run's CSVs are written when that run is done, with evaluation.json
    (how they were scored) and, with ``report``, report.html; ``summary`` (a CSV path)
    is written at the end.
    """
    _check_options(empty_volume, workers)
    prepared = [prepare_run(path, datasets_path, external, ignore_bg, foreign_predictions)
                for path in model_paths]
    evaluations = []
    for inputs in prepared:
        if inputs.note and not quiet:
            print(f"note: {inputs.run_dir.name}: {inputs.note}")
        evaluation = evaluate_prepared(inputs, empty_sets_nan, empty_volume, workers, quiet)
        evaluation.note = inputs.note
        write_results(evaluation)
        from mirage.runs import record_evaluation  # noqa: PLC0415 - it imports this module
        record_evaluation(evaluation, datasets_path=str(Path(datasets_path).resolve()),
                          ignore_bg=ignore_bg, empty_sets_nan=empty_sets_nan,
                          empty_volume=empty_volume, note=inputs.note or "")
        if not quiet:
            _note_unscored(inputs)
            print_results(evaluation)
        if report:
            from mirage.run_report import write_run_report  # noqa: PLC0415 - matplotlib
            path = write_run_report(evaluation.run_dir, datasets_path, quiet=quiet)
            if not quiet:
                print(f"wrote {path}")
        evaluations.append(evaluation)
    if summary:
        table = write_summary(evaluations, summary)
        if not quiet:
            print(f"\nsummary ({summary}):")
            print(table[["run", "dataset", "group", "volumes", *METRICS]].to_string(index=False))
    return evaluations
