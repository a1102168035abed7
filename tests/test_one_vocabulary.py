"""The tools speak one language: the same option names (old names as aliases), no
abbreviations, a suggestion for a mistyped option on every tool; packaged configs by name;
a trained run used by naming its folder; the MIRAGE guide's commands as written."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import run_seg_eval
import run_seg_report
import run_seg_tuning
from conftest import REPO, make_dataset
from mirage.config import parse_config
from mirage.grid import runner
from mirage.run.folder import runs_named

REQUIRED = ["--weights", "w.pth", "--data_path", "d/"]


def exit_and_err(main, argv, capsys):
    with pytest.raises(SystemExit) as stop:
        main([str(a) for a in argv])
    return stop.value.code, capsys.readouterr().err


@pytest.mark.parametrize("main, argv, wrong, right", [
    (run_seg_tuning.main, ["--epoch", "2", *REQUIRED], "--epoch", "--epochs"),  # abbreviation
    (run_seg_tuning.main, ["--epochz", "2", *REQUIRED], "--epochz", "--epochs"),  # typo
    (run_seg_eval.main, ["-m", "r/", "--summ", "s.csv"], "--summ", "--summary"),
    (run_seg_eval.main, ["-m", "r/", "--num_worker", "2"], "--num_worker", "--num_workers"),
    (run_seg_report.main, ["r/", "--alph", "0.1"], "--alph", "--alpha"),
    (run_seg_report.main, ["r/", "--output_dri", "o"], "--output_dri", "--output_dir"),
])
def test_a_mistyped_or_abbreviated_option_gets_a_suggestion(main, argv, wrong, right,
                                                            capsys):
    code, err = exit_and_err(main, argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2
    assert lines[-1].startswith(f"error: unknown option {wrong} (did you mean {right}?)")
    assert "-h lists the options" in lines[-1]
    assert len(lines) <= 5  # a short usage line, not the whole help (46 lines before)


def test_the_runner_suggests_and_accepts_underscores(capsys):
    code = None
    with pytest.raises(SystemExit) as stop:
        runner.main(["python", "x.py", "--runner-gpu", "0", "--", "--a", "1"])
    code = stop.value.code
    assert code == 2 and "did you mean --runner-gpus?" in capsys.readouterr().err
    from mirage.grid.expand import build_grid
    snake = build_grid(["python", "x.py", "--runner_retry", "2", "--", "--a", "1", "2"])
    kebab = build_grid(["python", "x.py", "--runner-retry", "2", "--", "--a", "1", "2"])
    assert snake.options.retry == kebab.options.retry == 2


def test_yaml_suggests_too(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epoch: 2\n")
    code, err = exit_and_err(run_seg_tuning.main, ["-c", cfg, *REQUIRED], capsys)
    assert code == 2 and "unknown option 'epoch'; did you mean 'epochs'?" in err


def test_old_names_are_aliases(monkeypatch):
    from mirage.cli import eval_parser
    old = eval_parser().parse_args(["-m", "a/", "b/", "--workers", "3"])
    new = eval_parser().parse_args(["--run_dir", "a/", "b/", "--num_workers", "3"])
    also = eval_parser().parse_args(["--model_path", "a/", "b/", "--num_workers", "3"])
    assert vars(old) == vars(new) == vars(also)
    assert new.run_dir == ["a/", "b/"] and new.num_workers == 3


def test_a_packaged_config_is_found_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no _cfgs/ here
    expected = yaml.safe_load((REPO / "mirage/configs/seg_200e_convnext.yaml").read_text())
    for name in ("seg_200e_convnext", "seg_200e_convnext.yaml",
                 "_cfgs/seg_200e_convnext.yaml"):
        config, _, _ = parse_config(["-c", name, *REQUIRED])
        assert config["epochs"] == expected["epochs"] == 200
        assert config["output_adapter"] == "convnext" and config["loss"] == "CEGDice"
    with pytest.raises(Exception, match="configs shipped with the package: demo, "
                                        "seg_200e_convnext"):
        parse_config(["-c", "seg_100e", *REQUIRED])


def test_usage_names_the_command_as_called():
    result = subprocess.run([sys.executable, str(REPO / "run_seg_eval.py"), "--bogus"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and result.stderr.startswith("usage: run_seg_eval.py")


def test_the_runner_checks_the_installed_training_command_like_the_script():
    """`mirage_runner run_seg_tuning ...` resolves run folders as `./runner python
    run_seg_tuning.py ...` does, so two jobs sharing one are refused in both forms."""
    from mirage.grid.checks import tuning_args
    args = ["--lr", "1e-3"]
    assert tuning_args(["run_seg_tuning", *args]) == args
    assert tuning_args(["/usr/local/bin/run_seg_tuning", *args]) == args
    assert tuning_args(["python", "run_seg_tuning.py", *args]) == args
    assert tuning_args(["python", "other.py", *args]) is None


# ----------------------------------------------------------------------------- --run_dir
def tiny_args(dataset, weights, out, *extra):
    return ["--weights", str(weights), "--data_path", str(dataset), "--input_size", "32", "48",
            "--patch_size", "16", "--batch_size", "2", "--num_workers", "0",
            "--base_output_dir", str(out), "--lr", "1e-3", "--output_adapter", "linear",
            "--aug_name", "none", "--drop_path_encoder", "0", "--epochs", "1",
            *map(str, extra)]


def test_a_run_is_used_by_naming_its_folder(tiny_dataset, tiny_weights, tmp_path, capsys,
                                            monkeypatch):
    args = tiny_args(tiny_dataset, tiny_weights, tmp_path / "out")
    run_dir = run_seg_tuning.main(args)
    run_seg_tuning.main(args + ["--infer_only", "--test"])
    expected = {p.name: p.read_bytes() for p in (run_dir / "preds").glob("*.png")}
    shutil.rmtree(run_dir / "preds")

    # from another folder, only the run folder (and runtime options) given
    monkeypatch.chdir(tmp_path)
    assert run_seg_tuning.main(["--run_dir", str(run_dir), "--infer_only", "--test", "--device",
                                "cpu", "--num_workers", "0"]) == run_dir
    assert {p.name: p.read_bytes() for p in (run_dir / "preds").glob("*.png")} == expected

    code, err = exit_and_err(run_seg_tuning.main, ["--run_dir", run_dir, "--infer_only",
                                                   "--test", "--lr", "0.1"], capsys)
    assert code == 2 and "--lr cannot be given with --run_dir: it changes what was trained" \
        in err
    code, err = exit_and_err(run_seg_tuning.main, ["--run_dir", tmp_path, "--test"], capsys)
    assert code == 2 and "no config.yaml there" in err


# ----------------------------------------------------------------------------- the guide
def test_runs_named_as_in_the_guide(tmp_path):
    parent = tmp_path / "v1" / "Duke_DME"
    for name in ("M_frozen_convnext_CEGDice_s42_0123abcd", "M_frozen_convnext_CEGDice_s7_"
                 "89abcdef", "M_frozen_convnext_CEGDice_minmax_s42_00000000"):
        (parent / name).mkdir(parents=True)
    named = runs_named(parent / "M_frozen_convnext_CEGDice")
    assert [p.name for p in named] == ["M_frozen_convnext_CEGDice_s42_0123abcd",
                                       "M_frozen_convnext_CEGDice_s7_89abcdef"]
    assert runs_named(parent / "M_frozen_convnext_CEGDice_s42_0123abcd") == [
        parent / "M_frozen_convnext_CEGDice_s42_0123abcd"]
    assert runs_named(parent / "nothing") == []


def test_the_guides_three_commands_run_as_written(base_layout_checkpoint, tmp_path,
                                                  monkeypatch):
    """The MIRAGE guide's training (through the runner), inference and evaluation, with
    weights and data named as in the guide; only sizes and epochs overridden."""
    monkeypatch.chdir(tmp_path)
    weights = Path("__weights") / "MIRAGE-Base.pth"
    weights.parent.mkdir()
    shutil.copy(base_layout_checkpoint, weights)
    make_dataset(Path("__datasets") / "Segmentation", name="Duke_DME",
                 splits={"train": 4, "val": 2, "test": 2}, size=(64, 64))
    guide = ["--version", "v1", "--config", "./_cfgs/seg_200e_convnext.yaml",
             "--weights", "./__weights/MIRAGE-Base.pth",
             "--data_path", "./__datasets/Segmentation/Duke_DME/"]
    small = ["--epochs", "1", "--input_size", "64", "--batch_size", "2", "--num_workers", "0"]
    # no _cfgs/ here: the packaged copy of the paper config is used, as when installed
    tuning = [sys.executable, str(REPO / "run_seg_tuning.py")]
    assert runner.main(tuning + ["--", *guide, *small]) == 0
    assert runner.main(tuning + ["--", *guide, *small, "--infer_only", "--test"]) == 0
    result = subprocess.run(
        [sys.executable, str(REPO / "eval_seg.py"), "--model_path",
         "./__output/seg/v1/Duke_DME/MIRAGE-Base_frozen_convnext_CEGDice/"],
        capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "names 1 run folder(s): MIRAGE-Base_frozen_convnext_CEGDice_s42_" in result.stdout
    run_dir, = (tmp_path / "__output/seg/v1/Duke_DME").glob("MIRAGE-Base_frozen_convnext_"
                                                           "CEGDice_s42_*")
    assert (run_dir / "results_layers.csv").is_file()  # Layer and Fluid: two groups
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["epochs"] == 1


def test_labels_from_the_command_line_and_a_yaml_file(tmp_path):
    from mirage.errors import UserError
    from mirage.report_cli import parse_labels
    file = tmp_path / "labels.yaml"
    file.write_text("MIRAGE-Large.pth: Large\n")
    assert parse_labels(["MIRAGE-Base.pth=Ours", f"@{file}"]) == {
        "MIRAGE-Base.pth": "Ours", "MIRAGE-Large.pth": "Large"}
    with pytest.raises(UserError, match="write NAME=TEXT"):
        parse_labels(["Ours"])


def test_the_runner_usage_names_the_installed_command(monkeypatch):
    from mirage.grid.runner_options import usage_text
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/mirage_runner", "--help"])
    assert usage_text().startswith("usage: mirage_runner BASE COMMAND")
    assert "./runner" not in usage_text()
    monkeypatch.setattr(sys, "argv", [str(REPO / "runner"), "--help"])
    assert usage_text().startswith("usage: ./runner BASE COMMAND")
