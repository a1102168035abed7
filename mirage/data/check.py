"""Check a dataset as training would, before any training: ``run_seg_check_data.py``.

    check_dataset(data_path, mapping_fn=None, workers=4) -> DatasetSummary
    format_summary(summary) -> text

The checks are training's own, in training's order (mirage/train/job.py and
``load_data`` in mirage/train/loop.py): the folder and its class table (INFO.json or
--mapping_fn), at least two classes, then ``find_split`` of train, val and test (when it
has masks) and every B-scan and mask decoded and checked (``check_slice``: readable,
sizes match, mask values in the class table). A test split without masks is checked as
``--infer_only --test`` reads it (B-scans only). The first problem raises the UserError
training would raise, with the same text. Evaluation-only datasets (``bscan/`` and
``semseg/`` at the top level, e.g. Duke iAMD) have their test split checked only.

What a clean dataset gets is a summary per split: volumes, B-scans, the share of pixels
of each class, the B-scans' sizes and bit depths.
"""
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
from tqdm import tqdm

from mirage.data.classes import ClassTable
from mirage.data.layout import check_slice, find_split, open_dataset, parse_slice_name
from mirage.errors import UserError
from mirage.fileio import read_gray

@dataclass
class SliceStats:
    """One checked B-scan: (height, width), bit depth (8 or 16), and the pixel count of
    each class (K,) in its mask (None without a mask)."""

    size: Tuple[int, int]
    bits: int
    class_pixels: Optional[np.ndarray]


@dataclass
class SplitSummary:
    """One split. class_pixels: (K,) pixel counts per class over its masks (None when it
    has no masks); min_size, max_size: (smallest height, smallest width), (largest ...);
    bit_depths: {8 or 16: number of B-scans}."""

    name: str
    volumes: int
    bscans: int
    class_pixels: Optional[np.ndarray]
    min_size: Tuple[int, int]
    max_size: Tuple[int, int]
    bit_depths: dict

    def class_shares(self):
        """(K,) fraction of the split's mask pixels in each class, or None."""
        if self.class_pixels is None:
            return None
        return self.class_pixels / max(1, int(self.class_pixels.sum()))


@dataclass
class DatasetSummary:
    """A dataset that passed every check: its folder, class table and splits."""

    root: Path
    name: str
    classes: ClassTable
    splits: list
    notes: list = field(default_factory=list)


def too_few_classes(classes):
    """The error training gives for a class table of fewer than two classes, else None
    (the same words as mirage/train/job.py, which says them inline)."""
    if classes.num_classes >= 2:
        return None
    return UserError(f"{classes.source}: only {classes.num_classes} class; a segmentation "
                     "model needs at least two (e.g. background and one layer)")


def find_splits(dataset):
    """The splits as training finds them, in its order, then those only inference reads:
    ``([(split name, [SliceFiles])] of training, [...] of a test split without masks,
    notes)``; the notes say what is left out."""
    root, test_dir = dataset.root, dataset.split_dir("test")
    if not (root / "train").exists() and not (root / "val").exists() \
            and (root / "bscan").is_dir():
        masks = (test_dir / "semseg").is_dir()
        return [], [("test", find_split(test_dir, need_masks=masks))], [
            "evaluation-only layout (bscan/ at the top level): test split only; training "
            "needs train/ and val/"]
    training = [(name, find_split(dataset.split_dir(name), need_masks=True))
                for name in ("train", "val")]
    if (test_dir / "semseg").is_dir():
        return training + [("test", find_split(test_dir, need_masks=True))], [], []
    if (test_dir / "bscan").is_dir():
        return training, [("test", find_split(test_dir, need_masks=False))], [
            "test split without masks: its B-scans are checked as --infer_only --test reads "
            "them; training tests nothing"]
    return training, [], [f"no test split ({test_dir / 'bscan'} not found): training tests "
                          "nothing and --infer_only --test has nothing to predict"]


