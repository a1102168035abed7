"""run_seg_report.py on a label-efficiency grid (issue 28): 2 models x 3 training-set sizes
x 2 seeds, fabricated as run_seg_tuning.py leaves such runs (identity.json with the size,
train_volumes.json, predictions) and scored by the real evaluation. The cells, the AUC
and the per-size tests are recomputed here from the results CSVs by the rule."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import yaml

from mirage.evaluate.outputs import evaluate_runs
from mirage.report import plots
from mirage.report.label_efficiency import normalised_auc
from mirage.data.synthetic import write_synthetic_dataset
from test_study import DATASET, make_grid, make_run, results_of, summarise

SPLIT = 4  # volumes of the (notional) training split: 'all'
SEEDS = (1, 2)
# model -> {training volumes: how many rows its predictions are off}; RETFound-Tiny's 2
# volumes are asked as a fraction (--train_fraction 0.5), which chose 2 volumes.
SHIFTS = {"MIRAGE-Tiny": {1: 4, 2: 2, SPLIT: 1}, "RETFound-Tiny": {1: 6, 2: 4, SPLIT: 3}}
CHOSEN = {1: ["p2"], 2: ["p0", "p2"], SPLIT: ["p0", "p1", "p2", "p3"]}


def size_identity(model, volumes):
    """The identity entries and run-name part of one size, as run_seg_tuning.py writes
    them (none for the whole split)."""
    if volumes == SPLIT:
        return {}, ""
    if model == "RETFound-Tiny" and volumes == 2:
        return {"train_fraction": 0.5, "subset_seed": 0}, "_f50"
    return {"train_volumes": volumes, "subset_seed": 0}, f"_v{volumes}"


def make_size_run(output, datasets, model, volumes, seed):
    entries, part = size_identity(model, volumes)
    name = f"{model}_frozen_convnext_CEGDice{part}_s{seed}_{volumes:04d}{seed:04d}"
    run_dir = make_run(output, datasets, model, seed, SHIFTS[model][volumes], evaluate=False,
                       name=name, identity_changes=entries)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    (run_dir / "config.yaml").write_text(yaml.safe_dump({**config, **entries}))
    (run_dir / "train_volumes.json").write_text(json.dumps({
        "split": "train", "volumes": CHOSEN[volumes], "split_volumes": SPLIT,
        "bscans": 2 * volumes, "train_volumes": entries.get("train_volumes", "all"),
        "train_fraction": entries.get("train_fraction", "all"),
        "subset_seed": entries.get("subset_seed")}))
    return run_dir


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("efficiency")
    datasets, output = root / "datasets", root / "output"
    write_synthetic_dataset(datasets, name=DATASET, splits={"test": 6},
                            slices_per_volume=2, size=(48, 64), seed=3)
    runs = {(model, volumes, seed): make_size_run(output, datasets, model, volumes, seed)
            for model in SHIFTS for volumes in SHIFTS[model] for seed in SEEDS}
    evaluate_runs(list(runs.values()), datasets, quiet=True)
    return output, runs


@pytest.fixture(scope="module")
def study(grid, tmp_path_factory):
    output, _ = grid
    figures = []
    real = plots.to_png

    def keep(fig, *args, **kwargs):
        figures.append(fig)
        return real(fig, *args, **kwargs)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plots, "to_png", keep)
        files = summarise([output], tmp_path_factory.mktemp("study"), bootstrap=0)
    return files, figures


def seed_means(runs, model, volumes):
    """Per seed: 100 x the mean Dice over all (volume, class) rows of its results."""
    return [100 * results_of(runs[(model, volumes, seed)])["Dice"].mean() for seed in SEEDS]


def test_cells_are_means_and_stds_over_seeds_by_training_volumes(grid, study):
    _, runs = grid
    files, _ = study
    cells = pd.read_csv(files["label_efficiency.csv"], keep_default_na=False)
    assert len(cells) == 6 and set(cells["model"]) == set(SHIFTS)
    md = files["summary.md"].read_text()
    assert "## Label efficiency: Dice (%), all scored classes, Synth_OCT" in md
    assert "| model | 1 | 2 | 4 (all) | AUC |" in md
    for model in SHIFTS:
        for volumes in (1, 2, SPLIT):
            values = seed_means(runs, model, volumes)
            row = cells[(cells["model"] == model) & (cells["volumes"] == volumes)]
            assert len(row) == 1
            row = row.iloc[0]
            assert float(row["mean"]) == pytest.approx(np.mean(values), abs=1e-9)
            assert float(row["std"]) == pytest.approx(np.std(values, ddof=1), abs=1e-9)
            assert (row["seeds"], row["seed_list"]) == (2, "1 2")
            assert row["cell"] == f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"
            assert row["cell"] in md
    sizes = cells[cells["model"] == "RETFound-Tiny"].set_index("volumes")["size"]
    assert sizes.to_dict() == {1: "1", 2: "50%", SPLIT: "all"}  # the fraction: 2 volumes
    # the better model (predictions less off) is bold at every size
    for volumes in (1, 2, SPLIT):
        best = cells[(cells["model"] == "MIRAGE-Tiny") & (cells["volumes"] == volumes)]
        assert f"**{best['cell'].iloc[0]}**" in md


def test_the_auc_is_the_trapezoid_over_log_size_per_log_span(grid, study):
    _, runs = grid
    files, _ = study
    auc = pd.read_csv(files["label_efficiency_auc.csv"]).set_index("model")
    for model in SHIFTS:
        y1, y2, y4 = (np.mean(seed_means(runs, model, v)) for v in (1, 2, SPLIT))
        # log 1, log 2, log 4 are evenly spaced: (ln2 (y1+y2)/2 + ln2 (y2+y4)/2) / ln4
        assert auc.loc[model, "auc"] == pytest.approx((y1 + 2 * y2 + y4) / 4, abs=1e-9)
        assert f"| {model} |" in files["summary.md"].read_text()
    assert auc.loc["MIRAGE-Tiny", "auc"] > auc.loc["RETFound-Tiny", "auc"]


def test_normalised_auc_by_hand():
    a, b, c = 40.0, 70.0, 85.0
    # sizes 1, 2, 8: (ln2 (a+b)/2 + (ln8 - ln2) (b+c)/2) / ln8 = (a + 3b + 2c) / 6
    assert normalised_auc([1, 2, 8], [a, b, c]) == pytest.approx((a + 3 * b + 2 * c) / 6)
    assert normalised_auc([3, 9], [50.0, 50.0]) == pytest.approx(50.0)  # a flat curve
    assert math.isnan(normalised_auc([4], [60.0]))


def test_per_size_tests_are_the_studys_paired_test(study):
    files, _ = study
    tests = pd.read_csv(files["label_efficiency_tests.csv"], keep_default_na=False)
    study_tests = pd.read_csv(files["significance.csv"], keep_default_na=False)
    study_tests = study_tests[(study_tests["metric"] == "Dice") &
                              (study_tests["class_group"] == "all")]
    assert list(tests["volumes"]) == [1, 2, SPLIT]
    names = {1: ("1 train volume", "1 train volume"),
             2: ("2 train volumes", "50% of train volumes"),
             SPLIT: ("all train volumes", "all train volumes")}
    for row in tests.itertuples():
        assert {row.model_a, row.model_b} == set(SHIFTS)
        part_a, part_b = names[row.volumes]
        same = study_tests[(study_tests["model_a"] == f"MIRAGE-Tiny, {part_a}") &
                           (study_tests["model_b"] == f"RETFound-Tiny, {part_b}")]
        assert len(same) == 1, (row.volumes, sorted(set(study_tests["model_a"])))
        assert float(row.p_value) == pytest.approx(float(same["p_value"].iloc[0]))
        assert row.n_volumes == 6 and row.family_size == 1  # Holm within one size
        assert row.better == "MIRAGE-Tiny"  # 6 of 6 volumes better: exact p = 2/64
        assert float(row.p_value) == pytest.approx(2 / 64)
    md = files["summary.md"].read_text()
    assert "1 volume(s): MIRAGE-Tiny vs RETFound-Tiny: p = 0.03125" in md


def test_the_plot_has_a_log_axis_one_line_per_model_and_a_band(study):
    files, figures = study
    assert files["label_efficiency.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (fig,) = [f for f in figures if f.axes and f.axes[0].get_xlabel().startswith("training")]
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_title() == DATASET
    assert sorted(line.get_label() for line in ax.lines) == sorted(SHIFTS)
    for line in ax.lines:
        assert list(line.get_xdata()) == [1, 2, SPLIT]
    assert len(ax.collections) == 2  # one ± std band per model
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4 (all)"]


def test_latex_and_html_hold_the_table(study):
    files, _ = study
    tex = files["summary.tex"].read_text()
    assert "Model & 1 & 2 & 4 (all) & AUC \\\\" in tex
    assert tex.count("\\begin{table}") == tex.count("\\end{table}")
    html = files["report.html"].read_text()
    assert html.index('id="label-efficiency"') < html.index('id="runs"')
    assert "Label efficiency: Dice (%), all scored classes, Synth_OCT" in html
    assert html.count("data:image/png") >= 2  # the heat map and the curves


def test_the_study_tables_label_the_sizes(study):
    files, _ = study
    labels = set(pd.read_csv(files["summary.csv"])["label"])
    assert labels == {"MIRAGE-Tiny, 1 train volume", "MIRAGE-Tiny, 2 train volumes",
                      "MIRAGE-Tiny, all train volumes", "RETFound-Tiny, 1 train volume",
                      "RETFound-Tiny, 50% of train volumes",
                      "RETFound-Tiny, all train volumes"}


def test_a_study_without_sizes_writes_no_label_efficiency(tmp_path, study):
    _, output, _ = make_grid(tmp_path, models={"MIRAGE-Tiny": 1}, seeds=(1,))
    out = tmp_path / "s"
    out.mkdir()
    (out / ".mirage-study").write_text("")
    (out / "label_efficiency.csv").write_text("of an earlier study\n")
    files = summarise([output], out, bootstrap=0)
    assert "label_efficiency.csv" not in files
    assert not list(out.glob("label_efficiency*"))
    assert "Label efficiency" not in files["summary.md"].read_text()


def test_runs_without_train_volumes_json_take_the_split_size_from_the_dataset(grid,
                                                                              tmp_path):
    """Runs that recorded no volumes (older runs of the whole split): 'all' is the
    training split's size, counted in the dataset folder their config.yaml names; where
    that is not there either, their points are left out with a note."""
    import shutil
    output, runs = grid
    copy = tmp_path / "output"
    shutil.copytree(output, copy)
    datasets = tmp_path / "datasets"
    write_synthetic_dataset(datasets, name=DATASET, splits={"train": 8}, slices_per_volume=1,
                            size=(48, 64), seed=5)
    for config_path in copy.rglob("config.yaml"):
        config = yaml.safe_load(config_path.read_text())
        config["data_path"] = str(datasets / DATASET)
        config_path.write_text(yaml.safe_dump(config))
        (config_path.parent / "train_volumes.json").unlink()
    cells = pd.read_csv(summarise([copy], tmp_path / "s", bootstrap=0)
                        ["label_efficiency.csv"], keep_default_na=False)
    sizes = cells[cells["model"] == "RETFound-Tiny"].set_index("size")["volumes"]
    assert sizes.to_dict() == {"1": 1, "50%": 4, "all": 8}  # 0.5 of 8 volumes
    shutil.rmtree(datasets)
    files = summarise([copy], tmp_path / "s2", bootstrap=0)
    cells = pd.read_csv(files["label_efficiency.csv"], keep_default_na=False)
    assert sorted(set(cells["volumes"])) == [1, 2]  # MIRAGE-Tiny's 1 and 2, RETFound's 1
    assert "the runs trained on all are left out: the size of the training split of " \
           "Synth_OCT is not known" in files["summary.md"].read_text()
