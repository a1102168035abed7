"""Edges where a run read back, a prediction or a config could silently change a number,
lose a file or end in a traceback: each is the right behaviour or a one-line refusal."""
import os
import shutil

import cv2
import numpy as np
import pytest
import yaml

import run_seg_predict
import run_seg_tuning
from mirage.config import parse_config
from mirage.errors import UserError
from mirage.train.predictor import as_gray, load_run
from test_predict import argv, mixed_bscans


def exit_and_err(main, args, capsys):
    """(exit status, stderr) of a command-line entry point."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def edit_config(run_dir, **changes):
    path = run_dir / "config.yaml"
    config = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**config, **changes}, sort_keys=False))


@pytest.fixture
def trained(tiny_dataset, tiny_weights, tmp_path):
    """A 1-epoch tiny run: (run dir, training argv)."""
    args = argv(tiny_dataset, tiny_weights, tmp_path / "out")
    return run_seg_tuning.main(args), args


# ----------------------------------------------------------------------------- read back
@pytest.mark.parametrize("option, value", [("decoder_interpolate_mode", "nearest"),
                                           ("minmax", True)])
def test_an_edited_config_yaml_is_refused_by_every_path_that_rebuilds_the_run(
        trained, tmp_path, capsys, option, value):
    """Options that change the forward pass, edited in config.yaml after training: the
    predictor, run_seg_predict.py and --infer_only refuse, naming the option and both
    values, instead of predicting with other options than the run was trained with."""
    run_dir, _ = trained
    trained_value = yaml.safe_load((run_dir / "config.yaml").read_text())[option]
    edit_config(run_dir, **{option: value})
    with pytest.raises(UserError, match=rf"{option} is {value!r} there, but the run was "
                                        rf"trained with {trained_value!r}"):
        load_run(run_dir, "cpu")
    bscans = mixed_bscans(tmp_path / "in")
    code, err = exit_and_err(run_seg_predict.main, ["--run_dir", run_dir, "-i",
                                                    bscans["mixvol_0"], "-o", tmp_path / "o",
                                                    "--device", "cpu"], capsys)
    assert code == 2 and f"{option} is {value!r} there" in err
    assert not (tmp_path / "o").exists()
    code, err = exit_and_err(run_seg_tuning.main, ["--run_dir", run_dir, "--infer_only",
                                                   "--test"], capsys)
    assert code == 2 and option in err


def test_a_checkpoint_records_and_checks_the_normalisation_and_upsampling(trained):
    """The checkpoint's meta holds the options that change the forward pass without
    changing a tensor's shape; a load with other values is refused naming both."""
    import dataclasses

    from conftest import build_from_options
    from mirage import checkpoint_io
    from mirage.run.spec import RunSpec
    from mirage.train.checkpointing import checkpoint_meta, load_model_weights
    run_dir, _ = trained
    meta = checkpoint_io.load_file(run_dir / "checkpoint-best.pth")["meta"]
    assert (meta["norm"], meta["interpolate_mode"]) == ("minmax", "bilinear")
    spec = RunSpec.from_run_dir(run_dir)
    changed = dataclasses.replace(spec, model=dataclasses.replace(
        spec.model, interpolate_mode="nearest"))
    model, _ = build_from_options(dict(spec.options))
    with pytest.raises(UserError, match="trained with --decoder_interpolate_mode bilinear, "
                                        "this run has nearest"):
        load_model_weights(model, run_dir / "checkpoint-best.pth",
                           checkpoint_meta(changed, spec.classes, model))


@pytest.mark.parametrize("content", [b"", b"weights: \xff\xfe\n"])
def test_an_empty_or_non_utf8_config_yaml_is_one_line(trained, capsys, content):
    run_dir, _ = trained
    (run_dir / "config.yaml").write_bytes(content)
    with pytest.raises(UserError) as err:
        load_run(run_dir, "cpu")
    assert "\n" not in str(err.value)
    assert ("not UTF-8" in str(err.value)) if content else "--weights is required" in str(
        err.value)
    code, err = exit_and_err(run_seg_tuning.main, ["--run_dir", run_dir, "--infer_only",
                                                   "--test"], capsys)
    assert code == 2 and err.startswith("error: ")


