"""Group evaluated runs across seeds and summarise them: the numbers behind the paper table.

    build_study(runs, labels=None)          -> Study (groups of seeds, labels, notes)
    summary_table(study, bootstrap)         -> DataFrame written as summary.csv
    volume_scores(group, class_group, m)    -> per-volume scores averaged over seeds
    study_metrics(study)                    -> the metrics the runs' results hold
                                               (mirage.report.metric_columns)

A group is one (evaluated dataset, model weights, decoder, loss, protocol) with one run per
seed; the protocol is every identity option of the run other than those (see
identity.json, or config.yaml for older runs), the --tuning protocol among them. Row labels: mirage.report.labels. Dice and
IoU are in percent, HD95 in pixels.

Per run, the mean of a class group is the mean over all its (volume, class) rows, NaN left
out (as run_seg_eval.py prints it); a class's mean is over volumes. The summary gives the
mean and the sample standard deviation (n - 1) of these per-run means over seeds.
Anything that would make a mean wrong (class sets, --empty_volume modes or --hd95_missing
rules that differ between seeds) leaves the mean empty with a note saying why, rather than
a wrong number. A class never predicted in a test volume that holds it is counted per row
(``missed``, ``missed_note``), so the tables can flag the cell.
"""
import json
import warnings
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from mirage.evaluate.intervals import BOOTSTRAP_RESAMPLES, interval_columns
from mirage.report.labels import is_ensemble, label_groups
# The metrics' vocabulary lives in metric_columns; these names are also read from here.
from mirage.report.metric_columns import (CI_RESAMPLES, LOWER_IS_BETTER,  # noqa: F401
                                          PERCENT_METRICS, lower_is_better, row_intervals,
                                          study_metrics, unit_of)
from mirage.run import METRICS
from mirage.run.results import HD95_MISSING_DEFAULT, missed_counts

CLASS_GROUPS = ("layers", "lesions", "all")
@dataclass(frozen=True)
class GroupKey:
    """What a paper table cell compares: everything but the seed."""

    dataset: str  # the evaluated dataset
    trained_on: str  # the run's training dataset (differs for external test sets)
    model: str  # weights file stem
    weights: str  # the weights file's SHA-256 (or its name for older runs)
    decoder: str
    loss: str
    protocol: tuple  # ((option, JSON value), ...)
    tuning: str = "frozen"  # the --tuning protocol (mirage.run.catalog.Run.tuning)
    # "class table 2" where runs of this dataset were trained with several class tables
    # (identity.json "classes"), else "": see tag_class_tables
    class_table: str = ""
    variant: str = ""  # "ensemble of seeds 0,1,2, flip" (Run.variant): a row of its own

    @property
    def dataset_label(self):
        """The dataset, as summary.csv's dataset column says it."""
        if self.dataset == self.trained_on:
            return self.dataset
        return f"{self.dataset} (from {self.trained_on})"

    @property
    def column(self):
        """The paper tables' column of the group: its dataset and, when the dataset's runs
        have several class tables, which one ("Duke_DME, class table 2")."""
        return column_label(self.dataset_label, self.class_table)


def column_label(dataset_label, class_table=""):
    """A paper table column: the dataset label, plus its class table where it has several."""
    return f"{dataset_label}, {class_table}" if class_table else dataset_label


@dataclass
class Member:
    """One seed of a group: the run and its evaluation on the group's dataset."""

    run: object  # mirage.run.catalog.Run
    evaluation: object  # mirage.run.catalog.Evaluation

    @property
    def seed(self):
        return self.run.seed


