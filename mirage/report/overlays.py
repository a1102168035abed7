"""Colour overlays: every test B-scan of a run, and single predicted masks.

    write_overlays(run_dir, datasets_path, external="", out_dir=None) -> the folder written
    class_overlay(image, labels, classes) -> (H, W, 3) uint8 RGB

``write_overlays`` draws each test B-scan as the run report's gallery draws its best,
median and worst (mirage/report/gallery.py): B-scan | truth | prediction | errors in red,
the scored classes tinted in the report's colours, but at the B-scan's own size (the
gallery shrinks wide B-scans for the page); ``legend.png`` in the same folder says
which colour is which class (and the error red), as the report's legend does. Files and
classes are found as run_seg_eval.py finds them (mirage.evaluate.inputs.prepare_run).
``class_overlay`` tints the classes of one predicted mask on its B-scan
(run_seg_predict.py --overlays).
"""
import sys
from pathlib import Path

import numpy as np

from mirage.data.classes import UNKNOWN_CLASS
from mirage.evaluate.class_plan import BACKGROUND_LIKE
from mirage.evaluate.inputs import prepare_run
from mirage.fileio import atomic_folder, atomic_path, write_png
from mirage.progress import progress
from mirage.report import gallery, plots
from mirage.run.folder import RunFolder

LEGEND = "legend.png"  # never a B-scan's name: those are <scan>_<slice number>.png


def write_png_rgb(path, rgb):
    """An (H, W, 3) uint8 RGB image as a PNG, atomically (OpenCV stores BGR)."""
    write_png(path, np.ascontiguousarray(rgb[..., ::-1]))


def write_overlays(run_dir, datasets_path, external="", out_dir=None, ignore_bg=True,
                   foreign_predictions=False, quiet=True):
    """One ``<slice_id>.png`` per test B-scan into ``out_dir`` (default
    ``RunFolder.overlays_dir``): B-scan | truth | prediction | errors, an (H, 4W + 12, 3) RGB
    image at the B-scan's size, and ``legend.png``: each tinted class's colour, the error
    red and the classes left untinted. The folder is written aside and swapped in whole.

    The predictions must carry their manifest, as for scoring, unless
    ``foreign_predictions``; ``ignore_bg``: background-like classes are not tinted and
    their errors not drawn (run_seg_eval.py's --ignore_bg). Returns the folder.
    """
    inputs = prepare_run(run_dir, datasets_path, external or None, ignore_bg,
                         foreign_predictions=foreign_predictions)
    plan, scored = inputs.plan, list(inputs.plan.scored)
    colors = plots.class_colors(plan.num_classes)
    target = Path(out_dir) if out_dir else RunFolder(inputs.run_dir).overlays_dir(external)
    slices = [(f"{scan}_{number}", gt, pred) for scan, items in inputs.volumes.items()
              for number, gt, pred in items]
    with atomic_folder(target) as staging:
        _write_legend(staging / LEGEND, plan, colors)
        for slice_id, gt, pred in progress(slices, desc=f"overlays -> {target.name}/",
                                           unit="B-scan", disable=quiet, file=sys.stderr):
            # truth and prediction read as scoring reads them; full size, unlike the
            # report's gallery, which shrinks wide B-scans
            truth, guess, _ = gallery.load_pair(plan, gt, pred)
            image, _ = gallery.bscan_image(gt, truth.shape)
            wrong = gallery.wrong_pixels(truth, guess, scored)
            write_png_rgb(staging / f"{slice_id}.png",
                          gallery.compose(image, truth, guess, wrong, colors, scored))
    return target


def _write_legend(path, plan, colors):
    untinted = [label for c, label in enumerate(plan.labels) if c not in plan.scored]
    notes = [f"not tinted (not scored): {', '.join(untinted)}"] if untinted else []
    png = plots.legend_png(gallery.legend_entries(plan, colors),
                           "colours: B-scan | truth | prediction | errors", notes)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(png)


def prediction_legend_png(classes):
    """PNG bytes of the legend of :func:`class_overlay` images: each tinted class's
    colour; the untinted (background-like) classes named below."""
    colors = plots.class_colors(classes.num_classes)
    shown = tinted_classes(classes)
    untinted = [label for i, label in enumerate(classes.labels) if i not in shown]
    notes = [f"not tinted: {', '.join(untinted)}"] if untinted else []
    return plots.legend_png([(classes.labels[i], gallery.rgb255(colors[i])) for i in shown],
                            "predicted classes", notes)


def tinted_classes(classes):
    """Indices of the classes an overlay tints: all but background-like ones."""
    shown = [i for i, label in enumerate(classes.labels)
             if label.strip().lower() not in BACKGROUND_LIKE]
    return shown or list(range(classes.num_classes))


def class_overlay(image, labels, classes):
    """One B-scan with its predicted classes tinted, as the gallery tints a prediction.

    image: (H, W) uint8/uint16 B-scan; labels: (H, W) INFO.json values of ``classes`` (a
    ClassTable). Returns (H, W, 3) uint8 RGB; background-like classes stay gray.
    """
    index = np.take(classes.value_to_index(), labels)
    gray = gallery.scaled_gray(image)
    colors = plots.class_colors(classes.num_classes)
    shown = tinted_classes(classes)
    unused = np.zeros(index.shape, bool)
    # compose draws four panels (B-scan, truth, prediction, errors); with no gap between
    # them the prediction is the third W columns.
    panels = gallery.compose(gray, np.full_like(index, UNKNOWN_CLASS), index, unused,
                             colors, shown, gap=0)
    width = index.shape[1]
    return np.ascontiguousarray(panels[:, 2 * width:3 * width])
