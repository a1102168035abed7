"""From runs to a paper table a reader can trust: readable row labels (never a hash), classes
never predicted flagged everywhere, the --hd95_missing rules by hand, TensorBoard with the
test metrics, and the figures' legends, ticks, colours and layout.

The study is fabricated as run_seg_tuning.py leaves it (tests/test_study.py's helpers) and
scored by the real evaluation; expected values are worked out by hand or recomputed from
the results CSVs with plain pandas.
"""
import hashlib
import json
import math
import re
import warnings
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from mirage.data.classes import read_class_table
from mirage.data.synthetic import class_values
from mirage.errors import UserError
from mirage.evaluate.outputs import evaluate_run, evaluate_runs, results_table
from mirage.fileio import read_gray, write_png
from mirage.run.catalog import Run, read_run
from mirage.run.predictions import write_manifest
from mirage.run.results import Evaluation

from conftest import seal_predictions
from test_study import DATASET, _log, make_run, write_synthetic_dataset

MODELS = {"MIRAGE-Tiny": 1, "RETFound-Tiny": 2}  # RETFound-Tiny never predicts Fluid
SEEDS = (1, 2, 3)
HEX64 = re.compile(r"[0-9a-f]{64}")


def sha_of(model):
    return hashlib.sha256(model.encode()).hexdigest()


# ----------------------------------------------------------------------------- the study
def make_study_grid(root):
    """2 models x 3 seeds on Synth_OCT, identities with the weights' SHA-256 and the class
    table (as run_seg_tuning.py writes them); RETFound-Tiny's predictions hold no Fluid."""
    datasets, output = Path(root) / "datasets", Path(root) / "output"
    write_synthetic_dataset(datasets, name=DATASET, splits={"test": 6}, slices_per_volume=2,
                            size=(48, 64), seed=3)
    truths = sorted((datasets / DATASET / "test" / "semseg").glob("*.png"))
    fluid, layer = class_values()[8], class_values()[5]
    runs = {}
    for model, shift in MODELS.items():
        for seed in SEEDS:
            run = make_run(output, datasets, model, seed, shift, evaluate=False,
                           identity_changes={"weights_sha256": sha_of(model),
                                             "classes": [[v, str(v)] for v in class_values()]})
            if model == "RETFound-Tiny":
                for truth in truths:
                    pred = read_gray(run / "preds" / truth.name)
                    pred[pred == fluid] = layer
                    write_png(run / "preds" / truth.name, pred)
                write_manifest(run / "preds", run / "checkpoint-best.pth", 2,
                               read_class_table(datasets / DATASET / "INFO.json"),
                               [t.stem for t in truths])
            evaluate_runs([run], datasets, quiet=True)
            runs[(model, seed)] = run
    return datasets, output, runs


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from mirage.report.study_outputs import write_study
    root = tmp_path_factory.mktemp("paper")
    datasets, output, runs = make_study_grid(root)
    files = write_study([output], root / "study", quiet=True, run_reports="none")
    return datasets, output, runs, files


def test_labels_hold_no_hash_and_hashes_stay_in_their_columns(study):
    _, _, _, files = study
    summary = pd.read_csv(files["summary.csv"], keep_default_na=False)
    runs = pd.read_csv(files["runs.csv"], keep_default_na=False)
    tests = pd.read_csv(files["significance.csv"], keep_default_na=False)
    labels = set(summary["label"]) | set(runs["label"]) | set(tests["model_a"]) | \
        set(tests["model_b"]) | (set(tests["better"]) - {""})
    assert labels == set(MODELS)  # the model itself, nothing else differs
    assert all(len(label) <= 40 and not HEX64.search(label) for label in labels)
    for name in ("summary.md", "summary.tex", "report.html"):
        text = files[name].read_text()
        assert not HEX64.search(text) and "weights_sha256" not in text, name
    assert "| MIRAGE-Tiny |" in files["summary.md"].read_text()
    for model in MODELS:  # the hashes are kept, in columns of their own
        assert set(summary.loc[summary["model"] == model, "weights_sha256"]) == {sha_of(model)}
        assert set(runs.loc[runs["label"] == model, "weights_sha256"]) == {sha_of(model)}
    assert runs["identity"].str.fullmatch(r"[0-9a-f]{8}").all()
    assert not summary["protocol"].str.contains("weights_sha256").any()


