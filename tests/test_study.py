"""Study summaries over seeds: summary.csv/md/tex, runs.csv and the notes for bad input.

The grid is fabricated as run_seg_tuning.py leaves it (config.yaml, identity.json,
log.txt, preds/) on the synthetic demo data, and scored by the real evaluation; expected
numbers are recomputed here from the results CSVs with plain pandas, by the rule.
"""
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from mirage.data.classes import read_class_table
from mirage.errors import UserError
from mirage.evaluate.outputs import evaluate_runs
from mirage.fileio import read_gray, write_png
from mirage.run.predictions import write_manifest
from mirage.data.synthetic import class_values, write_synthetic_dataset

DATASET = "Synth_OCT"
MODELS = {"MIRAGE-Tiny": 1, "RETFound-Tiny": 4}  # model -> rows its predictions are off by
SEEDS = (1, 2)
TEST_VOLUMES = 6


def _config(model, seed, data_path):
    from mirage.options import OPTIONS
    config = {opt.name: opt.default for opt in OPTIONS}
    config.update(weights=f"/weights/{model}.pth", seed=seed, data_path=str(data_path),
                  output_adapter="convnext", loss="CEGDice", epochs=3,
                  base_output_dir="out", version="v1")
    return config


def _log(seed, quality):
    lines = []
    for epoch in range(3):
        miou = 0.5 + 0.1 * epoch - 0.02 * quality + 0.01 * seed
        lines.append({"epoch": epoch, "train/loss": 1.0 / (epoch + 1),
                      "train/lr": 1e-3 / (epoch + 1), "val/loss": 1.2 / (epoch + 1),
                      "val/mIoU": miou, "val/mIoU_all": miou, "val/mIoU_fg": miou - 0.05,
                      "val/IoU": {"ILM-NFL": miou, "Fluid": miou / 2}, "time": 1.5})
    lines.append({"test_epoch": 2, "test/mIoU": 0.6, "test/loss": 0.4})
    return "".join(json.dumps(line) + "\n" for line in lines)


def write_prediction(truth_path, pred_path, shift, rng):
    """A prediction: the truth moved down by ``shift`` rows with a few random pixels."""
    truth = read_gray(truth_path)
    pred = np.roll(truth, shift, axis=0)
    noise = rng.random(truth.shape) < 0.02
    pred[noise] = rng.choice(np.asarray(class_values(), np.uint8), size=int(noise.sum()))
    write_png(pred_path, pred)


def make_run(output, datasets, model, seed, shift, evaluate=True, name=None,
             dataset=DATASET, identity_changes=None):
    """A run directory as training + inference leave it; evaluated unless told not to.

    identity_changes: entries replaced in its identity.json (e.g. {"lr": 0.001}).
    """
    data_path = datasets / dataset
    name = name or f"{model}_frozen_convnext_CEGDice_s{seed}_{abs(hash((model, seed))) % 16**8:08x}"
    run_dir = output / "v1" / dataset / name
    run_dir.mkdir(parents=True)
    config = _config(model, seed, data_path)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    identity = {k: config[k] for k in ("seed", "lr", "epochs", "output_adapter", "loss",
                                       "input_size", "freeze_encoder")}
    identity.update(weights_name=f"{model}.pth", dataset=dataset)
    identity.update(identity_changes or {})
    (run_dir / "identity.json").write_text(json.dumps(identity))
    write_run_outputs(run_dir, data_path, seed, shift, f"{model} {seed}")
    if evaluate:
        evaluate_runs([run_dir], datasets, quiet=True)
    return run_dir


def write_run_outputs(run_dir, data_path, seed, shift, checkpoint_text):
    """What training and ``--infer_only --test`` leave in a run folder besides its options:
    log.txt, the test predictions (``shift``: how far off the truth) sealed to a stand-in
    checkpoint-best.pth holding ``checkpoint_text``."""
    (run_dir / "log.txt").write_text(_log(seed, shift))
    rng = np.random.default_rng([seed, shift])
    truths = sorted((data_path / "test" / "semseg").glob("*.png"))
    for truth in truths:
        write_prediction(truth, run_dir / "preds" / truth.name, shift, rng)
    best = run_dir / "checkpoint-best.pth"
    best.write_bytes(checkpoint_text.encode())
    write_manifest(run_dir / "preds", best, 2, read_class_table(data_path / "INFO.json"),
                   [t.stem for t in truths])


