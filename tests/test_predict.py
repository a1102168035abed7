"""run_seg_predict.py and the Python predictor (mirage/train/predictor.py): a trained tiny
run predicts any folder of B-scans exactly as ``--infer_only --test`` predicts its test
split, and never leaves a half-written output folder."""
import json
import shutil

import cv2
import numpy as np
import pytest

import run_seg_predict
import run_seg_tuning
from conftest import make_dataset
from mirage.errors import UserError
from mirage.train.predictor import load_run

VALUES = (0, 100, 200)


def argv(dataset, weights, out, *extra):
    """A 1-epoch tiny run (tests/test_sealed_predictions.py trains the same)."""
    return [str(a) for a in (
        "--weights", weights, "--data_path", dataset, "--input_size", "32", "48",
        "--patch_size", "16", "--batch_size", "2", "--num_workers", "0",
        "--base_output_dir", out, "--lr", "1e-3", "--output_adapter", "linear",
        "--aug_name", "none", "--drop_path_encoder", "0", "--epochs", "1", *extra)]


def mixed_bscans(folder, seed=1):
    """B-scans of every kind training reads, of different sizes: 8-bit and 16-bit gray,
    8-bit RGB PNG, 16-bit RGB TIFF, 8-bit BMP; returns {stem: path}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    images = {
        "mixvol_0.png": rng.integers(0, 256, (64, 96), dtype=np.uint8),
        "mixvol_1.png": rng.integers(0, 65536, (50, 70), dtype=np.uint16),
        "mixvol_2.png": rng.integers(0, 256, (80, 60, 3), dtype=np.uint8),
        "mixvol_3.tif": rng.integers(0, 65536, (40, 100, 3), dtype=np.uint16),
        "mixvol_4.bmp": rng.integers(0, 256, (33, 47), dtype=np.uint8),
    }
    for name, image in images.items():
        smooth = cv2.GaussianBlur(image, (7, 7), 2)  # structure the model can respond to
        assert cv2.imwrite(str(folder / name), smooth)
    return {name.split(".")[0]: folder / name for name in images}


@pytest.fixture
def trained(tiny_dataset, tiny_weights, tmp_path):
    """A trained tiny run whose test split is now mixed B-scans without masks, predicted
    by ``--infer_only --test``: (run dir, {stem: B-scan path}, training argv)."""
    args = argv(tiny_dataset, tiny_weights, tmp_path / "out")
    run_dir = run_seg_tuning.main(args)
    shutil.rmtree(tiny_dataset / "test")
    bscans = mixed_bscans(tiny_dataset / "test" / "bscan")
    run_seg_tuning.main(args + ["--infer_only", "--test"])
    return run_dir, bscans, args


def predict(*args):
    """run_seg_predict.py -> exit status (0 or the SystemExit code)."""
    try:
        run_seg_predict.main([str(a) for a in args])
    except SystemExit as stop:
        return stop.code
    return 0


def errors(capsys):
    """The ``error:`` lines of stderr (the progress bar writes there too), checked to be
    all that is not a progress bar."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error: ")]


def test_masks_equal_what_infer_only_test_writes(trained, tmp_path):
    run_dir, bscans, _ = trained
    out = tmp_path / "masks"
    assert predict("--run_dir", run_dir, "-i", next(iter(bscans.values())).parent,
                   "-o", out, "--device", "cpu", "--batch_size", "3") == 0
    preds = sorted((run_dir / "preds").glob("*.png"))
    assert [p.stem for p in preds] == sorted(bscans)
    for reference in preds:
        mine = out / reference.name
        assert mine.read_bytes() == reference.read_bytes(), reference.name
        mask = cv2.imread(str(mine), cv2.IMREAD_UNCHANGED)
        assert mask.shape == cv2.imread(str(bscans[reference.stem]),
                                        cv2.IMREAD_GRAYSCALE).shape  # original size
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= set(VALUES)
    record = json.loads((out / "prediction_record.json").read_text())
    assert record["files"] == sorted(p.name for p in preds)
    assert record["classes"] == [[0, "Background"], [100, "Layer"], [200, "Fluid"]]
    import hashlib  # each input as predicted: its size and SHA-256, for scoring to check
    assert record["input_files"] == {
        stem: [path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest()]
        for stem, path in bscans.items()}