def test_a_class_never_predicted_is_flagged_in_the_results_files(study):
    _, _, runs, _ = study
    for (model, seed), run in runs.items():
        rows = pd.read_csv(run / "results_lesions.csv")
        # the original's five columns first, so old readers keep working
        assert list(rows.columns) == ["ID", "Class", "Dice", "IoU", "HD95", "truth_pixels",
                                      "pred_pixels", "missed"]
        expected = (rows["truth_pixels"] > 0) & (rows["pred_pixels"] == 0)
        assert (rows["missed"] == expected).all()
        if model == "RETFound-Tiny":
            assert (rows["pred_pixels"] == 0).all() and rows["missed"].sum() >= 1
            record = json.loads((run / "evaluation.json").read_text())[DATASET]
            assert record["hd95_missing"] == "original"
            assert record["missed"] == {"Fluid": int(rows["missed"].sum())}


def _holding(runs):
    """How many test volumes hold Fluid (the same for every run: one test set)."""
    rows = pd.read_csv(runs[("MIRAGE-Tiny", 1)] / "results_lesions.csv")
    return int((rows["truth_pixels"] > 0).sum())


def test_the_study_tables_mark_a_missed_class_never_bold_with_a_count(study):
    _, _, runs, files = study
    holding = _holding(runs)
    md = files["summary.md"].read_text()
    # before: "| RETFound-Tiny ... | **0.00 ± 0.00** |" in the HD95 lesions table
    hd95_lesions = md.split("## HD95 (px), lesions", 1)[1].split("##", 1)[0]
    assert "| RETFound-Tiny | 0.00 ± 0.00 † |" in hd95_lesions
    assert "| MIRAGE-Tiny | **" in hd95_lesions
    # the † footnote is said once (under the first table), for every metric of the tables;
    # the cells are listed once, under "Classes never predicted"
    dagger = [line for line in md.splitlines() if line.startswith("†")]
    assert len(dagger) == 1 and "Classes never predicted" in dagger[0]
    assert "In those volumes its Dice is 0" in dagger[0]
    assert ("In those volumes its HD95 is the mean over the volume's B-scans, 0 where "
            "neither mask holds the class") in dagger[0]
    assert "## Classes never predicted" in md
    assert (f"- RETFound-Tiny on {DATASET}: Fluid never predicted in {holding} of {holding} "
            f"test volumes that hold it, in each of the 3 seeds ({3 * holding} volume "
            "score(s) in all)") in md
    assert "**" not in "".join(line for line in md.splitlines() if "†" in line)
    summary = pd.read_csv(files["summary.csv"], keep_default_na=False)
    lesions = summary[summary["class"] == "[lesions]"].set_index("model")
    assert lesions.loc["RETFound-Tiny", "missed"] == 3 * holding
    assert lesions.loc["MIRAGE-Tiny", "missed"] == 0
    tex = files["summary.tex"].read_text()
    assert "RETFound-Tiny & 0.00 $\\pm$ 0.00$^\\dagger$ \\\\" in tex
    page = files["report.html"].read_text()
    assert "<td>0.00 ± 0.00 †</td>" in page and "† never predicted: RETFound-Tiny" in page
    tests = pd.read_csv(files["significance.csv"], keep_default_na=False)
    flagged = tests["note"].str.contains("RETFound-Tiny never predict")
    assert (flagged == tests["class_group"].isin(["lesions", "all"])).all()