@dataclass
class Group:
    key: GroupKey
    members: list = field(default_factory=list)  # sorted by seed
    notes: list = field(default_factory=list)
    label: str = ""  # the row label in the paper tables
    model_label: str = ""  # the label without the protocol: the row of tables by protocol
    tuning_label: str = ""  # the protocol in words: the column of tables by protocol
    conflict: str = ""  # why no mean can be computed at all (empty when fine)
    classes_differ: bool = False  # group means not computed, class means are

    @property
    def seeds(self):
        return [m.seed for m in self.members]

    @property
    def empty_volume(self):
        modes = sorted({m.evaluation.empty_volume for m in self.members} - {""})
        return "/".join(modes) or "unknown"

    @property
    def hd95_missing(self):
        rules = sorted({_hd95_rule(m.evaluation) for m in self.members})
        return "/".join(rules) or HD95_MISSING_DEFAULT

    @property
    def weights_sha256(self):
        return next((m.run.weights_sha256 for m in self.members if m.run.weights_sha256), "")

    def class_groups(self):
        kinds = {k for m in self.members for k in m.evaluation.kinds()}
        return [g for g in CLASS_GROUPS if g in kinds or g == "all"]

    def classes(self, class_group):
        """Class labels of the class group in the order the results files list them."""
        seen = {}
        for member in self.members:
            for label in member.evaluation.group_rows(class_group)["Class"]:
                seen.setdefault(label, None)
        return list(seen)


@dataclass
class Study:
    runs: list
    groups: list
    notes: list = field(default_factory=list)

    @property
    def datasets(self):
        """The tables' columns (dataset labels, with their class table where a dataset has
        several) in order: own test sets first."""
        keys = sorted({g.key for g in self.groups},
                      key=lambda k: (k.dataset != k.trained_on, k.dataset_label, k.column))
        return list(dict.fromkeys(k.column for k in keys))

    @property
    def labels(self):
        return sorted({g.label for g in self.groups})

    def group(self, label, column):
        for group in self.groups:
            if group.label == label and group.key.column == column:
                return group
        return None


def _hd95_rule(evaluation):
    # Evaluations made by hand (tests, other tools) may not carry the rule.
    return getattr(evaluation, "hd95_missing", HD95_MISSING_DEFAULT)


# ----------------------------------------------------------------------------- grouping
def build_study(runs, labels=None):
    """Group the evaluated runs by (dataset, model, decoder, loss, protocol) across seeds.

    labels: {weights file name or stem, or automatic row label: text} (see
    mirage.report.labels.label_groups); UserError for a key that names nothing.
    """
    by_key = {}
    for run in runs:
        for evaluation in run.evaluations:
            key = GroupKey(dataset=evaluation.dataset, trained_on=run.train_dataset,
                           model=run.model, weights=run.weights_id, decoder=run.decoder,
                           loss=run.loss, protocol=run.protocol(), tuning=run.tuning,
                           variant=run.variant)
            by_key.setdefault(key, []).append(Member(run, evaluation))
    groups = []
    for key, members in by_key.items():
        group = Group(key=key)
        members.sort(key=lambda m: (m.seed, str(m.run.path)))
        for member in members:
            same = [m for m in group.members if m.seed == member.seed]
            if same:
                note = (f"seed {member.seed} twice: {member.run.path} not used (same options "
                        f"as {same[0].run.path})")
                group.notes.append(note)
                member.run.notes.append(f"{key.dataset}: duplicate of {same[0].run.path}; "
                                        "not used")
                continue
            group.members.append(member)
        groups.append(group)
    notes = tag_class_tables(groups)
    notes += label_groups(groups, labels)
    for group in groups:
        _check_group(group)
    _note_missing_seeds([g for g in groups if not is_ensemble(g)])
    groups.sort(key=lambda g: (g.key.dataset_label, g.key.column, g.label))
    return Study(runs=list(runs), groups=groups, notes=notes)


def _class_entries(key):
    """The class table a group's runs were trained with ([[value, label], ...] from
    identity.json), or None when not recorded (runs without identity.json)."""
    text = dict(key.protocol).get("classes")
    return None if text is None else json.loads(text)


def tag_class_tables(groups):
    """Give each group of a dataset whose runs were trained with several class tables
    (identity.json "classes") its table: "class table 1", "class table 2", ... (fewest
    classes first), so the tables put each in a column of its own rather than comparing
    scores over different classes in one. Returns one note per such dataset, which says
    what each table is. Groups without a recorded table join no column of a known one."""
    by_dataset = {}
    for group in groups:
        by_dataset.setdefault(group.key.dataset_label, []).append(group)
    notes = []
    for dataset, members in by_dataset.items():
        tables = {}
        for group in members:
            entries = _class_entries(group.key)
            if entries is not None:
                tables.setdefault(json.dumps(entries), entries)
        if len(tables) < 2:
            continue
        order = sorted(tables, key=lambda text: (len(tables[text]), text))
        names = {text: f"class table {i}" for i, text in enumerate(order, 1)}
        for group in members:
            entries = _class_entries(group.key)
            tag = "class table not recorded" if entries is None else \
                names[json.dumps(entries)]
            group.key = replace(group.key, class_table=tag)
        described = "; ".join(
            f"{names[text]} = {len(tables[text])} classes ("
            + ", ".join(f"{value} {label}" for value, label in tables[text]) + ")"
            for text in order)
        notes.append(f"{dataset}: runs trained with {len(tables)} different class tables "
                     f"(identity.json classes) are in separate columns: {described}")
    return notes