def make_grid(root, models=MODELS, seeds=SEEDS, volumes=TEST_VOLUMES):
    """datasets/Synth_OCT (test split only) and output/v1/Synth_OCT/<run>, all evaluated."""
    datasets = Path(root) / "datasets"
    write_synthetic_dataset(datasets, name=DATASET, splits={"test": volumes},
                            slices_per_volume=2, size=(48, 64), seed=3)
    output = Path(root) / "output"
    runs = {(model, seed): make_run(output, datasets, model, seed, shift)
            for model, shift in models.items() for seed in seeds}
    return datasets, output, runs


# A study as wide as a paper's: 6 models (3 weights x 2 learning rates) on 6 datasets
# with long names; row labels near the 40-character limit.
WIDE_WEIGHTS = {"MIRAGE-Large_pretrain_ep400": 1, "RETFound_MAE_natureOCT": 2,
                "DINOv2_ViT-L14_reg4_ft": 3}
WIDE_DATASETS = ("Duke_DME_Chiu_2015_full_resolution", "AROI_Melinscak_2021",
                 "Duke_iAMD_Farsiu_2014", "OCTID_layers", "RETOUCH_Cirrus_fluid",
                 "Synthetic_OCT_benchmark_v2")


def make_wide_grid(root, volumes=6):
    """6 datasets x 6 models, one seed each, all evaluated (enough volumes for p-values)."""
    datasets, output = Path(root) / "datasets", Path(root) / "output"
    for i, dataset in enumerate(WIDE_DATASETS):
        write_synthetic_dataset(datasets, name=dataset, splits={"test": volumes},
                                slices_per_volume=1, size=(32, 48), seed=10 + i)
        for model, shift in WIDE_WEIGHTS.items():
            for lr in (1e-3, 1e-4):
                # as run_seg_tuning.py writes it: the weights' SHA-256 in the identity
                sha256 = hashlib.sha256(model.encode()).hexdigest()
                make_run(output, datasets, model, 1, shift + int(lr > 1e-4), dataset=dataset,
                         name=f"{model}_lr{lr:g}_s1_0000000{i}",
                         identity_changes={"lr": lr, "weights_sha256": sha256})
    return datasets, output


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    return make_grid(tmp_path_factory.mktemp("grid"))


def results_of(run_dir):
    """All (volume, class) rows of a run, read straight from its CSV files."""
    frames = [pd.read_csv(p, dtype={"ID": str}) for p in sorted(run_dir.glob("results*.csv"))]
    return pd.concat(frames, ignore_index=True)


def summarise(paths, out, **kwargs):
    from mirage.report.study_outputs import write_study
    return write_study(paths, out, quiet=True, run_reports="none", **kwargs)


