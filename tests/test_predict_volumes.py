"""run_seg_predict.py on OCT volume files (.eye through eyepy, .npy stacks): label PNGs per
B-scan, and for a layer run the .eye of predicted boundaries (eyepy's B-scan order), the
thickness CSV and en-face maps, all by the evaluation's boundary_rows."""
import csv
import sys

import cv2
import numpy as np
import pytest

import run_seg_tuning
from conftest import band_pair
from mirage.data.classes import ClassTable
from mirage.data.oct_files import INSTALL_HINT
from mirage.evaluate.layers import boundary_rows
from mirage.train.predictor import load_run
from test_predict import argv, errors, predict

eyepy = pytest.importorskip("eyepy")

LAYER, FLUID = 100, 200
AXIAL_MM, LATERAL_MM, BSCAN_MM = 0.0039, 0.011, 0.12
BOUNDARIES = ["top of Layer", "bottom of Layer"]  # the run's one layer, "Layer"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_weights):
    """A 1-epoch tiny run on tests/conftest.py's dataset (Background, Layer, Fluid: one
    layer, one lesion)."""
    from conftest import make_dataset
    root = tmp_path_factory.mktemp("volumes")
    dataset = make_dataset(root / "datasets")
    return run_seg_tuning.main(argv(dataset, tiny_weights, root / "out", ))


def bscan_stack(count=4, seed=3):
    """B-scans whose bands lie at different depths: each B-scan differs from the others."""
    rng = np.random.default_rng(seed)
    images = [band_pair(rng, (64, 96))[0] for _ in range(count)]
    images[0][:8] = 255  # B-scan 0 unlike the others, whichever order a reader keeps
    return np.stack(images)


def eye_file(path, images):
    volume = eyepy.EyeVolume(images.copy())
    volume.scale_y, volume.scale_x, volume.scale_z = AXIAL_MM, LATERAL_MM, BSCAN_MM
    volume.scale_unit = "mm"
    volume.add_layer_annotation(np.full(images.shape[::2], 5.0), name="manual ILM")
    volume.save(path)
    return path


def by_intensity(gray):
    """A stand-in model whose mask follows the B-scan (conftest's band_pair brightness:
    background 30, layer 180, fluid 90), so that every B-scan's mask differs."""
    gray = np.asarray(gray)
    return np.where(gray > 135, LAYER, np.where(gray > 60, FLUID, 0)).astype(np.uint8)


@pytest.fixture
def image_following(monkeypatch):
    """run_seg_predict.py's predictor (the real run's: classes, record) predicting
    :func:`by_intensity`: the tiny run predicts the same mask for every B-scan."""
    from mirage.train import predictor as module
    real = module.load_run

    def load(*args, **kwargs):
        loaded = real(*args, **kwargs)
        loaded.iter_predictions = lambda images, probabilities=False, dtype=None: (
            (by_intensity(image), None) for image in images)
        return loaded
    monkeypatch.setattr(module, "load_run", load)


def read_mask(path):
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert mask is not None, path
    return mask


def hand_thickness(mask):
    """Per column, with a plain loop: last Layer row + 1 - first Layer row; the mean over
    the columns that hold the layer, and their count."""
    values = []
    for column in mask.T:
        rows = np.flatnonzero(column == LAYER)
        if rows.size:
            values.append(rows[-1] + 1 - rows[0])
    return values


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_an_eye_volume_gives_layers_thickness_and_maps(run_dir, tmp_path, capsys,
                                                       image_following):
    images = bscan_stack()
    source = eye_file(tmp_path / "vol.eye", images)
    out = tmp_path / "pred"
    assert predict("--run_dir", run_dir, "-i", source, "-o", out, "--device", "cpu") == 0
    assert errors(capsys) == []
    n, height, width = images.shape
    masks = [read_mask(out / f"vol_{i}.png") for i in range(n)]
    # B-scan i of the file is predicted as vol_i.png (eyepy's order)
    for i in range(n):
        assert np.array_equal(by_intensity(images[i]), masks[i]), i
    assert all(not np.array_equal(masks[0], m) for m in masks[1:])

    saved = eyepy.EyeVolume.load(out / "vol.eye")
    assert list(saved.layers) == BOUNDARIES  # the manual annotation is left out
    assert np.array_equal(saved.data, images) and saved.scale_y == pytest.approx(AXIAL_MM)
    to_index = ClassTable.from_entries([(0, "Background"), (LAYER, "Layer"),
                                        (FLUID, "Fluid")], "test").value_to_index()
    for k, name in enumerate(BOUNDARIES):
        heights = saved.layers[name].data
        assert heights.shape == (n, width)
        for i in range(n):
            rows = boundary_rows(to_index[masks[i]], (1,))[k]
            np.testing.assert_array_equal(heights[i], rows)
            np.testing.assert_array_equal(saved[i].layers[name].data, rows)
    tops = saved.layers[BOUNDARIES[0]].data
    assert all(not np.array_equal(tops[0], tops[i], equal_nan=True) for i in range(1, n))
    assert list(saved.volume_maps) == ["Fluid"]
    assert np.array_equal(saved.volume_maps["Fluid"].data, np.stack(masks) == FLUID)

    rows = read_csv(out / "vol_thickness.csv")
    assert [r["bscan"] for r in rows] == [str(i) for i in range(n)] + ["all"]
    everything = []
    for i, row in enumerate(rows[:n]):
        values = hand_thickness(masks[i])
        everything += values
        assert (row["layer"], row["unit"], int(row["columns"])) == ("Layer", "um",
                                                                  len(values))
        if values:
            assert float(row["thickness"]) == pytest.approx(
                np.mean(values) * AXIAL_MM * 1000, abs=1e-3)
        else:
            assert row["thickness"] == ""
    assert int(rows[-1]["columns"]) == len(everything)
    assert float(rows[-1]["thickness"]) == pytest.approx(
        np.mean(everything) * AXIAL_MM * 1000, abs=1e-3)
    map_png = cv2.imread(str(out / "vol_thickness_Layer.png"))
    assert map_png is not None and map_png.shape[2] == 3
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"vol_{i}.png" for i in range(n)]
        + ["vol.eye", "vol_thickness.csv", "vol_thickness_Layer.png",
           "prediction_record.json"])


