"""Label efficiency: how a model's test score grows with its number of labelled volumes.

    label_efficiency(study, metric, class_group, alpha, labels) -> [EfficiencyTable, ...]
    normalised_auc(volumes, means)  -> the area under a curve over log size, per log span

A study is about label efficiency when some of its runs were trained on part of the
training split (``--train_volumes N`` / ``--train_fraction F``: in identity.json). Groups of
runs (mirage.report.study: one per dataset, model, decoder, loss and protocol, over seeds)
that differ only in that size are the points of one curve, a row of the tables; the runs
trained on the whole split (no size in their identity) join the curve of every row they
match, at the split's number of volumes. One table per dataset column:

- rows: the models (models x protocols where protocols differ; a row label says what the
  study's labels say, without the size); columns: the sizes in training volumes (a
  fraction counts as the volumes it chose, train_volumes.json), ``all`` as the split's
  number of volumes (train_volumes.json's ``split_volumes``, else the dataset folder);
- cells: mean ± sample std over seeds of each seed's mean of the metric over the class
  group's (volume, class) rows, as summary.csv computes them (``seed_values``);
- AUC: the trapezoid area under the mean curve over log(volumes), divided by the log span
  of the sizes: the curve's mean level, in the metric's unit (only for a row with a value
  at every size of its table, so that the rows' areas cover the same range);
- per size, the paired Wilcoxon test between the rows that the study uses between groups
  (mirage.report.significance.significance_table, Holm-Bonferroni over the pairs of one
  size).

The files (label_efficiency.csv, _auc.csv, _tests.csv, .png) and the sections of
summary.md, summary.tex and report.html: mirage.report.label_efficiency_outputs.
"""
import json
from dataclasses import dataclass, field, replace
from pathlib import PurePath
from typing import Optional

import numpy as np
import pandas as pd

from mirage.data.layout import open_dataset, scan_split
from mirage.data.subsets import split_volumes, subset_size
from mirage.errors import UserError
from mirage.options import ALL
from mirage.report.labels import SIZE_ENTRIES, label_groups
from mirage.report.significance import significance_table
from mirage.report.study import Study, lower_is_better, seed_statistics, seed_values

SUBSET_SEED = "subset_seed"


@dataclass
class Point:
    """One group of runs (one size of a curve): its mean and spread over seeds."""

    group: object  # mirage.report.study.Group
    volumes: Optional[int]  # the x value: training volumes (None: unknown)
    size: str  # as asked: '4', '25%', 'all'
    mean: float = float("nan")
    std: float = float("nan")
    seeds: int = 0  # seeds with a value
    seed_list: str = ""
    note: str = ""

    @property
    def text(self):
        """'81.23 ± 0.45'; the mean alone for one seed; 'n/a' without a value."""
        if not np.isfinite(self.mean):
            return "n/a"
        if self.seeds < 2 or not np.isfinite(self.std):
            return f"{self.mean:.2f}"
        return f"{self.mean:.2f} ± {self.std:.2f}"


@dataclass
class Curve:
    """One row: a model (and protocol) at every size it was trained with."""

    label: str
    points: dict = field(default_factory=dict)  # volumes -> Point
    auc: float = float("nan")
    auc_note: str = ""

    def mean_at(self, volumes):
        point = self.points.get(volumes)
        return point.mean if point is not None else float("nan")


@dataclass
class EfficiencyTable:
    """The curves of one dataset column."""

    column: str  # the study's column (dataset, with its class table where it has several)
    metric: str
    class_group: str
    sizes: list  # the x values in order (training volumes)
    split_volumes: Optional[int]  # the whole split's size ('all'), None if unknown
    curves: list
    tests: pd.DataFrame = None
    notes: list = field(default_factory=list)

    @property
    def lower_is_better(self):
        return lower_is_better(self.metric)

    def size_label(self, volumes):
        """A column header: '4', or '10 (all)' for the whole split."""
        return f"{volumes} (all)" if volumes == self.split_volumes else str(volumes)

    def best(self, values):
        """Indices of the best of ``values`` as printed (two decimals); ties all."""
        rounded = [round(v, 2) if np.isfinite(v) else None for v in values]
        finite = [v for v in rounded if v is not None]
        if len(finite) < 2:
            return set()
        target = min(finite) if self.lower_is_better else max(finite)
        return {i for i, v in enumerate(rounded) if v == target}