def _check_group(group):
    modes = {m.evaluation.empty_volume for m in group.members} - {""}
    if len(modes) > 1:
        which = "; ".join(f"s{m.seed}: {m.evaluation.empty_volume or 'unknown'}"
                          for m in group.members)
        group.conflict = (f"seeds evaluated with different --empty_volume modes ({which}); "
                          "re-evaluate all with one mode")
        group.notes.append(group.conflict)
    rules = {_hd95_rule(m.evaluation) for m in group.members}
    if len(rules) > 1 and not group.conflict:
        which = "; ".join(f"s{m.seed}: {_hd95_rule(m.evaluation)}" for m in group.members)
        group.conflict = (f"seeds evaluated with different --hd95_missing rules ({which}); "
                          "re-evaluate all with one rule")
        group.notes.append(group.conflict)
    class_sets = {m.evaluation.classes for m in group.members}
    if len(class_sets) > 1:
        group.classes_differ = True
        which = "; ".join(f"s{m.seed}: {', '.join(m.evaluation.classes)}"
                          for m in group.members)
        group.notes.append(f"class sets differ between seeds ({which}); group means not "
                           "computed, per-class means over the seeds that have the class")
    volume_sets = {frozenset(m.evaluation.rows["ID"]) for m in group.members}
    if len(volume_sets) > 1:
        counts = ", ".join(f"s{m.seed}: {m.evaluation.rows['ID'].nunique()}"
                           for m in group.members)
        group.notes.append(f"test volumes differ between seeds ({counts})")
    for member in group.members:
        group.notes.extend(f"s{member.seed}: {note}" for note in member.run.notes
                           if "duplicate of" not in note)


def _note_missing_seeds(groups):
    """A group with fewer seeds than others in its column says which are missing."""
    seeds_by_dataset = {}
    for group in groups:
        seeds_by_dataset.setdefault(group.key.column, set()).update(group.seeds)
    for group in groups:
        missing = sorted(seeds_by_dataset[group.key.column] - set(group.seeds))
        if missing:
            group.notes.append(f"seed(s) {', '.join(map(str, missing))} missing (other models "
                               "on this dataset have them)")


# ----------------------------------------------------------------------------- numbers
def _nanmean(values):
    values = np.asarray(values, dtype=float)
    if values.size == 0 or np.isnan(values).all():
        return float("nan")
    return float(np.nanmean(values))


def _scaled(rows, metric):
    values = rows[metric].to_numpy(dtype=float)
    return values * 100 if metric in PERCENT_METRICS else values


def seed_statistics(values):
    """(mean, sample std, n) over the finite values (per-seed means); std NaN when n < 2."""
    finite = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    if finite.size == 0:
        return float("nan"), float("nan"), 0
    std = float(np.std(finite, ddof=1)) if finite.size > 1 else float("nan")
    return float(finite.mean()), std, int(finite.size)


def format_cell(mean, std):
    """'81.23 ± 0.45'; 'n/a' for no value; the std 'n/a' for a single seed."""
    if not np.isfinite(mean):
        return "n/a"
    return f"{mean:.2f} ± {'n/a' if not np.isfinite(std) else f'{std:.2f}'}"


def _nan_note(frames, metrics=METRICS):
    notes = []
    for metric in metrics:
        total = sum(len(f) for f in frames)
        missing = sum(int(f[metric].isna().sum()) for f in frames)
        if missing:
            notes.append(f"{metric}: {missing} of {total} values NaN, left out")
    return notes


