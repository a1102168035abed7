"""The benchmark layout: class tables, pairing, checks and the Dataset."""
import json

import cv2
import numpy as np
import pytest
import torch

from conftest import make_dataset
from mirage.data.classes import read_class_table
from mirage.data.dataset import SegmentationDataset
from mirage.data.layout import check_split, find_split, open_dataset, parse_slice_name
from mirage.data.problems import DatasetProblems
from mirage.errors import UserError
from mirage.data.transforms import SegmentationTransform


def test_class_table_and_background(tiny_dataset):
    table = read_class_table(tiny_dataset / "INFO.json")
    assert table.values == (0, 100, 200) and table.labels == ("Background", "Layer", "Fluid")
    assert table.background_index() == 0
    info = {"0": {"value": 7, "label": "RNFL"}, "1": {"value": 9, "label": "bg"}}
    (tiny_dataset / "INFO.json").write_text(json.dumps(info))
    assert read_class_table(tiny_dataset / "INFO.json").background_index() == 1


def test_lookup_tables_map_values_both_ways():
    info_values = (0, 23, 46, 69, 92, 115, 138, 161)
    from mirage.data.classes import ClassTable
    table = ClassTable(info_values, tuple(str(v) for v in info_values))
    mask = np.array([[0, 23, 161], [92, 46, 0]], np.uint8)
    index = table.value_to_index()[mask]
    assert index.tolist() == [[0, 1, 7], [4, 2, 0]] and index.dtype == np.uint8
    assert table.index_to_value()[index].tolist() == mask.tolist()
    wide = ClassTable((0, 1000, 65535), ("a", "b", "c"))
    assert wide.value_to_index()[np.array([65535, 1000], np.uint16)].tolist() == [2, 1]
    assert wide.index_to_value().dtype == np.uint16


@pytest.mark.parametrize("content, match", [
    ("{not json", "not valid JSON"),
    ('{"0": {"value": 0}}', 'needs both "value" and "label"'),
    ('{"0": {"label": "bg"}}', 'needs both "value" and "label"'),
    ('{"0": {"value": "x", "label": "bg"}}', "expected an integer"),
    ('{"1": {"value": 0, "label": "bg"}}', "class indices must be 0..0"),
    ('[]', "must be a JSON object"),
])
def test_bad_info_json(tmp_path, content, match):
    path = tmp_path / "INFO.json"
    path.write_text(content)
    with pytest.raises(UserError, match=match) as err:
        read_class_table(path)
    assert str(path) in str(err.value)


def test_missing_folders_and_info(tmp_path, tiny_dataset):
    with pytest.raises(UserError, match="folder not found"):
        open_dataset(tmp_path / "nope")
    (tiny_dataset / "INFO.json").unlink()
    with pytest.raises(UserError, match="INFO.json not found"):
        open_dataset(tiny_dataset)
    with pytest.raises(UserError, match="bscan not found"):
        find_split(tmp_path / "empty", need_masks=True)


def test_split_pairs_and_decodes(tiny_dataset):
    info = open_dataset(tiny_dataset)
    slices = find_split(info.split_dir("train"), need_masks=True)
    assert len(slices) == 8 and all(s.mask.stem == s.slice_id for s in slices)
    assert check_split(slices, info.class_table) == [(64, 96)] * 8


def test_unpaired_files_are_listed(tiny_dataset):
    (tiny_dataset / "train/semseg/trainvol0_1.png").unlink()
    with pytest.raises(UserError, match=r"1 B-scan\(s\).*have no mask.*trainvol0_1"):
        find_split(tiny_dataset / "train", need_masks=True)
    (tiny_dataset / "val/bscan/valvol0_0.png").unlink()
    with pytest.raises(UserError, match=r"mask\(s\).*have no B-scan.*valvol0_0"):
        find_split(tiny_dataset / "val", need_masks=True)


def test_empty_split(tiny_dataset):
    for path in (tiny_dataset / "val/bscan").iterdir():
        path.unlink()
    with pytest.raises(UserError, match="the split is empty"):
        find_split(tiny_dataset / "val", need_masks=True)


def test_split_without_masks_allowed_for_prediction(tiny_dataset):
    import shutil
    shutil.rmtree(tiny_dataset / "test/semseg")
    slices = find_split(tiny_dataset / "test", need_masks=False)
    assert len(slices) == 3 and all(s.mask is None for s in slices)
    with pytest.raises(UserError, match="semseg not found"):
        find_split(tiny_dataset / "test", need_masks=True)


def test_unknown_mask_value_names_file_and_values(tiny_dataset):
    path = tiny_dataset / "train/semseg/trainvol0_2.png"
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    mask[0, :3] = [7, 255, 7]
    cv2.imwrite(str(path), mask)
    info = open_dataset(tiny_dataset)
    with pytest.raises(UserError, match=r"trainvol0_2.png holds value\(s\) \[7, 255\]"):
        check_split(find_split(tiny_dataset / "train", True), info.class_table)


@pytest.mark.parametrize("content, match", [(b"", "is empty"), (b"garbage", "not a readable")])
def test_unreadable_images(tiny_dataset, content, match):
    (tiny_dataset / "train/bscan/trainvol1_0.png").write_bytes(content)
    info = open_dataset(tiny_dataset)
    with pytest.raises(UserError, match=match):
        check_split(find_split(tiny_dataset / "train", True), info.class_table)


