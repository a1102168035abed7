"""95% bootstrap confidence intervals: per class and class group of a run, per study cell
over seeds, and of the paired difference between two models.

Every interval is checked against an independent reference on the same data and random
state: ``scipy.stats.bootstrap`` called here directly, and the BCa interval worked out by
hand from its textbook definition (Efron & Tibshirani 1993, 14.3 and 14.15) with the same
resample draws. Without the new options the outputs are what they were, byte for byte
(tests/data/intervals/, written by the code before the intervals existed).
"""
import inspect
import io
import math
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import interval_fixtures as F
import mirage.report.study_outputs as study_outputs
from mirage.errors import UserError
from mirage.evaluate.intervals import (BOOTSTRAP_RESAMPLES, RANDOM_STATE, difference_interval,
                                       mean_interval, rows_interval, volume_sums)
from mirage.report.significance import significance_table
from mirage.report.study import build_study, summary_table, volume_scores
from mirage.report.tables import paper_tables, to_latex, to_markdown

N = BOOTSTRAP_RESAMPLES


def scipy_interval(data, statistic, method="BCa", paired=False, resamples=N):
    """scipy.stats.bootstrap as a reader would call it, with the documented random state."""
    keyword = "rng" if "rng" in inspect.signature(stats.bootstrap).parameters \
        else "random_state"
    result = stats.bootstrap(data, statistic, n_resamples=resamples, paired=paired,
                             method=method, **{keyword: np.random.default_rng(RANDOM_STATE)})
    return result.confidence_interval.low, result.confidence_interval.high


def sorted_mean(values, axis=-1):
    """The mean as the definition takes it: the values added in ascending order."""
    return np.mean(np.sort(values, axis=axis), axis=axis)


def bca_by_hand(values, resamples=N, level=0.95):
    """The BCa interval of the mean of ``values``, from the definition: the same draws as
    scipy's (one (resamples, n) block of integers from default_rng(RANDOM_STATE)), bias
    z0 from the share of resampled means below the mean (ties count half), acceleration
    from the jackknife, then the adjusted quantiles of the resampled means (linear
    interpolation)."""
    values = np.asarray(values, dtype=float)
    n = values.size
    draws = np.random.default_rng(RANDOM_STATE).integers(0, n, (resamples, n))
    means = sorted_mean(values[draws])
    theta = sorted_mean(values)
    normal = NormalDist()
    share = (np.sum(means < theta) + np.sum(means <= theta)) / (2 * resamples)
    z0 = normal.inv_cdf(share)
    jack = np.array([np.delete(values, i).mean() for i in range(n)])
    spread = jack.mean() - jack
    acceleration = np.sum(spread ** 3) / (6 * np.sum(spread ** 2) ** 1.5)
    ends = []
    for tail in ((1 - level) / 2, (1 + level) / 2):
        z = normal.inv_cdf(tail)
        ends.append(normal.cdf(z0 + (z0 + z) / (1 - acceleration * (z0 + z))))
    return tuple(np.quantile(means, ends))


def frame(ids, values, column="Dice"):
    return pd.DataFrame({"ID": ids, column: values})


def per_volume(rows, metric, scale=1.0):
    """(sums, counts) of the finite scores of each volume (IDs in order), each sum
    correctly rounded (math.fsum), as the definition says."""
    rows = rows.reset_index(drop=True)
    values = (scale * rows[metric]).dropna()
    grouped = values.groupby(rows.loc[values.index, "ID"])
    return (grouped.agg(lambda v: math.fsum(v)).to_numpy(dtype=float),
            grouped.size().to_numpy(dtype=float))


def ratio(sums, counts, axis=-1):
    """A mean over (volume, class) rows from per-volume sums and counts (the sums added in
    ascending order)."""
    return np.sort(sums, axis=axis).sum(axis=axis) / counts.sum(axis=axis)


SCORES = np.array([0.71, 0.84, 0.66, 0.90, 0.78, 0.81, 0.59, 0.87, 0.75, 0.80])