SUMMARY_COLUMNS = ["dataset", "trained_on", "model", "weights_sha256", "decoder", "loss",
                   "tuning", "protocol", "label", "model_label", "tuning_label", "class_group", "class", "seeds", "seed_list",
                   "volumes", *[f"{m}_{s}" for m in METRICS for s in ("mean", "std")],
                   *METRICS, "missed", "missed_note", "empty_volume", "hd95_missing",
                   "notes", "runs",
                   # last, so that readers of the columns above by position keep working
                   *[f"{m}_seeds" for m in METRICS], "class_table"]


def seed_values(present, metric):
    """{seed: its mean of ``metric`` over its rows, NaN when every row is NaN} of
    ``present`` = [(Member, its rows), ...] (Dice and IoU in percent)."""
    return {member.seed: _nanmean(_scaled(rows, metric)) for member, rows in present}


def unscored_seeds_note(values, metric):
    """'HD95: 1 of 2 seeds scored; no value in seed(s) 2 (every volume NaN)' when some
    but not all of ``values`` (seed_values) are NaN, else "".

    Such a cell is a mean over fewer seeds than the group has, so it is never shown or
    tested as if all of them were there."""
    missing = [seed for seed, value in values.items() if not np.isfinite(value)]
    if not missing or len(missing) == len(values):
        return ""
    return (f"{metric}: {len(values) - len(missing)} of {len(values)} seeds scored; no "
            f"value in seed(s) {', '.join(map(str, missing))} (every volume NaN)")


def summary_columns(metrics=METRICS, bootstrap=BOOTSTRAP_RESAMPLES):
    """summary.csv's columns: SUMMARY_COLUMNS, then (appended, so that readers by
    position keep working) each metric's 95% interval and the resample count, then the
    columns of the metrics beyond METRICS with their intervals."""
    columns = list(SUMMARY_COLUMNS)
    if bootstrap:
        columns += [c for metric in METRICS for c in interval_columns(metric)]
        columns.append(CI_RESAMPLES)
    for metric in metrics:
        if metric not in METRICS:
            columns += [f"{metric}_mean", f"{metric}_std", metric, f"{metric}_seeds"]
            columns += interval_columns(metric) if bootstrap else []
    return columns


def summary_table(study, bootstrap=BOOTSTRAP_RESAMPLES):
    """One row per group, class group and class; see the module docstring for the numbers.

    Columns (SUMMARY_COLUMNS): dataset, trained_on, model, weights_sha256, decoder, loss,
    tuning (the --tuning protocol), protocol, label, model_label (the label without the
    protocol), tuning_label (the protocol in words), class_group, class ("[layers]" for
    the class group's own row), seeds (the seeds with a Dice value), seed_list (the seeds
    with rows), volumes, <metric>_mean, <metric>_std, <metric> ("mean ± std"), missed (the
    (seed, volume, class) scores of a class never predicted in a volume holding it),
    missed_note (the same in words), empty_volume, hd95_missing, notes, runs,
    <metric>_seeds (the seeds with a value of that metric: a seed whose every volume is
    NaN has none, and the mean is over the others), class_table ("class table 2" where
    the dataset's runs were trained with several class tables, else ""); then
    (summary_columns) <metric>_ci_low, <metric>_ci_high, <metric>_ci_method (the 95%
    bootstrap interval over test volumes with ``bootstrap`` resamples; 0: none of these
    columns) and ci_resamples; then the same for metrics beyond Dice, IoU and HD95.
    """
    metrics = study_metrics(study)
    records, intervals = [], {}  # a class's rows are the same under its kind and "all"
    for group in study.groups:
        key = group.key
        base = {"dataset": key.dataset_label, "class_table": key.class_table,
                "trained_on": key.trained_on,
                "model": key.model, "weights_sha256": group.weights_sha256,
                "decoder": key.decoder, "loss": key.loss, "tuning": key.tuning,
                "protocol": "; ".join(f"{k}={v}" for k, v in key.protocol),
                "label": group.label, "model_label": group.model_label,
                "tuning_label": group.tuning_label}
        for class_group in group.class_groups():
            frames = [m.evaluation.group_rows(class_group) for m in group.members]
            rows = [(f"[{class_group}]", frames)]
            for label in group.classes(class_group):
                rows.append((label, [f[f["Class"] == label] for f in frames]))
            for name, parts in rows:
                record = dict(base, class_group=class_group, **{"class": name})
                record.update(_row_numbers(group, name, parts, metrics))
                cached = (id(group), name)
                if cached not in intervals:
                    intervals[cached] = row_intervals(parts, metrics, bootstrap,
                                                      _blocked(group, name))
                record.update(intervals[cached])
                records.append(record)
    return pd.DataFrame(records, columns=summary_columns(metrics, bootstrap))