def test_size_mismatch(tiny_dataset):
    path = tiny_dataset / "train/semseg/trainvol0_0.png"
    cv2.imwrite(str(path), np.zeros((10, 20), np.uint8))
    info = open_dataset(tiny_dataset)
    with pytest.raises(UserError, match="trainvol0_0.png is 20x10 but its B-scan"):
        check_split(find_split(tiny_dataset / "train", True), info.class_table)


def test_dataset_items_16_bit_and_lut(tmp_path):
    folder = make_dataset(tmp_path, values=(0, 1000, 60000), splits={"train": 2})
    path = folder / "train/bscan/trainvol0_0.png"
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED).astype(np.uint16) * 200
    cv2.imwrite(str(path), image)
    info = open_dataset(folder)
    slices = find_split(folder / "train", True)
    data = SegmentationDataset(slices, info.class_table, SegmentationTransform((64, 96)))
    item = data[0]
    assert item["image"].shape == (1, 64, 96) and item["image"].dtype == torch.float32
    assert float(item["image"].min()) == 0.0 and float(item["image"].max()) == 1.0
    raw = cv2.imread(str(slices[0].mask), cv2.IMREAD_UNCHANGED)
    expected = np.select([raw == 0, raw == 1000, raw == 60000], [0, 1, 2], -1)
    assert np.array_equal(item["mask"].numpy(), expected)


def test_slice_names():
    assert parse_slice_name("patient_01_12") == ("patient_01", 12)
    with pytest.raises(UserError, match="<scan_id>_<slice number>"):
        parse_slice_name("patient01")


# ----------------------------------------------------------------------------- file names
# docs/segmentation_benchmark.md, "Checks before training": a file name without
# _<slice number> is reported with the file; two files for one slice would otherwise
# leave one of them silently unused.

def _rename(dataset, split, old, new, subs=("bscan", "semseg")):
    for sub in subs:
        (dataset / split / sub / old).rename(dataset / split / sub / new)


@pytest.mark.parametrize("name", ["trainvol0.png", "trainvol0_.png", "trainvol0_x.png",
                                  "7.png", "trainvol0_\u0661.png"])  # '١': not an ASCII digit
def test_file_name_without_slice_number_is_named(tiny_dataset, name):
    _rename(tiny_dataset, "train", "trainvol0_1.png", name)
    with pytest.raises(DatasetProblems) as err:
        find_split(tiny_dataset / "train", need_masks=True)
    # The B-scan and its mask are both misnamed: each folder's problem is listed.
    assert err.value.problems == [
        f"1 file(s) in {tiny_dataset / 'train' / sub} are not named <scan_id>_<slice "
        f"number> (e.g. patient01_5.png): {name}; rename them" for sub in ("bscan", "semseg")]
    assert str(err.value).splitlines()[0] == (f"2 problems in {tiny_dataset / 'train'}; fix "
                                              "them all, then run again:")


def test_misnamed_files_are_found_without_masks_too(tiny_dataset):
    import shutil
    shutil.rmtree(tiny_dataset / "test/semseg")  # RETOUCH's test split: B-scans only
    _rename(tiny_dataset, "test", "testvol0_0.png", "a.png", subs=("bscan",))
    _rename(tiny_dataset, "test", "testvol0_1.png", "b.png", subs=("bscan",))
    with pytest.raises(UserError, match=r"^2 file\(s\) in .*test/bscan are not named "
                                        r".*: a\.png, b\.png; rename them$"):
        find_split(tiny_dataset / "test", need_masks=False)


def test_two_files_with_one_stem_are_named(tiny_dataset):
    png = tiny_dataset / "train/semseg/trainvol0_1.png"
    cv2.imwrite(str(png.with_suffix(".bmp")), cv2.imread(str(png), cv2.IMREAD_UNCHANGED))
    with pytest.raises(UserError) as err:
        find_split(tiny_dataset / "train", need_masks=True)
    assert str(err.value) == (f"{tiny_dataset / 'train' / 'semseg'}: trainvol0_1.bmp and "
                              "trainvol0_1.png are two files for one slice; keep one of them")


def test_two_names_for_one_slice_are_named(tiny_dataset):
    _rename(tiny_dataset, "val", "valvol0_1.png", "valvol0_00.png")
    with pytest.raises(DatasetProblems) as err:
        find_split(tiny_dataset / "val", need_masks=True)
    assert err.value.problems == [
        f"{tiny_dataset / 'val' / sub}: valvol0_0.png and valvol0_00.png are both slice 0 of "
        "volume valvol0; rename or remove one of them" for sub in ("bscan", "semseg")]


@pytest.mark.parametrize("damage, expected", [
    ("no_slice", "file(s) in {root}/val/bscan are not named <scan_id>_<slice number>"),
    ("two_stems", "{root}/val/bscan: valvol0_0.bmp and valvol0_0.png are two files"),
])
def test_training_stops_naming_the_file(tiny_dataset, tiny_weights, tmp_path,
                                                      capsys, damage, expected):
    import run_seg_tuning
    if damage == "no_slice":
        _rename(tiny_dataset, "val", "valvol0_1.png", "valvol0.png")
    else:
        png = tiny_dataset / "val/bscan/valvol0_0.png"
        cv2.imwrite(str(png.with_suffix(".bmp")), cv2.imread(str(png), cv2.IMREAD_UNCHANGED))
    with pytest.raises(SystemExit) as exc:
        run_seg_tuning.main(["--weights", str(tiny_weights), "--data_path", str(tiny_dataset),
                             "--input_size", "32", "48", "--patch_size", "16", "--epochs", "1",
                             "--num_workers", "0", "--base_output_dir", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: ")
    assert expected.format(root=tiny_dataset) in "\n".join(err)