def test_eval_prints_the_mark_and_the_run_report_shows_it(study, capsys):
    from mirage.report.run_report import write_run_report
    datasets, _, runs, _ = study
    run = runs[("RETFound-Tiny", 1)]
    evaluate_runs([run], datasets)
    printed = capsys.readouterr().out
    assert re.search(r"^Fluid †\s+0\.00\s+0\.00\s+0\.00$", printed, re.M)
    assert re.search(r"^\[lesions\] †", printed, re.M) and re.search(r"^\[all\] †", printed,
                                                                      re.M)
    assert "† Fluid: never predicted in" in printed
    page = write_run_report(run, datasets).read_text()
    assert "Fluid †" in page and "<th class=\"text\">missed</th>" in page
    assert "--empty_volume" not in page  # the scoring rules in words, not flags
    assert "scores Dice = IoU = 0 there" in page and "keeps the mean over its B-scans" in page
    assert "errors (4th panel; no class is red)" in page


def test_old_results_files_without_counts_are_read_with_a_note(study, tmp_path):
    import shutil
    _, _, runs, _ = study
    run = tmp_path / DATASET / "old_run"
    shutil.copytree(runs[("RETFound-Tiny", 1)], run)
    for path in run.glob("results*.csv"):
        pd.read_csv(path).iloc[:, :5].to_csv(path, index=False)  # the original layout
    evaluation = read_run(run).evaluations[0]
    assert evaluation.rows["truth_pixels"].isna().all() and not evaluation.rows["missed"].any()
    assert any("without pixel counts" in note for note in read_run(run).notes)


# ----------------------------------------------------------------------------- labels
def _run(model, seed, identity, dataset="D1", weights=None):
    """An evaluated Run in memory (nothing on disk): one volume of one class."""
    rows = pd.DataFrame([("v1", "Layer", "layers", 0.8, 0.6, 1.0)],
                        columns=["ID", "Class", "Group", "Dice", "IoU", "HD95"])
    config = {"seed": seed, "weights": weights or f"/w/{model}.pth",
              "output_adapter": "linear", "loss": "CE"}
    run = Run(path=Path(f"/s/v1/{dataset}/{model}_{len(identity)}_{seed}"), config=config,
              identity={"seed": seed, "weights_name": Path(config["weights"]).name,
                        "weights_sha256": sha_of(config["weights"]), **identity},
              status="evaluated")
    run.evaluations = [Evaluation(dataset=dataset, external="", rows=rows, files=[],
                                  empty_volume="zero")]
    return run


def _labels(runs, labels=None):
    from mirage.report.study import build_study
    study = build_study(runs, labels)
    return sorted({g.label for g in study.groups}), study


def test_labels_name_what_differs_in_words():
    runs = [_run("A", s, {"lr": 1e-3, "freeze_patch_embed": False}) for s in (1, 2)]
    runs += [_run("A", 1, {"lr": 1e-4, "freeze_patch_embed": False}),
             _run("A", 1, {"lr": 1e-3, "freeze_patch_embed": True}),
             _run("B", 1, {"lr": 1e-3, "freeze_patch_embed": False})]
    labels, _ = _labels(runs)
    # The tuning protocol is said once, in words, last; a fully-frozen backbone under the
    # linear decoder (_run's) is a linear probe.
    assert labels == ["A, lr 1e-3, frozen (paper)", "A, lr 1e-3, linear probe",
                      "A, lr 1e-4, frozen (paper)", "B, lr 1e-3, frozen (paper)"]


def test_an_option_that_only_changes_with_the_dataset_keeps_one_row():
    runs = [_run(m, 1, {"epochs": 100}, "D1") for m in "AB"]
    runs += [_run(m, 1, {"epochs": 50}, "D2") for m in "AB"]
    labels, study = _labels(runs)
    assert labels == ["A", "B"] and study.datasets == ["D1", "D2"]


def test_same_file_name_in_two_folders_gets_the_folder():
    runs = [_run("A", 1, {}, weights="/w/pretrain_a/checkpoint.pth"),
            _run("A", 1, {}, weights="/w/pretrain_b/checkpoint.pth")]
    assert _labels(runs)[0] == ["pretrain_a/checkpoint", "pretrain_b/checkpoint"]


