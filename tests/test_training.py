"""End to end on a tiny dataset: train, resume, test, predict, and the errors on the way."""
import json
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

import run_seg_tuning
from conftest import REPO, epoch_context, make_dataset, optim_spec
from fm_seg_config import build_backbone
from mirage import checkpoint_io as ckpt
from mirage.run.folder import RunFolder
from mirage.train import distributed, inference
from mirage.train import loop as engine
from mirage.run.spec import PrecisionSpec
from mirage.train.precision import Precision
from mirage.config import parse_config
from mirage.data.dataset import SegmentationDataset
from mirage.data.layout import find_split, open_dataset
from mirage.train.losses import build_loss
from mirage.models.segmentation_model import SegmentationModel
from mirage.train.optim import build_optimizer, param_groups
from mirage.models.decoders import build_decoder
from mirage.data.transforms import SegmentationTransform


def argv(dataset, weights, out, *extra):
    return ["--weights", str(weights), "--data_path", str(dataset), "--input_size", "32", "48",
            "--patch_size", "16", "--batch_size", "2", "--num_workers", "0",
            "--base_output_dir", str(out), "--lr", "1e-3", "--output_adapter", "linear",
            "--aug_name", "none", "--drop_path_encoder", "0", *map(str, extra)]


def run(*args):
    return run_seg_tuning.main(list(args))


def run_dir_of(out, decoder="linear", loss="CE-ignore-bg", version="v1"):
    """The one run directory of these options (its name ends in _s<seed>_<hash>)."""
    found = list((out / version / "Tiny").glob(f"MIRAGE-Tiny_frozen_{decoder}_{loss}_s*_*"))
    assert len(found) == 1, found
    return found[0]


def test_frozen_blocks_bit_identical_after_a_step(tiny_dataset, tiny_weights):
    backbone, _, _ = build_backbone(tiny_weights, (32, 48), 16, 1, drop_path_rate=0.1)
    decoder = build_decoder("convnext", embed_dim=backbone.embed_dim, num_classes=3,
                            grid_size=backbone.grid_size, patch_size=(16, 16),
                            image_size=(32, 48), encoder_depth=backbone.depth)
    model = SegmentationModel(backbone, decoder)
    model.freeze_blocks()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    info = open_dataset(tiny_dataset)
    data = SegmentationDataset(find_split(tiny_dataset / "train", True), info.class_table,
                               SegmentationTransform((32, 48), train=True))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    optimizer = build_optimizer(param_groups(model, 0.05, 0.75),
                                optim_spec(opt="adamw", lr=1e-3))
    precision = Precision(torch.device("cpu"), PrecisionSpec(), print)
    engine.train_one_epoch(epoch_context(model, loader, optimizer, precision,
                                         (np.full(2, 1e-3), np.full(2, 0.05)), clip_grad=1.0),
                           0)
    after = model.state_dict()
    for name, tensor in before.items():
        if name.startswith("backbone.blocks.") or name == "backbone.input_adapter.pos_emb":
            assert torch.equal(tensor, after[name]), name
    for name in ("backbone.input_adapter.proj.weight", "backbone.global_tokens"):
        assert not torch.equal(before[name], after[name]), name
    changed = [n for n in before if n.startswith("decoder.")
               and not torch.equal(before[n], after[n])]
    assert len(changed) == len([n for n in before if n.startswith("decoder.")])


def test_train_writes_run_directory(tiny_dataset, tiny_weights, tmp_path, capsys):
    out = tmp_path / "out"
    run(*argv(tiny_dataset, tiny_weights, out, "--epochs", 2, "--output_adapter", "convnext",
              "--loss", "CEGDice", "--log_images", "--log_images_freq", 1))
    run_dir = run_dir_of(out, "convnext", "CEGDice")
    assert {"config.yaml", "log.txt", "checkpoint-1.pth", "checkpoint-best.pth"} <= \
        {p.name for p in run_dir.iterdir()}
    log = [json.loads(line) for line in (run_dir / "log.txt").read_text().splitlines()]
    assert [e["epoch"] for e in log[:2]] == [0, 1]
    assert {"train/loss", "train/lr", "val/loss", "val/mIoU", "val/aAcc", "val/mAcc"} <= \
        set(log[0])
    assert "test/mIoU" in log[2] and log[2]["test_epoch"] in (0, 1)
    assert len(list((run_dir / "images").glob("val_e0_*.png"))) == 2
    saved, _, _ = parse_config(["-c", str(run_dir / "config.yaml")])
    assert saved["output_adapter"] == "convnext" and saved["epochs"] == 2
    lines = capsys.readouterr().out
    assert "epoch 1/1" in lines and "test of the best checkpoint" in lines

    # a finished run is skipped
    run(*argv(tiny_dataset, tiny_weights, out, "--epochs", 2, "--output_adapter",
              "convnext", "--loss", "CEGDice"))
    assert "already finished 2 epochs: skipping" in capsys.readouterr().out


