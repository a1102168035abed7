"""Every result is what it claims to be: run identity, the lock, checkpoints that carry
what they were trained with, and options that would silently train nothing."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import run_seg_tuning
from conftest import REPO, make_dataset, write_mirage_checkpoint
from mirage import checkpoint_io as ckpt
from mirage.config import parse_config
from mirage.data.layout import open_dataset
from mirage.errors import UserError
from mirage.run.folder import RunFolder
from mirage.run.identity import run_dir_for_argv


def argv(dataset, weights, out, *extra):
    return ["--weights", str(weights), "--data_path", str(dataset), "--input_size", "32", "48",
            "--patch_size", "16", "--batch_size", "2", "--num_workers", "0",
            "--base_output_dir", str(out), "--lr", "1e-3", "--output_adapter", "linear",
            "--aug_name", "none", "--drop_path_encoder", "0", "--epochs", "1",
            *map(str, extra)]


def run(*args):
    return run_seg_tuning.main([str(a) for a in args])


def fails_with(capsys, *args):
    """Run, expect exit 2 with one 'error: ...' line; return that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run(*args)
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


# ----------------------------------------------------------------------------- identity
def test_seeds_and_learning_rates_get_their_own_directories(tiny_dataset, tiny_weights,
                                                            tmp_path):
    base = argv(tiny_dataset, tiny_weights, tmp_path)
    dirs = {run_dir_for_argv(base + extra) for extra in
            ([], ["--seed", "1"], ["--seed", "2"], ["--lr", "1e-2"], ["--epochs", "3"],
             ["--input_size", "64"], ["--batch_size", "1"])}
    assert len(dirs) == 7
    assert run_dir_for_argv(base + ["--seed", "7"]).name.startswith(
        "MIRAGE-Tiny_frozen_linear_CE-ignore-bg_s7_")
    # how a run executes is not what it trains: same directory
    assert run_dir_for_argv(base + ["--num_workers", "2", "--device", "cpu", "--version",
                                    "v1"]) == run_dir_for_argv(base)


def test_run_dir_matches_what_training_writes(tiny_dataset, tiny_weights, tmp_path):
    args = argv(tiny_dataset, tiny_weights, tmp_path, "--seed", 3)
    assert run(*args) == run_dir_for_argv(args)
    identity = json.loads((run_dir_for_argv(args) / "identity.json").read_text())
    assert identity["seed"] == 3 and identity["lr"] == 1e-3
    assert identity["classes"] == [[0, "Background"], [100, "Layer"], [200, "Fluid"]]


def test_class_table_and_weights_content_are_part_of_the_identity(tiny_dataset, tiny_weights,
                                                                  tmp_path):
    before = run_dir_for_argv(argv(tiny_dataset, tiny_weights, tmp_path))
    info = json.loads((tiny_dataset / "INFO.json").read_text())
    info["1"]["value"], info["2"]["value"] = info["2"]["value"], info["1"]["value"]
    (tiny_dataset / "INFO.json").write_text(json.dumps(info))
    assert run_dir_for_argv(argv(tiny_dataset, tiny_weights, tmp_path)) != before
    other = tmp_path / "w" / tiny_weights.name
    from fm_seg_config import MirageTiny
    write_mirage_checkpoint(other, MirageTiny(), seed=5)
    assert run_dir_for_argv(argv(tiny_dataset, other, tmp_path)).name != before.name


def test_a_directory_of_other_options_is_never_trained_into(tiny_dataset, tiny_weights,
                                                            tmp_path, capsys):
    args = argv(tiny_dataset, tiny_weights, tmp_path)
    run_dir = run(*args)
    stored = json.loads((run_dir / "identity.json").read_text())
    stored["lr"] = 0.5  # as if trained with another --lr into this directory
    (run_dir / "identity.json").write_text(json.dumps(stored))
    err = fails_with(capsys, *args)
    assert "holds a run with other options" in err and "lr: 0.5 there, 0.001 now" in err
    err = fails_with(capsys, *args, "--infer_only", "--test")
    assert "lr: 0.5 there" in err


def test_test_of_untrained_options_names_the_closest_run(tiny_dataset, tiny_weights, tmp_path,
                                                         capsys):
    run(*argv(tiny_dataset, tiny_weights, tmp_path))
    err = fails_with(capsys, *argv(tiny_dataset, tiny_weights, tmp_path, "--seed", 9),
                     "--infer_only", "--test")
    assert "no trained checkpoint" in err and "seed: 42 there, 9 now" in err


