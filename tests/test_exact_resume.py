"""A seeded run killed at any moment and resumed with the same command logs the same
numbers and ends with the same tensors as the run left alone, bit for bit (on the CPU).

Augmentation (``--aug_name simple``/``flip``) and stochastic depth
(``--drop_path_encoder``) draw random numbers in every step, so a resume that does not
restore the random generators, or that draws them at another point, shows at once."""
import dataclasses
import gc
import json

import pytest
import torch

from mirage import checkpoint_io as ckpt
from mirage.run.folder import RunFolder
from mirage.train import loop
from test_training import argv, run, run_dir_of

EPOCHS = 3
COMPARED = ("model", "optimizer", "scaler", "epoch", "best_miou", "best_epoch",
            "random_state")


def options(workers=0, aug="simple", keep=EPOCHS):
    return ("--epochs", EPOCHS, "--save_ckpt_freq", 1, "--keep_ckpts", keep,
            "--aug_name", aug, "--drop_path_encoder", 0.1, "--lr", 3e-3,
            "--num_workers", workers, "--device", "cpu")


def outcome(out):
    """(log.txt without the times, the final checkpoints' contents) of the run in ``out``."""
    run_dir = run_dir_of(out)
    log = [{k: v for k, v in json.loads(line).items() if k != "time"}
           for line in (run_dir / "log.txt").read_text().splitlines()]
    best = ckpt.load_file(run_dir / "checkpoint-best.pth")
    last = ckpt.load_file(run_dir / f"checkpoint-{EPOCHS - 1}.pth")
    return log, {"best": best["model"], **{key: last.get(key) for key in COMPARED}}


def assert_identical(a, b, where="checkpoint"):
    """Equal values, and bit-identical tensors, through nested dicts and lists."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny dataset and weights, and the outcome of uninterrupted runs (by workers)."""
    from conftest import make_dataset, write_mirage_checkpoint
    from fm_seg_config import MirageTiny
    root = tmp_path_factory.mktemp("exact")
    dataset = make_dataset(root / "datasets")
    weights = write_mirage_checkpoint(root / "MIRAGE-Tiny.pth", MirageTiny())
    references = {}

    def reference(workers=0, aug="simple"):
        if (workers, aug) not in references:
            out = root / f"straight_{workers}_{aug}"
            run(*argv(dataset, weights, out, *options(workers, aug)))
            references[workers, aug] = outcome(out)
        return references[workers, aug]
    return dataset, weights, reference


class Dies:
    """The training loader, raising KeyboardInterrupt (a Ctrl-C) after ``steps`` batches."""

    def __init__(self, loader, steps):
        self.loader, self.steps = loader, steps

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for step, batch in enumerate(self.loader):
            if step == self.steps:
                raise KeyboardInterrupt
            yield batch


def kill_in_epoch(monkeypatch, epoch, steps):
    """Make the run die after ``steps`` steps of ``epoch`` (0 steps: as it starts)."""
    real = loop.train_one_epoch

    def dying(ctx, epoch_now):  # train_one_epoch(TrainingContext, epoch)
        if epoch_now == epoch:
            data = dataclasses.replace(ctx.data, train_loader=Dies(ctx.data.train_loader,
                                                                   steps))
            ctx = dataclasses.replace(ctx, data=data)
        return real(ctx, epoch_now)
    monkeypatch.setattr(loop, "train_one_epoch", dying)


def kill_writing(monkeypatch, name):
    """Make the run die halfway through writing the file ``name``."""
    real = torch.save

    def dying(obj, f, *args, **kwargs):  # f: the open temporary file checkpoint_io writes
        if f".{name}." not in str(getattr(f, "name", f)):
            return real(obj, f, *args, **kwargs)
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", dying)


def kill_logging(monkeypatch, epoch):
    """Make the run die as it appends ``epoch``'s line to log.txt (its checkpoint is
    written by then)."""
    real = RunFolder.append_log

    def dying(folder, entry):
        if entry.get("epoch") == epoch:
            raise KeyboardInterrupt
        return real(folder, entry)
    monkeypatch.setattr(RunFolder, "append_log", dying)


def interrupted(monkeypatch, command, kill):
    """Run ``command`` with ``kill`` in place until it dies; then undo the kill."""
    with monkeypatch.context() as patch:
        kill(patch)
        with pytest.raises(KeyboardInterrupt):
            run(*command)
    gc.collect()  # the dead run's loader workers


