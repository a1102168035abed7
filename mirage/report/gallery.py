"""The overlay gallery of a run's report: its best, median and worst test B-scans by Dice.

    gallery(run_dir, datasets_path, external="", ignore_bg=True) -> Gallery (images, legend)

A B-scan's Dice is the mean, over the scored classes present in its truth or prediction,
of 2|P∩G| / (|P| + |G|) on that B-scan alone (classes absent from both are skipped).
Files and classes are found exactly as run_seg_eval.py finds them
(mirage.evaluate.inputs.prepare_run); the B-scan image is the file of the same name in the
``bscan/`` folder next to the masks.
"""
import sys
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from mirage.report import plots
from mirage.data.classes import UNKNOWN_CLASS
from mirage.errors import UserError
from mirage.evaluate.inputs import prepare_run
from mirage.evaluate.scoring import resize_nearest
from mirage.fileio import read_gray
from mirage.progress import progress

DISPLAY_WIDTH = 512  # wider B-scans are shown downscaled
MIN_DISPLAY_WIDTH = 256  # narrower ones are enlarged by whole pixels


def _classes(path, lut):
    classes = np.take(lut, read_gray(path))
    return classes, bool((classes == UNKNOWN_CLASS).any())


def slice_dice(truth, pred, scored):
    """Mean Dice over the ``scored`` classes present in ``truth`` or ``pred`` (NaN if none)."""
    values = []
    for c in scored:
        t, p = truth == c, pred == c
        total = int(t.sum()) + int(p.sum())
        if total:
            values.append(2.0 * int((t & p).sum()) / total)
    return float(np.mean(values)) if values else float("nan")


def load_pair(plan, gt_path, pred_path):
    truth, bad_truth = _classes(gt_path, plan.gt_lut)
    pred, bad_pred = _classes(pred_path, plan.pred_lut)
    if pred.shape != truth.shape:
        pred = resize_nearest(pred, truth.shape)
    if plan.invalid.any():
        where = plan.invalid[np.minimum(truth, len(plan.invalid) - 1)] & (truth != UNKNOWN_CLASS)
        pred[where] = truth[where]
    return truth, pred, bad_truth or bad_pred


def scaled_gray(image):
    """(H, W) B-scan (uint8, uint16 or float) -> float32 in [0, 1], min-max per image (a
    flat image becomes 0)."""
    image = image.astype(np.float32)
    span = float(image.max() - image.min()) or 1.0
    return (image - image.min()) / span


def bscan_image(gt_path, shape):
    """(the B-scan next to a mask, ``../bscan/<name>``, scaled to [0, 1] at ``shape``;
    whether it was found): black where there is none (a masks-only test set)."""
    bscan_path = Path(gt_path).parent.parent / "bscan" / Path(gt_path).name
    if not bscan_path.is_file():
        return np.zeros(shape, np.float32), False
    image = read_gray(bscan_path).astype(np.float32)
    if image.shape != tuple(shape):
        image = cv2.resize(image, tuple(shape)[::-1], interpolation=cv2.INTER_LINEAR)
    return scaled_gray(image), True


def wrong_pixels(truth, pred, scored):
    """(H, W) bool: where truth and prediction differ and either is a scored class."""
    return (truth != pred) & (np.isin(truth, scored) | np.isin(pred, scored))


def _display(gt_path, truth, pred, scored):
    image, found = bscan_image(gt_path, truth.shape)
    wrong = wrong_pixels(truth, pred, scored)
    height, width = truth.shape
    if width > DISPLAY_WIDTH:
        shape = (max(1, round(height * DISPLAY_WIDTH / width)), DISPLAY_WIDTH)
        image = cv2.resize(image, shape[::-1], interpolation=cv2.INTER_AREA)
        truth, pred = resize_nearest(truth, shape), resize_nearest(pred, shape)
        wrong = resize_nearest(wrong.astype(np.uint8), shape).astype(bool)
    return image, truth, pred, wrong, found


