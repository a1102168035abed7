"""What a study's cells and notes claim: a cell is the mean over the seeds that have a
value, and says so when that is fewer than the group's seeds; each footnote is said once
per document.

Runs are built in memory (mirage.run.catalog.Run with its Evaluation), so every expected
number is worked out by hand from the rows given here.
"""
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mirage.report.grid_report import render_grid_report
from mirage.report.significance import significance_table
from mirage.report.study import build_study, summary_table
from mirage.report.study_outputs import missed_lines, runs_table
from mirage.report.tables import paper_tables, to_latex, to_markdown
from mirage.run.catalog import Run
from mirage.run.results import Evaluation

VOLUMES = 8  # enough paired volumes for a p-value


def make_run(model, seed, dice, hd95, dataset="D1", missed=False, identity=None):
    """An evaluated Run of one class ("Layer") over VOLUMES volumes; ``missed``: the class
    is in every volume's truth and never predicted."""
    rows = pd.DataFrame({"ID": [f"v{i}" for i in range(VOLUMES)], "Class": "Layer",
                         "Group": "layers", "Dice": dice, "IoU": dice, "HD95": hd95,
                         "truth_pixels": 50, "pred_pixels": 0 if missed else 40,
                         "missed": missed})
    weights = f"/w/{model}.pth"
    run = Run(path=Path(f"/s/v1/{dataset}/{model}_s{seed}"),
              config={"seed": seed, "weights": weights, "output_adapter": "convnext",
                      "loss": "CE"},
              identity={"seed": seed, "weights_name": f"{model}.pth",
                        "weights_sha256": hashlib.sha256(weights.encode()).hexdigest(),
                        **(identity or {})},
              status="evaluated")
    run.evaluations = [Evaluation(dataset=dataset, external="", rows=rows, files=[],
                                  empty_volume="zero", options={"hd95_missing": "nan"})]
    return run


RNG = np.random.default_rng(7)
GOOD_DICE = [0.80 + 0.01 * RNG.random(VOLUMES) for _ in range(2)]
BAD_DICE = [0.60 + 0.01 * RNG.random(VOLUMES) for _ in range(2)]
HD95_SEED1 = 20 + 10 * RNG.random(VOLUMES)


def study_with_an_unscored_seed():
    """A's seed 2 has a NaN HD95 in every volume (e.g. --hd95_missing nan); B is whole."""
    runs = [make_run("A", 1, GOOD_DICE[0], HD95_SEED1),
            make_run("A", 2, GOOD_DICE[1], np.full(VOLUMES, np.nan)),
            make_run("B", 1, BAD_DICE[0], HD95_SEED1 + 5),
            make_run("B", 2, BAD_DICE[1], HD95_SEED1 + 6)]
    return build_study(runs)


def section(md, title):
    """The lines of summary.md's section ``title`` (up to the next one)."""
    return md.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


# ----------------------------------------------------------------------------- seeds
def test_a_cell_counts_only_the_seeds_with_a_value():
    study = study_with_an_unscored_seed()
    summary = summary_table(study)
    row = summary[(summary["label"] == "A") & (summary["class"] == "[all]")].iloc[0]
    hd95 = float(np.mean(HD95_SEED1))  # seed 1 alone
    assert row["HD95_mean"] == pytest.approx(hd95) and np.isnan(row["HD95_std"])
    assert row["HD95_seeds"] == 1 and row["Dice_seeds"] == 2 and row["seeds"] == 2
    assert row["seed_list"] == "1 2"
    assert "HD95: 1 of 2 seeds scored; no value in seed(s) 2 (every volume NaN)" in \
        row["notes"]
    dice = [100 * np.mean(d) for d in GOOD_DICE]

    md = to_markdown(paper_tables(summary))
    table = section(md, "HD95 (px), all scored classes")
    # before: "| A | 25.59 ± nan |", a one-seed mean shown as a mean over two seeds
    assert f"| A | **{hd95:.2f}** [1] |" in table and "nan" not in md
    assert "[1] 1 of 2 seeds scored; no value in seed(s) 2 (every volume NaN)" in table
    assert f"| A | **{np.mean(dice):.2f} ± {np.std(dice, ddof=1):.2f}** |" in \
        section(md, "Dice (%), all scored classes")
    tex = to_latex(paper_tables(summary))
    assert f"A & \\textbf{{{hd95:.2f}}}$^{{1}}$ \\\\" in tex and "1 of 2 seeds scored" in tex