# ----------------------------------------------------------------------------- one run
def test_a_class_interval_is_scipy_bootstrap_of_its_per_volume_scores():
    ids = [f"v{i}" for i in range(SCORES.size)]
    interval = rows_interval([frame(ids, SCORES)], "Dice", scale=100.0)
    assert interval.method == "BCa" and interval.volumes == SCORES.size
    low, high = scipy_interval((100 * SCORES,), sorted_mean)
    assert (interval.low, interval.high) == pytest.approx((low, high), rel=1e-12)
    # the textbook BCa with the same draws: an independent reference, not scipy's code
    assert (interval.low, interval.high) == pytest.approx(bca_by_hand(100 * SCORES),
                                                          rel=1e-9)
    assert interval.low < 100 * SCORES.mean() < interval.high


def test_volumes_without_a_value_are_left_out_as_they_are_of_the_mean():
    values = np.append(SCORES, [np.nan, np.nan])
    ids = [f"v{i}" for i in range(values.size)]
    interval = rows_interval([frame(ids, values, "HD95")], "HD95")
    assert interval.volumes == SCORES.size
    assert (interval.low, interval.high) == pytest.approx(
        scipy_interval((SCORES,), sorted_mean), rel=1e-12)


def test_bca_undefined_falls_back_to_the_percentile_interval_and_says_so():
    ids = [f"v{i}" for i in range(6)]
    interval = rows_interval([frame(ids, np.full(6, 0.5))], "Dice", scale=100.0)
    assert (interval.low, interval.high) == (50.0, 50.0)
    assert interval.method == "percentile"
    assert interval.description == ("percentile (BCa undefined: every resample gives the "
                                    "same mean)")
    with pytest.warns(stats.DegenerateDataWarning), np.errstate(invalid="ignore"):
        bca = scipy_interval((np.full(6, 50.0),), np.mean)  # what scipy's BCa makes of it
    assert np.isnan(bca).all()
    assert scipy_interval((np.full(6, 50.0),), np.mean, method="percentile") == (50.0, 50.0)


def test_a_single_volume_has_no_interval():
    interval = rows_interval([frame(["v0"], [0.8])], "Dice")
    assert not interval.found and interval.method == ""
    assert interval.description == "none (only 1 volume(s) with a value)"


def test_a_class_group_resamples_volumes_with_all_their_classes():
    """The group's mean is over all (volume, class) rows, NaN left out: each resample is
    the sum of the resampled volumes' finite scores over their number."""
    rng = np.random.default_rng(5)
    rows = pd.DataFrame({"ID": np.repeat([f"v{i}" for i in range(9)], 3),
                         "Class": np.tile(["A", "B", "C"], 9),
                         "HD95": 10 + 5 * rng.random(27)})
    rows.loc[[1, 5, 6, 7, 8], "HD95"] = np.nan  # v2 has no value at all
    interval = rows_interval([rows], "HD95")
    sums, counts = per_volume(rows, "HD95")
    assert interval.volumes == len(sums) == 8
    expected = scipy_interval((sums, counts), ratio, paired=True)
    assert (interval.low, interval.high) == pytest.approx(expected, rel=1e-12)
    # its centre is the reported mean (all rows, NaN left out), not the mean of volumes
    assert ratio(sums, counts) == pytest.approx(rows["HD95"].mean(), rel=1e-12)
    assert ratio(sums, counts) != pytest.approx(
        rows.groupby("ID")["HD95"].mean().mean(), rel=1e-6)