def test_best_checkpoint_is_really_loaded_for_testing(tiny_dataset, tiny_weights, tmp_path,
                                                      monkeypatch):
    loaded = []
    real = inference.load_for_inference
    monkeypatch.setattr(inference, "load_for_inference",
                        lambda model, path, *rest: loaded.append(path.name) or real(model, path, *rest))
    run(*argv(tiny_dataset, tiny_weights, tmp_path, "--epochs", 1))
    assert loaded == ["checkpoint-best.pth"]


def test_resume_after_interruption_continues_from_the_right_epoch(
        tiny_dataset, tiny_weights, tmp_path, monkeypatch, capsys):
    common = ("--epochs", 4, "--save_ckpt_freq", 1, "--keep_ckpts", 4)
    straight = tmp_path / "straight"
    run(*argv(tiny_dataset, tiny_weights, straight, *common))

    interrupted = tmp_path / "interrupted"
    real_epoch = engine.train_one_epoch

    def dies_at_epoch_2(ctx, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return real_epoch(ctx, epoch)

    monkeypatch.setattr(engine, "train_one_epoch", dies_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run(*argv(tiny_dataset, tiny_weights, interrupted, *common))
    monkeypatch.setattr(engine, "train_one_epoch", real_epoch)
    run_dir = run_dir_of(interrupted)
    assert sorted(RunFolder(run_dir).epoch_checkpoints()) == [0, 1]
    capsys.readouterr()
    run(*argv(tiny_dataset, tiny_weights, interrupted, *common))
    assert "continuing at epoch 2" in capsys.readouterr().out
    log = [json.loads(x) for x in (run_dir / "log.txt").read_text().splitlines()]
    assert [e["epoch"] for e in log if "epoch" in e] == [0, 1, 2, 3]
    a = ckpt.load_file(run_dir / "checkpoint-3.pth")
    b = ckpt.load_file(run_dir_of(straight) / "checkpoint-3.pth")
    assert a["epoch"] == b["epoch"] == 3
    for name, tensor in b["model"].items():
        torch.testing.assert_close(a["model"][name], tensor, rtol=1e-5, atol=1e-6)


def test_infer_only_writes_pngs_at_original_size(tiny_dataset, tiny_weights, tmp_path):
    run(*argv(tiny_dataset, tiny_weights, tmp_path, "--epochs", 1))
    run(*argv(tiny_dataset, tiny_weights, tmp_path, "--epochs", 1, "--infer_only", "--test"))
    preds = run_dir_of(tmp_path) / "preds"
    names = sorted(p.name for p in preds.glob("*.png"))
    assert names == sorted(p.name for p in (tiny_dataset / "test/bscan").iterdir())
    for name in names:
        pred = cv2.imread(str(preds / name), cv2.IMREAD_UNCHANGED)
        assert pred.shape == (64, 96) and pred.dtype == np.uint8
        assert set(np.unique(pred)) <= {0, 100, 200}


def test_infer_without_masks_and_on_an_external_dataset(tiny_dataset, tiny_weights, tmp_path):
    run(*argv(tiny_dataset, tiny_weights, tmp_path, "--epochs", 1))
    shutil.rmtree(tiny_dataset / "test/semseg")                      # like RETOUCH
    run(*argv(tiny_dataset, tiny_weights, tmp_path, "--epochs", 1, "--infer_only", "--test"))
    assert len(list((run_dir_of(tmp_path) / "preds").glob("*.png"))) == 3
    # evaluation-only layout (bscan/ and semseg/ at the top), other classes, 16-bit values
    external = make_dataset(tmp_path / "ext", name="Other", splits={"test": 2},
                            size=(40, 50), values=(0, 300, 600), labels=("a", "b", "c"))
    for sub in ("bscan", "semseg"):
        shutil.move(external / "test" / sub, external / sub)
    run(*argv(tiny_dataset, tiny_weights, tmp_path, "--epochs", 1, "--infer_only", "--test",
              "--test_data_path", external))
    preds = sorted((run_dir_of(tmp_path) / "preds_Other").glob("*.png"))
    assert len(preds) == 2
    assert cv2.imread(str(preds[0]), cv2.IMREAD_UNCHANGED).shape == (40, 50)


def test_test_mode_logs_metrics(tiny_dataset, tiny_weights, tmp_path, capsys):
    run(*argv(tiny_dataset, tiny_weights, tmp_path, "--epochs", 1))
    run(*argv(tiny_dataset, tiny_weights, tmp_path, "--epochs", 1, "--test"))
    run(*argv(tiny_dataset, tiny_weights, tmp_path, "--epochs", 1, "--test"))
    assert ">> test of the best checkpoint" in capsys.readouterr().out
    log = (run_dir_of(tmp_path) / "log.txt").read_text().splitlines()
    # the test after training and both --test runs score the same checkpoint on the same
    # data: one line, not three
    assert sum("test/mIoU" in line for line in log) == 1


def test_infer_only_without_checkpoint_is_an_error(tiny_dataset, tiny_weights, tmp_path,
                                                   capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(*argv(tiny_dataset, tiny_weights, tmp_path, "--infer_only", "--test"))
    assert exit_info.value.code == 2
    assert "no trained checkpoint" in capsys.readouterr().err


def test_existing_checkpoints_are_never_overwritten_by_a_fresh_run(tiny_dataset, tiny_weights,
                                                                    tmp_path, capsys):
    run(*argv(tiny_dataset, tiny_weights, tmp_path, "--epochs", 2, "--save_ckpt_freq", 1))
    before = (run_dir_of(tmp_path) / "checkpoint-1.pth").read_bytes()
    with pytest.raises(SystemExit):
        run(*argv(tiny_dataset, tiny_weights, tmp_path, "--epochs", 2, "--save_ckpt_freq", 1,
                  "--no_auto_resume"))
    assert "already holds checkpoints" in capsys.readouterr().err
    assert (run_dir_of(tmp_path) / "checkpoint-1.pth").read_bytes() == before


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint-best.pth"
    ckpt.save(path, {"model": {"w": torch.ones(3)}})
    original = path.read_bytes()

    def dies_while_writing(obj, f, *args, **kwargs):
        f.write(b"partial")  # checkpoint_io saves through an open file
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_while_writing)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(path, {"model": {"w": torch.zeros(3)}})
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-best.pth"]


@pytest.mark.parametrize("mutate, extra, message", [
    (lambda d: shutil.rmtree(d / "val"), (), "val/bscan not found"),
    (lambda d: (d / "INFO.json").write_text("{"), (), "not valid JSON"),
    (lambda d: None, ("--input_size", "40"), "not divisible by --patch_size"),
    (lambda d: None, ("--weights", "nowhere/MIRAGE-Base.pth"), "file not found"),
    (lambda d: None, ("--batch_size", "64"), "use a smaller batch size"),
    (lambda d: None, ("--device", "cuda:7"), "--device cuda:7"),
])
def test_bad_input_exits_with_one_line(tiny_dataset, tiny_weights, tmp_path, capsys, mutate,
                                       extra, message):
    if "cuda" in " ".join(extra) and torch.cuda.device_count() > 7:
        pytest.skip("this machine really has a cuda:7")
    mutate(tiny_dataset)
    with pytest.raises(SystemExit) as exit_info:
        run(*argv(tiny_dataset, tiny_weights, tmp_path, "--epochs", 1), *extra)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_script_reports_errors_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "run_seg_tuning.py"), "--weights",
                             str(tmp_path / "MIRAGE-Base.pth"), "--data_path",
                             str(tmp_path / "missing")], capture_output=True, text=True,
                            cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: ") and "missing" in result.stderr


