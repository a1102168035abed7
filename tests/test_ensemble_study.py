"""A scored ensemble (run_seg_predict.py --run_dir A B, --tta flip) as its own row of a study.

The runs and their results are fabricated as tests/test_study.py does; the ensemble's
output folder is what run_seg_predict.py leaves (PNGs + prediction_record.json), scored by
the real run_seg_eval.py code into that folder.
"""
import json
from pathlib import Path
import shutil

import numpy as np
import pandas as pd
import pytest

from mirage.errors import UserError
from mirage.evaluate.outputs import evaluate_runs
from mirage.fileio import file_sha256
from mirage.run.catalog import find_runs, read_run
from mirage.run.predictions import write_manifest
from mirage.data.classes import read_class_table
from test_study import DATASET, SEEDS, make_grid, results_of, summarise, write_prediction

MODEL = "MIRAGE-Tiny"
LABEL = f"{MODEL}, ensemble of seeds 1,2, flip"


def make_ensemble(root, datasets, members, name="ens", shift=0):
    out = root / "ensembles" / name
    out.mkdir(parents=True)
    data = datasets / DATASET
    rng = np.random.default_rng(7)
    inputs = {}
    for truth in sorted((data / "test" / "semseg").glob("*.png")):
        write_prediction(truth, out / truth.name, shift, rng)
        inputs[truth.stem] = str((data / "test" / "bscan" / truth.name).resolve())
    runs = [{"run_dir": str(m), "checkpoint": "checkpoint-best.pth",
             "checkpoint_sha256": file_sha256(m / "checkpoint-best.pth"), "epoch": 2}
            for m in members]
    record = {"runs": runs, "tta": "flip",
              "classes": read_class_table(data / "INFO.json").entries(),
              "inputs": inputs, "files": sorted(p.name for p in out.glob("*.png"))}
    (out / "prediction_record.json").write_text(json.dumps(record))
    return out


@pytest.fixture(scope="module")
def study_grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("ens")
    datasets, output, runs = make_grid(root)
    out = make_ensemble(root, datasets, [runs[(MODEL, s)] for s in SEEDS])
    evaluate_runs([out], datasets, quiet=True)
    return root, datasets, output, runs, out


def test_an_ensemble_folder_is_scored_into_itself(study_grid):
    _, _, _, _, out = study_grid
    assert (out / "results_layers.csv").is_file() or (out / "results.csv").is_file()
    record = json.loads((out / "evaluation.json").read_text())
    assert DATASET in record and "ensemble of 2 runs" in record[DATASET]["note"]
    run = read_run(out)
    assert run.status == "evaluated" and run.tta == "flip"
    assert run.ensemble["seeds"] == list(SEEDS) and run.train_dataset == DATASET
    assert run.variant == "ensemble of seeds 1,2, flip"


def test_a_changed_member_checkpoint_is_refused_in_one_line(study_grid, tmp_path):
    root, datasets, _, runs, _ = study_grid
    member = tmp_path / "v1" / DATASET / runs[(MODEL, 2)].name
    shutil.copytree(runs[(MODEL, 2)], member)
    out = make_ensemble(tmp_path, datasets, [runs[(MODEL, 1)], member])
    (member / "checkpoint-best.pth").write_text("retrained")
    with pytest.raises(UserError) as err:
        evaluate_runs([out], datasets, quiet=True)
    assert "\n" not in str(err.value) and str(member) in str(err.value)
    assert "earlier checkpoint-best.pth" in str(err.value)


