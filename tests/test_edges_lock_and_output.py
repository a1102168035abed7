"""Edges QA found: a full disk or a read-only folder while taking a run's lock, a lock file
that names no owner, a negative number after an option, and PEFT that is installed but
does not import."""
import errno
import json
import os
import sys
import tempfile
from pathlib import Path

import pytest

import run_seg_tuning
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
        lora._import_peft()
    text = one_line(info)
    assert text.startswith("--tuning lora: Hugging Face's PEFT library is installed but "
                           f"fails to import ({reason}")
    assert "not installed" not in text and "pip install --force-reinstall peft" in text
    assert "peft" not in sys.modules


def test_a_module_named_peft_that_is_not_peft(fake_peft):
    package = fake_peft("VERSION = 'mine'\n")
    with pytest.raises(UserError, match=f"peft imported from {package / '__init__.py'} is not "
                                        "Hugging Face's PEFT"):
        lora._import_peft()


def test_peft_not_installed_says_so(fake_peft, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import raises ModuleNotFoundError
    with pytest.raises(UserError) as info:
        lora._import_peft()
    assert one_line(info) == ("--tuning lora needs Hugging Face's PEFT library, which is not "
                              f"installed: {lora.LORA_EXTRA}")