def test_the_run_summary_csv_carries_each_group_interval(tmp_path):
    from mirage.evaluate.outputs import summary_table as run_summary, write_summary
    evaluations = F.run_evaluations()
    table = run_summary(evaluations)
    for ev in evaluations:
        for group in ("layers", "lesions", "all"):
            rows = ev.rows if group == "all" else ev.rows[ev.rows["Group"] == group]
            row = table[(table["run"] == ev.run_dir.name) & (table["group"] == group)].iloc[0]
            for metric, scale in (("Dice", 100.0), ("IoU", 100.0), ("HD95", 1.0)):
                expected = scipy_interval(per_volume(rows, metric, scale), ratio,
                                          paired=True)
                assert (row[f"{metric}_ci_low"], row[f"{metric}_ci_high"]) == \
                    pytest.approx(expected, rel=1e-12)
                assert row[f"{metric}_ci_method"] == "BCa"
    assert set(table["ci_resamples"]) == {N}
    # the columns of the first 18 are as before, byte for byte
    text = io.StringIO()
    table.iloc[:, :18].to_csv(text, index=False, na_rep="NaN")
    assert text.getvalue() == (F.GOLDEN / "eval_summary.csv").read_text()
    # a summary with intervals is recognised as one: written again over itself
    path = tmp_path / "summary.csv"
    write_summary(evaluations, path)
    write_summary(evaluations, path, bootstrap=2000)
    assert set(pd.read_csv(path)["ci_resamples"]) == {2000}
    write_summary(evaluations, path, bootstrap=0)  # the layout of earlier versions
    assert path.read_text() == (F.GOLDEN / "eval_summary.csv").read_text()
    with pytest.raises(UserError, match="--bootstrap 10: .* at least 1000"):
        write_summary(evaluations, path, bootstrap=10)


# ----------------------------------------------------------------------------- seeds
def test_a_study_cell_resamples_volumes_jointly_for_all_seeds():
    """Per seed the mean over the resampled volumes' rows, then the mean over seeds: the
    seeds are never pooled as extra volumes."""
    study = build_study(F.study_runs())
    summary = summary_table(study)
    group = next(g for g in study.groups if g.label == "A" and g.key.dataset == "D1")
    row = summary[(summary["label"] == "A") & (summary["dataset"] == "D1")
                  & (summary["class"] == "[all]")].iloc[0]
    arrays = []
    for member in group.members:  # per seed and volume: sum and number of scores
        arrays += per_volume(member.evaluation.rows, "Dice", 100.0)

    def cell(*data, axis=-1):
        per_seed = [ratio(s, c, axis) for s, c in zip(data[::2], data[1::2])]
        return np.mean(per_seed, axis=0)

    expected = scipy_interval(tuple(arrays), cell, paired=True)
    assert (row["Dice_ci_low"], row["Dice_ci_high"]) == pytest.approx(expected, rel=1e-12)
    assert row["Dice_ci_low"] < row["Dice_mean"] < row["Dice_ci_high"]


def test_a_seed_repeated_gives_the_interval_of_one_seed_not_a_narrower_one():
    one = F.result_rows(0.8, 1, "D1")
    sums, counts = volume_sums([one], "Dice", 100.0)
    single = mean_interval(sums, counts)
    sums2, counts2 = volume_sums([one, one.copy()], "Dice", 100.0)
    twice = mean_interval(sums2, counts2)
    assert (twice.low, twice.high) == pytest.approx((single.low, single.high), rel=1e-12)
    pooled = rows_interval([pd.concat([one, one.assign(ID=one["ID"] + "b")])], "Dice", 100.0)
    assert pooled.high - pooled.low < 0.8 * (single.high - single.low)  # what pooling does


def test_a_one_seed_study_cell_is_the_run_summary_interval():
    from mirage.evaluate.outputs import summary_table as run_summary
    evaluation = F.run_evaluations()[0]
    run = F.make_run("A", 1, "D1", 0.82)  # the same rows as that evaluation
    summary = summary_table(build_study([run]))
    row = summary[summary["class"] == "[all]"].iloc[0]
    run_row = run_summary([evaluation]).query("group == 'all'").iloc[0]
    for metric in ("Dice", "IoU", "HD95"):
        assert row[f"{metric}_ci_low"] == pytest.approx(run_row[f"{metric}_ci_low"], rel=1e-12)
        assert row[f"{metric}_ci_high"] == pytest.approx(run_row[f"{metric}_ci_high"],
                                                         rel=1e-12)