# ----------------------------------------------------------------------------- the lock
def test_a_run_directory_in_use_is_refused(tiny_dataset, tiny_weights, tmp_path, capsys):
    args = argv(tiny_dataset, tiny_weights, tmp_path)
    run_dir = run_dir_for_argv(args)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from mirage.run.lock import run_lock
        with run_lock({str(run_dir)!r}):
            print("locked", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        err = fails_with(capsys, *args)
        assert f"in use by process {holder.pid}" in err
        assert not (run_dir / "log.txt").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died without removing its lock: detected as stale, training goes on
    assert (run_dir / ".lock").exists()
    assert run(*args) == run_dir
    assert "removing a stale lock" in capsys.readouterr().out
    assert not (run_dir / ".lock").exists()


def test_two_processes_started_at_once_never_share_a_directory(tiny_dataset, tiny_weights,
                                                               tmp_path):
    args = argv(tiny_dataset, tiny_weights, tmp_path, "--epochs", 3)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, str(REPO / "run_seg_tuning.py"), *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    outputs = " ".join(out + err for _, out, err in results)
    # Either one was refused while the other trained, or the second came after the first
    # had finished and skipped it; never two writers.
    assert codes in ([0, 2], [0, 0]), outputs
    if codes == [0, 2]:
        assert "is in use by process" in outputs
    else:
        assert "skipping training" in outputs
    run_dir = run_dir_for_argv(args)
    epochs = [json.loads(line).get("epoch") for line in
              (run_dir / "log.txt").read_text().splitlines()]
    assert [e for e in epochs if e is not None] == [0, 1, 2]


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoints_are_slim_and_carry_what_they_were_trained_with(tiny_dataset, tiny_weights,
                                                                    tmp_path):
    run_dir = run(*argv(tiny_dataset, tiny_weights, tmp_path, "--output_adapter", "convnext"))
    payload = ckpt.load_file(run_dir / "checkpoint-0.pth", what="checkpoint")
    assert payload["format"] == "slim-v2"
    assert not any(name.startswith("backbone.blocks.") for name in payload["model"])
    assert any(name.startswith("decoder.") for name in payload["model"])
    assert "backbone.input_adapter.proj.weight" in payload["model"]  # trained
    meta = payload["meta"]
    assert meta["classes"] == [[0, "Background"], [100, "Layer"], [200, "Fluid"]]
    assert meta["input_size"] == [32, 48] and meta["patch_size"] == [16, 16]
    assert meta["decoder"] == "convnext" and meta["family"] == "MIRAGE-Tiny"
    import hashlib
    assert meta["weights"]["sha256"] == hashlib.sha256(tiny_weights.read_bytes()).hexdigest()
    assert "optimizer" not in ckpt.load_file(run_dir / "checkpoint-best.pth")


def test_only_the_newest_epoch_checkpoints_are_kept(tiny_dataset, tiny_weights, tmp_path):
    run_dir = run(*argv(tiny_dataset, tiny_weights, tmp_path, "--epochs", 4,
                        "--save_ckpt_freq", 1, "--keep_ckpts", 2))
    assert sorted(RunFolder(run_dir).epoch_checkpoints()) == [2, 3]
    assert (run_dir / "checkpoint-best.pth").is_file()


def test_swapped_class_values_are_refused_at_inference(tiny_dataset, tiny_weights, tmp_path,
                                                       capsys):
    run_dir = run(*argv(tiny_dataset, tiny_weights, tmp_path))
    info = json.loads((tiny_dataset / "INFO.json").read_text())
    info["1"]["value"], info["2"]["value"] = info["2"]["value"], info["1"]["value"]
    swapped = tmp_path / "swapped.json"
    swapped.write_text(json.dumps(info))
    err = fails_with(capsys, *argv(tiny_dataset, tiny_weights, tmp_path, "--version", "v2",
                                   "--mapping_fn", swapped),
                     "--resume", run_dir / "checkpoint-0.pth")
    assert "class table" in err and "[100, 'Layer']" in err and "[200, 'Layer']" in err


@pytest.mark.parametrize("extra, what", [
    (("--input_size", 64), "--input_size [32, 48]"),
    (("--patch_size", 8), "--patch_size [16, 16]"),
    (("--output_adapter", "convnext"), "--output_adapter linear"),
])
def test_a_checkpoint_of_other_shapes_is_refused_naming_both(tiny_dataset, tiny_weights,
                                                             tmp_path, capsys, extra, what):
    run_dir = run(*argv(tiny_dataset, tiny_weights, tmp_path))
    err = fails_with(capsys, *argv(tiny_dataset, tiny_weights, tmp_path, "--version", "v2",
                                   *extra), "--resume", run_dir / "checkpoint-0.pth")
    assert f"trained with {what}" in err and "this run has" in err


def test_a_checkpoint_of_other_weights_is_refused(tiny_dataset, tiny_weights, tmp_path,
                                                  capsys):
    run_dir = run(*argv(tiny_dataset, tiny_weights, tmp_path))
    from fm_seg_config import MirageTiny
    other = write_mirage_checkpoint(tmp_path / "other" / "MIRAGE-Tiny.pth", MirageTiny(),
                                    seed=3)
    err = fails_with(capsys, *argv(tiny_dataset, other, tmp_path),
                     "--resume", run_dir / "checkpoint-0.pth")
    assert "SHA-256" in err and str(other) in err


def test_weights_with_nan_are_rejected_before_training(tiny_dataset, tmp_path, capsys):
    from fm_seg_config import MirageTiny
    path = write_mirage_checkpoint(tmp_path / "w" / "MIRAGE-Tiny.pth", MirageTiny())
    payload = ckpt.load_file(path)
    payload["model"]["encoder.0.attn.qkv.weight"][0, 0] = float("nan")
    ckpt.save(path, payload)
    err = fails_with(capsys, *argv(tiny_dataset, path, tmp_path))
    assert "NaN or Inf" in err and "qkv.weight" in err


# ----------------------------------------------------------------------------- losses
def test_a_lesion_dataset_of_background_only_batches_trains(tmp_path):
    # Every training B-scan is all background: CE-ignore-bg has nothing to score there.
    dataset = make_dataset(tmp_path / "datasets", values=(0, 100, 200))
    from mirage.fileio import read_gray, write_png
    for mask in (dataset / "train" / "semseg").iterdir():
        write_png(mask, read_gray(mask) * 0)
    weights = write_mirage_checkpoint(tmp_path / "w" / "MIRAGE-Tiny.pth",
                                      __import__("fm_seg_config").MirageTiny())
    run_dir = run(*argv(dataset, weights, tmp_path, "--loss", "CE-ignore-bg"))
    losses = [json.loads(line)["train/loss"] for line in
              (run_dir / "log.txt").read_text().splitlines() if '"epoch"' in line]
    assert losses == [0.0]


def test_a_dataset_with_only_a_background_class_is_a_clear_error(tmp_path, tiny_weights,
                                                                 capsys):
    dataset = make_dataset(tmp_path / "datasets")
    from mirage.fileio import read_gray, write_png
    for mask in dataset.glob("*/semseg/*.png"):
        write_png(mask, read_gray(mask) * 0)
    (dataset / "INFO.json").write_text(json.dumps({"0": {"value": 0, "label": "Background"}}))
    err = fails_with(capsys, *argv(dataset, tiny_weights, tmp_path))
    assert "only 1 class" in err


# ----------------------------------------------------------------------------- options
@pytest.mark.parametrize("extra, message", [
    (("--clip_grad", 0), "--clip_grad 0.0: must be a positive gradient norm"),
    (("--start_epoch", 5, "--epochs", 2), "--start_epoch 5: must be in 0..epochs-1"),
    (("--weight_decay", -1), "--weight_decay -1.0: must be 0 or more"),
    (("--lr", "nan"), "expected a finite number"),
    (("--lr", "inf"), "expected a finite number"),
    (("--opt_betas", 0.9, 1.5), "each must be in [0, 1)"),
    (("--opt_eps", 0), "--opt_eps 0.0: must be positive"),
    (("--device", "mps"), "--device mps: not supported"),
    (("--device", "meta"), "--device meta: not supported"),
    (("--input_size", "\uff13\uff12"), "expected ASCII digits"),
    (("--batch_size", "\u0662"), "expected ASCII digits"),
    (("--version", "../../../x"), "must be a plain folder name"),
    (("--version", "/abs/path"), "must be a plain folder name"),
])
def test_options_that_would_train_wrong_are_refused(tiny_dataset, tiny_weights, tmp_path,
                                                    capsys, extra, message):
    err = fails_with(capsys, *argv(tiny_dataset, tiny_weights, tmp_path), *extra)
    assert message in err
    assert not list(tmp_path.glob("**/log.txt"))


def test_base_output_dir_that_is_a_file(tiny_dataset, tiny_weights, tmp_path, capsys):
    (tmp_path / "out").write_text("not a folder")
    err = fails_with(capsys, *argv(tiny_dataset, tiny_weights, tmp_path / "out"))
    assert "is a file, not a folder" in err


def test_version_from_yaml_cannot_escape(tiny_dataset, tiny_weights, tmp_path, capsys):
    config = tmp_path / "shared.yaml"
    config.write_text("version: ../../escaped\n")
    err = fails_with(capsys, "-c", config, *argv(tiny_dataset, tiny_weights, tmp_path / "o"))
    assert "--version '../../escaped'" in err
    assert not (tmp_path / "escaped").exists()


def test_an_unwritable_output_folder_is_one_line(tiny_dataset, tiny_weights, tmp_path,
                                                 capsys, monkeypatch):
    import errno

    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("mirage.fileio.tempfile.mkstemp", refused)
    with pytest.raises(UserError, match=f"cannot write {tmp_path / 'x.txt'}: Permission"):
        from mirage.fileio import write_text
        write_text(tmp_path / "x.txt", "hello")


def test_a_full_disk_is_reported_as_such(tmp_path, monkeypatch):
    import errno

    def full(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(UserError, match=f"no space left on {tmp_path}"):
        ckpt.save(tmp_path / "checkpoint-0.pth", {"model": {}})
    assert list(tmp_path.iterdir()) == []


def test_yaml_identity_dump_reads_back(tiny_dataset, tiny_weights, tmp_path):
    run_dir = run(*argv(tiny_dataset, tiny_weights, tmp_path, "--seed", 5))
    config, _, _ = parse_config(["-c", str(run_dir / "config.yaml")])
    assert config["seed"] == 5
    assert run_dir_for_argv(["-c", str(run_dir / "config.yaml")]) == run_dir
    assert open_dataset(tiny_dataset).name == "Tiny"


def test_a_full_checkpoint_of_the_first_version_still_resumes(tiny_dataset, tiny_weights,
                                                              tmp_path, capsys):
    run_dir = run(*argv(tiny_dataset, tiny_weights, tmp_path, "--epochs", 2))
    slim = ckpt.load_file(run_dir / "checkpoint-1.pth")
    # The first version's layout: the whole model (backbone included), config, class table.
    config, _, _ = parse_config(argv(tiny_dataset, tiny_weights, tmp_path, "--epochs", 2))
    dataset = open_dataset(tiny_dataset)
    from conftest import build_from_options
    model, _ = build_from_options(config, input_size=(32, 48), patch_size=(16, 16))
    model.load_state_dict(slim["model"], strict=False)  # a slim file: the trained tensors only
    legacy = tmp_path / "legacy" / "checkpoint-0.pth"
    ckpt.save(legacy, {"model": model.state_dict(), "epoch": 0, "optimizer":
                       slim["optimizer"], "scaler": slim["scaler"], "config": config,
                       "class_values": list(dataset.class_table.values),
                       "class_labels": list(dataset.class_table.labels)})
    capsys.readouterr()
    run(*argv(tiny_dataset, tiny_weights, tmp_path, "--epochs", 2, "--version", "v2"),
        "--resume", legacy)
    assert "continuing at epoch 1" in capsys.readouterr().out


def test_checkpoint_benchmark_quick_mode():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_checkpoint
    result = bench_checkpoint.main(["--quick"])
    assert result["slim_best"]["MB"] < result["full_best"]["MB"]
    assert 0 < result["run_total"]["slim_over_full"] < 1


def test_epochs_count_from_0_in_console_log_and_checkpoint_names(tiny_dataset, tiny_weights,
                                                                 tmp_path, capsys):
    capsys.readouterr()
    run_dir = run(*argv(tiny_dataset, tiny_weights, tmp_path, "--epochs", 2,
                        "--save_ckpt_freq", 1, "--keep_ckpts", 2))
    out = capsys.readouterr().out
    assert "epoch 0/1 " in out and "epoch 1/1 " in out and "epoch 2/" not in out
    log = [json.loads(line) for line in (run_dir / "log.txt").read_text().splitlines()]
    assert [e["epoch"] for e in log if "epoch" in e] == [0, 1]
    assert sorted(RunFolder(run_dir).epoch_checkpoints()) == [0, 1]
    best_epoch = ckpt.load_file(run_dir / "checkpoint-best.pth")["epoch"]
    assert f"(epoch {best_epoch})" in out
