"""Predictions sealed to their checkpoint, files, data and class table, end to end: train a
tiny run, predict, then change what a careless user could change and score."""
import json
import shutil

import cv2
import numpy as np
import pytest
import yaml

import run_seg_eval
import run_seg_tuning
from conftest import make_dataset, write_info
from mirage.data.classes import read_class_table
from mirage.errors import UserError


def argv(dataset, weights, out, *extra):
    return ["--weights", str(weights), "--data_path", str(dataset), "--input_size", "32", "48",
            "--patch_size", "16", "--batch_size", "2", "--num_workers", "0",
            "--base_output_dir", str(out), "--lr", "1e-3", "--output_adapter", "linear",
            "--aug_name", "none", "--drop_path_encoder", "0", "--epochs", "1", *map(str, extra)]


def tune(*args):
    return run_seg_tuning.main([str(a) for a in args])


def score(datasets, run_dir, capsys, *extra):
    """run_seg_eval.py -> (exit code, stdout, stderr)."""
    try:
        run_seg_eval.main(["-d", str(datasets), "-m", str(run_dir), "--no_report",
                           *map(str, extra)])
        code = 0
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def predicted(tiny_dataset, tiny_weights, tmp_path):
    """A trained tiny run with its test predictions: (datasets folder, run dir, argv)."""
    args = argv(tiny_dataset, tiny_weights, tmp_path / "out")
    run_dir = tune(*args)
    tune(*args, "--infer_only", "--test")
    return tiny_dataset.parent, run_dir, args


def test_an_edited_prediction_is_refused_and_predicted_again(predicted, capsys):
    datasets, run_dir, args = predicted
    preds = run_dir / "preds"
    original = (preds / "testvol0_0.png").read_bytes()
    edited = cv2.imread(str(preds / "testvol0_0.png"), cv2.IMREAD_UNCHANGED)
    edited = np.where(edited == 100, 200, 100).astype(edited.dtype)  # other valid values
    cv2.imwrite(str(preds / "testvol0_0.png"), edited)
    capsys.readouterr()

    code, _, err = score(datasets, run_dir, capsys)
    assert code == 2
    assert "testvol0_0.png was changed after it was written" in err
    assert "--infer_only --test" in err and len(err.strip().splitlines()) == 1
    assert score(datasets, run_dir, capsys, "--foreign_predictions")[0] == 0  # explicit

    tune(*args, "--infer_only", "--test")  # not skipped: the folder no longer matches
    assert "already holds the predictions" not in capsys.readouterr().out
    assert (preds / "testvol0_0.png").read_bytes() == original
    assert score(datasets, run_dir, capsys)[0] == 0


def test_an_unchanged_folder_is_not_predicted_again(predicted, capsys):
    _, run_dir, args = predicted
    capsys.readouterr()
    tune(*args, "--infer_only", "--test")
    assert "already holds the predictions of checkpoint-best.pth: skipping" in \
        capsys.readouterr().out


def test_predictions_of_another_copy_of_the_dataset_are_not_scored(predicted, tmp_path,
                                                                   tiny_weights, capsys):
    datasets, run_dir, args = predicted
    # Same name, INFO.json and slice names; other images (another seed).
    other = make_dataset(tmp_path / "elsewhere", seed=7)
    other_args = [other if a == str(datasets / "Tiny") else a for a in args]
    other_args = [str(a) for a in other_args]
    capsys.readouterr()
    tune(*other_args, "--infer_only", "--test")
    out = capsys.readouterr().out
    assert "held predictions of" in out and "replacing them" in out  # a notice

    code, _, err = score(datasets, run_dir, capsys)
    assert code == 2
    assert "was predicted from other data: B-scan testvol0_0" in err
    assert str(other / "test") in err
    # scored against the data it was predicted from, it passes
    assert score(other.parent, run_dir, capsys)[0] == 0