def test_a_seed_without_any_value_is_left_out_of_the_cell_and_its_interval():
    study = build_study(F.study_runs())
    summary = summary_table(study)
    row = summary[(summary["label"] == "A") & (summary["dataset"] == "D2")
                  & (summary["class"] == "[all]")].iloc[0]
    seed1 = next(r for r in F.study_runs() if r.path.name == "A_s1"
                 and r.evaluations[0].dataset == "D2")
    alone = rows_interval([seed1.evaluations[0].rows], "HD95")
    assert row["HD95_seeds"] == 1
    assert (row["HD95_ci_low"], row["HD95_ci_high"]) == pytest.approx(
        (alone.low, alone.high), rel=1e-12)


# ----------------------------------------------------------------------------- pairs
def test_the_paired_difference_interval_is_scipy_paired_bootstrap():
    study = build_study(F.study_runs())
    tests = significance_table(study)
    groups = {(g.label, g.key.column): g for g in study.groups}
    row = tests[(tests["dataset"] == "D1") & (tests["class_group"] == "all")
                & (tests["metric"] == "Dice") & (tests["model_a"] == "A")
                & (tests["model_b"] == "B")].iloc[0]
    a = volume_scores(groups[("A", "D1")], "all", "Dice")
    b = volume_scores(groups[("B", "D1")], "all", "Dice")
    expected = scipy_interval((a.to_numpy(), b.loc[a.index].to_numpy()),
                              lambda x, y, axis=-1: sorted_mean(x - y, axis), paired=True)
    assert (row["diff_ci_low"], row["diff_ci_high"]) == pytest.approx(expected, rel=1e-12)
    assert row["mean_diff"] == pytest.approx(np.mean(a - b))
    assert row["diff_ci_method"] == "BCa" and row["ci_resamples"] == N
    pooled = tests[tests["dataset"] == "all datasets (pooled)"]
    assert pooled["diff_ci_low"].notna().any()


def test_a_hand_made_paired_difference():
    """B scores each volume 2 points below A, except two volumes: the paired interval is
    that of the differences' mean (the textbook BCa of d = A - B with the same draws) and
    far narrower than the spread of the scores themselves."""
    b = np.array([60.0, 75.0, 68.0, 81.0, 55.0, 90.0, 72.0, 64.0])
    d = np.array([2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 5.0, -1.0])
    interval = difference_interval(b + d, b)
    assert interval.method == "BCa"
    assert (interval.low, interval.high) == pytest.approx(bca_by_hand(d), rel=1e-9)
    assert interval.low < 2.0 < interval.high and interval.high - interval.low < 4
    unpaired = scipy_interval((b + d, b), lambda x, y, axis=-1: np.mean(x, axis=axis)
                              - np.mean(y, axis=axis))
    assert unpaired[1] - unpaired[0] > 4 * (interval.high - interval.low)
    same = difference_interval(b + 2, b)  # one difference throughout: BCa undefined
    assert (same.low, same.high) == (2.0, 2.0) and same.method == "percentile"
    assert not difference_interval([1.0], [0.0]).found


# ----------------------------------------------------------------------------- outputs
@pytest.fixture
def in_memory_study(monkeypatch):
    """write_study on the study of interval_fixtures (no run folders on disk)."""
    monkeypatch.setattr(study_outputs, "find_runs", lambda paths: F.study_runs())

    def write(out, **options):
        return study_outputs.write_study(["unused"], out, run_reports="none", quiet=True,
                                         **options)
    return write