def inspect_slice(files, classes, lut):
    """Decode one B-scan (and its mask) once and check it as training does; SliceStats.

    A mismatch is reported by training's own ``check_slice``, so that the message is the
    one training gives (it decodes the pair again, only then)."""
    image = read_gray(files.bscan)
    bits = 16 if image.dtype == np.uint16 else 8
    if files.mask is None:
        return SliceStats(image.shape, bits, None)
    mask = read_gray(files.mask)
    counts = np.bincount(mask.ravel(), minlength=1)
    present = np.flatnonzero(counts)
    if mask.shape != image.shape or (lut[present] >= classes.num_classes).any():
        check_slice(files, classes)  # raises training's UserError naming the file
        raise UserError(f"{files.mask} does not fit its B-scan {files.bscan.name}")
    per_class = np.bincount(lut[present], weights=counts[present],
                            minlength=classes.num_classes).astype(np.int64)
    return SliceStats(image.shape, bits, per_class)


def split_summary(name, slices, stats):
    """The SplitSummary of one split's slices and their SliceStats."""
    volumes = {parse_slice_name(s.slice_id)[0] for s in slices}
    heights = [s.size[0] for s in stats]
    widths = [s.size[1] for s in stats]
    with_masks = [s.class_pixels for s in stats if s.class_pixels is not None]
    pixels = np.sum(with_masks, axis=0) if len(with_masks) == len(stats) else None
    return SplitSummary(name=name, volumes=len(volumes), bscans=len(slices),
                        class_pixels=pixels, min_size=(min(heights), min(widths)),
                        max_size=(max(heights), max(widths)),
                        bit_depths=dict(sorted(Counter(s.bits for s in stats).items())))


def inspect_slices(slices, classes, workers, desc):
    """SliceStats of each slice, in order; the first bad one (in that order, as
    check_split reports it) raises. Threads: OpenCV releases the GIL while decoding."""
    lut = classes.value_to_index()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        jobs = pool.map(lambda files: inspect_slice(files, classes, lut), slices)
        return list(tqdm(jobs, total=len(slices), desc=desc, leave=False,
                         disable=len(slices) < 50))


def check_dataset(data_path, mapping_fn=None, workers=4):
    """Run every check training runs on ``data_path`` (``--mapping_fn``: its class table
    elsewhere); the DatasetSummary, or the first problem as training's UserError."""
    dataset = open_dataset(data_path, mapping_fn)
    classes = dataset.class_table
    error = too_few_classes(classes)
    if error is not None:
        raise error
    training, inference_only, notes = find_splits(dataset)
    splits = []
    # Training's checks first, all of them, then what only inference reads: a dataset
    # training would refuse is refused with training's (first) error.
    for group in (training, inference_only):
        slices = [files for _, split in group for files in split]
        stats = inspect_slices(slices, classes, workers, f"checking {dataset.name}")
        start = 0
        for name, split in group:
            splits.append(split_summary(name, split, stats[start:start + len(split)]))
            start += len(split)
    return DatasetSummary(root=dataset.root, name=dataset.name, classes=classes,
                          splits=splits, notes=notes)


# ----------------------------------------------------------------------------- text
def _span(low, high):
    return str(low) if low == high else f"{low}-{high}"


def _share(value):
    if value is None:
        return "-"
    if value == 0:
        return "0"
    return "<0.1" if value < 0.0005 else f"{100 * value:.1f}"


def format_summary(summary):
    """The summary as text: a header line, one table row per split (class shares in % of
    the split's mask pixels, '-' without masks), then the notes."""
    classes = summary.classes
    header = ["split", "volumes", "B-scans", "height", "width", "bits"]
    labels = [f"{label} ({value})" for value, label in zip(classes.values, classes.labels)]
    rows = [header + labels]
    for split in summary.splits:
        shares = split.class_shares()
        bits = ", ".join(f"{b}" if len(split.bit_depths) == 1 else f"{b}: {n}"
                         for b, n in split.bit_depths.items())
        rows.append([split.name, str(split.volumes), str(split.bscans),
                     _span(split.min_size[0], split.max_size[0]),
                     _span(split.min_size[1], split.max_size[1]), bits]
                    + [_share(None if shares is None else s)
                       for s in (shares if shares is not None else [None] * len(labels))])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) + len(labels))]
    lines = [f"{summary.name}: {summary.root} ({classes.num_classes} classes from "
             f"{classes.source}; class columns: % of mask pixels)"]
    for row in rows:
        cells = [cell.ljust(w) if i == 0 else cell.rjust(w)
                 for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  " + "  ".join(cells).rstrip())
    lines += [f"  note: {note}" for note in summary.notes]
    return "\n".join(lines)
