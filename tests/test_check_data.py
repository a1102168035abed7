"""run_seg_check_data.py (mirage/data/check.py): every check training runs, with training's
words (every problem at once, leaks between splits included), and a summary of each clean
dataset."""
import json
import os
import re
import shutil

import cv2
import numpy as np
import pytest

import run_seg_check_data
import run_seg_tuning
from conftest import make_dataset, write_info
from mirage.data.check import check_dataset, format_summary


def train_argv(dataset, weights, out, *extra):
    return [str(a) for a in (
        "--weights", weights, "--data_path", dataset, "--input_size", "32", "48",
        "--patch_size", "16", "--epochs", "1", "--num_workers", "0",
        "--base_output_dir", out, *extra)]


def run(main, args, capsys):
    """(exit status, stdout, the ``error:`` lines of stderr)."""
    code, out, err = run_full(main, args, capsys)
    return code, out, [line for line in err.splitlines() if line.startswith("error: ")]


def run_full(main, args, capsys):
    """(exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def problem_lines(err):
    """The problems an ``error:`` on stderr lists: its one line, or the lines under
    "N problems in ...:"."""
    lines = err.strip().splitlines()
    assert lines[0].startswith("error: "), lines
    if len(lines) == 1:
        return [lines[0][len("error: "):]]
    assert re.fullmatch(rf"error: {len(lines) - 1} problems in .*; fix them all, then run "
                        "again:", lines[0]), lines[0]
    assert all(line.startswith("  - ") for line in lines[1:]), lines
    return [line[len("  - "):] for line in lines[1:]]


def _rename(root, split, old, new, subs=("bscan", "semseg")):
    for sub in subs:
        (root / split / sub / old).rename(root / split / sub / new)


def _mask_values(root):
    path = root / "train/semseg/trainvol0_2.png"
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    mask[0, :3] = [7, 255, 7]
    cv2.imwrite(str(path), mask)


def _empty_split(root):
    for path in (root / "val/bscan").iterdir():
        path.unlink()


def _link(path, target):
    path.unlink()
    os.symlink(target, path)


def _volume_in_two_splits(root):
    _rename(root, "val", "valvol0_1.png", "trainvol1_9.png")


def _images_in_every_split(root):
    _mask_values(root)
    (root / "val/bscan/valvol0_0.png").write_bytes(b"")
    cv2.imwrite(str(root / "test/semseg/testvol0_1.png"), np.zeros((8, 8), np.uint8))


# The damages tests/test_data.py shows training refusing: each damages the dataset in
# place, or returns a list of extra options for both commands.
BROKEN = {
    "no dataset folder": lambda root: shutil.rmtree(root),
    "no INFO.json": lambda root: (root / "INFO.json").unlink(),
    "INFO.json not JSON": lambda root: (root / "INFO.json").write_text("{not json"),
    "INFO.json value not an integer": lambda root: (root / "INFO.json").write_text(
        '{"0": {"value": "x", "label": "bg"}, "1": {"value": 1, "label": "a"}}'),
    "one class": lambda root: write_info(root, values=(0,), labels=("Background",)),
    "duplicate labels": lambda root: write_info(root, labels=("Background", "ILM", "ilm ")),
    "no val folder": lambda root: shutil.rmtree(root / "val"),
    "no train masks": lambda root: shutil.rmtree(root / "train/semseg"),
    "empty split": _empty_split,
    "B-scan without mask": lambda root: (root / "train/semseg/trainvol0_1.png").unlink(),
    "mask without B-scan": lambda root: (root / "val/bscan/valvol0_0.png").unlink(),
    "no slice number": lambda root: _rename(root, "train", "trainvol0_1.png", "trainvol0.png"),
    "two files one stem": lambda root: shutil.copy(root / "val/bscan/valvol0_0.png",
                                                   root / "val/bscan/valvol0_0.bmp"),
    "two names one slice": lambda root: _rename(root, "val", "valvol0_1.png",
                                                "valvol0_00.png"),
    "unknown mask values": _mask_values,
    "size mismatch": lambda root: cv2.imwrite(str(root / "train/semseg/trainvol0_0.png"),
                                              np.zeros((10, 20), np.uint8)),
    "empty image": lambda root: (root / "train/bscan/trainvol1_0.png").write_bytes(b""),
    "not an image": lambda root: (root / "val/semseg/valvol0_1.png").write_bytes(b"garbage"),
    "bad test mask": lambda root: cv2.imwrite(str(root / "test/semseg/testvol0_2.png"),
                                              np.full((64, 96), 9, np.uint8)),
    "missing --mapping_fn": lambda root: ["--mapping_fn", root / "nowhere.json"],
    "blank label": lambda root: write_info(root, labels=("Background", " ", "Fluid")),
    "symlink loop": lambda root: _link(root / "train/bscan/trainvol0_2.png", "trainvol0_2.png"),
    "dangling symlink": lambda root: _link(root / "val/semseg/valvol0_0.png", "/nowhere.png"),
    "volume in two splits": _volume_in_two_splits,
    "same B-scan in two splits": lambda root: shutil.copy(
        root / "train/bscan/trainvol1_1.png", root / "test/bscan/testvol0_2.png"),
    "images broken in every split": _images_in_every_split,
}


@pytest.mark.parametrize("damage", list(BROKEN))
def test_each_broken_dataset_gets_trainings_error(tiny_dataset, tiny_weights, tmp_path,
                                                 capsys, damage):
    damaged = BROKEN[damage](tiny_dataset)
    extra = damaged if isinstance(damaged, list) else []
    code, _, trained = run_full(run_seg_tuning.main,
                                train_argv(tiny_dataset, tiny_weights, tmp_path / "out",
                                           *extra), capsys)
    assert code == 2, damage
    code, _, checked = run_full(run_seg_check_data.main,
                                ["--data_path", tiny_dataset, *extra], capsys)
    assert code == 2
    assert problem_lines(checked) == problem_lines(trained)  # the same words


def test_a_clean_dataset_is_summarised(tmp_path, capsys):
    data = make_dataset(tmp_path / "datasets", splits={"train": 8, "val": 2, "test": 3})
    wide = data / "train/bscan/trainvol1_3.png"  # one 16-bit B-scan of another size
    cv2.imwrite(str(wide), np.full((70, 100), 3000, np.uint16))
    cv2.imwrite(str(data / "train/semseg/trainvol1_3.png"), np.zeros((70, 100), np.uint8))
    summary = check_dataset(data)
    assert [s.name for s in summary.splits] == ["train", "val", "test"]
    train, val, test = summary.splits
    assert (train.volumes, train.bscans, val.volumes, val.bscans, test.bscans) == (2, 8, 1, 2, 3)
    assert train.min_size == (64, 96) and train.max_size == (70, 100)
    assert train.bit_depths == {8: 7, 16: 1} and test.bit_depths == {8: 3}
    expected = np.zeros(3, np.int64)
    for path in sorted((data / "train/semseg").iterdir()):
        mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        expected += [(mask == v).sum() for v in (0, 100, 200)]
    assert train.class_pixels.tolist() == expected.tolist()
    assert abs(train.class_shares().sum() - 1) < 1e-12
    text = format_summary(summary)
    assert "Background (0)" in text and "Fluid (200)" in text
    assert "64-70" in text and "96-100" in text and "8: 7, 16: 1" in text
    code, out, errors = run(run_seg_check_data.main, ["--data_path", data], capsys)
    assert code == 0 and errors == [] and text in out


def test_all_datasets_are_checked_before_the_exit_status(tmp_path, capsys):
    good = make_dataset(tmp_path / "d", name="Good")
    bad = make_dataset(tmp_path / "d", name="Bad")
    (bad / "train/semseg/trainvol0_1.png").unlink()
    other = make_dataset(tmp_path / "d", name="Other", seed=2)
    code, out, errors = run(run_seg_check_data.main,
                            ["--data_path", good, bad, other], capsys)
    assert code == 2 and len(errors) == 1 and "trainvol0_1" in errors[0]
    assert f"Good: {good}" in out and f"Other: {other}" in out and "Bad:" not in out
    assert "1 of 3 dataset(s) failed" in out


def test_mapping_fn_and_layouts_without_train_or_masks(tmp_path, capsys):
    data = make_dataset(tmp_path / "d", values=(0, 1000, 60000))
    info = tmp_path / "classes.json"
    shutil.move(data / "INFO.json", info)
    shutil.rmtree(data / "test/semseg")  # RETOUCH's test split: B-scans only
    summary = check_dataset(data, mapping_fn=info)
    assert summary.classes.values == (0, 1000, 60000)
    assert summary.splits[-1].name == "test" and summary.splits[-1].class_pixels is None
    assert any("test split without masks" in note for note in summary.notes)
    assert "  test " in format_summary(summary) and " - " in format_summary(summary)
    # an evaluation-only dataset (Duke iAMD): bscan/ and semseg/ at the top level
    external = make_dataset(tmp_path / "e", name="Ext", splits={"test": 3})
    for sub in ("bscan", "semseg"):
        shutil.move(external / "test" / sub, external / sub)
    shutil.rmtree(external / "test")
    summary = check_dataset(external)
    assert [s.name for s in summary.splits] == ["test"] and summary.splits[0].bscans == 3
    assert "evaluation-only" in summary.notes[0]
    info_text = json.loads((external / "INFO.json").read_text())
    assert len(info_text) == 3
    code, _, errors = run(run_seg_check_data.main, ["--data_path", data, "--workers", "2"],
                          capsys)
    assert code == 2 and errors == [f"error: class table {data / 'INFO.json'} not found; "
                                    "every dataset needs an INFO.json (see "
                                    "docs/segmentation_benchmark.md)"]
