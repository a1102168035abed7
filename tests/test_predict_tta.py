"""Test-time flips (``--tta flip``) and ensembles of runs (``--run_dir A B``, ``load_run([A,
B])``) in run_seg_predict.py, the Python predictor and ``--infer_only --test``."""
import json

import cv2
import numpy as np
import pytest
import torch

import run_seg_tuning
from conftest import make_dataset
from mirage.errors import UserError
from mirage.run import predictions
from mirage.train.predictor import Ensemble, load_run, load_runs
from test_predict import argv, predict, trained  # noqa: F401 (the fixture)


def symmetric_bscan(seed=3):
    """A left-right symmetric 8-bit B-scan at the tiny run's input size (32 x 48, so the
    resize is the identity and the model sees it symmetric too)."""
    rng = np.random.default_rng(seed)
    half = cv2.GaussianBlur(rng.integers(0, 256, (32, 24), dtype=np.uint8), (5, 5), 2)
    return np.ascontiguousarray(np.concatenate([half, half[:, ::-1]], axis=1))


def asymmetric_bscan(seed=4):
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 256, (32, 48), dtype=np.uint8), (5, 5), 2)


class MirrorAveraged(torch.nn.Module):
    """A model whose output for a mirrored input is the mirrored output: the logits of the
    image and of its mirror image (mirrored back), averaged. Records what it sees."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, batch):
        self.seen.append(batch.clone())
        return (self.model(batch) + torch.flip(self.model(torch.flip(batch, dims=(-1,))),
                                               dims=(-1,))) / 2


def test_flip_of_a_symmetric_image_through_a_mirror_equivariant_model_changes_nothing(
        trained):
    run_dir, _, _ = trained
    image = symmetric_bscan()
    assert np.array_equal(image, image[:, ::-1])
    plain, flipped = load_run(run_dir, "cpu"), load_run(run_dir, "cpu", tta="flip")
    for predictor in (plain, flipped):  # class_scores runs the RunContext's model
        predictor.run.model = predictor.model = MirrorAveraged(predictor.model)
    logits_level = plain.model(torch.from_numpy(plain.transform(image)[0])[None])
    assert torch.allclose(logits_level, torch.flip(logits_level, dims=(-1,)), atol=1e-5)
    once = plain.predict_probabilities(image)
    averaged = flipped.predict_probabilities(image)
    for seen in plain.model.seen + flipped.model.seen:  # the model saw a symmetric image
        assert torch.equal(seen, torch.flip(seen, dims=(-1,)))
    assert np.allclose(once, averaged, atol=1e-6)
    assert np.array_equal(plain.predict(image), flipped.predict(image))


def test_flip_averages_the_probabilities_of_the_image_and_its_mirror(trained):
    """The trained tiny model is not mirror-equivariant: TTA differs from one prediction
    and is the mean of the softmax of the image and of its mirror image, flipped back."""
    run_dir, bscans, _ = trained
    image = asymmetric_bscan()
    plain, flipped = load_run(run_dir, "cpu"), load_run(run_dir, "cpu", tta="flip")
    once = plain.predict_probabilities(image)
    mirrored = plain.predict_probabilities(np.ascontiguousarray(image[:, ::-1]))[:, :, ::-1]
    averaged = flipped.predict_probabilities(image)
    assert not np.allclose(once, averaged, atol=1e-4)
    assert np.allclose(averaged, (once + mirrored) / 2, atol=1e-6)
    lut = np.zeros(256, np.int64)
    lut[[0, 100, 200]] = np.arange(3)
    assert np.array_equal(lut[flipped.predict(image)], averaged.argmax(axis=0))
    # other sizes and batches: each image is averaged with its own mirror image
    batch = flipped.predict_probabilities(list(bscans.values()))
    for probs, path in zip(batch, bscans.values()):
        assert np.allclose(probs, flipped.predict_probabilities(path), atol=1e-6)
        assert np.allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    with pytest.raises(UserError, match="tta 'rotate': not supported"):
        load_run(run_dir, "cpu", tta="rotate")


@pytest.fixture
def second_run(trained, tiny_dataset, tiny_weights, tmp_path):
    """Another seed of the trained tiny run: its run directory."""
    return run_seg_tuning.main(argv(tiny_dataset, tiny_weights, tmp_path / "out",
                                    "--seed", "7"))


def test_an_ensemble_of_one_run_is_that_run(trained):
    run_dir, bscans, _ = trained
    single, ensemble = load_run(run_dir, "cpu"), load_run([run_dir], "cpu")
    assert isinstance(ensemble, Ensemble)
    for path in bscans.values():
        assert np.array_equal(ensemble.predict(path), single.predict(path))
        assert np.array_equal(ensemble.predict_probabilities(path),
                              single.predict_probabilities(path))


def test_an_ensemble_averages_its_runs_probabilities(trained, second_run, tmp_path):
    run_dir, bscans, _ = trained
    assert second_run != run_dir
    paths = list(bscans.values())
    first, second = load_run(run_dir, "cpu"), load_run(second_run, "cpu")
    ensemble = load_runs([run_dir, second_run], "cpu", batch_size=2)
    lut = np.zeros(256, np.int64)
    lut[[0, 100, 200]] = np.arange(3)
    for path, probs, labels in zip(paths, ensemble.predict_probabilities(paths),
                                   ensemble.predict(paths)):
        by_hand = (first.predict_probabilities(path) + second.predict_probabilities(path)) / 2
        assert np.allclose(probs, by_hand, atol=1e-7)
        assert np.array_equal(lut[labels], by_hand.argmax(axis=0))
    assert any(not np.array_equal(first.predict(p), second.predict(p)) or not np.allclose(
        first.predict_probabilities(p), second.predict_probabilities(p)) for p in paths)
    # with TTA: the mean over runs of each run's flip-averaged probabilities
    flip = load_runs([run_dir, second_run], "cpu", tta="flip")
    by_hand = (load_run(run_dir, "cpu", tta="flip").predict_probabilities(paths[0])
               + load_run(second_run, "cpu", tta="flip").predict_probabilities(paths[0])) / 2
    assert np.allclose(flip.predict_probabilities(paths[0]), by_hand, atol=1e-7)
    # run_seg_predict.py --run_dir A B: the ensemble's masks, recorded with both checkpoints
    out = tmp_path / "ensemble"
    assert predict("--run_dir", run_dir, second_run, "-i", *paths, "-o", out,
                   "--device", "cpu", "--tta", "flip") == 0
    for path in paths:
        mask = cv2.imread(str(out / f"{path.stem}.png"), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(mask, flip.predict(path))
    record = json.loads((out / "prediction_record.json").read_text())
    assert record["tta"] == "flip" and "run_dir" not in record
    assert [r["run_dir"] for r in record["runs"]] == [str(run_dir.resolve()),
                                                      str(second_run.resolve())]
    from mirage.fileio import file_sha256
    assert [r["checkpoint_sha256"] for r in record["runs"]] == [
        file_sha256(d / "checkpoint-best.pth") for d in (run_dir, second_run)]
    assert predictions.prediction_tta(record) == "flip"
    import run_seg_predict  # noqa: F401
    from mirage.predict_cli import RECORD
    assert RECORD == predictions.PREDICTION_RECORD
    source = predictions.prediction_source(out)  # as the catalog and scoring read it
    assert source["ensemble"] and source["tta"] == "flip" and source["runs"] == record["runs"]
    assert predictions.prediction_source(run_dir / "preds") == {
        "runs": [{"run_dir": str(run_dir.resolve()), "checkpoint": "checkpoint-best.pth",
                  "checkpoint_sha256": file_sha256(run_dir / "checkpoint-best.pth"),
                  "epoch": 0}], "tta": "none", "ensemble": False}
    assert predictions.prediction_source(tmp_path) is None


def test_runs_with_other_classes_or_input_sizes_are_refused(trained, tiny_dataset,
                                                            tiny_weights, tmp_path, capsys):
    run_dir, bscans, _ = trained
    other = make_dataset(tmp_path / "others", values=(0, 100, 150))
    other_classes = run_seg_tuning.main(argv(other, tiny_weights, tmp_path / "out"))
    with pytest.raises(UserError, match=r"their class tables differ \(class 2: \(200, "
                                        r"'Fluid'\) vs \(150, 'Fluid'\)\)"):
        load_runs([run_dir, other_classes], "cpu")
    smaller = run_seg_tuning.main(argv(tiny_dataset, tiny_weights, tmp_path / "out",
                                       "--input_size", "32", "32"))
    capsys.readouterr()
    assert predict("--run_dir", run_dir, smaller, "-i", bscans["mixvol_0"], "-o",
                   tmp_path / "o", "--device", "cpu") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and "their input sizes differ (32x48 vs 32x32)" in err[0]
    assert not (tmp_path / "o").exists()


def test_infer_only_test_with_flip_records_it_and_predicts_again(trained, tmp_path,
                                                                 capsys):
    run_dir, bscans, args = trained
    preds = run_dir / "preds"
    assert predictions.prediction_tta(predictions.read_manifest(preds)) == "none"
    plain = {p.name: p.read_bytes() for p in preds.glob("*.png")}
    run_seg_tuning.main(["--run_dir", str(run_dir), "--infer_only", "--test", "--tta",
                         "flip", "--device", "cpu", "--num_workers", "0"])
    manifest = predictions.read_manifest(preds)
    assert manifest["tta"] == "flip"
    assert "tta: flip" in (preds / "config_infer.yaml").read_text()
    # the masks are run_seg_predict.py --tta flip's
    out = tmp_path / "masks"
    assert predict("--run_dir", run_dir, "-i", *bscans.values(), "-o", out, "--device",
                   "cpu", "--tta", "flip") == 0
    flipped = {p.name: p.read_bytes() for p in preds.glob("*.png")}
    assert flipped == {name: (out / name).read_bytes() for name in flipped}
    assert json.loads((out / "prediction_record.json").read_text())["tta"] == "flip"
    # without --tta the predictions are not up to date: predicted again, as before
    run_seg_tuning.main(args + ["--infer_only", "--test"])
    assert predictions.read_manifest(preds)["tta"] == "none"
    assert {p.name: p.read_bytes() for p in preds.glob("*.png")} == plain
    # --tta without --infer_only is one line
    with pytest.raises(SystemExit):
        run_seg_tuning.main(args + ["--test", "--tta", "flip"])
    assert "--tta flip changes written predictions only" in capsys.readouterr().err