def test_without_the_new_options_the_study_files_are_as_before(in_memory_study, tmp_path):
    files = in_memory_study(tmp_path / "default")
    for name in ("summary.md", "summary.tex", "runs.csv"):
        assert files[name].read_bytes() == (F.GOLDEN / name).read_bytes(), name
    for name in ("summary.csv", "significance.csv"):  # the old columns, then the new ones
        old = pd.read_csv(F.GOLDEN / name, keep_default_na=False, dtype=str)
        new = pd.read_csv(files[name], keep_default_na=False, dtype=str)
        assert list(new.columns[:len(old.columns)]) == list(old.columns)
        assert new[old.columns].equals(old), name
    summary = pd.read_csv(files["summary.csv"])
    assert list(summary.columns[len(pd.read_csv(F.GOLDEN / "summary.csv").columns):]) == [
        f"{m}_ci_{p}" for m in ("Dice", "IoU", "HD95") for p in ("low", "high", "method")
    ] + ["ci_resamples"]
    assert list(pd.read_csv(files["significance.csv"]).columns[-5:]) == [
        "mean_diff", "diff_ci_low", "diff_ci_high", "diff_ci_method", "ci_resamples"]
    # --bootstrap 0: every file exactly as before
    files = in_memory_study(tmp_path / "off", bootstrap=0)
    for name in ("summary.csv", "significance.csv", "summary.md", "summary.tex", "runs.csv"):
        assert files[name].read_bytes() == (F.GOLDEN / name).read_bytes(), name
    files = in_memory_study(tmp_path / "tuning", columns="tuning", metric="HD95",
                            table_metrics=("Dice", "IoU", "HD95"))
    for name in ("summary.md", "summary.tex"):
        golden = F.GOLDEN / name.replace("summary", "summary_tuning_all_metrics")
        assert files[name].read_bytes() == golden.read_bytes(), name


def test_the_ci_option_shows_each_interval_in_the_tables(in_memory_study, tmp_path):
    files = in_memory_study(tmp_path / "ci", ci=True)
    summary = pd.read_csv(files["summary.csv"])
    row = summary[(summary["label"] == "A") & (summary["dataset"] == "D1")
                  & (summary["class"] == "[all]")].iloc[0]
    cell = (f"{row['Dice_mean']:.2f} ± {row['Dice_std']:.2f} "
            f"({row['Dice_ci_low']:.2f}, {row['Dice_ci_high']:.2f})")
    md = files["summary.md"].read_text()
    assert f"| A | **{cell}** |" in md
    assert "in parentheses: the 95% confidence interval of the mean over the test volumes, " \
           f"BCa bootstrap from {N} resamples of the volumes" in md
    one_seed = summary[(summary["label"] == "C") & (summary["class"] == "[all]")].iloc[0]
    assert (f"| C | {one_seed['Dice_mean']:.2f} ({one_seed['Dice_ci_low']:.2f}, "
            f"{one_seed['Dice_ci_high']:.2f}) [1] |") in md
    tex = files["summary.tex"].read_text()
    tex_cell = cell.replace("±", "$\\pm$")
    assert f"A & \\textbf{{{tex_cell}}}" in tex
    assert "95\\% confidence interval of the mean" in tex
    html = files["report.html"].read_text()
    assert cell in html and "in parentheses: the 95% confidence interval" in html
    assert "mean_diff (95% CI)" in html


def test_a_percentile_interval_or_none_gets_a_footnote_with_ci():
    runs = [F.make_run("A", 1, "D1", 0.8), F.make_run("B", 1, "D1", 0.7)]
    rows = runs[1].evaluations[0].rows
    rows["Dice"] = 0.5  # every volume alike: BCa undefined
    summary = summary_table(build_study(runs))
    md = to_markdown(paper_tables(summary, ["Dice"], ci=True))
    assert "| B | 50.00 (50.00, 50.00) [1] |" in md
    assert ("[1] 95% CI: percentile (BCa undefined: every resample gives the same mean)"
            in md)
    assert "[1]" not in to_markdown(paper_tables(summary, ["Dice"]))  # not without --ci
    with pytest.raises(ValueError, match="no confidence intervals"):
        paper_tables(summary_table(build_study(runs), bootstrap=0), ["Dice"], ci=True)