def test_user_labels_replace_a_model_name_or_a_whole_label():
    runs = [_run("A", 1, {"lr": 1e-3}), _run("A", 1, {"lr": 1e-4}), _run("B", 1, {"lr": 1e-3})]
    labels, _ = _labels(runs, {"A.pth": "Ours", "B, lr 1e-3": "Baseline (paper)"})
    assert labels == ["Baseline (paper)", "Ours, lr 1e-3", "Ours, lr 1e-4"]
    with pytest.raises(UserError, match="--label C: no model or row label"):
        _labels(runs, {"C": "x"})
    with pytest.raises(UserError, match="both labelled 'Same'"):
        _labels(runs, {"A, lr 1e-3": "Same", "B, lr 1e-3": "Same"})


def test_labels_longer_than_40_characters_name_settings_with_a_legend():
    many = {"lr": 1e-3, "epochs": 100, "weight_decay": 0.05, "batch_size": 8}
    other = {"lr": 1e-4, "epochs": 200, "weight_decay": 0.01, "batch_size": 16}
    runs = [_run("MIRAGE-Base", 1, many), _run("MIRAGE-Base", 1, other)]
    labels, study = _labels(runs)
    assert labels == ["MIRAGE-Base, setting 1", "MIRAGE-Base, setting 2"]
    assert any("setting 1 = 8 batch" in note or "setting 1 = batch 8" in note
               for note in study.notes)


# ----------------------------------------------------------------------------- HD95 rules
INFO = {"0": {"value": 0, "label": "Background"}, "1": {"value": 100, "label": "Layer"},
        "2": {"value": 200, "label": "Fluid"}}
SHAPE = (6, 8)  # diagonal sqrt(36 + 64) = 10 pixels


def _slice(square=None, column=1):
    """A 6x8 mask: the layer in rows 4-5, and Fluid as the 3x3 square at rows 1-3 and
    columns ``column``..``column + 2`` when ``square``."""
    mask = np.zeros(SHAPE, np.uint8)
    mask[4:, :] = 100
    if square:
        mask[1:4, column:column + 3] = 200
    return mask


def hand_volumes(root):
    """Four volumes of three B-scans; what Fluid is where (truth | prediction):

    missed:   slice 0 | nowhere               -> never predicted
    found:    slice 0 | slice 0, one column right: HD95 1 there (worked example in the docs)
    spurious: nowhere | slice 1               -> predicted but absent from the truth
    apart:    slice 0 | slice 2               -> never in both masks of one B-scan
    """
    truth_at = {"missed": 0, "found": 0, "spurious": None, "apart": 0}
    pred_at = {"missed": None, "found": 0, "spurious": 1, "apart": 2}
    data = root / "datasets" / "Tiny_DME"
    (data / "test" / "semseg").mkdir(parents=True)
    (data / "INFO.json").write_text(json.dumps(INFO))
    preds = root / "runs" / "Tiny_DME" / "run" / "preds"
    preds.mkdir(parents=True)
    for volume in truth_at:
        for s in range(3):
            truth = _slice(truth_at[volume] == s)
            pred = _slice(pred_at[volume] == s, column=2 if volume == "found" else 1)
            cv2.imwrite(str(data / "test" / "semseg" / f"{volume}_{s}.png"), truth)
            cv2.imwrite(str(preds / f"{volume}_{s}.png"), pred)
    seal_predictions(preds)
    return root / "datasets", preds.parent


# Per-volume Fluid HD95 by hand: 1-empty B-scans are NaN (left out), both-empty ones 0.
HAND_FLUID = {  # volume: (original, nan, diagonal)
    "missed": (0.0, math.nan, 10.0), "found": (1 / 3, 1 / 3, 1 / 3),
    "spurious": (0.0, math.nan, 10.0), "apart": (0.0, math.nan, 10.0)}