def _row_numbers(group, name, parts, metrics=METRICS):
    """The seeds, volumes, metrics, missed classes and notes of one summary row."""
    present = [(m, p) for m, p in zip(group.members, parts) if len(p)]
    blocked = _blocked(group, name)
    record = {"seed_list": " ".join(str(m.seed) for m, _ in present),
              "volumes": len({v for _, p in present for v in p["ID"]})}
    unscored = []
    for metric in metrics:
        values = {} if blocked else seed_values(
            [(m, p) for m, p in present if metric in p], metric)
        mean, std, n = seed_statistics(values.values() if values else [float("nan")])
        record[f"{metric}_mean"], record[f"{metric}_std"] = mean, std
        record[metric] = format_cell(mean, std)
        record[f"{metric}_seeds"] = n
        if metric == "Dice":
            record["seeds"] = n
        unscored.append(unscored_seeds_note(values, metric))
    record["missed"], record["missed_note"] = missed_summary(present)
    notes = _row_notes(group, name, parts, metrics) + [note for note in unscored if note]
    record.update(empty_volume=group.empty_volume, hd95_missing=group.hd95_missing,
                  notes=" | ".join(notes),
                  runs="; ".join(str(m.run.path) for m in group.members))
    return record


def _blocked(group, name):
    """Why a row has no mean ("" when it has one): a conflict between the group's seeds,
    or (for a class group's row) class sets that differ between them."""
    if group.conflict:
        return group.conflict
    return "class sets differ between seeds" if group.classes_differ and \
        name.startswith("[") else ""


def missed_summary(present):
    """(count, text) of the classes never predicted in test volumes that hold them.

    present: [(Member, its results rows), ...]. count: the (seed, volume, class) scores
    concerned; text e.g. "Fluid never predicted in 8 of 8 test volumes that hold it, in
    each of the 3 seeds", "" when none.
    """
    per_class = {}
    for member, rows in present:
        for label, (missed, holding) in missed_counts(rows).items():
            per_class.setdefault(label, []).append((member.seed, missed, holding))
    texts = []
    for label, seeds in per_class.items():
        counts = {(missed, holding) for _, missed, holding in seeds}
        if len(counts) == 1 and len(seeds) == len(present):
            missed, holding = counts.pop()
            every = f", in each of the {len(seeds)} seeds" if len(seeds) > 1 else ""
            texts.append(f"{label} never predicted in {missed} of {holding} test volumes "
                         f"that hold it{every}")
        else:
            which = ", ".join(f"seed {seed}: {missed} of {holding}"
                              for seed, missed, holding in seeds)
            texts.append(f"{label} never predicted in some test volumes that hold it "
                         f"({which})")
    total = sum(missed for seeds in per_class.values() for _, missed, _ in seeds)
    return total, "; ".join(texts)


def _row_notes(group, name, parts, metrics=METRICS):
    notes = []
    if name.startswith("["):
        notes += group.notes
    elif group.conflict:
        notes.append(group.conflict)
    notes += _nan_note([p for p in parts if len(p)], [m for m in metrics
                                                      if all(m in p for p in parts)])
    return notes


def volume_scores(group, class_group, metric):
    """Per-volume scores of a group: each run's per-volume mean over the class group's
    classes (NaN left out), then the mean over seeds (seeds lacking the volume or with NaN
    left out). Returns a Series indexed by volume ID (Dice/IoU in percent), or None when
    the group cannot be averaged (see Group.conflict / classes_differ)."""
    if group.conflict or group.classes_differ:
        return None
    per_seed = []
    for member in group.members:
        rows = member.evaluation.group_rows(class_group)
        if rows.empty:
            continue
        frame = pd.DataFrame({"ID": rows["ID"].to_numpy(), "v": _scaled(rows, metric)})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            per_seed.append(frame.groupby("ID", sort=True)["v"].mean())
    if not per_seed:
        return None
    return pd.concat(per_seed, axis=1).mean(axis=1, skipna=True)
