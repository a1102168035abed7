"""run_seg_prepare_data.py: OCT volumes (eyepy .eye files, Duke .mat files) to a dataset in
the benchmark layout, checked against masks made by hand from the documented rule."""
import json
import sys

import cv2
import numpy as np
import pytest

from mirage.data.oct_files import label_map
from mirage.prepare_cli import prepare_data

eyepy = pytest.importorskip("eyepy")
from eyepy.core.eyemeta import EyeBscanMeta, EyeVolumeMeta  # noqa: E402

N, H, W = 3, 20, 6
LABELS = ["Above ILM", "ILM-BM", "Below BM", "Fluid", "Invalid"]
VALUES = [0, 85, 169, 254, 255]  # i * 254 / 3 rounded; Invalid 255


def heights():
    """ILM and BM per B-scan, unlike in every B-scan (asymmetric), one missing height
    (B-scan 1, column 2) and one crossing (B-scan 2, column 4)."""
    ilm = np.array([[4.0 + i + 0.1 * c for c in range(W)] for i in range(N)])
    bm = ilm + 6 + np.arange(N)[:, None]
    ilm[1, 2] = np.nan
    ilm[2, 4], bm[2, 4] = 15.0, 10.0
    return ilm, bm


def fluid():
    mask = np.zeros((N, H, W), bool)
    mask[0, 7:9, 1] = True
    return mask


def bscans(volume_index=0):
    rng = np.random.default_rng(volume_index)
    return rng.integers(0, 256, (N, H, W)).astype(np.uint8)


def eye_volume(patient="P1", index=0, data=None, scale=(0.004, 0.01, 0.1)):
    data = bscans(index) if data is None else data
    meta = EyeVolumeMeta(
        scale_y=scale[0], scale_x=scale[1], scale_z=scale[2], scale_unit="mm",
        bscan_meta=[EyeBscanMeta(start_pos=(0, i), end_pos=(W - 1, i), pos_unit="pixel")
                    for i in range(N - 1, -1, -1)],
        **({"patient_id": patient} if patient else {}))
    volume = eyepy.EyeVolume(data=data, meta=meta)
    ilm, bm = heights()
    volume.add_layer_annotation(bm, name="BM")  # not in anatomical order on purpose
    volume.add_layer_annotation(ilm, name="ILM")
    volume.add_pixel_annotation(fluid(), name="Fluid")
    return volume


def expected_mask(i):
    """The mask of B-scan i by hand: rows above round(ILM) 0, then 1 until round(BM), then
    2; a column with a missing or crossing height Invalid; fluid painted over."""
    ilm, bm = heights()
    mask = np.zeros((H, W), np.uint8)
    for c in range(W):
        if np.isnan(ilm[i, c]) or np.isnan(bm[i, c]) or round(bm[i, c]) < round(ilm[i, c]):
            mask[:, c] = 4
            continue
        for r in range(H):
            mask[r, c] = int(r >= np.floor(ilm[i, c] + 0.5)) + int(r >= np.floor(bm[i, c] + 0.5))
    mask[fluid()[i]] = 3
    return np.array(VALUES, np.uint8)[mask]


def read(path):
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def slices(root):
    return {p.stem: (split, p) for split in ("train", "val", "test")
            for p in (root / split / "bscan").glob("*.png")}


def test_masks_images_classes_and_spacing_of_eye_files(tmp_path, capsys):
    files = []
    for k, patient in enumerate(["P1", "P1", "P2", "P3", "P4"]):
        path = tmp_path / "in" / f"eye_{k}_OD.eye"  # underscores in the stem
        path.parent.mkdir(exist_ok=True)
        eye_volume(patient, k).save(path)
        files.append(path)
    out = tmp_path / "Data"
    prepared = prepare_data(["-i", str(tmp_path / "in"), "-o", str(out),
                             "--split", "2", "1", "1"])
    info = json.loads((out / "INFO.json").read_text())
    assert info["spacing"] == {"axial_um": 4.0, "lateral_um": 10.0, "bscan_um": 100.0}
    assert [info[str(i)]["label"] for i in range(5)] == LABELS
    assert [info[str(i)]["value"] for i in range(5)] == VALUES
    found = slices(out)
    assert len(found) == 5 * N
    for k in range(5):
        for i in range(N):
            split, bscan = found[f"eye_{k}_OD_{i}"]
            np.testing.assert_array_equal(read(bscan), bscans(k)[i])  # B-scan i's pixels
            np.testing.assert_array_equal(read(out / split / "semseg" / bscan.name),
                                          expected_mask(i))
    # one volume per file, one split per patient
    split_of = {r.volume: r.split for r in prepared.records}
    assert split_of["eye_0_OD"] == split_of["eye_1_OD"]
    assert {r.split for r in prepared.records} == {"train", "val", "test"}
    summary = {s.name: s for s in prepared.summary.splits}
    assert sum(s.volumes for s in summary.values()) == 5
    record = json.loads((out / "prepare_record.json").read_text())
    assert record["layers_top_to_bottom"] == ["ILM", "BM"]
    assert record["volumes"][0]["missing_columns"] == 1
    assert record["volumes"][0]["crossing_columns"] == 1
    text = capsys.readouterr().out
    assert "passed every check" in text and "--ignore_index 4" in text