def test_a_npy_stack_is_a_volume_in_pixels(run_dir, tmp_path, capsys):
    images = bscan_stack(3, seed=5)
    np.save(tmp_path / "stack.npy", images)
    out = tmp_path / "pred"
    assert predict("--run_dir", run_dir, "-i", tmp_path / "stack.npy", "-o", out,
                   "--device", "cpu", "--tta", "flip") == 0
    assert errors(capsys) == []
    predictor = load_run(run_dir, device="cpu", tta="flip")
    for i in range(3):
        assert np.array_equal(read_mask(out / f"stack_{i}.png"),
                              predictor.predict(images[i]))
    rows = read_csv(out / "stack_thickness.csv")
    assert {r["unit"] for r in rows} == {"px"}
    for i, row in enumerate(rows[:3]):
        values = hand_thickness(read_mask(out / f"stack_{i}.png"))
        assert int(row["columns"]) == len(values)
        if values:
            assert float(row["thickness"]) == pytest.approx(np.mean(values), abs=1e-3)
    saved = eyepy.EyeVolume.load(out / "stack.eye")
    assert saved.layers["top of Layer"].data.shape == (3, 96)


def test_a_corrupt_file_is_one_line_and_no_output(run_dir, tmp_path, capsys):
    bad = tmp_path / "bad.eye"
    bad.write_bytes(b"not a zip at all")
    good = tmp_path / "good.npy"
    np.save(good, bscan_stack(2))
    out = tmp_path / "pred"
    assert predict("--run_dir", run_dir, "-i", good, bad, "-o", out, "--device", "cpu") == 2
    lines = errors(capsys)
    assert len(lines) == 1 and str(bad) in lines[0] and "eyepy.EyeVolume.load" in lines[0]
    assert not out.exists() and not any(p.name.startswith(".pred") for p in tmp_path.iterdir())
    np.save(tmp_path / "flat.npy", np.zeros((4, 5), np.uint8))
    assert predict("--run_dir", run_dir, "-i", tmp_path / "flat.npy", "-o", out) == 2
    lines = errors(capsys)
    assert len(lines) == 1 and "flat.npy" in lines[0] and "(N, H, W)" in lines[0]
    assert not out.exists()


def test_without_eyepy_an_eye_file_says_how_to_install_and_npy_works(
        run_dir, tmp_path, capsys, monkeypatch):
    images = bscan_stack(2)
    source = eye_file(tmp_path / "vol.eye", images)
    np.save(tmp_path / "stack.npy", images)
    monkeypatch.setitem(sys.modules, "eyepy", None)  # import eyepy raises ImportError
    out = tmp_path / "pred"
    assert predict("--run_dir", run_dir, "-i", source, "-o", out, "--device", "cpu") == 2
    assert errors(capsys) == [f"error: {INSTALL_HINT}"]
    assert not out.exists()
    assert predict("--run_dir", run_dir, "-i", tmp_path / "stack.npy", "-o", out,
                   "--device", "cpu") == 0
    assert errors(capsys) == []
    names = {p.name for p in out.iterdir()}
    assert {"stack_0.png", "stack_1.png", "stack_thickness.csv"} <= names
    assert "stack.eye" not in names