def test_significance_says_a_group_has_fewer_seeds_for_a_metric():
    study = study_with_an_unscored_seed()
    tests = significance_table(study)
    hd95 = tests[(tests["metric"] == "HD95") & (tests["class_group"] == "all")].iloc[0]
    assert "A: HD95: 1 of 2 seeds scored; no value in seed(s) 2 (every volume NaN)" in \
        hd95["note"]
    assert np.isfinite(hd95["p_value"])  # still tested, on the seed that has values
    dice = tests[tests["metric"] == "Dice"]
    assert not dice["note"].str.contains("seeds scored").any()


# ----------------------------------------------------------------------------- footnotes
def study_with_repeated_notes():
    """B has one seed of two (a footnote in every table) and never predicts its class
    (a † in every table)."""
    runs = [make_run("A", s, GOOD_DICE[s - 1], HD95_SEED1) for s in (1, 2)]
    runs.append(make_run("B", 1, np.zeros(VOLUMES), HD95_SEED1, missed=True))
    return build_study(runs)


def test_each_footnote_is_said_once_in_summary_md_and_the_html():
    study = study_with_repeated_notes()
    summary = summary_table(study)
    tables = paper_tables(summary)
    assert len(tables) == 4  # Dice and HD95, each for "all" and "layers"
    missed = missed_lines(summary)
    md = to_markdown(tables, missed=missed)
    # before: "[1] 1 seed(s) only" and the † note under each of the 4 tables
    assert md.count("1 seed(s) only") == 1
    assert md.count("[1] 1 seed(s) only") == 1
    dagger = [line for line in md.splitlines() if line.startswith("†")]
    assert len(dagger) == 1
    assert "In those volumes its Dice is 0" in dagger[0] and "Its HD95" in dagger[0]
    assert "Classes never predicted" in dagger[0]
    for table in tables:  # every table still marks the cell and refers to the note
        assert "| B | 0.00 † [1] |" in section(md, table.title) or \
            f"| B | {np.mean(HD95_SEED1):.2f} † [1] |" in section(md, table.title)
    assert md.index("[1] 1 seed(s) only") < md.index("## Dice (%), layers")

    page = render_grid_report(study, tables, significance_table(study), runs_table(study),
                              {}, {}, missed=missed)
    assert page.count("1 seed(s) only") == 1
    assert page.count("† a class never predicted in test volumes that hold it") == 1
    assert page.count("[1]") == len(tables) + 1  # one mark per table, one note


def test_a_table_alone_lists_its_never_predicted_cells():
    study = study_with_repeated_notes()
    table = paper_tables(summary_table(study))[0]
    md = to_markdown([table])  # as the command line prints it, without the section
    assert "† B on D1: Layer never predicted in 8 of 8 test volumes that hold it. In " \
           "those volumes its Dice is 0. Never in bold." in md


# ----------------------------------------------------------------------------- heat maps
def colour_scale(fig):
    return fig.axes[0].images[0].get_clim()


def test_a_heat_map_never_magnifies_tiny_differences():
    from mirage.report import plots
    # QA's study: 33.75 vs 33.90 filled the whole colour scale
    fig = plots.heat_map([[33.75], [33.90]], ["A", "B"], ["D1"], "mean Dice",
                         min_span=10, natural=(0, 100), unit="%")
    low, high = colour_scale(fig)
    assert high - low == pytest.approx(10) and (low + high) / 2 == pytest.approx(33.825)
    assert fig.axes[0].get_xlabel() == "colour scale 28.8 to 38.8 %, at least 10 wide"
    # near the top of Dice the scale stays inside 0-100, as wide as asked
    assert colour_scale(plots.heat_map([[97.0], [99.5]], ["A", "B"], ["D1"], "Dice",
                                       min_span=10, natural=(0, 100))) == (90, 100)
    # HD95 (pixels) has no upper bound; a wide spread is shown whole
    assert plots.colour_limits([0.5, 1.0], 10, (0, np.inf)) == (0, 10)
    assert plots.colour_limits([20.0, 65.0], 10, (0, np.inf)) == (20, 65)