@pytest.mark.parametrize("rule", ["original", "nan", "diagonal"])
def test_the_three_hd95_missing_rules_by_hand(tmp_path, rule):
    datasets, run = hand_volumes(tmp_path)
    evaluation = evaluate_run(run, datasets, quiet=True, hd95_missing=rule)
    rows = evaluation.rows.set_index(["ID", "Class"])
    index = ("original", "nan", "diagonal").index(rule)
    for volume, values in HAND_FLUID.items():
        got = rows.loc[(volume, "Fluid"), "HD95"]
        want = values[index]
        assert (math.isnan(got) if math.isnan(want) else got == pytest.approx(want, abs=1e-6))
        assert rows.loc[(volume, "Layer"), "HD95"] == 0.0  # the rules touch no found class
    counts = rows.xs("Fluid", level="Class")[["truth_pixels", "pred_pixels", "missed"]]
    assert counts.to_dict("index") == {
        "apart": {"truth_pixels": 9, "pred_pixels": 9, "missed": False},
        "found": {"truth_pixels": 9, "pred_pixels": 9, "missed": False},
        "missed": {"truth_pixels": 9, "pred_pixels": 0, "missed": True},
        "spurious": {"truth_pixels": 0, "pred_pixels": 9, "missed": False}}
    # the printed means: Fluid over its 4 volumes, [all] over 8 (volume, class) rows
    table = results_table(evaluation)
    fluid = {"original": 1 / 12, "nan": 1 / 3, "diagonal": (30 + 1 / 3) / 4}[rule]
    overall = {"original": 1 / 24, "nan": 1 / 15, "diagonal": (30 + 1 / 3) / 8}[rule]
    assert table.loc["Fluid", "HD95"] == pytest.approx(fluid, abs=1e-6)
    assert table.loc["[all]", "HD95"] == pytest.approx(overall, abs=1e-6)
    record = json.loads((run / "evaluation.json").read_text())["Tiny_DME"]
    assert record["hd95_missing"] == rule


def test_a_bad_hd95_missing_rule_is_a_one_line_error(tmp_path):
    datasets, run = hand_volumes(tmp_path)
    with pytest.raises(UserError, match="--hd95_missing must be one of original, nan, "
                                        "diagonal"):
        evaluate_run(run, datasets, quiet=True, hd95_missing="zero")


# ----------------------------------------------------------------------------- inputs
def test_a_dataset_folder_is_not_a_run_folder(study):
    datasets, _, _, _ = study
    with pytest.raises(UserError, match=r"Synth_OCT is not a run folder \(no config.yaml"):
        evaluate_runs([datasets / DATASET], datasets, quiet=True)


def test_an_output_root_stands_for_its_runs(study, tmp_path, capsys):
    import shutil
    datasets, output, runs, _ = study
    root = tmp_path / "output"
    shutil.copytree(output, root)
    unfinished = root / "v1" / DATASET / runs[("MIRAGE-Tiny", 3)].name
    shutil.rmtree(unfinished / "preds")
    evaluations = evaluate_runs([root], datasets, quiet=False)
    assert len(evaluations) == len(runs) - 1
    assert f"1 run folder(s) without predictions to score skipped: {unfinished.name}" in \
        capsys.readouterr().out


# ----------------------------------------------------------------------------- TensorBoard
def test_tensorboard_holds_the_test_metrics_at_the_tested_epoch(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is an optional dependency")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from mirage.report.tensorboard_log import write_tensorboard
    run = tmp_path / "run"
    run.mkdir()
    log = [json.loads(line) for line in _log(1, 1).splitlines()]
    log = [dict(entry, epoch=e) for e, entry in enumerate(log[:3] * 2)] + [
        {"test_epoch": 1, "test/mIoU": 0.6, "test/IoU": {"Fluid": 0.4}, "test_data": "x"}]
    write_tensorboard(run, log)  # the test line is last, but its epoch (1) is earlier
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("test/mIoU")] == [(1, 0.6)]
    assert events.Scalars("test/IoU/Fluid")[0].value == pytest.approx(0.4)
    assert [e.step for e in events.Scalars("train/loss")] == list(range(6))