# ----------------------------------------------------------------------------- the summary
def test_summary_means_over_seeds_match_a_hand_computation(grid, tmp_path):
    _, output, runs = grid
    files = summarise([output], tmp_path / "study")
    summary = pd.read_csv(files["summary.csv"], keep_default_na=False)
    lesions = ("fluid",)
    for model in MODELS:
        per_seed = {}
        for seed in SEEDS:
            rows = results_of(runs[(model, seed)])
            layers = rows[~rows["Class"].str.lower().isin(lesions)]
            per_seed[seed] = {"all": rows, "layers": layers,
                              "lesions": rows[rows["Class"].str.lower().isin(lesions)]}
        for group in ("all", "layers", "lesions"):
            dice = [100 * per_seed[s][group]["Dice"].mean() for s in SEEDS]
            hd = [per_seed[s][group]["HD95"].mean() for s in SEEDS]  # pandas skips NaN
            row = summary[(summary["model"] == model) & (summary["class"] == f"[{group}]")]
            assert len(row) == 1
            row = row.iloc[0]
            assert row["seeds"] == 2 and row["volumes"] == TEST_VOLUMES
            assert row["seed_list"] == "1 2"
            assert float(row["Dice_mean"]) == pytest.approx(np.mean(dice), abs=1e-9)
            assert float(row["Dice_std"]) == pytest.approx(np.std(dice, ddof=1), abs=1e-9)
            assert float(row["HD95_mean"]) == pytest.approx(np.mean(hd), abs=1e-9)
            assert row["Dice"] == f"{np.mean(dice):.2f} ± {np.std(dice, ddof=1):.2f}"
        # one class: the mean over volumes of that class, then over seeds
        fluid = [100 * per_seed[s]["all"].query("Class == 'Fluid'")["Dice"].mean()
                 for s in SEEDS]
        row = summary[(summary["model"] == model) & (summary["class"] == "Fluid")].iloc[0]
        assert float(row["Dice_mean"]) == pytest.approx(np.mean(fluid), abs=1e-9)
    # the better model (predictions off by one row) wins every cell
    good = summary[(summary["model"] == "MIRAGE-Tiny") & (summary["class"] == "[all]")]
    bad = summary[(summary["model"] == "RETFound-Tiny") & (summary["class"] == "[all]")]
    assert float(good["Dice_mean"].iloc[0]) > float(bad["Dice_mean"].iloc[0])


def test_markdown_and_latex_tables_bold_the_best(grid, tmp_path):
    _, output, _ = grid
    files = summarise([output], tmp_path / "study")
    summary = pd.read_csv(files["summary.csv"])
    row = summary[(summary["model"] == "MIRAGE-Tiny") & (summary["class"] == "[all]")].iloc[0]
    cell = f"{row['Dice_mean']:.2f} ± {row['Dice_std']:.2f}"
    md = files["summary.md"].read_text()
    assert "## Dice (%), all scored classes" in md
    assert f"| MIRAGE-Tiny | **{cell}** |" in md
    other = summary[(summary["model"] == "RETFound-Tiny") & (summary["class"] == "[all]")]
    assert f"| RETFound-Tiny | {other['Dice_mean'].iloc[0]:.2f} ±" in md
    assert "## HD95 (px), layers" in md and "## Dice (%), lesions" in md
    tex = files["summary.tex"].read_text()
    assert "\\toprule" in tex and "Model & Synth\\_OCT \\\\" in tex
    tex_cell = cell.replace("±", "$\\pm$")
    assert f"MIRAGE-Tiny & \\textbf{{{tex_cell}}} \\\\" in tex
    assert tex.count("\\begin{table}") == tex.count("\\end{table}") == 6  # 2 metrics x 3 groups


def test_runs_are_grouped_by_protocol_and_labelled_by_what_differs(tmp_path):
    datasets, output, _ = make_grid(tmp_path, models={"MIRAGE-Tiny": 1}, seeds=(1,))
    run = make_run(output, datasets, "MIRAGE-Tiny", 1, 2, name="other_lr_s1_00000000")
    identity = json.loads((run / "identity.json").read_text())
    (run / "identity.json").write_text(json.dumps(dict(identity, lr=0.01)))
    summary = pd.read_csv(summarise([output], tmp_path / "s")["summary.csv"])
    labels = sorted(set(summary["label"]))
    assert labels == ["MIRAGE-Tiny, lr 1e-2", "MIRAGE-Tiny, lr 1e-4"]