def test_the_metrics_option_chooses_the_tables(in_memory_study, tmp_path):
    files = in_memory_study(tmp_path / "iou", table_metrics=("IoU",), metric="IoU")
    md = files["summary.md"].read_text()
    titles = [line for line in md.splitlines() if line.startswith("## ")]
    assert titles[:3] == ["## IoU (%), all scored classes", "## IoU (%), layers",
                          "## IoU (%), lesions"]
    assert "## Dice" not in md and "## HD95" not in md
    with pytest.raises(UserError, match="--metrics BoundaryMAE_um: no run's results hold it; "
                                        "the metrics of these runs: Dice IoU HD95"):
        in_memory_study(tmp_path / "x", table_metrics=("Dice", "BoundaryMAE_um"))
    with pytest.raises(UserError, match="--ci shows the bootstrap intervals"):
        in_memory_study(tmp_path / "y", ci=True, bootstrap=0)


def test_a_metric_the_results_gain_gets_columns_tables_and_tests(tmp_path, monkeypatch):
    """E.g. HD95_um where run_seg_eval.py knew a spacing: nothing here names it."""
    runs = F.study_runs()
    for run in runs:
        rows = run.evaluations[0].rows
        rows["HD95_um"] = rows["HD95"] * 3.87
    monkeypatch.setattr(study_outputs, "find_runs", lambda paths: runs)
    files = study_outputs.write_study(["unused"], tmp_path / "s", run_reports="none",
                                      quiet=True, table_metrics=("Dice", "HD95_um"), ci=True)
    summary = pd.read_csv(files["summary.csv"])
    assert list(summary.columns[-7:]) == ["HD95_um_mean", "HD95_um_std", "HD95_um",
                                          "HD95_um_seeds", "HD95_um_ci_low",
                                          "HD95_um_ci_high", "HD95_um_ci_method"]
    both = summary.dropna(subset=["HD95_mean"])
    assert both["HD95_um_mean"].to_numpy() == pytest.approx(3.87 * both["HD95_mean"])
    assert both["HD95_um_ci_low"].to_numpy() == pytest.approx(3.87 * both["HD95_ci_low"],
                                                              rel=1e-6)
    md = files["summary.md"].read_text()
    assert "## HD95_um (µm), all scored classes" in md and "(lower is better" in md
    best = summary[(summary["dataset"] == "D1") & (summary["class"] == "[all]")]
    winner = best.loc[best["HD95_um_mean"].idxmin()]
    assert f"| {winner['label']} | **{winner['HD95_um_mean']:.2f}" in md
    tests = pd.read_csv(files["significance.csv"])
    assert "HD95_um" in set(tests["metric"])


def test_the_run_reports_table_shows_each_interval(tmp_path):
    from mirage.report.run_report import class_table, interval_notes
    run = F.make_run("B", 1, "D1", 0.74, missed_fluid=3)
    evaluation = run.evaluations[0]
    table, notes = interval_notes(class_table(evaluation))
    assert list(table.columns[:5]) == ["class", "volumes", "Dice (%)", "IoU (%)",
                                       "HD95 (px)"]
    assert list(table.columns[5:8]) == ["Dice 95% CI", "IoU 95% CI", "HD95 95% CI"]
    rows = evaluation.rows
    fluid = rows[rows["Class"] == "Fluid"]
    low, high = scipy_interval((100 * fluid["Dice"].to_numpy(),), sorted_mean)
    shown = table.set_index("class").loc["Fluid †", "Dice 95% CI"]
    assert shown == f"({low:.2f}, {high:.2f})" and notes == []
    assert "95% CI" not in "".join(class_table(evaluation, bootstrap=0).columns)