def test_the_study_refreshes_tensorboard_when_a_report_is_kept(study, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is an optional dependency")
    import shutil
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from mirage.report.study_outputs import write_study
    from mirage.report.tensorboard_log import write_tensorboard
    _, _, runs, _ = study
    run = tmp_path / DATASET / "run_s1"
    shutil.copytree(runs[("MIRAGE-Tiny", 1)], run)
    (run / "report.html").write_text('<meta name="generator" content="mirage-seg-report">')
    epochs = [e for e in read_run(run).log if "epoch" in e]
    write_tensorboard(run, epochs)  # as the per-epoch hook left it: before the test line
    write_study([run], tmp_path / "s", quiet=True, run_reports="missing")
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert "test/mIoU" in events.Tags()["scalars"]


# ----------------------------------------------------------------------------- figures
def test_training_curves_one_validation_line_per_series_and_a_labelled_test_score():
    from mirage.report import plots
    log = [json.loads(line) for line in _log(1, 1).splitlines()]  # val/mIoU == mIoU_all
    fig = plots.training_curves(log)
    miou = fig.axes[1]
    assert [t.get_text() for t in miou.get_legend().get_texts()] == [
        "validation, all classes", "validation, foreground",
        "test (best checkpoint, epoch 2): 60.0"]
    assert miou.get_title() == "mIoU (%)"
    for ax in fig.axes:
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert ticks and all(float(t).is_integer() for t in ticks), ax.get_title()
    per_class = plots.class_iou_curves(log).axes[0]
    assert all(float(t).is_integer() for t in per_class.get_xticks())


def test_no_class_colour_looks_like_the_error_red():
    from mirage.report import plots
    for count in (3, 9, 20, 30):
        colors = plots.class_colors(count)
        assert not any(plots.is_red_like(c) for c in colors)
        assert len({tuple(c) for c in colors}) == count
    assert plots.is_red_like(plots.ERROR_RGB)


def test_heat_map_keeps_long_labels_inside_the_image_without_warnings():
    from mirage.report import plots
    rows = [f"MODEL-{i}_pretrained_long_name, lr 1e-{i}" for i in range(6)]
    names = ["Duke_DME_Chiu_2015_full_resolution", "AROI", "Duke_iAMD (from AROI)",
             "A_very_long_dataset_name_that_needs_many_lines_to_be_shown", "B", "C"]
    columns, legend = plots.short_labels(names)
    assert legend == [(f"D{i}", name) for i, name in enumerate(names, 1)]  # one too long
    columns, legend = plots.short_labels(names[:3])
    assert legend == [] and [c.replace("\n", "") for c in columns] == \
        ["Duke_DME_Chiu_2015_full_resolution", "AROI", "Duke_iAMD(from AROI)"]
    assert all(len(line) <= 14 for c in columns for line in c.split("\n"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = plots.heat_map(np.arange(36.0).reshape(6, 6), rows, plots.short_labels(
            names[:3] + ["OCTID", "RETOUCH_Cirrus", "Synthetic_OCT_v2"])[0], "mean Dice")
        plots.to_png(fig)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # lays the figure out as saving does
    renderer = canvas.get_renderer()
    box = fig.bbox
    ax = fig.axes[0]
    for label in ax.get_xticklabels() + ax.get_yticklabels():
        extent = label.get_window_extent(renderer)
        assert extent.x0 >= box.x0 - 1 and extent.x1 <= box.x1 + 1, label.get_text()
        assert extent.y0 >= box.y0 - 1 and extent.y1 <= box.y1 + 1, label.get_text()
    assert [t.get_text() for t in ax.get_yticklabels()] == rows  # never cut


def test_the_run_report_says_what_precision_actually_ran(study, tmp_path):
    import shutil
    import yaml
    from mirage.report.run_report import write_run_report
    datasets, _, runs, _ = study
    run = tmp_path / DATASET / "cpu_run"
    shutil.copytree(runs[("MIRAGE-Tiny", 1)], run)
    page = write_run_report(run, datasets, with_gallery=False).read_text()
    assert "True (CUDA only; --device auto and log.txt does not record the device" in page
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump(dict(config, device="cpu")))
    page = write_run_report(run, datasets, with_gallery=False).read_text()
    assert "True (not used: CPU run, float32)" in page
