"""Every problem of a dataset at once, leaks between splits, blank class labels and
symbolic links that lead nowhere: what run_seg_check_data.py and training refuse, and
the words they use (docs/segmentation_benchmark.md, "Checks before training")."""
import json
import os
import shutil

import cv2
import numpy as np
import pytest

import run_seg_check_data
import run_seg_tuning
from conftest import make_dataset, write_info
from test_check_data import problem_lines
from mirage.data.check import check_dataset, check_training_data
from mirage.data.classes import read_class_table
from mirage.data.layout import check_split, find_split, open_dataset
from mirage.data.problems import MAX_LISTED, DatasetProblems


def train(dataset, weights, out, capsys):
    """Train for one epoch; (exit status, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run_seg_tuning.main([str(a) for a in (
            "--weights", weights, "--data_path", dataset, "--input_size", "32", "48",
            "--patch_size", "16", "--epochs", "1", "--num_workers", "0",
            "--base_output_dir", out)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return stop.value.code, err


def check(dataset, capsys):
    """run_seg_check_data.py; (exit status, stdout, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run_seg_check_data.main(["--data_path", str(dataset)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return stop.value.code, out, err


def write_mask(path, value):
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    mask[0, 0] = value
    cv2.imwrite(str(path), mask)


# ----------------------------------------------------------------------------- all at once
def test_every_problem_is_listed_at_once(tiny_dataset, capsys):
    root = tiny_dataset
    (root / "train/bscan/trainvol0_1.png").rename(root / "train/bscan/trainvol0.png")
    write_mask(root / "train/semseg/trainvol1_0.png", 7)
    (root / "val/semseg/valvol0_1.png").write_bytes(b"garbage")
    cv2.imwrite(str(root / "test/semseg/testvol0_2.png"), np.zeros((10, 20), np.uint8))
    with pytest.raises(DatasetProblems) as err:
        check_dataset(root)
    train_bscan, val_mask = root / "train/bscan", root / "val/semseg/valvol0_1.png"
    assert err.value.problems == [
        f"1 file(s) in {train_bscan} are not named <scan_id>_<slice number> (e.g. "
        "patient01_5.png): trainvol0.png; rename them",
        f"1 mask(s) in {root / 'train/semseg'} have no B-scan in {train_bscan}: trainvol0_1",
        f"{root / 'train/semseg/trainvol1_0.png'} holds value(s) [7] not in "
        f"{root / 'INFO.json'} (known: [0, 100, 200])",
        f"{val_mask} is not a readable image (not PNG, JPEG, TIFF or BMP data); replace it "
        "with a valid PNG",
        f"{root / 'test/semseg/testvol0_2.png'} is 20x10 but its B-scan testvol0_2.png is "
        "96x64; masks must match their B-scans"]
    code, out, stderr = check(root, capsys)
    assert code == 2 and "1 of 1 dataset(s) failed" in out
    assert stderr.splitlines() == [
        f"error: 5 problems in {root}; fix them all, then run again:",
        *[f"  - {problem}" for problem in err.value.problems]]


def test_training_lists_every_problem_of_the_images_before_training(tiny_dataset,
                                                                    tiny_weights, tmp_path,
                                                                    capsys):
    root = tiny_dataset
    write_mask(root / "train/semseg/trainvol0_3.png", 9)
    (root / "val/bscan/valvol0_0.png").write_bytes(b"")
    cv2.imwrite(str(root / "test/semseg/testvol0_1.png"), np.zeros((8, 8), np.uint8))
    code, err = train(root, tiny_weights, tmp_path / "out", capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[0] == f"error: 3 problems in {root}; fix them all, then run again:"
    named = ["train/semseg/trainvol0_3.png", "val/bscan/valvol0_0.png",
             "test/semseg/testvol0_1.png"]
    assert len(lines) == 4 and all(str(root / path) in line
                                   for path, line in zip(named, lines[1:]))
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.pth"))


def test_a_long_list_is_cut_after_the_first_problems(tmp_path):
    root = make_dataset(tmp_path, splits={"train": 30})
    for path in sorted((root / "train/semseg").iterdir()):
        write_mask(path, 7)
    slices = find_split(root / "train", True)
    with pytest.raises(DatasetProblems) as err:
        check_split(slices, open_dataset(root).class_table)
    lines = str(err.value).splitlines()
    assert len(err.value.problems) == 30 and len(lines) == 1 + MAX_LISTED + 1
    assert lines[0] == f"30 problems in {root / 'train'}; fix them all, then run again:"
    assert lines[1] == (f"  - {root / 'train/semseg/trainvol0_0.png'} holds value(s) [7] "
                        f"not in {root / 'INFO.json'} (known: [0, 100, 200])")
    assert lines[-1] == "  ... and 10 more"


def test_one_problem_stays_one_line(tiny_dataset):
    (tiny_dataset / "train/semseg/trainvol0_1.png").unlink()
    with pytest.raises(DatasetProblems) as err:
        check_dataset(tiny_dataset)
    assert "\n" not in str(err.value) and str(err.value).startswith("1 B-scan(s) in ")


def test_a_broken_class_table_does_not_hide_the_layout_problems(tiny_dataset):
    write_info(tiny_dataset, labels=("Background", "Layer", "layer"))
    (tiny_dataset / "val/semseg/valvol0_0.png").unlink()
    with pytest.raises(DatasetProblems) as err:
        check_dataset(tiny_dataset)
    # The masks' values are not compared with an unusable table: no line per mask.
    assert len(err.value.problems) == 2
    assert "both labelled 'layer'" in err.value.problems[0]
    assert "have no mask" in err.value.problems[1]


# ----------------------------------------------------------------------------- leaks
def test_a_volume_in_two_splits_is_refused(tiny_dataset, tiny_weights, tmp_path, capsys):
    root = tiny_dataset
    for sub in ("bscan", "semseg"):  # slice 1 of valvol0 becomes slice 9 of trainvol1
        (root / "val" / sub / "valvol0_1.png").rename(root / "val" / sub / "trainvol1_9.png")
    problem = (f"volume trainvol1 is in 2 splits: train (trainvol1_0.png, trainvol1_1.png, "
               f"trainvol1_2.png and 1 more) and val (trainvol1_9.png) of {root}; keep each "
               "volume in one split (move its B-scans and masks together)")
    with pytest.raises(DatasetProblems) as err:
        check_dataset(root)
    assert err.value.problems == [problem]
    code, err = train(root, tiny_weights, tmp_path / "out", capsys)
    assert code == 2 and err.strip() == f"error: {problem}"


def test_a_volume_in_a_test_split_without_masks_is_refused(tiny_dataset):
    shutil.rmtree(tiny_dataset / "test/semseg")  # RETOUCH: inference reads it
    (tiny_dataset / "test/bscan/testvol0_0.png").rename(
        tiny_dataset / "test/bscan/trainvol0_7.png")
    with pytest.raises(DatasetProblems, match=r"^volume trainvol0 is in 2 splits: train "
                                              r"\(.*\) and test \(trainvol0_7.png\)"):
        check_dataset(tiny_dataset)


def test_the_same_b_scan_in_two_splits_is_refused(tiny_dataset, tiny_weights, tmp_path,
                                                 capsys):
    root = tiny_dataset
    train_bscan = root / "train/bscan/trainvol1_2.png"
    copy = root / "test/bscan/testvol0_1.png"
    # Re-encoded (another PNG compression) under another name: the pixels are compared.
    cv2.imwrite(str(copy), cv2.imread(str(train_bscan), cv2.IMREAD_UNCHANGED),
                [cv2.IMWRITE_PNG_COMPRESSION, 0])
    assert copy.read_bytes() != train_bscan.read_bytes()
    problem = (f"identical B-scans (same pixels) in train and test: {train_bscan}, {copy}; "
               "keep the B-scan in one split only")
    with pytest.raises(DatasetProblems) as err:
        check_dataset(root)
    assert err.value.problems == [problem]
    code, err = train(root, tiny_weights, tmp_path / "out", capsys)
    assert code == 2 and err.strip() == f"error: {problem}"


def test_a_copied_volume_is_one_problem_not_one_per_b_scan(tiny_dataset):
    for name in ("trainvol0_0.png", "trainvol0_1.png"):
        for sub in ("bscan", "semseg"):
            shutil.copy(tiny_dataset / "train" / sub / name, tiny_dataset / "val" / sub / name)
    with pytest.raises(DatasetProblems) as err:
        check_dataset(tiny_dataset)
    assert len(err.value.problems) == 1
    assert err.value.problems[0].startswith("volume trainvol0 is in 2 splits")


def test_blank_b_scans_and_copies_within_a_split_are_no_leak(tiny_dataset):
    for path in ("train/bscan/trainvol0_0.png", "val/bscan/valvol0_0.png"):
        cv2.imwrite(str(tiny_dataset / path), np.zeros((64, 96), np.uint8))
    shutil.copy(tiny_dataset / "train/bscan/trainvol0_1.png",
                tiny_dataset / "train/bscan/trainvol1_1.png")
    summary = check_dataset(tiny_dataset)
    assert [split.bscans for split in summary.splits] == [8, 2, 3]


# ----------------------------------------------------------------------------- INFO.json
@pytest.mark.parametrize("label", ["", "   "])
def test_a_blank_class_label_is_refused(tiny_dataset, tiny_weights, tmp_path, capsys, label):
    info = tiny_dataset / "INFO.json"
    write_info(tiny_dataset, labels=("Background", label, "Fluid"))
    problem = (f'{info}: class 1 (value 100) has a blank label; give it a name, e.g. '
               '"Background" or "RNFL"')
    with pytest.raises(DatasetProblems) as err:
        read_class_table(info)
    assert err.value.problems == [problem]
    code, out, stderr = check(tiny_dataset, capsys)
    assert code == 2 and stderr.strip() == f"error: {problem}"
    code, err = train(tiny_dataset, tiny_weights, tmp_path / "out", capsys)
    assert code == 2 and err.strip() == f"error: {problem}"


def test_every_faulty_class_entry_is_listed(tmp_path):
    info = tmp_path / "INFO.json"
    info.write_text(json.dumps({"0": {"value": 0}, "1": {"value": "x", "label": "a"},
                                "2": {"value": 5, "label": 3}, "4": {"value": 5,
                                                                     "label": "b"}}))
    with pytest.raises(DatasetProblems) as err:
        read_class_table(info)
    assert [p.split(": ", 1)[1] for p in err.value.problems] == [
        'class 0 needs both "value" and "label"',
        "class 1 has value 'x'; expected an integer pixel value in 0..65535",
        "class 2 has label 3; expected a string",
        "class indices must be 0..3, got [0, 1, 2, 4]"]


# ----------------------------------------------------------------------------- symlinks
def test_a_symlink_loop_and_a_dangling_link_are_named(tiny_dataset, tiny_weights, tmp_path,
                                                      capsys):
    loop = tiny_dataset / "train/bscan/trainvol1_3.png"
    loop.unlink()
    os.symlink(loop.name, loop)  # it points at itself
    dangling = tiny_dataset / "val/semseg/valvol0_1.png"
    dangling.unlink()
    os.symlink("/nowhere/valvol0_1.png", dangling)
    loop_problem = (f"{loop} is a symbolic link loop (it leads back to itself); replace it "
                    "with the image file or remove it")
    dangling_problem = (f"{dangling} is a symbolic link to /nowhere/valvol0_1.png, which "
                        "does not exist; replace it with the image file or remove it")
    # The link is the problem; its pair is not also reported as lacking a B-scan or mask.
    assert find_split(tiny_dataset / "test", True)
    with pytest.raises(DatasetProblems) as err:
        find_split(tiny_dataset / "train", True)
    assert err.value.problems == [loop_problem]
    with pytest.raises(DatasetProblems) as err:
        check_dataset(tiny_dataset)
    assert err.value.problems == [loop_problem, dangling_problem]
    code, err = train(tiny_dataset, tiny_weights, tmp_path / "out", capsys)
    assert code == 2 and loop_problem in problem_lines(err)  # and the other, from val on


def test_a_link_to_an_image_is_read(tiny_dataset):
    image = tiny_dataset / "train/bscan/trainvol0_0.png"
    kept = tiny_dataset.parent / "kept.png"
    image.rename(kept)
    os.symlink(kept, image)
    assert len(find_split(tiny_dataset / "train", True)) == 8


# ----------------------------------------------------------------------------- for training
def test_training_data_lists_every_split_at_once(tiny_dataset):
    root = tiny_dataset
    info = open_dataset(root)
    splits = check_training_data(info, info.class_table)
    assert {name: len(files) for name, files in splits.items()} == {"train": 8, "val": 2,
                                                                    "test": 3}
    assert splits["val"] == find_split(root / "val", True)
    (root / "train/semseg/trainvol0_1.png").unlink()  # a folder problem in train
    (root / "val/bscan/valvol0_1.png").rename(root / "val/bscan/valvol0.png")  # ... in val
    write_mask(root / "test/semseg/testvol0_0.png", 7)  # an image problem in test
    with pytest.raises(DatasetProblems) as err:
        check_training_data(info, info.class_table)
    assert [problem.split(" ")[0:2] for problem in err.value.problems] == [
        ["1", "B-scan(s)"], ["1", "file(s)"], ["1", "mask(s)"],
        [str(root / "test/semseg/testvol0_0.png"), "holds"]]
    assert str(err.value).startswith(f"4 problems in {root};")


def test_training_data_without_test_masks(tiny_dataset):
    shutil.rmtree(tiny_dataset / "test/semseg")
    info = open_dataset(tiny_dataset)
    assert check_training_data(info, info.class_table)["test"] == []
