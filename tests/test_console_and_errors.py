"""What a researcher reads: the training console (epochs counted both ways, the time
left, per-class IoU), errors that name the real cause (weights of another model width),
no empty run folder after a failed start, and the runner's estimate and quiet job logs."""
import shutil
import sys

import pytest

import run_seg_tuning
from fm_seg_config import build_backbone
from mirage.errors import UserError
from mirage.grid import one_command, progress, runner
from mirage.run.lock import run_lock
from mirage.train import loop, validation
from mirage.train.checkpointing import TrainingState


def argv(dataset, weights, out, *extra):
    return ["--weights", str(weights), "--data_path", str(dataset), "--input_size", "32", "48",
            "--patch_size", "16", "--batch_size", "2", "--num_workers", "0",
            "--base_output_dir", str(out), "--lr", "1e-3", "--output_adapter", "linear",
            "--aug_name", "none", "--drop_path_encoder", "0", *map(str, extra)]


def run(*args):
    return run_seg_tuning.main(list(args))


def run_folders(out):
    """The run folders under ``out`` (version v1, dataset Tiny)."""
    parent = out / "v1" / "Tiny"
    return sorted(parent.iterdir()) if parent.is_dir() else []


# ----------------------------------------------------------------------------- console


def test_console_counts_epochs_from_0_and_of_the_total_and_says_what_a_resume_trains(
        tiny_dataset, tiny_weights, tmp_path, monkeypatch, capsys):
    common = ("--epochs", 5, "--save_ckpt_freq", 1, "--keep_ckpts", 5)
    real_epoch = loop.train_one_epoch

    def dies_at_epoch_1(ctx, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return real_epoch(ctx, epoch)

    monkeypatch.setattr(loop, "train_one_epoch", dies_at_epoch_1)
    # captured stderr is no terminal: the bars write plain lines, here one per redraw
    monkeypatch.setenv("TQDM_MININTERVAL", "0")
    with pytest.raises(KeyboardInterrupt):
        run(*argv(tiny_dataset, tiny_weights, tmp_path, *common))
    first = capsys.readouterr()
    assert ">> training epochs 0..4 (5 epochs, numbered from 0) on " in first.out
    assert "epoch 0/4 (1 of 5)  train_loss" in first.out
    assert "epoch 0/4 (1 of 5):" in first.err  # the progress bar says it the same way

    monkeypatch.setattr(loop, "train_one_epoch", real_epoch)
    run(*argv(tiny_dataset, tiny_weights, tmp_path, *common))
    out = capsys.readouterr().out
    assert ">> training epochs 1..4 of 0..4 (resumed at epoch 1) on " in out
    assert "training for" not in out
    lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert [line.split("  ")[0] for line in lines] == [
        "epoch 1/4 (2 of 5)", "epoch 2/4 (3 of 5)", "epoch 3/4 (4 of 5)", "epoch 4/4 (5 of 5)"]
    # the time left after every epoch but the last
    assert all(" left" in line.split("  ")[-1] for line in lines[:-1])
    assert "left" not in lines[-1]
    ious = [line for line in out.splitlines() if "val IoU %:" in line]
    assert len(ious) == 4  # one line per validation
    assert ious[0].startswith("  val IoU %: Background ") and "| Layer " in ious[0] \
        and "| Fluid " in ious[0]


def test_time_left_is_the_mean_epoch_time_times_the_epochs_left():
    clock = loop.EpochClock()
    assert clock.time_left(3) is None  # nothing measured: no guess
    clock.add(30.0)
    assert clock.time_left(4) == pytest.approx(120.0)
    clock.add(10.0)
    clock.add(12.0)  # the first epoch (one-time costs) no longer counts
    assert clock.time_left(10) == pytest.approx(110.0)
    assert clock.time_left(0) is None
    stats = {"epoch": 12, "train/loss": 0.3, "train/lr": 1e-4, "time": 41.3}
    line = loop.epoch_line(stats, TrainingState(), 200, 2 * 3600 + 5 * 60)
    assert line.startswith("epoch 12/199 (13 of 200)  train_loss 0.3000")
    assert line.endswith("  41.3s  est. 2h05m left")
    assert loop.epoch_line(stats, TrainingState(), 200).endswith("  41.3s")


def test_per_class_iou_is_one_short_line_with_long_labels_cut():
    line = validation.iou_line({"Background": 0.951, "ILM-NFL": 0.8024, "Intraretinal fluid": 0.5,
                     "Drusen": None})
    assert line == "  val IoU %: Background 95.1 | ILM-NFL 80.2 | Intraretina. 50.0 | Drusen -"


# ----------------------------------------------------------------------------- errors


def test_weights_of_another_width_name_the_wrong_model_and_leave_no_run_folder(
        tiny_dataset, tiny_weights, tmp_path, capsys):
    renamed = tmp_path / "weights" / "MIRAGE-Base.pth"
    renamed.parent.mkdir()
    shutil.copy(tiny_weights, renamed)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        run(*argv(tiny_dataset, renamed, out, "--epochs", 1))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "holds a model of width 128 (4 blocks) but MIRAGE-Base has width 768 " \
           "(12 blocks), so the file name or --fm names the wrong model" in err
    assert "--fm mirage-tiny" in err and "--num_global_tokens" not in err
    assert run_folders(out) == []


def test_fm_naming_another_width_is_the_same_error(tiny_weights):
    with pytest.raises(UserError, match=r"width 128 \(4 blocks\) but MIRAGE-Large has width "
                                        r"1024 \(24 blocks\)"):
        build_backbone(tiny_weights, 64, fm="mirage-large")


def test_a_garbage_weights_file_leaves_no_run_folder(tiny_dataset, tmp_path, capsys):
    garbage = tmp_path / "weights" / "MIRAGE-Tiny.pth"
    garbage.parent.mkdir()
    garbage.write_bytes(b"not a checkpoint " * 64)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        run(*argv(tiny_dataset, garbage, out, "--epochs", 1))
    assert exit_info.value.code == 2
    assert "not a PyTorch checkpoint" in capsys.readouterr().err
    assert run_folders(out) == []


def test_the_lock_removes_only_an_empty_folder_it_created(tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    with run_lock(existing):
        pass
    assert existing.is_dir() and list(existing.iterdir()) == []  # not ours: kept
    new = tmp_path / "new" / "run"
    with pytest.raises(RuntimeError):
        with run_lock(new):
            assert (new / ".lock").is_file()
            raise RuntimeError("the model could not be built")
    assert not new.exists()
    written = tmp_path / "written"
    with run_lock(written):
        (written / "log.txt").write_text("{}\n")
    assert [p.name for p in written.iterdir()] == ["log.txt"]


# ----------------------------------------------------------------------------- runner


@pytest.fixture
def runner_env(tmp_path, monkeypatch):
    """A scratch working folder, no fake GPUs or cluster, tqdm at its own defaults."""
    for name in (runner.FAKE_GPUS_ENV, runner.CLUSTER_ENV, "TQDM_DELAY", "TQDM_MININTERVAL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_runner_estimates_from_finished_jobs_not_from_tqdms_rate(runner_env, capsys,
                                                                monkeypatch):
    monkeypatch.setenv("TQDM_MININTERVAL", "0")  # captured stderr: a plain line per redraw
    job = runner_env / "job.py"
    job.write_text("import sys, time\ntime.sleep(float(sys.argv[2]))\n")
    logs = runner_env / "logs"
    assert runner.main([sys.executable, str(job), "--runner-log", str(logs), "--",
                        "--sleep", "0.2", "0.3", "0.4"], poll_s=0.02) == 0
    err = capsys.readouterr().err
    assert "\r" not in err  # captured stderr is no terminal: plain lines
    assert "jobs finished" in err and " elapsed" in err
    assert "estimate: " in err and " left (mean job " in err
    assert "job/s" not in err and "s/job" not in err and "<" not in err  # tqdm's rate, ETA


def test_time_left_of_the_grid_from_the_mean_job():
    assert progress.time_left_estimate([], [5.0], 3, 2) is None  # nothing finished: no guess
    # mean 90 s: two pending jobs and the 60 s left of the running one
    assert progress.time_left_estimate([60.0, 120.0], [30.0], 2, 1) == pytest.approx(240.0)
    assert progress.time_left_estimate([60.0, 120.0], [30.0], 2, 2) == pytest.approx(120.0)
    assert progress.time_left_estimate([60.0], [90.0], 0, 4) == pytest.approx(0.0)


BARS = ("from tqdm import tqdm\nimport time\n"
        "for _ in tqdm(range(100), leave=False):\n    time.sleep(0.01)\nprint('finished')\n")


def test_a_jobs_progress_bars_write_rarely_into_its_log(runner_env):
    job = runner_env / "bars.py"
    job.write_text(BARS)
    logs = runner_env / "logs"
    assert runner.main([sys.executable, str(job), "--runner-log", str(logs), "--",
                        "--v", "1"], poll_s=0.02) == 0
    text = next(logs.glob("*.log")).read_bytes()  # bytes: read_text turns \r into \n
    assert b"finished" in text and b"\r" not in text  # a 1 s bar: never drawn
    # the same in a SLURM array task
    task_log = runner_env / "task.log"
    assert one_command.run_one_command([sys.executable, str(job)], task_log)["exit_code"] == 0
    text = task_log.read_bytes()
    assert b"finished" in text and b"\r" not in text