# ----------------------------------------------------------------------------- bad input
def test_unevaluated_and_unreadable_runs_are_listed_not_dropped(grid, tmp_path):
    datasets, _, runs = grid
    extra = tmp_path / "extra"
    untested = make_run(extra, datasets, "MIRAGE-Tiny", 3, 1, evaluate=False)
    broken = extra / "v1" / DATASET / "broken_s1_00000000"
    broken.mkdir(parents=True)
    (broken / "config.yaml").write_text("seed: [unclosed\n")
    files = summarise([runs[("MIRAGE-Tiny", 1)], extra], tmp_path / "study")
    listing = pd.read_csv(files["runs.csv"], keep_default_na=False)
    status = dict(zip(listing["path"], listing["status"]))
    assert status[str(untested)].startswith("not evaluated: no results")
    assert status[str(broken)].startswith("not used: unreadable config.yaml")
    assert status[str(runs[("MIRAGE-Tiny", 1)])] == "in the summary"
    md = files["summary.md"].read_text()
    assert "## Runs not in the tables" in md and str(untested) in md and str(broken) in md


def _copy_grid(grid, tmp_path):
    import shutil
    datasets, output, runs = grid
    shutil.copytree(output, tmp_path / "output")
    return {key: tmp_path / "output" / path.relative_to(output) for key, path in runs.items()}


def test_different_class_sets_in_a_group_give_a_note_not_a_mean(grid, tmp_path):
    runs = _copy_grid(grid, tmp_path)
    lesions = runs[("MIRAGE-Tiny", 2)] / "results_lesions.csv"
    lesions.unlink()  # seed 2 now scored the layers only
    files = summarise([tmp_path / "output"], tmp_path / "s")
    summary = pd.read_csv(files["summary.csv"], keep_default_na=False)
    md = files["summary.md"].read_text()
    assert "| MIRAGE-Tiny | n/a [1] |" in md and "[1] class sets differ between seeds" in md
    row = summary[(summary["model"] == "MIRAGE-Tiny") & (summary["class"] == "[all]")].iloc[0]
    assert row["Dice"] == "n/a" and "class sets differ between seeds" in row["notes"]
    fluid = summary[(summary["model"] == "MIRAGE-Tiny") & (summary["class"] == "Fluid")]
    assert fluid.iloc[0]["seeds"] == 1  # the per-class mean uses the seed that has it


def test_mixed_empty_volume_modes_give_a_note_everywhere(grid, tmp_path):
    runs = _copy_grid(grid, tmp_path)
    record_path = runs[("RETFound-Tiny", 1)] / "evaluation.json"
    record = json.loads(record_path.read_text())
    record[DATASET]["empty_volume"] = "nan"
    record_path.write_text(json.dumps(record))
    files = summarise([tmp_path / "output"], tmp_path / "s")
    summary = pd.read_csv(files["summary.csv"], keep_default_na=False)
    rows = summary[summary["model"] == "RETFound-Tiny"]
    assert (rows["Dice"] == "n/a").all()
    assert all("different --empty_volume modes" in note for note in rows["notes"])
    tests = pd.read_csv(files["significance.csv"], keep_default_na=False)
    assert (tests["p_value"] == "").all() and (tests["p_holm"] == "").all()
    assert tests["note"].str.contains("empty_volume").all()


def test_nan_metrics_are_left_out_of_means_with_a_count(grid, tmp_path):
    runs = _copy_grid(grid, tmp_path)
    path = runs[("MIRAGE-Tiny", 1)] / "results_layers.csv"
    rows = pd.read_csv(path, dtype={"ID": str})
    rows.loc[:2, "HD95"] = np.nan
    rows.to_csv(path, index=False, na_rep="NaN")
    summary = pd.read_csv(summarise([tmp_path / "output"], tmp_path / "s")["summary.csv"],
                          keep_default_na=False)
    row = summary[(summary["model"] == "MIRAGE-Tiny") & (summary["class"] == "[layers]")]
    assert "HD95: 3 of" in row.iloc[0]["notes"]
    seed1 = rows["HD95"].dropna().mean()
    seed2 = results_of(runs[("MIRAGE-Tiny", 2)]).query("Class != 'Fluid'")["HD95"].mean()
    assert float(row.iloc[0]["HD95_mean"]) == pytest.approx((seed1 + seed2) / 2, abs=1e-9)


