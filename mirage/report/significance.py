"""Is model A really better than model B? Paired Wilcoxon signed-rank tests over volumes.

    wilcoxon_paired(a, b)          -> dict (n, median difference, W, p-value, note)
    holm(p_values)                 -> Holm-Bonferroni adjusted p-values
    significance_table(study)      -> DataFrame written as significance.csv
    difference_columns(bootstrap)  -> the columns appended for the interval of A - B

Pairing: on one dataset, the two models' scores of the same test volume form a pair; a
model's score of a volume is its per-volume score averaged over its seeds
(mirage.report.study.volume_scores). Volumes missing or NaN for either model are left out;
a seed with no value of the metric in any volume adds nothing, and the row's note says that
the model's scores come from fewer of its seeds ("A: HD95: 1 of 2 seeds scored; ...").
The test: two-sided Wilcoxon signed-rank test on the differences A - B; zero differences
(|d| < 1e-9) are dropped first (Wilcoxon's convention); the p-value is exact when at most
50 differences remain and no two have equal magnitude, else the normal approximation with
the tie correction and no continuity correction. With fewer than MIN_PAIRS paired volumes
no p-value is given (the smallest possible two-sided p with 5 pairs is 0.0625).
Correction: Holm-Bonferroni over all tested pairs of models in one family = (dataset,
class group, metric). "All datasets (pooled)" repeats the test with the volumes of every
dataset both models were evaluated on. An ensemble's row (one prediction of several runs,
mirage.run.catalog.Run.ensemble) is left out of the tests: its runs are the seeds of a
model of the table, so it is neither a model of its own nor independent of theirs.

Beside each test, the 95% paired bootstrap interval of the mean difference A - B over the
same paired volumes (mirage.evaluate.intervals.difference_interval: the volumes resampled
in pairs, BCa, the fixed random state, ``bootstrap`` resamples), in columns appended after
COLUMNS: mean_diff, diff_ci_low, diff_ci_high, diff_ci_method, ci_resamples. An interval
that excludes 0 says the same as a test at the 5% level, without the multiple-comparison
correction (which p_holm has).
"""
import itertools

import numpy as np
import pandas as pd
from scipy import stats

from mirage.evaluate.intervals import BOOTSTRAP_RESAMPLES, difference_interval
from mirage.report.labels import is_ensemble
from mirage.report.metric_columns import CI_RESAMPLES, lower_is_better, study_metrics
from mirage.report.study import (missed_summary, seed_values, unscored_seeds_note,
                                 volume_scores)

MIN_PAIRS = 6
EXACT_MAX = 50
ZERO_TOLERANCE = 1e-9
POOLED = "all datasets (pooled)"
COLUMNS = ("dataset", "class_group", "metric", "model_a", "model_b", "n_volumes", "mean_a",
           "mean_b", "median_diff", "statistic", "p_value", "p_holm", "family_size",
           "significant", "better", "method", "note")
DIFFERENCE_COLUMNS = ("mean_diff", "diff_ci_low", "diff_ci_high", "diff_ci_method",
                      CI_RESAMPLES)


def difference_columns(bootstrap):
    """The columns appended after COLUMNS: the interval of A - B (none without
    ``bootstrap``)."""
    return list(DIFFERENCE_COLUMNS) if bootstrap else []


def wilcoxon_paired(a, b, min_pairs=MIN_PAIRS):
    """Two-sided Wilcoxon signed-rank test of paired scores ``a`` and ``b`` ((n,) arrays).

    Returns {n_volumes, median_diff (median of a - b), statistic (the smaller rank sum),
    p_value, method ("exact" / "normal approximation"), note}; p_value is NaN (and the note
    says why) with fewer than ``min_pairs`` pairs.
    """
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n = int(diff.size)
    result = {"n_volumes": n, "median_diff": float(np.median(diff)) if n else float("nan"),
              "statistic": float("nan"), "p_value": float("nan"), "method": "", "note": ""}
    if n < min_pairs:
        result["note"] = (f"only {n} paired volume(s) (< {min_pairs}): a Wilcoxon test is "
                          "not meaningful, no p-value")
        return result
    nonzero = diff[np.abs(diff) >= ZERO_TOLERANCE]
    if nonzero.size == 0:
        result.update(p_value=1.0, statistic=0.0,
                      note="equal scores on every paired volume")
        return result
    magnitudes = np.round(np.abs(nonzero) / ZERO_TOLERANCE)
    ties = np.unique(magnitudes).size < magnitudes.size
    exact = nonzero.size <= EXACT_MAX and not ties
    test = _wilcoxon(nonzero, "exact" if exact else "asymptotic")
    result.update(statistic=float(test.statistic), p_value=float(test.pvalue),
                  method="exact" if exact else "normal approximation")
    dropped = n - nonzero.size
    if dropped:
        result["note"] = f"{dropped} zero difference(s) dropped"
    return result