def normalised_auc(volumes, means):
    """The area under the curve of ``means`` over log(``volumes``) by the trapezoid rule,
    divided by log(max) - log(min): the curve's mean level, in the metric's unit (the log
    base cancels). NaN with fewer than two sizes."""
    x = np.log(np.asarray(volumes, dtype=float))
    y = np.asarray(means, dtype=float)
    if x.size < 2 or x[-1] <= x[0]:
        return float("nan")
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2) / (x[-1] - x[0]))


# ----------------------------------------------------------------------------- sizes
def train_set_of(group):
    """{train_volumes, train_fraction, subset_seed} of a group's runs (catalog.Run: from
    identity.json, else config.yaml; runs from before the options: the whole split)."""
    return group.members[0].run.train_set_options()


def size_of(group):
    """(train_volumes, train_fraction) of a group, each a number or ``all``."""
    options = train_set_of(group)
    return tuple(options[name] for name in SIZE_ENTRIES)


def is_whole(group):
    return size_of(group) == (ALL, ALL)


def split_sizes(study):
    """{training dataset: the number of volumes of its training split}, from the runs'
    train_volumes.json, else the dataset folder the runs name (if it is there), and notes
    where they disagree."""
    found, notes = {}, []
    for run in study.runs:
        if run.split_volumes is not None:
            found.setdefault(run.train_dataset, set()).add(run.split_volumes)
    sizes = {}
    for dataset, counts in found.items():
        sizes[dataset] = max(counts)
        if len(counts) > 1:
            notes.append(f"{dataset}: the runs' training splits had "
                         f"{' or '.join(map(str, sorted(counts)))} volumes "
                         f"(train_volumes.json); 'all' is taken as {max(counts)}")
    tried = set(sizes)
    for run in study.runs:
        if run.train_dataset not in tried and run.config.get("data_path"):
            tried.add(run.train_dataset)
            count = _count_on_disk(run.config["data_path"])
            if count:
                sizes[run.train_dataset] = count
    return sizes, notes


def _count_on_disk(data_path):
    """The number of volumes of a dataset folder's training split, or None."""
    try:
        slices, _ = scan_split(open_dataset(data_path).split_dir("train"), need_masks=False)
    except (UserError, OSError):
        return None
    return len(split_volumes(slices)) or None


def _volumes_of(group, split):
    """(x value or None, size as asked) of a group; ``split``: its split's volumes."""
    volumes, fraction = size_of(group)
    if volumes != ALL:
        size = str(volumes)
    elif fraction != ALL:
        size = f"{100 * fraction:g}%"
    else:
        size = ALL
    # train_volumes.json (or --train_volumes) says it; the seeds of a size share volumes
    known = [m.run.trained_volumes for m in group.members
             if m.run.trained_volumes is not None]
    if known:
        return known[0], size
    if split is None:
        return None, size
    return (subset_size(split, fraction=fraction) if fraction != ALL else split), size


# ----------------------------------------------------------------------------- rows
def _row_key(group):
    """What one curve holds fixed: the group's key (GroupKey) without the size."""
    protocol = tuple((k, v) for k, v in group.key.protocol
                     if k not in (*SIZE_ENTRIES, SUBSET_SEED))
    return replace(group.key, protocol=protocol)


def _rows(groups):
    """[(row key, subset seed or None, [groups])]: the groups of one row, the whole-split
    groups in every row of their key (one per subset seed)."""
    by_key = {}
    for group in groups:
        seed = None if is_whole(group) else train_set_of(group)[SUBSET_SEED]
        by_key.setdefault(_row_key(group), {}).setdefault(seed, []).append(group)
    rows = []
    for key, by_seed in by_key.items():
        whole = by_seed.pop(None, [])
        if not by_seed:
            rows.append((key, None, whole))
        for seed, members in sorted(by_seed.items()):
            rows.append((key, seed, members + whole))
    return rows


def _representative(group, seed):
    """A copy of the group without its size (and with the row's subset seed), to label
    the row with the study's labelling rules."""
    protocol = tuple((k, v) for k, v in group.key.protocol
                     if k not in (*SIZE_ENTRIES, SUBSET_SEED))
    if seed is not None:
        protocol += ((SUBSET_SEED, json.dumps(seed)),)
    return replace(group, key=replace(group.key, protocol=tuple(sorted(protocol))))