def test_run_dir_works_from_any_folder_when_config_yaml_has_relative_paths(
        tiny_dataset, tiny_weights, tmp_path, monkeypatch):
    """Trained from one folder with relative paths (./__weights/..., as the guide types
    them), a run is read back from anywhere: the paths are found from the folder it was
    trained in, which its place under --base_output_dir gives."""
    project = tmp_path / "project"
    (project / "__weights").mkdir(parents=True)
    shutil.copy(tiny_weights, project / "__weights" / "MIRAGE-Tiny.pth")
    shutil.copytree(tiny_dataset, project / "__datasets" / "Tiny")
    monkeypatch.chdir(project)
    run_dir = run_seg_tuning.main(argv("./__datasets/Tiny", "./__weights/MIRAGE-Tiny.pth",
                                       "./__output/seg"))
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["weights"].startswith(".")
    run_dir = run_dir.resolve()
    monkeypatch.chdir(tmp_path)  # elsewhere
    assert run_seg_tuning.main(["--run_dir", str(run_dir), "--infer_only", "--test",
                                "--device", "cpu"]).resolve() == run_dir
    assert len(list((run_dir / "preds").glob("*.png"))) == 3  # the test split
    assert load_run(run_dir, "cpu").epoch == 0


def test_run_dir_with_the_weights_file_moved_under_another_name(tiny_dataset, tiny_weights,
                                                               tmp_path):
    """The family and the run's name come from the name the file had at training; the
    checkpoint checks the renamed file's SHA-256."""
    weights = tmp_path / "MIRAGE-Tiny.pth"
    shutil.copy(tiny_weights, weights)
    run_dir = run_seg_tuning.main(argv(tiny_dataset, weights, tmp_path / "out"))
    renamed = tmp_path / "renamed.pth"
    os.rename(weights, renamed)
    assert run_seg_tuning.main(["--run_dir", str(run_dir), "--weights", str(renamed),
                                "--infer_only", "--test", "--device", "cpu"]) == run_dir
    assert load_run(run_dir, "cpu", weights=renamed).epoch == 0


def test_reinference_never_deletes_what_it_did_not_write(trained, capsys):
    run_dir, args = trained
    run_seg_tuning.main(args + ["--infer_only", "--test"])
    mine = run_dir / "preds" / "mine"
    mine.mkdir()
    (mine / "a.png").write_bytes(b"user's")
    (run_dir / "preds" / "manifest.json").unlink()  # not up to date: it must predict again
    code, err = exit_and_err(run_seg_tuning.main, args + ["--infer_only", "--test"], capsys)
    assert code == 2 and "holds mine, which inference did not write" in err
    assert (mine / "a.png").read_bytes() == b"user's"


def test_predict_device_mps_is_one_line(trained, tmp_path, capsys):
    run_dir, _ = trained
    bscans = mixed_bscans(tmp_path / "in")
    code, err = exit_and_err(run_seg_predict.main, ["--run_dir", run_dir, "-i",
                                                    bscans["mixvol_0"], "-o", tmp_path / "o",
                                                    "--device", "mps"], capsys)
    assert code == 2 and "--device mps: not supported" in err


# ----------------------------------------------------------------------------- inputs
def test_an_rgba_array_is_one_b_scan_read_as_training_reads_an_rgba_png(tmp_path):
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (64, 96, 4), dtype=np.uint8)
    path = tmp_path / "scan.png"
    assert cv2.imwrite(str(path), rgba[..., [2, 1, 0, 3]])  # an RGBA PNG on disk
    from mirage.fileio import read_gray
    assert as_gray(rgba).shape == (64, 96)
    np.testing.assert_array_equal(as_gray(rgba), read_gray(path))
    with pytest.raises(UserError, match="float32.*uint8/uint16"):
        as_gray(rgba.astype(np.float32))


def test_a_stack_of_rgba_b_scans_is_predicted_as_a_stack(trained):
    run_dir, _ = trained
    predictor = load_run(run_dir, "cpu")
    rgba = np.random.default_rng(1).integers(0, 256, (2, 40, 50, 4), dtype=np.uint8)
    labels = predictor.predict(rgba)
    assert labels.shape == (2, 40, 50)
    np.testing.assert_array_equal(labels[1], predictor.predict(rgba[1]))


# ----------------------------------------------------------------------------- options
def test_resume_beside_test_is_refused(tiny_dataset, tiny_weights, tmp_path, capsys):
    code, err = exit_and_err(run_seg_tuning.main, argv(tiny_dataset, tiny_weights, tmp_path)
                             + ["--test", "--resume", "x.pth"], capsys)
    assert code == 2 and "--resume x.pth continues training, but --test uses the run's " \
                         "checkpoint-best.pth; drop --resume" in err


