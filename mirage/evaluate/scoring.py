"""Scoring: one B-scan's pixel counts and HD95, a volume's Dice/IoU/HD95 rows, and a whole
run's rows, with the B-scans spread over worker processes.

    evaluate_prepared(inputs, ...) -> RunEvaluation (rows: one per volume and scored class)

Scores are per volume (all B-scans sharing ``<scan>``) and per foreground class. The
arithmetic lives in mirage.evaluate.metrics. Each row also keeps the class's pixel counts
in the volume's truth and prediction and whether the class was missed (in the truth,
never predicted), so that a perfect-looking HD95 of a missed class is never hidden.
"""
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

from mirage.data.classes import UNKNOWN_CLASS
from mirage.errors import UserError
from mirage.evaluate import EMPTY_VOLUME_MODES, HD95_MISSING_RULES
from mirage.evaluate.metrics import dice_score, hd95_per_class, iou_score
from mirage.fileio import read_gray
from mirage.progress import progress
from mirage.run import METRICS
from mirage.run.results import COUNT_COLUMNS, MISSED
from mirage.workers import dying_with_parent


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

    paths: (ground-truth path, prediction path). Returns ((intersection, pred_count,
    true_count), hd, diagonal): (K,) int64 pixel counts per class, (len(plan.scored),)
    float64 HD95 per scored class, and the mask's diagonal sqrt(H^2 + W^2) in pixels.
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
    diagonal = math.sqrt(height ** 2 + width ** 2)
    one_empty = float("nan") if empty_sets_nan else diagonal
    hd = hd95_per_class(pred, truth, plan.scored, one_empty)
    counts = (np.diagonal(confusion).copy(), confusion.sum(axis=0), confusion.sum(axis=1))
    return counts, hd, diagonal


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

    rows: DataFrame, one row per (volume, scored class): ID, Class, Group, Dice, IoU
    (fractions), HD95 (pixels), truth_pixels, pred_pixels (the class's pixels in the
    volume's truth and prediction) and missed (in the truth, never predicted).
    files: the CSV files written. groups: {group: [class labels]}.
    """

    run_dir: Path
    dataset: str
    external: str
    rows: pd.DataFrame
    groups: dict
    num_slices: int
    files: list = field(default_factory=list)
    note: str = ""  # a caveat about where the predictions come from
    hd95_missing: str = "original"  # the HD95 rule of volumes with a missed class

    def group_rows(self, group):
        return self.rows if group == "all" else self.rows[self.rows["Group"] == group]


def _nanmean(values):
    """Mean over the non-NaN values (NaN when there are none), as numpy.nanmean."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "Mean of empty slice"
        return float(np.nanmean(np.ascontiguousarray(values)))


def volume_scores(plan, slice_results, empty_volume="zero", hd95_missing="original"):
    """Aggregate one volume's per-B-scan results into rows (class label, Dice, IoU, HD95,
    truth pixels, predicted pixels, missed).

    slice_results: [(counts, hd, diagonal), ...] from score_slice, in slice order. Dice and
    IoU use the pixel counts summed over the volume; HD95 is the NaN-ignoring mean over
    B-scans. With empty_volume="nan", classes absent from both volumes get NaN for all
    three. A class that is in the volume but never in the truth and the prediction of the
    same B-scan (never predicted, predicted but absent from the truth, or both in
    different B-scans) has no measured distance: "original" keeps the mean over the
    B-scans (0 where both masks are empty, so a missed class can score a perfect 0),
    "nan" makes its HD95 NaN, "diagonal" the volume's image diagonal sqrt(H^2 + W^2).
    """
    inter, pred_count, true_count = (sum(r[0][i] for r in slice_results) for i in range(3))
    hd = np.stack([r[1] for r in slice_results])  # (S, len(scored))
    # classes found in the truth and the prediction of at least one same B-scan
    both = np.any([(r[0][1] > 0) & (r[0][2] > 0) for r in slice_results], axis=0)
    diagonal = max(r[2] for r in slice_results)
    dice = dice_score(inter, pred_count, true_count)
    iou = iou_score(inter, pred_count, true_count)
    rows = []
    for j, c in enumerate(plan.scored):
        present = pred_count[c] + true_count[c] > 0
        distance = _nanmean(hd[:, j])
        if present and not both[c] and hd95_missing != "original":
            distance = float("nan") if hd95_missing == "nan" else diagonal
        values = [float(dice[c]), float(iou[c]), distance]
        if empty_volume == "nan" and not present:
            values = [float("nan")] * 3
        missed = bool(true_count[c] > 0 and pred_count[c] == 0)
        rows.append((plan.labels[c], *values, int(true_count[c]), int(pred_count[c]),
                     missed))
    return rows


def check_options(empty_volume, workers, hd95_missing="original"):
    if empty_volume not in EMPTY_VOLUME_MODES:
        raise UserError(f"--empty_volume must be one of {', '.join(EMPTY_VOLUME_MODES)}, "
                        f"not {empty_volume!r}")
    if hd95_missing not in HD95_MISSING_RULES:
        raise UserError(f"--hd95_missing must be one of {', '.join(HD95_MISSING_RULES)}, "
                        f"not {hd95_missing!r}")
    if int(workers) < 1:
        raise UserError(f"--workers must be at least 1, not {workers}")


def evaluate_prepared(inputs, empty_sets_nan=True, empty_volume="zero", workers=1,
                      quiet=False, hd95_missing="original"):
    """Score every volume of ``inputs`` (a RunInputs); returns the rows as a RunEvaluation.

    Writes nothing; see evaluate_run.
    """
    check_options(empty_volume, workers, hd95_missing)
    plan = inputs.plan
    tasks = [(gt, pred) for slices in inputs.volumes.values() for _, gt, pred in slices]
    score = partial(score_slice, plan=plan, empty_sets_nan=empty_sets_nan)
    results = []
    with progress(total=len(tasks), desc=f"evaluating {inputs.run_dir.name}", unit="B-scan",
                  disable=quiet, leave=False, file=sys.stderr) as bar:
        for result in _map_in_workers(score, tasks, int(workers)):
            results.append(result)
            bar.update()
    group_of = {plan.labels[c]: g for g, members in plan.groups.items() for c in members}
    rows, start = [], 0
    for scan_id, slices in inputs.volumes.items():
        for label, *values in volume_scores(plan, results[start:start + len(slices)],
                                            empty_volume, hd95_missing):
            rows.append((scan_id, label, group_of[label], *values))
        start += len(slices)
    frame = pd.DataFrame(rows, columns=["ID", "Class", "Group", *METRICS, *COUNT_COLUMNS,
                                        MISSED])
    groups = {g: [plan.labels[c] for c in members] for g, members in plan.groups.items()}
    return RunEvaluation(run_dir=inputs.run_dir, dataset=inputs.dataset,
                         external=inputs.external, rows=frame, groups=groups,
                         num_slices=len(tasks), hd95_missing=hd95_missing)