def compose(image, truth, pred, wrong, colors, shown, gap=4):
    """The four panels side by side as one (H, 4W + 3 gap, 3) uint8 RGB image: the B-scan,
    truth and prediction with the ``shown`` classes tinted in ``colors`` ((K, 3) floats in
    [0, 1]), and the wrong pixels in red (plots.ERROR_RGB, which no class colour resembles)
    on the darkened B-scan."""
    gray = np.repeat(image[..., None], 3, axis=2)

    def tinted(classes):
        out = gray.copy()
        for c in shown:
            where = classes == c
            out[where] = 0.45 * gray[where] + 0.55 * colors[c]
        return out

    errors = 0.7 * gray
    errors[wrong] = plots.ERROR_RGB
    white = np.ones((image.shape[0], gap, 3))
    panels = [gray, white, tinted(truth), white, tinted(pred), white, errors]
    return np.round(255 * np.clip(np.concatenate(panels, axis=1), 0, 1)).astype(np.uint8)


ERRORS_LABEL = "errors (4th panel; no class is red)"


def rgb255(rgb):
    """A matplotlib colour (r, g, b in 0..1) as 0..255 integers."""
    return tuple(int(round(255 * v)) for v in rgb)


def legend_entries(plan, colors):
    """[(label, (r, g, b) in 0..255)]: the tinted (scored) classes of ``plan`` in
    ``colors``, then the error red, as compose() draws them."""
    return [(plan.labels[c], rgb255(colors[c])) for c in plan.scored] + \
        [(ERRORS_LABEL, rgb255(plots.ERROR_RGB))]


@dataclass
class Gallery:
    """images: [(caption, PNG bytes)] best, median, worst; legend: [(label, (r, g, b))]
    with components in 0..255; zoom: how many screen pixels a B-scan pixel should take
    (small B-scans are enlarged by the page, not in the PNG); notes: what is missing."""

    images: list = field(default_factory=list)
    legend: list = field(default_factory=list)
    zoom: int = 1
    notes: list = field(default_factory=list)


def gallery(run_dir, datasets_path, external="", ignore_bg=True, quiet=True):
    """The Gallery of a run's evaluation on ``external`` (or its own test set)."""
    try:
        # What was scored is shown as it is: the predictions' manifest was checked then.
        inputs = prepare_run(run_dir, datasets_path, external or None, ignore_bg,
                             foreign_predictions=True)
    except UserError as err:
        return Gallery(notes=[f"no overlay gallery: {err}"])
    plan = inputs.plan
    scored = list(plan.scored)
    scores, skipped = [], 0
    slices = [(scan, number, gt, pred) for scan, items in inputs.volumes.items()
              for number, gt, pred in items]
    for scan, number, gt, pred in progress(slices, desc="report: B-scan Dice",
                                           unit="B-scan", disable=quiet, leave=False,
                                           file=sys.stderr):
        try:
            truth, guess, bad = load_pair(plan, gt, pred)
        except UserError:
            bad = True
        if bad:
            skipped += 1
            continue
        score = slice_dice(truth, guess, scored)
        if np.isfinite(score):
            scores.append((score, f"{scan}_{number}", gt, pred))
    result = Gallery()
    if skipped:
        result.notes.append(f"{skipped} B-scan(s) with unreadable files or unknown pixel "
                            "values left out of the gallery")
    if not scores:
        result.notes.append("no overlay gallery: no B-scan has a scored class")
        return result
    colors = plots.class_colors(plan.num_classes)
    result.legend = legend_entries(plan, colors)
    scores.sort(key=lambda s: (s[0], s[1]))
    picks = {"worst": scores[0], "median": scores[(len(scores) - 1) // 2], "best": scores[-1]}
    seen = set()
    for name in ("best", "median", "worst"):
        score, slice_id, gt, pred = picks[name]
        if slice_id in seen:
            continue
        seen.add(slice_id)
        truth, guess, _ = load_pair(plan, gt, pred)
        image, truth, guess, wrong, found = _display(gt, truth, guess, scored)
        caption = (f"{name} of {len(scores)} B-scans: {slice_id}, Dice {100 * score:.1f}% "
                   "(B-scan | truth | prediction | errors in red)")
        if not found:
            caption += "; B-scan image not found, shown black"
        result.images.append((caption, plots.rgb_png(compose(image, truth, guess, wrong,
                                                             colors, scored))))
        result.zoom = -(-MIN_DISPLAY_WIDTH // image.shape[1])  # ceil
    return result