def test_predictions_of_other_b_scans_are_refused(study_grid, tmp_path):
    _, datasets, _, runs, _ = study_grid
    out = make_ensemble(tmp_path, datasets, [runs[(MODEL, s)] for s in SEEDS])
    record = json.loads((out / "prediction_record.json").read_text())
    stem = sorted(record["inputs"])[0]
    other = tmp_path / "other.png"
    other.write_bytes(b"not the B-scan")
    record["inputs"][stem] = str(other)
    (out / "prediction_record.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match="predicted from other data"):
        evaluate_runs([out], datasets, quiet=True)


def test_a_b_scan_changed_since_it_was_predicted_is_refused(study_grid, tmp_path):
    """run_seg_predict.py records each input's size and SHA-256 as predicted: a B-scan
    of the scored split that changed since (same path) is refused, not scored."""
    from mirage.run.predictions import file_entry
    _, datasets, _, runs, _ = study_grid
    copied = tmp_path / "datasets"
    shutil.copytree(datasets, copied)
    out = make_ensemble(tmp_path, copied, [runs[(MODEL, s)] for s in SEEDS])
    record = json.loads((out / "prediction_record.json").read_text())
    record["input_files"] = {stem: file_entry(path) for stem, path in
                             record["inputs"].items()}
    (out / "prediction_record.json").write_text(json.dumps(record))
    evaluate_runs([out], copied, quiet=True)  # as predicted: scored
    bscan = Path(record["inputs"][sorted(record["inputs"])[0]])
    bscan.write_bytes(bscan.read_bytes() + b"\0")  # replaced since, at the same path
    with pytest.raises(UserError, match="predicted from other data"):
        evaluate_runs([out], copied, quiet=True)


def test_the_study_shows_the_ensemble_as_its_own_row(study_grid, tmp_path):
    _, _, output, runs, out = study_grid
    plain = pd.read_csv(summarise([output], tmp_path / "plain")["summary.csv"],
                        keep_default_na=False, dtype=str)
    files = summarise([output, out.parent], tmp_path / "with")
    summary = pd.read_csv(files["summary.csv"], keep_default_na=False, dtype=str)
    row = summary[(summary["label"] == LABEL) & (summary["class"] == "[all]")]
    assert len(row) == 1
    rows = results_of(out)
    assert float(row["Dice_mean"].iloc[0]) == pytest.approx(100 * rows["Dice"].mean())
    assert float(row["HD95_mean"].iloc[0]) == pytest.approx(rows["HD95"].mean())
    assert row["seeds"].iloc[0] == "1" and "one prediction of an ensemble" in row["notes"].iloc[0]
    # the plain runs' rows are exactly as without the ensemble
    others = summary[summary["label"] != LABEL].reset_index(drop=True)
    pd.testing.assert_frame_equal(others, plain)
    significance = pd.read_csv(files["significance.csv"], keep_default_na=False, dtype=str)
    assert not (significance[["model_a", "model_b"]] == LABEL).any().any()
    plain_sig = pd.read_csv(summarise([output], tmp_path / "plain2")["significance.csv"],
                            keep_default_na=False, dtype=str)
    pd.testing.assert_frame_equal(significance, plain_sig)
    markdown = files["summary.md"].read_text()
    assert LABEL in markdown and "no ± std over seeds" in markdown
    assert "seed(s) only" not in markdown


def test_an_ensemble_of_runs_that_differ_is_listed_not_used(study_grid, tmp_path):
    _, datasets, _, runs, _ = study_grid
    out = make_ensemble(tmp_path, datasets, [runs[(MODEL, 1)], runs[("RETFound-Tiny", 1)]])
    evaluate_runs([out], datasets, quiet=True)
    run = find_runs([out])[0]
    assert run.status == "not used: its runs differ in model"


def test_a_run_with_flipped_predictions_says_so(study_grid, tmp_path):
    _, datasets, _, runs, _ = study_grid
    run_dir = tmp_path / "v1" / DATASET / runs[(MODEL, 1)].name
    shutil.copytree(runs[(MODEL, 1)], run_dir)
    preds = run_dir / "preds"
    (preds / "manifest.json").unlink()
    write_manifest(preds, run_dir / "checkpoint-best.pth", 2,
                   read_class_table(datasets / DATASET / "INFO.json"),
                   [p.stem for p in preds.glob("*.png")], tta="flip")
    assert read_run(run_dir).tta == "flip" and read_run(runs[(MODEL, 1)]).tta == "none"