def test_a_changed_class_table_is_refused_at_scoring(predicted, capsys):
    datasets, run_dir, _ = predicted
    info = datasets / "Tiny" / "INFO.json"
    write_info(info.parent, labels=("Background", "Fluid", "Layer"))  # two labels swapped
    code, _, err = score(datasets, run_dir, capsys)
    assert code == 2
    assert "does not hold the classes the predictions in preds/ were made with" in err
    assert "value 100 is 'Fluid' there but was 'Layer' for the predictions" in err


def test_duplicate_labels_are_an_info_json_error(tmp_path, tiny_weights, capsys):
    data = make_dataset(tmp_path / "datasets", labels=("Background", "ILM-NFL", "ilm-nfl "))
    with pytest.raises(UserError, match="classes 1 and 2 are both labelled 'ilm-nfl '"):
        read_class_table(data / "INFO.json")
    with pytest.raises(SystemExit) as stop:  # training refuses it before anything runs
        tune(*argv(data, tiny_weights, tmp_path / "out"))
    assert stop.value.code == 2
    assert "both labelled" in capsys.readouterr().err


def test_each_predictions_folder_keeps_its_own_inference_record(predicted, tmp_path, capsys):
    datasets, run_dir, args = predicted
    own_record = run_dir / "preds" / "config_infer.yaml"
    assert yaml.safe_load(own_record.read_text())["test_data_path"] is None
    # an external set whose folder is also named like the training dataset
    external = make_dataset(tmp_path / "external", seed=3)
    tune(*args, "--infer_only", "--test", "--test_data_path", external)
    external_record = run_dir / "preds_Tiny" / "config_infer.yaml"
    assert yaml.safe_load(external_record.read_text())["test_data_path"] == str(external)
    assert yaml.safe_load(own_record.read_text())["test_data_path"] is None  # untouched
    assert not list(run_dir.glob("config_infer_*.yaml"))
    manifest = json.loads((run_dir / "preds_Tiny" / "manifest.json").read_text())
    assert manifest["data"]["split"] == str((external / "test").resolve())
    assert sorted(manifest["files"]) == sorted(p.name for p in
                                               (run_dir / "preds_Tiny").glob("*.png"))


def test_an_old_manifest_without_file_hashes_is_refused(predicted, capsys):
    datasets, run_dir, _ = predicted
    path = run_dir / "preds" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["files"], manifest["format"]
    path.write_text(json.dumps(manifest))
    code, _, err = score(datasets, run_dir, capsys)
    assert code == 2 and "earlier version and seals no file contents" in err


def test_a_removed_bscan_folder_only_skips_the_data_check(predicted, capsys):
    """Masks-only copies of a test set (no bscan/) are still scored: nothing to compare."""
    datasets, run_dir, _ = predicted
    shutil.rmtree(datasets / "Tiny" / "test" / "bscan")
    assert score(datasets, run_dir, capsys)[0] == 0


def test_the_data_record_holds_each_bscan_hash(predicted):
    import hashlib
    datasets, run_dir, _ = predicted
    manifest = json.loads((run_dir / "preds" / "manifest.json").read_text())
    bscan = datasets / "Tiny" / "test" / "bscan" / "testvol0_1.png"
    assert manifest["data"]["bscans"]["testvol0_1"] == [
        bscan.stat().st_size, hashlib.sha256(bscan.read_bytes()).hexdigest()]
    pred = run_dir / "preds" / "testvol0_1.png"
    assert manifest["files"]["testvol0_1.png"] == [
        pred.stat().st_size, hashlib.sha256(pred.read_bytes()).hexdigest()]
    assert np.array_equal(sorted(manifest["slices"]),
                          sorted(p.stem for p in (datasets / "Tiny" / "test" / "bscan").iterdir()))


@pytest.mark.parametrize("text", ["[1, 2]", "42", '"seed"'])
def test_an_identity_json_that_is_not_an_object_is_a_one_line_error(
        tiny_dataset, tiny_weights, tmp_path, capsys, text):
    args = argv(tiny_dataset, tiny_weights, tmp_path / "out")
    run_dir = tune(*args)
    (run_dir / "identity.json").write_text(text)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        tune(*args)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    assert "identity.json: not a JSON object of options" in err