def test_label_map_rule():
    # column 0: boundaries start rows round(0.4) = 0 and round(2.5) = 3 (halves up);
    # column 1: a height missing; column 2: the boundaries cross -> Invalid (3)
    labels, missing, crossing = label_map(np.array([[0.4, np.nan, 3.0], [2.5, 2.0, 1.0]]), 4)
    assert (missing, crossing) == (1, 1)
    np.testing.assert_array_equal(labels, [[1, 3, 3], [1, 3, 3], [1, 3, 3], [2, 3, 3]])
    # equal heights are a layer of zero thickness, not a crossing
    labels, _, crossing = label_map(np.array([[2.0], [2.2]]), 4)
    assert crossing == 0 and labels[:, 0].tolist() == [0, 0, 2, 2]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_splits_keep_patients_apart(tmp_path, seed):
    patients = ["A", "A", "B", "C", "C", "C", "D", None, None]
    (tmp_path / "in").mkdir()
    for k, patient in enumerate(patients):
        eye_volume(patient, k).save(tmp_path / "in" / f"v{k}.eye")
    prepared = prepare_data(["-i", str(tmp_path / "in"), "-o", str(tmp_path / "D"),
                             "--seed", str(seed), "--split", "0.5", "0.25", "0.25",
                             "--layers", "ILM", "BM", "--pixel_classes"])
    splits = {}
    for record in prepared.records:
        key = record.patient or record.volume
        splits.setdefault(key, set()).add(record.split)
    assert all(len(s) == 1 for s in splits.values())
    assert len(splits) == 6  # two files without a patient ID: each its own patient
    info = json.loads((tmp_path / "D" / "INFO.json").read_text())
    assert "Fluid" not in [entry["label"] for key, entry in info.items() if key != "spacing"]


def test_float_data_is_scaled_min_max_without_clipping(tmp_path):
    data = np.linspace(-1.0, 3.0, N * H * W).reshape(N, H, W).astype(np.float32)
    for k in range(3):  # no two volumes alike: the check refuses a B-scan in two splits
        eye_volume(f"P{k}", k, data=data ** (k + 1) if k else data).save(tmp_path / f"f{k}.eye")
    out = tmp_path / "D"
    prepare_data(["-i", *(str(tmp_path / f"f{k}.eye") for k in range(3)), "-o", str(out)])
    split, path = slices(out)["f0_0"]
    image = read(path)
    assert image.dtype == np.uint8
    np.testing.assert_array_equal(image, np.round((data[0] + 1) / 4 * 255).astype(np.uint8))
    assert slices(out)["f0_2"][1] and read(slices(out)["f0_2"][1]).max() == 255


def duke_mat(path, index):
    """A .mat file in the layout eyepy's Duke reader reads: images (H, W, N), layerMaps
    (N, W, 3) for ILM, IBRPE, BM, and Age."""
    import scipy.io
    images = bscans(index).transpose(1, 2, 0).astype(np.float64)
    ilm, bm = heights()
    ibrpe = (ilm + bm) / 2
    scipy.io.savemat(path, {"images": images, "layerMaps": np.stack([ilm, ibrpe, bm], -1),
                            "Age": np.array([[70]])})


def test_duke_mat_files(tmp_path):
    for k in range(3):
        duke_mat(tmp_path / f"duke_{k}.mat", k)
    out = tmp_path / "D"
    prepare_data(["-i", str(tmp_path), "-o", str(out), "--layers", "BM", "ILM"])
    info = json.loads((out / "INFO.json").read_text())
    assert info["spacing"] == {"axial_um": 4.5, "lateral_um": 6.7, "bscan_um": 67.0}
    assert [info[str(i)]["label"] for i in range(4)] == ["Above ILM", "ILM-BM", "Below BM",
                                                        "Invalid"]
    values = np.array([0, 127, 254, 255], np.uint8)
    for k in range(3):
        for i in range(N):
            split, bscan = slices(out)[f"duke_{k}_{i}"]
            np.testing.assert_array_equal(read(bscan), bscans(k)[i])
            ilm, bm = heights()
            labels, _, _ = label_map(np.stack([ilm[i], bm[i]]), H, (), invalid=3)
            np.testing.assert_array_equal(read(out / split / "semseg" / bscan.name),
                                          values[labels])
            # by hand as well: the layer map's row i is B-scan i's
            assert read(out / split / "semseg" / bscan.name)[H - 1, 0] == 254


def test_missing_eyepy_is_one_line(tmp_path, monkeypatch, capsys):
    eye_volume().save(tmp_path / "a.eye")
    monkeypatch.setitem(sys.modules, "eyepy", None)
    with pytest.raises(SystemExit) as stop:
        prepare_data(["-i", str(tmp_path / "a.eye"), "-o", str(tmp_path / "D")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install .[oct]" in err
    assert not (tmp_path / "D").exists()


def test_a_corrupt_file_is_one_line_and_nothing_is_written(tmp_path, capsys):
    for k in range(3):
        eye_volume(f"P{k}", k).save(tmp_path / f"ok{k}.eye")
    (tmp_path / "bad.eye").write_bytes(b"not a zip file")
    out = tmp_path / "D"
    with pytest.raises(SystemExit) as stop:
        prepare_data(["-i", str(tmp_path), "-o", str(out)])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert str(tmp_path / "bad.eye") in err[0] and "eyepy.EyeVolume.load" in err[0]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # --skip_bad builds the rest
    prepared = prepare_data(["-i", str(tmp_path), "-o", str(out), "--skip_bad"])
    assert len(prepared.records) == 3


def test_an_unknown_suffix_and_a_shared_stem_are_refused(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    eye_volume().save(tmp_path / "x" / "s.eye")
    eye_volume().save(tmp_path / "y" / "s.eye")
    for inputs, words in (([tmp_path / "a.txt"], "no reader for '.txt'"),
                          ([tmp_path / "x", tmp_path / "y"], "share the name 's'")):
        with pytest.raises(SystemExit):
            prepare_data(["-i", *map(str, inputs), "-o", str(tmp_path / "D")])
        assert words in capsys.readouterr().err
