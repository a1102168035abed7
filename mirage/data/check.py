"""Check a dataset as training would, before any training: ``run_seg_check_data.py``.

    check_dataset(data_path, mapping_fn=None, workers=4) -> DatasetSummary
    format_summary(summary) -> text
    check_training_data(dataset, classes, workers=2) -> {split name: [SliceFiles]}

The checks are training's own (mirage/train/job.py and ``load_data`` in
mirage/train/loop.py): the folder and its class table (INFO.json or --mapping_fn), at
least two classes, then the folders of train, val and test (when it has masks:
``scan_split``), every B-scan and mask decoded once and checked (``inspect_slice``:
readable, sizes match, mask values in the class table) and what leaks between the splits
(``leak_problems``: a volume or a B-scan in two splits). A test split without masks is
checked as ``--infer_only --test`` reads it (B-scans only), and for leaks. Evaluation-only
datasets (``bscan/`` and ``semseg/`` at the top level, e.g. Duke iAMD) have their test
split checked only.

Every problem is found, not only the first: they are raised together as one
:class:`~mirage.data.problems.DatasetProblems`, each in the words training uses for it.
Only a missing dataset folder stops the check at once. A class table that cannot be used
(broken, or fewer than two classes) is reported and the masks' values are then not
checked: every mask would be reported for that one cause.

What a clean dataset gets is a summary per split: volumes, B-scans, the share of pixels
of each class, the B-scans' sizes and bit depths. ``check_training_data`` is the same
check of the splits training reads, for training itself: one list of every problem of
train, val and test, where ``find_split`` of each then ``check_split`` stop at the first
split whose folders fail.
"""
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from mirage.data.classes import ClassTable, read_class_table
from mirage.data.layout import (DatasetInfo, class_table_file, dataset_folder, inspect_slices,
                                leak_problems, parse_slice_name, scan_split)
from mirage.data.problems import DatasetProblems, problems_of
from mirage.errors import UserError


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
    notes, [problem, ...])``; the notes say what is left out, the problems are those of
    the split folders (:func:`~mirage.data.layout.scan_split`)."""
    root, test_dir = dataset.root, dataset.split_dir("test")
    problems = []

    def scan(name, need_masks):
        slices, found = scan_split(dataset.split_dir(name), need_masks)
        problems.extend(found)
        return name, slices

    if not (root / "train").exists() and not (root / "val").exists() \
            and (root / "bscan").is_dir():
        return [], [scan("test", (test_dir / "semseg").is_dir())], [
            "evaluation-only layout (bscan/ at the top level): test split only; training "
            "needs train/ and val/"], problems
    training = [scan("train", True), scan("val", True)]
    if (test_dir / "semseg").is_dir():
        return training + [scan("test", True)], [], [], problems
    if (test_dir / "bscan").is_dir():
        return training, [scan("test", False)], [
            "test split without masks: its B-scans are checked as --infer_only --test reads "
            "them; training tests nothing"], problems
    return training, [], [f"no test split ({test_dir / 'bscan'} not found): training tests "
                          "nothing and --infer_only --test has nothing to predict"], problems


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


def _inspect(groups, classes, workers, desc):
    """Decode every slice of ``groups`` ([(split name, [SliceFiles])]) once: its
    (SliceStats or None) in order, and the problems of the slices and of what leaks
    between the splits. The decode gives the checks, the summary and the digest the leak
    check compares."""
    slices = [files for _, split in groups for files in split]
    results = inspect_slices(slices, classes, workers, desc)
    problems = [problem for _, slice_problems in results for problem in slice_problems]
    stats = [slice_stats for slice_stats, _ in results]
    return stats, problems + leak_problems(slices, stats)


def check_training_data(dataset, classes, workers=2):
    """The splits training reads, checked all at once before anything trains:
    ``{"train": [SliceFiles], "val": [...], "test": [...]}`` (test: ``[]`` when the
    split has no masks, as training then tests nothing). Raises one DatasetProblems
    listing every problem of the three splits' folders, images and leaks."""
    test_dir = dataset.split_dir("test")
    names = ("train", "val", "test") if (test_dir / "semseg").is_dir() else ("train", "val")
    splits, problems = {}, []
    for name in names:
        splits[name], found = scan_split(dataset.split_dir(name), need_masks=True)
        problems += found
    _, found = _inspect(list(splits.items()), classes, workers, f"checking {dataset.name}")
    if problems + found:
        raise DatasetProblems(problems + found, dataset.root)
    splits.setdefault("test", [])
    return splits


def check_dataset(data_path, mapping_fn=None, workers=4):
    """Run every check training runs on ``data_path`` (``--mapping_fn``: its class table
    elsewhere); the DatasetSummary, or every problem found as one DatasetProblems."""
    root = dataset_folder(data_path)
    problems = []
    try:
        classes = read_class_table(class_table_file(root, mapping_fn))
    except UserError as err:
        problems += problems_of(err)
        classes = None
    if classes is not None and too_few_classes(classes) is not None:
        problems.append(str(too_few_classes(classes)))
    usable = classes if not problems else None  # see the module's docstring
    dataset = DatasetInfo(root=root, name=root.resolve().name, class_table=classes)
    training, inference_only, notes, found = find_splits(dataset)
    groups = training + inference_only
    stats, found_in_images = _inspect(groups, usable, workers, f"checking {dataset.name}")
    problems += found + found_in_images
    if problems:
        raise DatasetProblems(problems, root)
    splits, start = [], 0
    for name, split in groups:
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