def test_the_predictor_equals_the_command(trained, tmp_path):
    run_dir, bscans, _ = trained
    out = tmp_path / "masks"
    assert predict("--run_dir", run_dir, "-i", *bscans.values(), "-o", out) == 0
    predictor = load_run(run_dir, device="cpu", batch_size=2)
    assert predictor.classes.values == VALUES and predictor.epoch == 0
    written = {stem: cv2.imread(str(out / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
               for stem in bscans}
    # paths, one at a time and as a list (batched across sizes)
    for stem, path in bscans.items():
        assert np.array_equal(predictor.predict(path), written[stem]), stem
    batch = predictor.predict(list(bscans.values()))
    assert all(np.array_equal(b, written[s]) for b, s in zip(batch, bscans))
    # arrays as training reads the files: 2-D 8/16-bit, and an RGB PNG's (H, W, 3) RGB
    gray8 = cv2.imread(str(bscans["mixvol_0"]), cv2.IMREAD_UNCHANGED)
    gray16 = cv2.imread(str(bscans["mixvol_1"]), cv2.IMREAD_UNCHANGED)
    rgb = cv2.imread(str(bscans["mixvol_2"]), cv2.IMREAD_UNCHANGED)[..., ::-1]
    assert gray16.dtype == np.uint16 and rgb.shape == (80, 60, 3)
    assert np.array_equal(predictor.predict(gray8), written["mixvol_0"])
    assert np.array_equal(predictor.predict(gray16), written["mixvol_1"])
    assert np.array_equal(predictor.predict(rgb), written["mixvol_2"])
    stacked = predictor.predict(np.stack([gray8, gray8]))
    assert stacked.shape == (2, 64, 96) and np.array_equal(stacked[1], written["mixvol_0"])


def test_probabilities_fit_the_masks(trained, tmp_path):
    run_dir, bscans, _ = trained
    out = tmp_path / "masks"
    assert predict("--run_dir", run_dir, "-i", *bscans.values(), "-o", out,
                   "--probabilities", "--overlays") == 0
    lut = np.zeros(256, np.int64)
    lut[list(VALUES)] = np.arange(3)
    for stem, path in bscans.items():
        mask = cv2.imread(str(out / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        with np.load(out / f"{stem}.npz") as saved:
            probs = saved["probabilities"]
            assert saved["values"].tolist() == list(VALUES)
            assert saved["labels"].tolist() == ["Background", "Layer", "Fluid"]
        assert probs.dtype == np.float16 and probs.shape == (3, *mask.shape)
        assert np.allclose(probs.astype(np.float32).sum(axis=0), 1.0, atol=4e-3)
        index = lut[mask]
        # the mask's class is the most probable one everywhere; argmax differs only where
        # two classes round to one float16 value
        chosen = np.take_along_axis(probs, index[None], axis=0)[0]
        assert np.array_equal(chosen, probs.max(axis=0))
        differs = probs.argmax(axis=0) != index
        assert (chosen[differs] == probs.max(axis=0)[differs]).all()
        overlay = cv2.imread(str(out / f"{stem}_overlay.png"), cv2.IMREAD_UNCHANGED)
        assert overlay.shape == (*mask.shape, 3)
    # the overlays' legend names each tinted class (its text is in the PNG's Description)
    from PIL import Image
    legend = Image.open(out / "overlays_legend.png")
    described = legend.text["Description"]
    assert "Layer" in described and "Fluid" in described and "not tinted: Background" in \
        described
    predictor = load_run(run_dir, device="cpu")
    mine = predictor.predict_probabilities(bscans["mixvol_2"])
    assert mine.dtype == np.float32 and mine.shape == (3, 80, 60)
    assert np.array_equal(lut[predictor.predict(bscans["mixvol_2"])], mine.argmax(axis=0))


def test_a_bad_input_file_leaves_nothing_half_written(trained, tmp_path, capsys):
    run_dir, bscans, _ = trained
    folder = next(iter(bscans.values())).parent
    out = tmp_path / "masks"
    assert predict("--run_dir", run_dir, "-i", folder, "-o", out) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # a header that reads, data that does not: found while predicting, after other files
    data = bscans["mixvol_0"].read_bytes()
    (folder / "mixvol_9.png").write_bytes(data[:len(data) // 2])
    capsys.readouterr()
    assert predict("--run_dir", run_dir, "-i", folder, "-o", out, "--probabilities") == 2
    err = errors(capsys)
    assert len(err) == 1 and "mixvol_9.png" in err[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    # a file that is no image at all stops it before the model loads
    (folder / "mixvol_9.png").write_bytes(b"not an image")
    assert predict("--run_dir", run_dir, "-i", folder, "-o", tmp_path / "new") == 2
    assert "mixvol_9.png is not a readable image" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_an_output_folder_with_other_files_is_refused(trained, tmp_path, capsys):
    run_dir, bscans, _ = trained
    folder = next(iter(bscans.values())).parent
    assert predict("--run_dir", run_dir, "-i", folder, "-o", folder) == 2  # the inputs
    assert "holds files run_seg_predict.py did not write" in capsys.readouterr().err
    out = tmp_path / "masks"
    assert predict("--run_dir", run_dir, "-i", bscans["mixvol_0"], "-o", out) == 0
    assert predict("--run_dir", run_dir, "-i", folder, "-o", out) == 0  # earlier output
    assert len(list(out.glob("*.png"))) == len(bscans)
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert predict("--run_dir", run_dir, "-i", folder, "-o", out) == 2
    err = capsys.readouterr().err
    assert "notes.txt" in err and (out / "notes.txt").read_text() == "mine"


def test_moved_weights_are_given_and_checked(trained, tiny_weights, tmp_path):
    run_dir, bscans, _ = trained
    moved = tmp_path / "elsewhere" / "encoder.pth"  # a name that says no model family
    moved.parent.mkdir()
    shutil.copy(tiny_weights, moved)
    reference = load_run(run_dir, device="cpu").predict(bscans["mixvol_0"])
    assert np.array_equal(load_run(run_dir, "cpu", weights=moved).predict(bscans["mixvol_0"]),
                          reference)
    other = tmp_path / "other.pth"
    from conftest import write_mirage_checkpoint
    from fm_seg_config import MirageTiny
    write_mirage_checkpoint(other, MirageTiny(), seed=5)
    with pytest.raises(UserError, match="SHA-256"):
        load_run(run_dir, "cpu", weights=other)
    with pytest.raises(UserError, match="weights file .*missing.pth .*not found"):
        load_run(run_dir, "cpu", weights=tmp_path / "missing.pth")


def test_bad_runs_and_inputs_are_one_line_errors(trained, tmp_path, capsys):
    run_dir, bscans, _ = trained
    with pytest.raises(UserError, match="config.yaml not found"):
        load_run(tmp_path, "cpu")
    predictor = load_run(run_dir, "cpu")
    with pytest.raises(UserError, match="cannot predict a array of shape .* float32"):
        predictor.predict(np.zeros((8, 8), np.float32))
    (run_dir / "checkpoint-best.pth").unlink()
    assert predict("--run_dir", run_dir, "-i", bscans["mixvol_0"], "-o", tmp_path / "o") == 2
    err = errors(capsys)
    assert len(err) == 1 and "checkpoint-best.pth not found" in err[0]
    assert predict("--run_dir", run_dir, "-i", tmp_path / "nothing", "-o", tmp_path / "o") == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert predict("--run_dir", run_dir, "-i", bscans["mixvol_0"], "-o", tmp_path / "o",
                   "--batch", "2") == 2  # no abbreviations
    assert "unknown option --batch (did you mean --batch_size?)" in capsys.readouterr().err


def test_wider_class_values_give_16_bit_masks(tmp_path, tiny_weights):
    data = make_dataset(tmp_path / "datasets", values=(0, 1000, 60000))
    run_dir = run_seg_tuning.main(argv(data, tiny_weights, tmp_path / "out"))
    predictor = load_run(run_dir, "cpu")
    mask = predictor.predict(data / "test" / "bscan" / "testvol0_0.png")
    assert mask.dtype == np.uint16 and set(np.unique(mask)) <= {0, 1000, 60000}


def test_the_predictor_and_infer_only_rebuild_the_same_spec(trained, monkeypatch):
    """One way to rebuild a run: ``--run_dir RUN --infer_only --test`` and ``load_run``
    read the run folder back through RunSpec.from_run_dir's steps and build the model with
    the same ``model_for``, from equal model, protocol and precision specs."""
    import dataclasses

    from mirage.train import build, inference, predictor
    run_dir, _, _ = trained
    built = []

    def recording(spec, runtime, num_classes=None):
        built.append(spec)
        return build.model_for(spec, runtime, num_classes)

    monkeypatch.setattr(inference, "model_for", recording)
    monkeypatch.setattr(predictor, "model_for", recording)
    shutil.rmtree(run_dir / "preds")  # else the inference is skipped as up to date
    run_seg_tuning.main(["--run_dir", str(run_dir), "--infer_only", "--test", "--device",
                         "cpu", "--num_workers", "0"])
    load_run(run_dir, "cpu")
    assert len(built) == 2
    infer_only, predicting = built
    for spec in built:  # the family is an instance: compared by its class
        assert type(spec.model.fm).__name__ == "MirageTiny"
    assert dataclasses.replace(infer_only.model, fm=None) == \
        dataclasses.replace(predicting.model, fm=None)
    assert infer_only.protocol == predicting.protocol
    assert infer_only.precision == predicting.precision
    assert infer_only.folder.path.resolve() == predicting.folder.path.resolve() == \
        run_dir.resolve()
    # the options differ only in what says how the job runs, never in what was trained
    differ = {k for k in infer_only.options if infer_only.options[k] != predicting.options[k]}
    assert differ <= {"test", "infer_only", "num_workers"}, differ
