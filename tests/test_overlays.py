"""Overlays (mirage/report/overlays.py): every test B-scan of a run drawn as the report's
gallery draws it, written atomically; a single predicted mask tinted on its B-scan."""
import cv2
import numpy as np
import pytest

import run_seg_tuning
from conftest import make_dataset
from mirage.data.classes import ClassTable
from mirage.errors import UserError
from mirage.evaluate.inputs import prepare_run
from mirage.report import gallery, plots
from mirage.report.overlays import class_overlay, write_overlays
from mirage.run.folder import RunFolder


def argv(dataset, weights, out, *extra):
    """A 1-epoch tiny run (tests/test_sealed_predictions.py trains the same)."""
    return [str(a) for a in (
        "--weights", weights, "--data_path", dataset, "--input_size", "32", "48",
        "--patch_size", "16", "--batch_size", "2", "--num_workers", "0",
        "--base_output_dir", out, "--lr", "1e-3", "--output_adapter", "linear",
        "--aug_name", "none", "--drop_path_encoder", "0", "--epochs", "1", *extra)]


@pytest.fixture
def predicted(tiny_dataset, tiny_weights, tmp_path):
    """A trained tiny run with its test predictions: (datasets folder, run dir, argv)."""
    args = argv(tiny_dataset, tiny_weights, tmp_path / "out")
    run_dir = run_seg_tuning.main(args)
    run_seg_tuning.main(args + ["--infer_only", "--test"])
    return tiny_dataset.parent, run_dir, args


def read_rgb(path):
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)[..., ::-1]


def test_one_overlay_per_test_bscan_as_the_gallery_draws_it(predicted):
    datasets, run_dir, _ = predicted
    folder = write_overlays(run_dir, datasets)
    assert folder == RunFolder(run_dir).overlays_dir() == run_dir / "overlays"
    bscans = sorted((datasets / "Tiny" / "test" / "bscan").glob("*.png"))
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [p.name for p in bscans] + ["legend.png"])
    for bscan in bscans:
        image = read_rgb(folder / bscan.name)
        height, width = cv2.imread(str(bscan), cv2.IMREAD_UNCHANGED).shape
        assert image.shape == (height, 4 * width + 3 * 4, 3)  # 4 panels, 3 gaps of 4
        gray = cv2.imread(str(bscan), cv2.IMREAD_UNCHANGED).astype(np.float32)
        gray = (gray - gray.min()) / float(gray.max() - gray.min())
        expected = np.round(255 * gray.astype(np.float64)).astype(np.uint8)  # as compose
        for channel in range(3):  # the first panel is the B-scan itself
            assert np.array_equal(image[:, :width, channel], expected)
        assert (image[:, width:width + 4] == 255).all()  # a white gap
    # the same drawing as the report's gallery: compose() of the gallery's own inputs
    plan_inputs = prepare_run(run_dir, datasets)
    scan, items = next(iter(plan_inputs.volumes.items()))
    number, gt, pred = items[0]
    truth, guess, _ = gallery.load_pair(plan_inputs.plan, gt, pred)
    image, truth, guess, wrong, _ = gallery._display(gt, truth, guess, plan_inputs.plan.scored)
    drawn = gallery.compose(image, truth, guess, wrong,
                            plots.class_colors(plan_inputs.plan.num_classes),
                            list(plan_inputs.plan.scored))
    assert np.array_equal(read_rgb(folder / f"{scan}_{number}.png"), drawn)


def test_external_overlays_and_a_bad_prediction_leave_the_old_folder(predicted, tmp_path):
    datasets, run_dir, args = predicted
    external = make_dataset(datasets, name="Other", seed=3)
    run_seg_tuning.main(args + ["--infer_only", "--test", "--test_data_path", str(external)])
    folder = write_overlays(run_dir, datasets, external="Other", foreign_predictions=True)
    assert folder == run_dir / "overlays_Other" and len(list(folder.iterdir())) == 3 + 1
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    (run_dir / "preds_Other" / "testvol0_1.png").write_bytes(b"broken")
    with pytest.raises(UserError, match="testvol0_1.png"):
        write_overlays(run_dir, datasets, external="Other", foreign_predictions=True)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".overlays")]
    # without foreign_predictions the manifest is checked, as for scoring
    with pytest.raises(UserError, match="was changed after it was written"):
        write_overlays(run_dir, datasets, external="Other")
    out = write_overlays(run_dir, datasets, out_dir=tmp_path / "mine")
    assert out == tmp_path / "mine" and len(list(out.iterdir())) == 3 + 1  # + legend.png


def test_the_overlays_folder_has_a_legend_naming_every_class(predicted, capsys):
    from PIL import Image
    from run_seg_eval import main as run_seg_eval
    datasets, run_dir, _ = predicted
    run_seg_eval(["-d", str(datasets), "-m", str(run_dir), "--overlays"])
    assert "(colours: overlays/legend.png)" in capsys.readouterr().out
    legend = run_dir / "overlays" / "legend.png"
    image = Image.open(legend)
    said = image.text["Description"].splitlines()
    colors = plots.class_colors(3)  # the Tiny dataset: Background, Layer, Fluid
    rgb = [tuple(int(round(255 * v)) for v in colors[c]) for c in (1, 2)]
    assert said == [f"Layer: rgb{rgb[0]}", f"Fluid: rgb{rgb[1]}",
                    "errors (4th panel; no class is red): rgb(255, 26, 26)",
                    "not tinted (not scored): Background"]
    drawn = {tuple(p) for p in np.asarray(image.convert("RGB")).reshape(-1, 3)}
    assert set(rgb) | {(255, 26, 26)} <= drawn  # each swatch in its exact colour
    # ... and the run report points to the folder and its legend
    page = (run_dir / "report.html").read_text()
    assert 'href="overlays/legend.png"' in page and "Every test B-scan (3)" in page


def test_a_predicted_mask_is_tinted_on_its_bscan():
    classes = ClassTable((0, 100, 200), ("Background", "Layer", "Fluid"))
    image = np.arange(12, dtype=np.uint16).reshape(3, 4) * 1000
    labels = np.array([[0, 100, 200, 0]] * 3, np.uint8)
    rgb = class_overlay(image, labels, classes)
    assert rgb.shape == (3, 4, 3) and rgb.dtype == np.uint8
    gray = image / image.max()
    colors = plots.class_colors(3)
    background = np.round(255 * gray[:, 0])
    assert np.array_equal(rgb[:, 0], np.repeat(background[:, None], 3, axis=1))  # gray
    for column, c in ((1, 1), (2, 2)):
        tint = np.round(255 * (0.45 * gray[:, column, None] + 0.55 * colors[c]))
        assert np.array_equal(rgb[:, column], tint)