def _row_labels(rows, labels):
    """One label per row, by mirage.report.labels on copies of the groups without their
    size; of the user's ``labels``, those that name a model or a row (a label given for a
    group of one size names no row)."""
    def label(user):
        copies = [_representative(members[0], seed) for _, seed, members in rows]
        label_groups(copies, user)
        return copies

    try:
        copies = label(None)
    except UserError:  # rows the labelling rules cannot tell apart: the groups' own labels
        return [members[0].label for _, _, members in rows]
    names = set()
    for copy in copies:
        weights = PurePath(str(copy.members[0].run.config.get("weights") or "")) \
            if copy.members else PurePath("")
        names |= {weights.name, weights.stem, copy.key.model, copy.label, copy.model_label}
    user = {k: v for k, v in (labels or {}).items() if k in names}
    if user:
        try:
            copies = label(user)
        except UserError:  # the user's labels would merge two rows: keep the automatic
            pass
    return [copy.label for copy in copies]


# ----------------------------------------------------------------------------- numbers
def _point(group, volumes, size, metric, class_group):
    """The group's mean and std over seeds, as summary.csv's row of the class group."""
    point = Point(group=group, volumes=volumes, size=size)
    if group.conflict or group.classes_differ:
        point.note = group.conflict or "class sets differ between seeds"
        return point
    present = [(m, m.evaluation.group_rows(class_group)) for m in group.members]
    present = [(m, rows) for m, rows in present if len(rows) and metric in rows]
    values = seed_values(present, metric)
    point.mean, point.std, point.seeds = seed_statistics(values.values() or [np.nan])
    point.seed_list = " ".join(str(seed) for seed, value in values.items()
                               if np.isfinite(value))
    return point


def _curve(label, members, splits, metric, class_group, notes):
    curve = Curve(label=label)
    for group in sorted(members, key=is_whole):  # sizes asked for before 'all'
        volumes, size = _volumes_of(group, splits.get(group.key.trained_on))
        if volumes is None:
            notes.append(f"{label}: the runs trained on {size} are left out: the size of "
                         f"the training split of {group.key.trained_on} is not known (no "
                         "train_volumes.json, and the dataset folder is not found)")
            continue
        if volumes in curve.points:
            notes.append(f"{label}: two groups trained on {volumes} volumes ("
                         f"{curve.points[volumes].size} and {size}); the first is shown")
            continue
        curve.points[volumes] = _point(group, volumes, size, metric, class_group)
    return curve


def _auc(table):
    for curve in table.curves:
        means = [curve.mean_at(v) for v in table.sizes]
        missing = [str(v) for v, m in zip(table.sizes, means) if not np.isfinite(m)]
        if len(table.sizes) < 2:
            curve.auc_note = "AUC needs at least two sizes"
        elif missing:
            curve.auc_note = (f"no AUC: no value at {', '.join(missing)} volume(s), so its "
                              "area would cover another range than the other rows'")
        else:
            curve.auc = normalised_auc(table.sizes, means)


def _tests(table, alpha):
    """Per size, every pair of rows: the study's paired Wilcoxon test (significance.csv's
    columns, with the size and the row labels)."""
    frames = []
    for volumes in table.sizes:
        points = [(c.label, c.points[volumes]) for c in table.curves if volumes in c.points]
        if len(points) < 2:
            continue
        groups = list({id(p.group): p.group for _, p in points}.values())
        names = {p.group.label: label for label, p in points}
        frame = significance_table(Study(runs=[], groups=groups), metrics=[table.metric],
                                   alpha=alpha, bootstrap=0)
        frame = frame[frame["class_group"] == table.class_group].copy()
        for column in ("model_a", "model_b", "better"):
            frame[column] = [names.get(value, value) for value in frame[column]]
        frame.insert(1, "volumes", volumes)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def label_efficiency(study, metric="Dice", class_group="all", alpha=0.05, labels=None):
    """The label-efficiency tables of ``study`` (one per dataset column), or [] when no
    group was trained on part of its training split."""
    if all(is_whole(group) for group in study.groups):
        return []
    splits, split_notes = split_sizes(study)
    tables = []
    for column in study.datasets:
        groups = [g for g in study.groups if g.key.column == column]
        if all(is_whole(g) for g in groups):
            continue
        rows = _rows(groups)
        notes = list(split_notes)
        curves = [_curve(label, members, splits, metric, class_group, notes)
                  for label, (_, _, members) in zip(_row_labels(rows, labels), rows)]
        curves = sorted((c for c in curves if c.points), key=lambda c: c.label)
        trained_on = {g.key.trained_on for g in groups}
        split = splits.get(next(iter(trained_on))) if len(trained_on) == 1 else None
        table = EfficiencyTable(column=column, metric=metric, class_group=class_group,
                                sizes=sorted({v for c in curves for v in c.points}),
                                split_volumes=split, curves=curves, notes=notes)
        _auc(table)
        table.tests = _tests(table, alpha)
        tables.append(table)
    return tables