def test_output_folder_with_foreign_files_is_refused(grid, tmp_path):
    _, output, _ = grid
    target = tmp_path / "mine"
    target.mkdir()
    (target / "summary.csv").write_text("my own table\n")
    with pytest.raises(UserError, match="not written by run_seg_report.py"):
        summarise([output], target)
    assert (target / "summary.csv").read_text() == "my own table\n"
    summarise([output], tmp_path / "ours")
    summarise([output], tmp_path / "ours")  # its own files are replaced


def test_bad_paths_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        summarise([tmp_path / "nope"], tmp_path / "s")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no run directory"):
        summarise([tmp_path / "empty"], tmp_path / "s")


def test_command_line_prints_the_table_and_writes_the_files(grid, tmp_path, capsys):
    import run_seg_report
    _, output, _ = grid
    run_seg_report.main([str(output), "-o", str(tmp_path / "cli"), "--run_reports", "none"])
    printed = capsys.readouterr().out
    assert "| MIRAGE-Tiny |" in printed and "4 run directories, 4 evaluated" in printed
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == sorted(
        [".mirage-study", "report.html", "runs.csv", "significance.csv", "summary.csv",
         "summary.md", "summary.tex"])
    with pytest.raises(SystemExit) as exit_info:
        run_seg_report.main([str(tmp_path / "missing"), "-o", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_a_seed_found_twice_is_used_once_and_listed(grid, tmp_path):
    import shutil
    _, output, runs = grid
    copy = tmp_path / "backup" / DATASET / runs[("MIRAGE-Tiny", 1)].name
    shutil.copytree(runs[("MIRAGE-Tiny", 1)], copy)
    files = summarise([output, tmp_path / "backup"], tmp_path / "s")
    summary = pd.read_csv(files["summary.csv"], keep_default_na=False)
    row = summary[(summary["model"] == "MIRAGE-Tiny") & (summary["class"] == "[all]")].iloc[0]
    assert row["seeds"] == 2 and "seed 1 twice" in row["notes"]
    listing = pd.read_csv(files["runs.csv"], keep_default_na=False)
    statuses = listing[listing["run"] == copy.name]["status"].tolist()
    assert sorted(statuses) == ["in the summary", "not used (duplicate seed)"]


def test_an_external_test_set_is_its_own_column(grid, tmp_path):
    runs = _copy_grid(grid, tmp_path)
    for (model, seed), run in runs.items():
        (run / "preds_Other").mkdir()  # as --infer_only --test_data_path .../Other leaves it
        for group in ("layers", "lesions"):
            rows = pd.read_csv(run / f"results_{group}.csv", dtype={"ID": str})
            rows["Dice"] = rows["Dice"] / 2
            rows.to_csv(run / f"results_{group}_Other.csv", index=False)
    files = summarise([tmp_path / "output"], tmp_path / "s")
    summary = pd.read_csv(files["summary.csv"], keep_default_na=False)
    assert sorted(set(summary["dataset"])) == ["Other (from Synth_OCT)", "Synth_OCT"]
    totals = summary[summary["class"] == "[all]"]
    own = totals[totals["dataset"] == "Synth_OCT"]
    other = totals[totals["dataset"] == "Other (from Synth_OCT)"]
    assert other["Dice_mean"].to_numpy() == pytest.approx(own["Dice_mean"].to_numpy() / 2)
    assert "| model | Synth_OCT | Other (from Synth_OCT) |" in files["summary.md"].read_text()
    tests = pd.read_csv(files["significance.csv"], keep_default_na=False)
    assert "all datasets (pooled)" in set(tests["dataset"])


def test_help_answers_without_loading_the_heavy_libraries():
    import subprocess
    import sys
    repo = Path(__file__).resolve().parents[1]
    code = ("import runpy, sys\nsys.argv = ['run_seg_report.py', '-h']\ntry:\n"
            f"    runpy.run_path({str(repo / 'run_seg_report.py')!r}, run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'pandas', 'matplotlib', 'scipy') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=repo, check=True)
    assert "usage: run_seg_report.py" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "[]"