def test_a_warmup_longer_than_the_run_is_noted(tiny_dataset, tiny_weights, tmp_path, capsys):
    run_seg_tuning.main(argv(tiny_dataset, tiny_weights, tmp_path, "--warmup_steps", "50"))
    out = capsys.readouterr().out
    # 8 training B-scans in batches of 2: 4 steps for the 1 epoch
    assert ">> note: --warmup_steps 50 is longer than the run (4 steps of 4 per epoch): " \
           "the warmup is cut to 4 steps" in out


def test_the_original_mirage_config_loads_with_a_notice(tmp_path, capsys):
    """The original's own YAML (its keys as published, values here): the key this toolkit
    does not use is named once; a value that would change the masks is refused."""
    original = tmp_path / "seg_200e_convnext.yaml"
    original.write_text("in_domains: bscan\npatch_size:\n  bscan: [32, 32]\n"
                        "num_global_tokens: 1\ndrop_path_encoder: 0.1\noutput_adapter: "
                        "convnext\ndecoder_main_tasks: bscan\nepochs: 200\nopt: adamw\n"
                        "lr: 0.0001\nwarmup_lr: 0.000001\nmin_lr: 0.\nwarmup_epochs: 1\n"
                        "input_size:\n  bscan: [1024, 1024]\nlayer_decay: 0.75\n"
                        "batch_size: 4\nloss: CEGDice\naug_name: simple\n"
                        "seg_reduce_zero_label: False\neval_freq: 1\nlog_images: False\n"
                        "log_images_freq: 20\n")
    config, _, _ = parse_config(["-c", str(original), "--weights", "w.pth", "--data_path", "d"])
    assert (config["lr"], config["warmup_lr"], config["batch_size"]) == (1e-4, 1e-6, 4)
    err = capsys.readouterr().err
    assert err.count("note: ") == 1 and "ignoring seg_reduce_zero_label" in err
    original.write_text(original.read_text().replace("seg_reduce_zero_label: False",
                                                     "seg_reduce_zero_label: True"))
    with pytest.raises(UserError, match="seg_reduce_zero_label: True is not supported"):
        parse_config(["-c", str(original), "--weights", "w.pth", "--data_path", "d"])
    original.write_text("lr: 1e-4\nseg_reduce_zero_lable: false\n")  # a typo: refused
    with pytest.raises(UserError, match="unknown option 'seg_reduce_zero_lable'"):
        parse_config(["-c", str(original), "--weights", "w.pth", "--data_path", "d"])


def test_the_runner_refuses_a_protocol_option_of_another_protocol_up_front(
        tiny_dataset, tiny_weights, tmp_path):
    """docs/runner.md: a grid whose job would refuse its options is refused before any
    job starts (the dry resolution runs the same checks as the job)."""
    from mirage.run.identity import run_dir_for_argv
    with pytest.raises(UserError, match="--lora_rank applies only with --tuning lora"):
        run_dir_for_argv(argv(tiny_dataset, tiny_weights, tmp_path, "--tuning", "frozen",
                              "--lora_rank", "4"))


def test_the_second_job_of_a_process_does_not_repeat_the_run_lines(trained, capsys):
    """The demo predicts right after training: the run folder and model lines once."""
    from mirage.train import job
    run_dir, args = trained
    config, _, _ = parse_config(args + ["--infer_only", "--test"])
    capsys.readouterr()
    job.main(config, announce=False)
    out = capsys.readouterr().out
    assert ">> run directory" not in out and ">> MIRAGE-Tiny: loaded" not in out
    assert ">> wrote 3 predictions" in out


def test_the_same_checkpoint_is_the_same_bytes(tmp_path):
    """A weights file's SHA-256 names its runs: saving the same tensors twice (the demo
    writes its tiny encoder in every fresh folder) must give the same file."""
    import hashlib

    import torch

    from mirage import checkpoint_io
    payload = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "epoch": 0}
    checkpoint_io.save(tmp_path / "a" / "MIRAGE-Tiny.pth", payload)
    checkpoint_io.save(tmp_path / "b" / "MIRAGE-Tiny.pth", payload)
    digests = {hashlib.sha256((tmp_path / d / "MIRAGE-Tiny.pth").read_bytes()).hexdigest()
               for d in "ab"}
    assert len(digests) == 1
