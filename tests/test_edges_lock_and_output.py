"""Edges QA found: a full disk or a read-only folder while taking a run's lock, a lock file
that names no owner, a negative number after an option, PEFT that is installed but does
not import, and run_seg_predict.py's output folder given as ``~/...``, as a symlink or as
a mount point."""
import errno
import json
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import run_seg_predict
import run_seg_tuning
from mirage import fileio
from mirage.config import build_parser
from mirage.errors import UserError
from mirage.models import lora
from mirage.run import lock
from mirage.run.lock import run_lock


def one_line(info):
    text = str(info.value)
    assert "\n" not in text, text
    return text


def hidden(folder):
    """Names of the hidden entries of ``folder``: temporaries left behind."""
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------------------- the run lock
@pytest.fixture
def full_disk(monkeypatch):
    """os.write writes half of what it is given once, then fails as a full disk does."""
    calls, real_write = [], os.write

    def write(fd, data):
        calls.append(fd)
        if len(calls) == 1 and len(data) > 1:
            return real_write(fd, bytes(data[:len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", write)
    return calls


@pytest.mark.parametrize("hard_links", [True, False])
def test_a_full_disk_while_taking_the_lock_leaves_no_lock(tmp_path, monkeypatch, full_disk,
                                                           hard_links):
    if not hard_links:  # FAT, some FUSE mounts: the lock is created, then written
        monkeypatch.setattr(os, "link", lambda *a: (_ for _ in ()).throw(
            OSError(errno.EPERM, "Operation not permitted")))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "log.txt").write_text("{}\n")
    with pytest.raises(UserError) as info:
        with run_lock(run_dir):
            pytest.fail("the lock was taken")
    assert full_disk, "the lock was never written"
    assert one_line(info) == (f"cannot lock the run directory {run_dir}: no space left on "
                              "its disk (or quota exceeded); free some space and run again")
    assert sorted(p.name for p in run_dir.iterdir()) == ["log.txt"]  # no .lock, no temporary
    # a run folder the lock created is removed again
    with pytest.raises(UserError, match="no space left"):
        with run_lock(tmp_path / "new" / "run"):
            pass
    assert list((tmp_path / "new").iterdir()) == []


def test_a_read_only_run_folder_is_one_line(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(UserError) as info:
        with run_lock(run_dir):
            pass
    assert one_line(info) == (f"cannot lock the run directory {run_dir}: Read-only file "
                              "system; check that the folder is writable")


def test_a_full_disk_at_the_lock_is_one_error_line_of_the_command(tiny_dataset, tiny_weights,
                                                                   tmp_path, full_disk,
                                                                   capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        run_seg_tuning.main([str(a) for a in (
            "--weights", tiny_weights, "--data_path", tiny_dataset, "--input_size", "32",
            "--patch_size", "16", "--batch_size", "2", "--num_workers", "0",
            "--base_output_dir", out, "--output_adapter", "linear", "--epochs", "1")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    assert err.startswith("error: cannot lock the run directory ") and err.count("\n") == 1
    assert "no space left" in err
    assert not [p for p in out.rglob("*") if p.is_file()]  # no empty .lock to block the next


@pytest.mark.parametrize("content, problem", [
    (b"", "is empty"), (b"{\"pi", "is not a lock this tool wrote"),
    (b"[1, 2]", "is not a lock this tool wrote"), (b"\xff\xfe", "is not text")])
def test_a_lock_naming_no_owner_says_how_to_clear_it(tmp_path, monkeypatch, content, problem):
    monkeypatch.setattr(lock, "SETTLE_S", 0.0)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    path = run_dir / ".lock"
    path.write_bytes(content)
    with pytest.raises(UserError) as info:
        with run_lock(run_dir):
            pytest.fail("an ownerless lock was taken over")
    assert one_line(info) == (f"the lock {path} {problem}, so it names no owner; delete "
                              f"{path} if no run_seg_tuning.py is running on {run_dir}")
    assert path.read_bytes() == content  # left for the user to judge
    path.unlink()  # as the message says
    with run_lock(run_dir):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists()


@pytest.mark.parametrize("hard_links", [True, False])
def test_the_lock_is_whole_and_exclusive(tmp_path, monkeypatch, hard_links):
    if not hard_links:
        monkeypatch.setattr(os, "link", lambda *a: (_ for _ in ()).throw(
            OSError(errno.ENOTSUP, "Operation not supported")))
    run_dir = tmp_path / "run"
    with run_lock(run_dir):
        held = json.loads((run_dir / ".lock").read_text())
        assert held["pid"] == os.getpid() and held["host"]
        assert hidden(run_dir) == [".lock"]  # the temporary it was written in is gone
        with pytest.raises(UserError, match=f"{run_dir} is in use by process {os.getpid()}"):
            with run_lock(run_dir):
                pass
        assert json.loads((run_dir / ".lock").read_text()) == held
    assert not run_dir.exists()  # it created the folder, nothing was written in it


# ----------------------------------------------------------------------------- negative values
@pytest.mark.parametrize("value", ["-1e-3", "-0.5e2", "-inf"])
def test_a_negative_value_after_a_space_says_how_to_write_it(value, capsys):
    with pytest.raises(SystemExit) as stop:
        run_seg_tuning.main(["--min_lr", value, "--epochs", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2
    assert [line for line in err if line.startswith("error:")] == [
        f"error: --min_lr: a negative value must be written --min_lr={value}; "
        f"{build_parser().prog} -h lists the options"]
    # written that way it parses
    parsed = build_parser().parse_args([f"--min_lr={value}"])
    assert parsed.min_lr == value


def test_an_option_missing_its_value_keeps_argparses_message(capsys):
    with pytest.raises(SystemExit):
        run_seg_tuning.main(["--min_lr", "--epochs", "2"])
    err = capsys.readouterr().err
    assert "argument --min_lr: expected one argument" in err and "negative" not in err


# ----------------------------------------------------------------------------- PEFT
@pytest.fixture
def fake_peft(tmp_path, monkeypatch):
    """Write a package ``peft`` whose __init__ is the given source, first on sys.path;
    the real peft (imported or not) is back in sys.modules after the test."""
    saved = {name: mod for name, mod in sys.modules.items()
             if name == "peft" or name.startswith("peft.")}
    for name in saved:
        monkeypatch.delitem(sys.modules, name)

    def install(source):
        package = tmp_path / "fake" / "peft"
        package.mkdir(parents=True)
        (package / "__init__.py").write_text(source)
        monkeypatch.syspath_prepend(str(package.parent))  # also invalidates import caches
        return package

    yield install
    for name in [n for n in sys.modules if n == "peft" or n.startswith("peft.")]:
        if name not in saved:
            del sys.modules[name]


@pytest.mark.parametrize("source, reason", [
    ("raise RuntimeError('CUDA driver version is insufficient\\nmore detail')",
     "RuntimeError: CUDA driver version is insufficient"),
    ("import transformers_that_is_not_there", "ModuleNotFoundError: No module named "
                                              "'transformers_that_is_not_there'"),
    ("from os import no_such_name", "ImportError: cannot import name 'no_such_name' from 'os'"),
])
def test_peft_that_fails_to_import_says_why(fake_peft, source, reason):
    fake_peft(source)
    with pytest.raises(UserError) as info:
        lora.import_peft()
    text = one_line(info)
    assert text.startswith("--tuning lora: Hugging Face's PEFT library is installed but "
                           f"fails to import ({reason}")
    assert "not installed" not in text and "pip install --force-reinstall peft" in text
    assert "peft" not in sys.modules


def test_a_module_named_peft_that_is_not_peft(fake_peft):
    package = fake_peft("VERSION = 'mine'\n")
    with pytest.raises(UserError, match=f"peft imported from {package / '__init__.py'} is not "
                                        "Hugging Face's PEFT"):
        lora.import_peft()


def test_peft_not_installed_says_so(fake_peft, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import raises ModuleNotFoundError
    with pytest.raises(UserError) as info:
        lora.import_peft()
    assert one_line(info) == ("--tuning lora needs Hugging Face's PEFT library, which is not "
                              f"installed: {lora.LORA_EXTRA}")


# ----------------------------------------------------------------------------- run_seg_predict
def test_predict_paths_may_start_with_a_tilde(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    args = run_seg_predict.build_parser().parse_args(
        ["--run_dir", "~/run", "-i", "~/a", "~/b.png", "-o=~/masks", "--weights", "~/w.pth"])
    assert (args.run_dir, args.input, args.output, args.weights) == (
        [str(tmp_path / "run")], [str(tmp_path / "a"), str(tmp_path / "b.png")],
        str(tmp_path / "masks"), str(tmp_path / "w.pth"))


class FakePredictor:
    """What write_predictions reads of a Predictor: a mask of the B-scan's size per input,
    of value 100 (or raising on a file named broken*)."""

    def __init__(self, run_dir):
        self.run_dir, self.epoch, self.device = run_dir, 3, "cpu"
        self.classes = SimpleNamespace(values=(0, 100), labels=("Background", "Layer"),
                                       entries=lambda: [[0, "Background"], [100, "Layer"]])

    def describe(self):
        return f"{self.run_dir.name} (checkpoint of epoch {self.epoch})"

    def record(self):
        return {"runs": [{"run_dir": str(self.run_dir), "checkpoint": "checkpoint-best.pth",
                          "checkpoint_sha256": "0" * 64, "epoch": self.epoch}],
                "tta": "none"}

    def iter_predictions(self, paths, probabilities, dtype):
        for path in paths:
            if Path(path).name.startswith("broken"):
                raise UserError(f"{path} is not a readable image")
            yield np.full((4, 6), 100, np.uint8), None


@pytest.fixture
def scans(tmp_path, monkeypatch):
    """A folder of two B-scans, and load_run answering a FakePredictor."""
    from mirage.train import predictor
    monkeypatch.setattr(predictor, "load_run", lambda run_dir, **kw: FakePredictor(
        Path(run_dir)))
    folder = tmp_path / "scans"
    folder.mkdir()
    for stem in ("a", "b"):
        fileio.write_png(folder / f"{stem}.png", np.zeros((4, 6), np.uint8))
    return folder


def predict(*args):
    try:
        run_seg_predict.main([str(a) for a in ("--run_dir", "run", *args)])
    except SystemExit as stop:
        return stop.code
    return 0


def test_a_symlinked_output_is_written_through_the_link(scans, tmp_path):
    real, link = tmp_path / "outputs" / "masks", tmp_path / "masks"
    real.parent.mkdir()
    assert predict("-i", scans, "-o", real) == 0
    link.symlink_to(real, target_is_directory=True)
    (scans / "a.png").unlink()
    fileio.write_png(scans / "c.png", np.zeros((4, 6), np.uint8))
    assert predict("-i", scans, "-o", link) == 0
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert sorted(p.name for p in real.iterdir()) == ["b.png", "c.png",
                                                      "prediction_record.json"]
    assert hidden(real.parent) == [] and hidden(tmp_path) == []


def mount_at(monkeypatch, folder):
    """Make ``folder`` a mount point: os.path.ismount says so, and rename() of it fails."""
    folder = Path(folder).resolve()
    real_ismount, real_replace = os.path.ismount, os.replace
    monkeypatch.setattr(os.path, "ismount",
                        lambda p: Path(p).resolve() == folder or real_ismount(p))

    def replace(src, dst, **kwargs):
        if folder in (Path(src).resolve(), Path(dst).resolve()):
            raise OSError(errno.EBUSY, "Device or resource busy")
        return real_replace(src, dst, **kwargs)
    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("detected", [True, False])
def test_a_mount_point_output_is_written_into(scans, tmp_path, monkeypatch, detected):
    mount = tmp_path / "mnt"
    mount.mkdir()
    mount_at(monkeypatch, mount)
    own = ["lost+found"] if detected else []  # a fresh file system's, at its mount point
    if detected:
        (mount / "lost+found").mkdir()
    else:  # a bind mount that ismount misses: only the rename is refused
        monkeypatch.setattr(os.path, "ismount", lambda p: False)
    assert predict("-i", scans, "-o", mount) == 0
    assert sorted(p.name for p in mount.iterdir()) == ["a.png", "b.png", *own,
                                                       "prediction_record.json"]
    before = {p.name: p.read_bytes() for p in mount.iterdir() if p.is_file()}
    # a failure while predicting leaves the earlier output as it was, and no temporaries
    fileio.write_png(scans / "broken.png", np.zeros((4, 6), np.uint8))
    assert predict("-i", scans, "-o", mount) == 2
    assert {p.name: p.read_bytes() for p in mount.iterdir() if p.is_file()} == before
    assert hidden(mount) == [] and hidden(tmp_path) == []
    # an earlier output is replaced: what the new run does not write goes, lost+found stays
    (scans / "broken.png").unlink()
    (scans / "a.png").unlink()
    assert predict("-i", scans, "-o", mount) == 0
    assert sorted(p.name for p in mount.iterdir()) == ["b.png", *own,
                                                       "prediction_record.json"]
    assert json.loads((mount / "prediction_record.json").read_text())["files"] == ["b.png"]
    assert hidden(mount) == [] and hidden(tmp_path) == []


def test_a_mount_point_with_the_users_files_is_refused(scans, tmp_path, monkeypatch, capsys):
    mount = tmp_path / "mnt"
    mount.mkdir()
    (mount / "notes.txt").write_text("mine")
    mount_at(monkeypatch, mount)
    assert predict("-i", scans, "-o", mount) == 2
    assert "holds files run_seg_predict.py did not write (notes.txt)" in capsys.readouterr().err
    assert [p.name for p in mount.iterdir()] == ["notes.txt"]


def test_a_killed_write_into_a_mount_point_does_not_block_the_next(scans, tmp_path,
                                                                   monkeypatch):
    mount = tmp_path / "mnt"
    (mount / f"{fileio.IN_PLACE_PREFIX}x1.partial").mkdir(parents=True)
    mount_at(monkeypatch, mount)
    assert predict("-i", scans, "-o", mount) == 0
    assert sorted(p.name for p in mount.iterdir()) == ["a.png", "b.png",
                                                       "prediction_record.json"]


def test_an_output_that_cannot_be_written_names_it_not_another_commands_option(
        scans, tmp_path, monkeypatch, capsys):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    out = tmp_path / "masks"
    assert predict("-i", scans, "-o", out) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--base_output_dir" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: cannot write {out}: Permission denied; check the permissions of {tmp_path} "
        "or write somewhere else"]


def test_a_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real_replace = os.replace

    def replace(src, dst, **kwargs):
        if Path(dst) == target and Path(src).name.endswith(".partial"):
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(src, dst, **kwargs)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(UserError, match=f"cannot replace {target} by its new version: Input"):
        with fileio.atomic_folder(target) as staging:
            (staging / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["old.txt"] and hidden(tmp_path) == []


def test_writing_into_a_mount_point_replaces_files_and_folders_by_either(tmp_path,
                                                                         monkeypatch):
    mount = tmp_path / "mnt"
    mount.mkdir()
    (mount / "a").mkdir()
    (mount / "a" / "old.txt").write_text("old")
    (mount / "b").write_text("old")
    (mount / "c").write_text("old")
    mount_at(monkeypatch, mount)
    with fileio.atomic_folder(mount) as staging:
        assert staging.parent == mount  # on the mount's own file system
        (staging / "a").write_text("new")
        (staging / "b").mkdir()
        (staging / "b" / "new.txt").write_text("new")
    assert (mount / "a").read_text() == "new" and (mount / "b" / "new.txt").read_text() == "new"
    assert sorted(p.name for p in mount.iterdir()) == ["a", "b"]