def test_the_study_heat_map_states_its_colour_scale():
    study = study_with_an_unscored_seed()
    summary = summary_table(study)
    tables = paper_tables(summary, ["Dice"])
    page = render_grid_report(study, tables, significance_table(study), runs_table(study),
                              {}, {})
    dice = sorted(float(summary[(summary["label"] == label) & (summary["class"] == "[all]")]
                        ["Dice_mean"].iloc[0]) for label in ("A", "B"))
    assert dice[1] - dice[0] > 10  # wider than the span: the scale is the values' range
    assert f"Colours: colour scale {dice[0]:.1f} to {dice[1]:.1f} %, at least 10 wide" in page


# ----------------------------------------------------------------------------- class tables
LAYER_ONLY = [[0, "Background"], [40, "Layer"]]
WITH_FLUID = [[0, "Background"], [40, "Layer"], [120, "Fluid"]]


def test_runs_of_one_dataset_with_two_class_tables_get_a_column_each():
    """A was trained on D1 with both class tables, B with the one holding Fluid: their
    scores are over different classes, so one column would compare unlike with unlike."""
    runs = [make_run("A", s, GOOD_DICE[s - 1], HD95_SEED1, identity={"classes": LAYER_ONLY})
            for s in (1, 2)]
    runs += [make_run(m, s, dice[s - 1], HD95_SEED1, identity={"classes": WITH_FLUID})
             for m, dice in (("A", BAD_DICE), ("B", GOOD_DICE)) for s in (1, 2)]
    study = build_study(runs)
    columns = ["D1, class table 1", "D1, class table 2"]
    assert study.datasets == columns and study.labels == ["A", "B"]  # no "A #1", "A #2"
    assert ("D1: runs trained with 2 different class tables (identity.json classes) are in "
            "separate columns: class table 1 = 2 classes (0 Background, 40 Layer); class "
            "table 2 = 3 classes (0 Background, 40 Layer, 120 Fluid)") in study.notes

    summary = summary_table(study)
    assert set(summary["dataset"]) == {"D1"}  # the dataset column says the dataset
    totals = summary[summary["class"] == "[all]"].set_index(["label", "class_table"])
    assert sorted(totals.index) == [("A", "class table 1"), ("A", "class table 2"),
                                    ("B", "class table 2")]
    table = paper_tables(summary, ["Dice"])[0]
    assert table.columns == columns
    dice = {name: [100 * np.mean(d) for d in values]
            for name, values in (("good", GOOD_DICE), ("bad", BAD_DICE))}
    md = to_markdown([table], notes=study.notes)
    assert "| model | D1, class table 1 | D1, class table 2 |" in md
    assert (f"| A | **{np.mean(dice['good']):.2f} ± {np.std(dice['good'], ddof=1):.2f}** | "
            f"{np.mean(dice['bad']):.2f} ± {np.std(dice['bad'], ddof=1):.2f} |") in md
    assert f"| B | – | **{np.mean(dice['good']):.2f} ±" in md
    assert "separate columns: class table 1 = 2 classes" in md  # the note, in ## Notes

    tests = significance_table(study)  # pairs within a column only: A and B on table 2
    assert set(tests["dataset"]) == {"D1, class table 2"}
    assert set(runs_table(study)["status"]) == {"in the summary"}
    assert set(runs_table(study)["dataset"]) == set(columns)


def test_one_class_table_keeps_the_dataset_column_as_it_was():
    runs = [make_run(m, 1, GOOD_DICE[0], HD95_SEED1, identity={"classes": LAYER_ONLY})
            for m in "AB"]
    runs.append(make_run("C", 1, GOOD_DICE[0], HD95_SEED1))  # older run: table not recorded
    study = build_study(runs)
    assert study.datasets == ["D1"] and not study.notes
    assert set(summary_table(study)["class_table"]) == {""}