@pytest.mark.parametrize("kill", [
    pytest.param(lambda mp: kill_in_epoch(mp, 1, 2), id="within-epoch-1"),
    pytest.param(lambda mp: kill_in_epoch(mp, 2, 0), id="between-epochs"),
    pytest.param(lambda mp: kill_logging(mp, 1), id="writing-the-log-line"),
    pytest.param(lambda mp: kill_writing(mp, "checkpoint-1.pth"), id="writing-checkpoint"),
    pytest.param(lambda mp: kill_writing(mp, f"checkpoint-{EPOCHS - 1}.pth"),
                 id="writing-last-checkpoint"),
])
def test_a_killed_run_resumes_exactly(setup, tmp_path, monkeypatch, capsys, kill):
    dataset, weights, reference = setup
    command = argv(dataset, weights, tmp_path, *options())
    interrupted(monkeypatch, command, kill)
    capsys.readouterr()
    run(*command)
    assert "resumed from" in capsys.readouterr().out
    log, final = outcome(tmp_path)
    expected_log, expected = reference()
    assert log == expected_log
    assert_identical(final, expected)


def test_a_run_with_workers_resumes_exactly(setup, tmp_path, monkeypatch):
    dataset, weights, reference = setup
    command = argv(dataset, weights, tmp_path, *options(workers=2, aug="flip"))
    interrupted(monkeypatch, command, lambda mp: kill_in_epoch(mp, 1, 2))
    run(*command)
    log, final = outcome(tmp_path)
    expected_log, expected = reference(workers=2, aug="flip")
    assert log == expected_log
    assert_identical(final, expected)


def test_a_torn_log_line_is_restored_from_its_checkpoint(setup, tmp_path, monkeypatch,
                                                         capsys):
    dataset, weights, reference = setup
    command = argv(dataset, weights, tmp_path, *options())
    interrupted(monkeypatch, command, lambda mp: kill_in_epoch(mp, 2, 0))
    log_file = RunFolder(run_dir_of(tmp_path)).log_file
    text = log_file.read_text()
    log_file.write_text(text[:-40])  # epoch 1's line cut short, as by a failed write
    capsys.readouterr()
    run(*command)
    assert "1 unreadable line(s) skipped" in capsys.readouterr().out
    assert outcome(tmp_path)[0] == reference()[0]


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(setup, tmp_path,
                                                                    monkeypatch, capsys):
    dataset, weights, reference = setup
    command = argv(dataset, weights, tmp_path, *options())
    interrupted(monkeypatch, command, lambda mp: kill_in_epoch(mp, 2, 0))
    latest = run_dir_of(tmp_path) / "checkpoint-1.pth"
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated
    capsys.readouterr()
    run(*command)
    out = capsys.readouterr().out
    assert "checkpoint-1.pth is damaged" in out and "from the previous intact " \
        "checkpoint-0.pth" in out
    log, final = outcome(tmp_path)
    assert log == reference()[0]
    assert_identical(final, reference()[1])


def test_a_damaged_only_checkpoint_is_a_one_line_error(setup, tmp_path, monkeypatch,
                                                       capsys):
    dataset, weights, _ = setup
    command = argv(dataset, weights, tmp_path, *options(keep=1))
    interrupted(monkeypatch, command, lambda mp: kill_in_epoch(mp, 2, 0))
    latest = run_dir_of(tmp_path) / "checkpoint-1.pth"
    latest.write_bytes(latest.read_bytes()[:1000])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run(*command)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(latest) in err
    assert "damaged (truncated" in err and "delete checkpoint-1.pth" in err
    assert "--resume" not in err


def test_a_checkpoint_without_random_state_still_resumes(setup, tmp_path, monkeypatch,
                                                         capsys):
    dataset, weights, _ = setup
    command = argv(dataset, weights, tmp_path, *options())
    interrupted(monkeypatch, command, lambda mp: kill_in_epoch(mp, 2, 0))
    path = run_dir_of(tmp_path) / "checkpoint-1.pth"
    payload = ckpt.load_file(path)
    del payload["random_state"], payload["log_entry"]  # as saved before they existed
    ckpt.save(path, payload)
    capsys.readouterr()
    run(*command)
    assert "holds no random state" in capsys.readouterr().out
    log, _ = outcome(tmp_path)
    assert [entry.get("epoch") for entry in log if "epoch" in entry] == [0, 1, 2]