def _wilcoxon(diff, method):
    kwargs = dict(zero_method="wilcox", correction=False, alternative="two-sided")
    try:
        return stats.wilcoxon(diff, method=method, **kwargs)
    except ValueError:  # SciPy < 1.13 calls the normal approximation "approx"
        return stats.wilcoxon(diff, method="approx" if method == "asymptotic" else method,
                              **kwargs)


def holm(p_values):
    """Holm-Bonferroni adjusted p-values; NaN entries are not tested and stay NaN.

    With the m finite p-values sorted ascending, p_(i) (i = 1..m) becomes
    max_{j <= i} min(1, (m - j + 1) p_(j)).
    """
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    tested = np.flatnonzero(np.isfinite(p))
    m = tested.size
    running = 0.0
    for rank, index in enumerate(tested[np.argsort(p[tested], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted


# ----------------------------------------------------------------------------- the table
def _pair_problem(group_a, group_b, class_group):
    for group in (group_a, group_b):
        if group.conflict:
            return f"{group.label}: {group.conflict}"
        if group.classes_differ:
            return f"{group.label}: class sets differ between its seeds"
    modes = {group_a.empty_volume, group_b.empty_volume} - {"unknown"}
    if len(modes) > 1:
        return (f"scored with different --empty_volume modes ({group_a.empty_volume} vs "
                f"{group_b.empty_volume}); re-evaluate both with one mode")
    if group_a.hd95_missing != group_b.hd95_missing:
        return (f"scored with different --hd95_missing rules ({group_a.hd95_missing} vs "
                f"{group_b.hd95_missing}); re-evaluate both with one rule")
    classes_a, classes_b = group_a.classes(class_group), group_b.classes(class_group)
    if sorted(classes_a) != sorted(classes_b):
        return (f"different classes scored ({', '.join(classes_a)} vs "
                f"{', '.join(classes_b)}); no fair comparison")
    return ""


def _paired(scores_a, scores_b):
    """Common volumes with a value for both; (a, b, number of common volumes left out)."""
    common = scores_a.index.intersection(scores_b.index)
    a, b = scores_a.loc[common], scores_b.loc[common]
    finite = a.notna() & b.notna()
    return a[finite].to_numpy(), b[finite].to_numpy(), int((~finite).sum()), len(common)


def _compare(dataset, class_group, metric, label_a, label_b, pieces, min_pairs,
             bootstrap=0):
    """One row. pieces: [(scores_a, scores_b, problem), ...] (several for pooled)."""
    row = {"dataset": dataset, "class_group": class_group, "metric": metric,
           "model_a": label_a, "model_b": label_b}
    problems = [problem for _, _, problem in pieces if problem]
    if problems:
        row.update(n_volumes=0, note=problems[0])
        return row
    parts = [_paired(a, b) for a, b, _ in pieces]
    a = np.concatenate([p[0] for p in parts])
    b = np.concatenate([p[1] for p in parts])
    nan_dropped, common = sum(p[2] for p in parts), sum(p[3] for p in parts)
    if common == 0:
        row.update(n_volumes=0, note="no common volumes: the two models were tested on "
                                     "different volumes")
        return row
    result = wilcoxon_paired(a, b, min_pairs)
    notes = [result.pop("note")]
    if nan_dropped:
        notes.append(f"{nan_dropped} common volume(s) with a NaN score left out")
    row.update(result, mean_a=float(np.mean(a)) if a.size else float("nan"),
               mean_b=float(np.mean(b)) if b.size else float("nan"),
               note="; ".join(n for n in notes if n))
    if bootstrap:
        row.update(_difference(a, b, bootstrap))
    return row


def _difference(a, b, bootstrap):
    """The mean of A - B over the paired volumes and its 95% paired bootstrap interval."""
    interval = difference_interval(a, b, bootstrap)
    return {"mean_diff": float(np.mean(a - b)) if a.size else float("nan"),
            "diff_ci_low": interval.low, "diff_ci_high": interval.high,
            "diff_ci_method": interval.description, CI_RESAMPLES: bootstrap}


def significance_table(study, metrics=None, alpha=0.05, min_pairs=MIN_PAIRS,
                       bootstrap=BOOTSTRAP_RESAMPLES):
    """Every pair of models on each dataset (and pooled over datasets), per class group
    and metric (default: every metric of the study); columns COLUMNS, then
    difference_columns(bootstrap). See the module docstring for the test, the correction
    and the interval."""
    metrics = study_metrics(study) if metrics is None else list(metrics)
    rows = []
    by_dataset = {}
    for group in study.groups:
        if is_ensemble(group):  # one prediction, not seeds of a model: left out
            continue
        by_dataset.setdefault(group.key.column, []).append(group)
    for dataset, groups in by_dataset.items():
        groups = sorted(groups, key=lambda g: g.label)
        for group_a, group_b in itertools.combinations(groups, 2):
            for class_group in _shared_class_groups(group_a, group_b):
                problem = _pair_problem(group_a, group_b, class_group)
                missed = _missed_note(group_a, group_b, class_group)
                for metric in metrics:
                    scores = _scores(group_a, group_b, class_group, metric, problem)
                    row = _compare(dataset, class_group, metric, group_a.label,
                                   group_b.label, [scores], min_pairs, bootstrap)
                    notes = (row.get("note"), missed,
                             *_seed_notes((group_a, group_b), class_group, metric))
                    row["note"] = "; ".join(n for n in notes if n)
                    rows.append(row)
    if len(by_dataset) > 1:
        rows += _pooled_rows(by_dataset, metrics, min_pairs, bootstrap)
    table = pd.DataFrame(rows, columns=list(COLUMNS) + difference_columns(bootstrap))
    return _correct(table, alpha)


def _missed_note(group_a, group_b, class_group):
    """'B never predicts a class in some volumes that hold it (summary.md, †)' or ""."""
    which = [g.label for g in (group_a, group_b)
             if missed_summary([(m, m.evaluation.group_rows(class_group))
                                for m in g.members])[0]]
    if not which:
        return ""
    return (f"{' and '.join(which)} never predict(s) a class in some test volumes that "
            "hold it (see summary.md, †)")


def _seed_notes(groups, class_group, metric, dataset=""):
    """'A: HD95: 1 of 2 seeds scored; no value in seed(s) 2 (...)' for each group whose
    per-volume scores of ``metric`` come from fewer seeds than it has."""
    notes = []
    for group in groups:
        present = [(m, m.evaluation.group_rows(class_group)) for m in group.members]
        note = unscored_seeds_note(seed_values([(m, rows) for m, rows in present
                                                if len(rows)], metric), metric)
        if note:
            notes.append(f"{dataset + ': ' if dataset else ''}{group.label}: {note}")
    return notes


def _shared_class_groups(group_a, group_b):
    other = set(group_b.class_groups())
    return [g for g in group_a.class_groups() if g in other]


def _scores(group_a, group_b, class_group, metric, problem):
    if problem:
        return None, None, problem
    return (volume_scores(group_a, class_group, metric),
            volume_scores(group_b, class_group, metric), "")


def _pooled_rows(by_dataset, metrics, min_pairs, bootstrap=0):
    labels = sorted({g.label for groups in by_dataset.values() for g in groups})
    rows = []
    for label_a, label_b in itertools.combinations(labels, 2):
        for class_group in ("layers", "lesions", "all"):
            for metric in metrics:
                pieces, used, seed_notes = [], [], []
                for dataset, groups in by_dataset.items():
                    found = {g.label: g for g in groups}
                    a, b = found.get(label_a), found.get(label_b)
                    if a is None or b is None or class_group not in _shared_class_groups(a, b):
                        continue
                    seed_notes += _seed_notes((a, b), class_group, metric, dataset)
                    problem = _pair_problem(a, b, class_group)
                    if problem:
                        problem = f"{dataset}: {problem}"
                    scores_a, scores_b, problem = _scores(a, b, class_group, metric, problem)
                    # Volume IDs are only unique within a dataset.
                    if scores_a is not None:
                        scores_a = _prefixed(scores_a, dataset)
                        scores_b = _prefixed(scores_b, dataset)
                    pieces.append((scores_a, scores_b, problem))
                    used.append(dataset)
                if len(used) < 2:
                    continue
                row = _compare(POOLED, class_group, metric, label_a, label_b, pieces,
                               min_pairs, bootstrap)
                row["note"] = "; ".join(n for n in (f"over {', '.join(used)}",
                                                    row.get("note", ""), *seed_notes) if n)
                rows.append(row)
    return rows


def _prefixed(scores, dataset):
    scores = scores.copy()
    scores.index = [f"{dataset}/{i}" for i in scores.index]
    return scores


def _correct(table, alpha):
    """Holm within each (dataset, class group, metric); 'better' where significant."""
    table["p_holm"] = np.nan
    table["family_size"] = 0
    for _, index in table.groupby(["dataset", "class_group", "metric"], sort=False).groups.items():
        p = table.loc[index, "p_value"].to_numpy(dtype=float)
        table.loc[index, "p_holm"] = holm(p)
        table.loc[index, "family_size"] = int(np.isfinite(p).sum())
    significant = table["p_holm"].to_numpy(dtype=float) < alpha
    table["significant"] = np.where(np.isfinite(table["p_holm"].to_numpy(dtype=float)),
                                    np.where(significant, "yes", "no"), "")
    better = []
    for (_, row), sig in zip(table.iterrows(), significant):
        if not sig:
            better.append("")
            continue
        a_higher = row["median_diff"] > 0 if row["median_diff"] != 0 else \
            row["mean_a"] > row["mean_b"]
        a_better = a_higher != lower_is_better(row["metric"])
        better.append(row["model_a"] if a_better else row["model_b"])
    table["better"] = better
    return table
