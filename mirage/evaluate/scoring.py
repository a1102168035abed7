"""Scoring: one B-scan's pixel counts, HD95 and layer boundaries, a volume's Dice/IoU/HD95
rows, and a whole run's rows and measurements, with the B-scans spread over worker
processes.

    evaluate_prepared(inputs, ...) -> RunEvaluation (rows: one per volume and scored class;
                                      measurements: boundaries, thicknesses, lesion areas)

Scores are per volume (all B-scans sharing ``<scan>``) and per foreground class. The
arithmetic lives in mirage.evaluate.metrics and mirage.evaluate.layers. Each row also keeps
the class's pixel counts in the volume's truth and prediction and whether the class was
missed (in the truth, never predicted), so that a perfect-looking HD95 of a missed class is
never hidden. With an axial and a lateral spacing (inputs.spacing) each row also holds
HD95_um and ASSD_um, after the other columns.
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
from mirage.evaluate.layers import layer_sums
from mirage.evaluate.measurements import measurement_tables
from mirage.evaluate.metrics import dice_score, iou_score, surface_distances
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


# The columns of the results rows in micrometres, after the others, with a spacing.
UM_METRICS = ("HD95_um", "ASSD_um")


@dataclass
class SliceMeasures:
    """What one B-scan adds beyond the pixel scores: HD95 and ASSD in micrometres per scored
    class and the image diagonal in micrometres (None / NaN without an axial and lateral
    spacing), and the layer boundary sums (mirage.evaluate.layers.layer_sums; None without
    layers or when not measured)."""

    hd95_um: np.ndarray = None
    assd_um: np.ndarray = None
    diagonal_um: float = float("nan")
    layers: np.ndarray = None


def score_slice(paths, plan, empty_sets_nan=True, spacing=None, measure=True):
    """Decode one B-scan's mask and prediction and score it.

    paths: (ground-truth path, prediction path). spacing: a Spacing (micrometre distances
    where it gives axial and lateral) or None. measure: also take the layer boundary sums.
    Returns ((intersection, pred_count, true_count), hd, diagonal, SliceMeasures): (K,)
    int64 pixel counts per class, (len(plan.scored),) float64 HD95 per scored class, the
    mask's diagonal sqrt(H^2 + W^2) in pixels, and the rest.
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
    in_plane = spacing is not None and spacing.in_plane
    distances = surface_distances(pred, truth, plan.scored, empty_sets_nan,
                                  (spacing.axial_um, spacing.lateral_um) if in_plane else None)
    counts = (np.diagonal(confusion).copy(), confusion.sum(axis=0), confusion.sum(axis=1))
    layers = layer_sums(truth, pred, plan.layer_stack) if measure and plan.layer_stack else None
    return counts, distances.hd95, diagonal, SliceMeasures(
        distances.hd95_um, distances.assd_um, distances.diagonal_um, layers)


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
    volume's truth and prediction) and missed (in the truth, never predicted); then
    HD95_um and ASSD_um where the spacing gives axial and lateral.
    files: the results CSV files written. groups: {group: [class labels]}.
    spacing: the Spacing used (None: pixels only). measurements: {kind: DataFrame} of the
    measurement files (mirage.evaluate.measurements); measurement_files: those written.
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
    spacing: object = None
    measurements: dict = field(default_factory=dict)
    measurement_files: list = field(default_factory=list)

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
    HD95_um and ASSD_um (appended to each row when the B-scans hold them) follow the same
    rules, with the diagonal in micrometres.
    """
    inter, pred_count, true_count = (sum(r[0][i] for r in slice_results) for i in range(3))
    hd = np.stack([r[1] for r in slice_results])  # (S, len(scored))
    # classes found in the truth and the prediction of at least one same B-scan
    both = np.any([(r[0][1] > 0) & (r[0][2] > 0) for r in slice_results], axis=0)
    diagonal = max(r[2] for r in slice_results)
    extras = [r[3] for r in slice_results if len(r) > 3]
    in_um = bool(extras) and extras[0].hd95_um is not None
    if in_um:
        hd_um = np.stack([m.hd95_um for m in extras])
        assd_um = np.stack([m.assd_um for m in extras])
        diagonal_um = max(m.diagonal_um for m in extras)
    dice = dice_score(inter, pred_count, true_count)
    iou = iou_score(inter, pred_count, true_count)
    rows = []
    for j, c in enumerate(plan.scored):
        present = pred_count[c] + true_count[c] > 0
        distances = [(_nanmean(hd[:, j]), diagonal)]
        if in_um:
            distances += [(_nanmean(hd_um[:, j]), diagonal_um),
                          (_nanmean(assd_um[:, j]), diagonal_um)]
        if present and not both[c] and hd95_missing != "original":
            distances = [(float("nan") if hd95_missing == "nan" else worst, worst)
                         for _, worst in distances]
        values = [float(dice[c]), float(iou[c]), distances[0][0]]
        um_values = [value for value, _ in distances[1:]]
        if empty_volume == "nan" and not present:
            values, um_values = [float("nan")] * 3, [float("nan")] * len(um_values)
        missed = bool(true_count[c] > 0 and pred_count[c] == 0)
        rows.append((plan.labels[c], *values, int(true_count[c]), int(pred_count[c]),
                     missed, *um_values))
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
                      quiet=False, hd95_missing="original", measure=True):
    """Score every volume of ``inputs`` (a RunInputs); returns the rows as a RunEvaluation.

    inputs.spacing (a Spacing or None) adds the micrometre columns; ``measure`` the layer
    boundaries, thicknesses and lesion areas (measurements). Writes nothing; see
    evaluate_run.
    """
    check_options(empty_volume, workers, hd95_missing)
    plan = inputs.plan
    spacing = getattr(inputs, "spacing", None)
    tasks = [(gt, pred) for slices in inputs.volumes.values() for _, gt, pred in slices]
    score = partial(score_slice, plan=plan, empty_sets_nan=empty_sets_nan, spacing=spacing,
                    measure=measure)
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
    in_um = spacing is not None and spacing.in_plane
    frame = pd.DataFrame(rows, columns=["ID", "Class", "Group", *METRICS, *COUNT_COLUMNS,
                                        MISSED, *(UM_METRICS if in_um else ())])
    groups = {g: [plan.labels[c] for c in members] for g, members in plan.groups.items()}
    measurements = measurement_tables(plan, inputs.volumes, results, spacing) if measure \
        else {}
    return RunEvaluation(run_dir=inputs.run_dir, dataset=inputs.dataset,
                         external=inputs.external, rows=frame, groups=groups,
                         num_slices=len(tasks), hd95_missing=hd95_missing, spacing=spacing,
                         measurements=measurements)
