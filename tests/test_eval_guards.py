"""run_seg_eval.py refuses, before scoring anything, what would lose a user's file or score
the wrong pairs: a --summary path that is not a new file or an earlier summary, and a truth
mask of another size than its B-scan.

The run is fabricated as run_seg_tuning.py leaves it (tests/test_study.py's helpers) on
the synthetic demo data, with its B-scans next to the masks.
"""
from pathlib import Path

import cv2
import pandas as pd
import pytest

from mirage.evaluate.outputs import evaluate_runs
from test_evaluation import run_cli  # run_seg_eval.py -> (code, out, err)
from test_study import DATASET, make_run, write_synthetic_dataset


@pytest.fixture
def run(tmp_path):
    """(datasets folder, an unscored run folder with sealed predictions)."""
    datasets = tmp_path / "datasets"
    write_synthetic_dataset(datasets, name=DATASET, splits={"test": 2}, slices_per_volume=2,
                            size=(48, 64), seed=3)
    run_dir = make_run(tmp_path / "output", datasets, "MIRAGE-Tiny", 1, 1, evaluate=False)
    return datasets, run_dir


def one_line_error(err):
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ----------------------------------------------------------------------------- --summary
# What QA's --summary overwrote, relative to (datasets folder, run folder).
PROTECTED = {
    "the best checkpoint": lambda d, r: r / "checkpoint-best.pth",
    "log.txt": lambda d, r: r / "log.txt",
    "config.yaml": lambda d, r: r / "config.yaml",
    "the predictions' manifest": lambda d, r: r / "preds" / "manifest.json",
    "a prediction": lambda d, r: next((r / "preds").glob("*.png")),
    "a new file in a run folder": lambda d, r: r / "summary.csv",
    "the dataset's INFO.json": lambda d, r: d / DATASET / "INFO.json",
    "a new file deep in a dataset": lambda d, r: d / DATASET / "test" / "semseg" / "s.csv",
}


@pytest.mark.parametrize("case", list(PROTECTED))
def test_summary_never_replaces_a_run_or_dataset_file(run, capsys, case):
    datasets, run_dir = run
    target = PROTECTED[case](datasets, run_dir)
    before = target.read_bytes() if target.exists() else None
    code, _, err = run_cli(["-d", datasets, "-m", run_dir, "--summary", target], capsys)
    line = one_line_error(err)
    assert code == 2 and f"--summary {target}" in line
    assert ("is a run folder" in line) != ("is a dataset folder" in line)
    assert (target.read_bytes() if target.exists() else None) == before
    assert not list(run_dir.glob("results*.csv"))  # refused before anything was scored


def test_summary_refuses_a_file_it_did_not_write_and_a_folder(run, tmp_path, capsys):
    datasets, run_dir = run
    notes = tmp_path / "notes.csv"
    notes.write_text("run,comment\nmine,keep me\n")
    code, _, err = run_cli(["-d", datasets, "-m", run_dir, "--summary", notes], capsys)
    assert code == 2 and "is not a summary CSV written by run_seg_eval.py" in one_line_error(err)
    assert notes.read_text() == "run,comment\nmine,keep me\n"
    code, _, err = run_cli(["-d", datasets, "-m", run_dir, "--summary", tmp_path], capsys)
    assert code == 2 and "is a folder" in one_line_error(err)
    code, _, err = run_cli(["-d", datasets, "-m", run_dir, "--summary",
                            notes / "table.csv"], capsys)
    assert code == 2 and f"{notes} is a file, not a folder" in one_line_error(err)
    assert not list(run_dir.glob("results*.csv"))


def test_summary_writes_a_new_file_and_replaces_its_own(run, tmp_path, capsys):
    datasets, run_dir = run
    summary = tmp_path / "paper" / "summary.csv"
    code, _, err = run_cli(["-d", datasets, "-m", run_dir, "--summary", summary,
                            "--no_report"], capsys)
    assert code == 0, err
    first = pd.read_csv(summary)
    assert list(first.columns)[:18] == [  # the layout other tools parse, unchanged
        "run", "dataset", "group", "seed", "identity", "volumes", "path", "note", "missed",
        "Dice", "Dice_mean", "Dice_std", "IoU", "IoU_mean", "IoU_std", "HD95", "HD95_mean",
        "HD95_std"]
    assert list(first.columns)[18:28] == [  # appended: the 95% bootstrap intervals
        f"{m}_ci_{part}" for m in ("Dice", "IoU", "HD95") for part in
        ("low", "high", "method")] + ["ci_resamples"]
    assert list(first["group"]) == ["layers", "lesions", "all"]
    # an earlier summary, also one of the first tool's narrower layout, is replaced
    first[["run", "dataset", "group", "volumes", "path", "Dice", "Dice_mean", "Dice_std",
           "IoU_mean", "HD95_mean"]].to_csv(summary, index=False)
    code, _, err = run_cli(["-d", datasets, "-m", run_dir, "--summary", summary,
                            "--no_report"], capsys)
    assert code == 0, err
    assert pd.read_csv(summary).equals(first)
    assert [p.name for p in summary.parent.iterdir()] == ["summary.csv"]  # no temporary file


def test_write_summary_from_python_checks_the_path_too(run):
    from mirage.errors import UserError
    from mirage.evaluate.outputs import write_summary
    datasets, run_dir = run
    evaluations = evaluate_runs([run_dir], datasets, quiet=True)
    checkpoint = run_dir / "checkpoint-best.pth"
    before = checkpoint.read_bytes()
    with pytest.raises(UserError, match="is a run folder"):
        write_summary(evaluations, checkpoint)
    assert checkpoint.read_bytes() == before


# ----------------------------------------------------------------------------- mask sizes
def test_a_mask_of_another_size_than_its_bscan_is_refused(run, capsys):
    datasets, run_dir = run
    mask = next((datasets / DATASET / "test" / "semseg").glob("*.png"))
    bscan = datasets / DATASET / "test" / "bscan" / mask.name
    wider = cv2.resize(cv2.imread(str(mask), cv2.IMREAD_UNCHANGED), (66, 48),
                       interpolation=cv2.INTER_NEAREST)  # its B-scan (and prediction): 64x48
    assert cv2.imwrite(str(mask), wider)
    code, _, err = run_cli(["-d", datasets, "-m", run_dir, "--no_report"], capsys)
    line = one_line_error(err)
    assert code == 2
    assert f"{mask} is 66x48 but its B-scan {bscan} is 64x48" in line
    assert not list(run_dir.glob("results*.csv"))
    # the same refusal for scoring predictions of another tool
    code, _, err = run_cli(["-d", datasets, "-m", run_dir, "--no_report",
                            "--foreign_predictions"], capsys)
    assert code == 2 and f"{mask} is 66x48" in one_line_error(err)


def test_masks_the_size_of_their_bscans_are_scored(run):
    datasets, run_dir = run
    evaluation = evaluate_runs([run_dir], datasets, quiet=True)[0]
    assert evaluation.num_slices == 4 and Path(run_dir / "results_layers.csv").is_file()