def test_predictions_are_16_bit_when_info_values_exceed_255(tmp_path, tiny_weights):
    dataset = make_dataset(tmp_path / "datasets", values=(0, 1000, 60000))
    run(*argv(dataset, tiny_weights, tmp_path, "--epochs", 1))
    run(*argv(dataset, tiny_weights, tmp_path, "--epochs", 1, "--infer_only", "--test"))
    for path in (run_dir_of(tmp_path) / "preds").glob("*.png"):
        pred = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert pred.dtype == np.uint16 and pred.shape == (64, 96)
        assert set(np.unique(pred)) <= {0, 1000, 60000}


def test_resume_from_a_given_checkpoint(tiny_dataset, tiny_weights, tmp_path, capsys):
    run(*argv(tiny_dataset, tiny_weights, tmp_path, "--epochs", 2, "--save_ckpt_freq", 1,
              "--keep_ckpts", 2))
    first = run_dir_of(tmp_path) / "checkpoint-0.pth"
    run(*argv(tiny_dataset, tiny_weights, tmp_path, "--epochs", 2, "--version", "v2",
              "--resume", first))
    assert "continuing at epoch 1" in capsys.readouterr().out
    log = (tmp_path / "v2" / "Tiny" / run_dir_of(tmp_path).name / "log.txt").read_text()
    assert [json.loads(x).get("epoch") for x in log.splitlines()][:1] == [1]
    with pytest.raises(SystemExit):
        run(*argv(tiny_dataset, tiny_weights, tmp_path, "--epochs", 2, "--version", "v3",
                  "--resume", run_dir_of(tmp_path) / "checkpoint-best.pth"))
    assert "not a training checkpoint" in capsys.readouterr().err