# ----------------------------------------------------------------------------- commands
def test_the_command_lines_take_bootstrap_and_ci(in_memory_study, tmp_path, capsys):
    import run_seg_report
    run_seg_report.main(["unused", "-o", str(tmp_path / "cli"), "--run_reports", "none",
                         "--bootstrap", "2000", "--ci", "--metrics", "Dice", "IoU"])
    summary = pd.read_csv(tmp_path / "cli" / "summary.csv")
    assert set(summary["ci_resamples"]) == {2000}
    md = (tmp_path / "cli" / "summary.md").read_text()
    assert "from 2000 resamples" in md and "## IoU (%)" in md and "## HD95" not in md
    run_seg_report.main(["unused", "-o", str(tmp_path / "old"), "--run_reports", "none",
                         "--table_metrics", "HD95"])  # the old name still works
    assert "## HD95 (px)" in (tmp_path / "old" / "summary.md").read_text()
    capsys.readouterr()
    for bad in (["--bootstrap", "50"], ["--ci", "--bootstrap", "0"],
                ["--metrics", "Dice", "Volume_nl"]):
        with pytest.raises(SystemExit) as stop:
            run_seg_report.main(["unused", "-o", str(tmp_path / "bad"), *bad])
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err


def test_run_seg_eval_takes_bootstrap(tmp_path, capsys):
    from test_eval_guards import run_cli
    from test_study import DATASET, make_run, write_synthetic_dataset
    datasets = tmp_path / "datasets"
    write_synthetic_dataset(datasets, name=DATASET, splits={"test": 3}, slices_per_volume=2,
                            size=(48, 64), seed=3)
    run_dir = make_run(tmp_path / "output", datasets, "MIRAGE-Tiny", 1, 1, evaluate=False)
    summary = tmp_path / "summary.csv"
    code, _, err = run_cli(["-d", datasets, "-m", run_dir, "--summary", summary,
                            "--bootstrap", "3000"], capsys)
    assert code == 0, err
    table = pd.read_csv(summary)
    assert set(table["ci_resamples"]) == {3000}
    rows = pd.concat([pd.read_csv(p, dtype={"ID": str})
                      for p in sorted(run_dir.glob("results*.csv"))])
    all_row = table[table["group"] == "all"].iloc[0]
    expected = scipy_interval(per_volume(rows, "Dice", 100.0), ratio, paired=True,
                              resamples=3000)
    assert (all_row["Dice_ci_low"], all_row["Dice_ci_high"]) == pytest.approx(expected,
                                                                             rel=1e-9)
    page = (run_dir / "report.html").read_text()
    assert "Dice 95% CI" in page and "3000 resamples" in page
    code, _, err = run_cli(["-d", datasets, "-m", run_dir, "--bootstrap", "-1"], capsys)
    assert code == 2 and "--bootstrap -1" in err


def test_the_run_summary_takes_a_metric_the_results_gain(tmp_path):
    """run_seg_eval.py --summary with a spacing: HD95_um and ASSD_um get their columns and
    intervals after the others, and the file is still recognised as a summary."""
    from mirage.evaluate.outputs import write_summary
    evaluations = F.run_evaluations()
    for ev in evaluations:
        ev.rows["HD95_um"] = 3.87 * ev.rows["HD95"]
        ev.rows["ASSD_um"] = 1.5 * ev.rows["HD95"]
    path = tmp_path / "summary.csv"
    table = write_summary(evaluations, path)
    assert list(table.columns[28:]) == [f"{m}{part}" for m in ("HD95_um", "ASSD_um") for part
                                        in ("", "_mean", "_std", "_ci_low", "_ci_high",
                                            "_ci_method")]
    row = table[(table["run"] == "A_s1") & (table["group"] == "all")].iloc[0]
    rows = evaluations[0].rows
    assert row["HD95_um_mean"] == pytest.approx(rows["HD95_um"].mean(), rel=1e-12)
    expected = scipy_interval(per_volume(rows, "HD95_um"), ratio, paired=True)
    assert (row["HD95_um_ci_low"], row["HD95_um_ci_high"]) == pytest.approx(expected,
                                                                             rel=1e-12)
    write_summary(evaluations, path)  # recognised as its own: replaced
