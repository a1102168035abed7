"""One-line errors for input a user can fix: a study's output folder that cannot be made,
a checkpoint file that is no checkpoint (told apart from one that would run code), and
sizes in the feature cache's messages that read as sizes (not "0.00 GB")."""
import errno
import pickle
import random
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from mirage import checkpoint_io as ckpt
from mirage.errors import UserError
from mirage.report import study_outputs
from mirage.report.study_outputs import write_study
from mirage.report_cli import main as report_main
from mirage.train import feature_cache as fc
from mirage.units import format_size
from test_feature_cache import Dataset, identity, open_cache


def one_line(err):
    text = str(err.value)
    assert "\n" not in text, text
    return text


# ----------------------------------------------------------------------------- study folder


@pytest.fixture
def one_run(tmp_path):
    """A folder holding one (unevaluated) run directory: enough to reach the output."""
    run = tmp_path / "runs" / "run1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 1\n")
    return tmp_path / "runs"


def study(runs, output_dir):
    return write_study([runs], output_dir, quiet=True, run_reports="none")


def test_output_folder_under_a_file_is_a_one_line_error(one_run, tmp_path, capsys):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder\n")
    with pytest.raises(UserError) as err:
        study(one_run, blocker / "study")
    assert one_line(err) == (f"--output_dir {blocker / 'study'}: cannot create the folder "
                             f"(Not a directory: {blocker} is a file); choose a folder you "
                             "can write to with -o")
    # The command line: exit 2, one line on stderr, no traceback.
    with pytest.raises(SystemExit) as exc:
        report_main([str(one_run), "-o", str(blocker / "a" / "b"), "--run_reports", "none"])
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"error: --output_dir {blocker / 'a' / 'b'}: cannot create the folder "
                     f"(Not a directory: {blocker} is a file); choose a folder you can "
                     "write to with -o"]


def test_output_folder_without_permission_is_a_one_line_error(one_run, tmp_path,
                                                              monkeypatch):
    # Tests run as root, whom chmod does not stop: the refusal is simulated.
    def refuse(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    out = tmp_path / "study"
    with pytest.raises(UserError) as err:
        study(one_run, out)
    assert one_line(err) == (f"--output_dir {out}: cannot create the folder (Permission "
                             "denied); choose a folder you can write to with -o")

    def refuse_parent(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self.parent))

    monkeypatch.setattr(Path, "mkdir", refuse_parent)
    with pytest.raises(UserError) as err:
        study(one_run, out)
    assert f"(Permission denied at {tmp_path})" in one_line(err)


def test_existing_read_only_output_folder_is_a_one_line_error(one_run, tmp_path,
                                                              monkeypatch):
    out = tmp_path / "study"
    out.mkdir()
    monkeypatch.setattr(study_outputs.os, "access", lambda path, mode: False)
    with pytest.raises(UserError) as err:
        study(one_run, out)
    assert one_line(err) == (f"--output_dir {out}: the folder is not writable; choose a "
                             "folder you can write to with -o")


# ----------------------------------------------------------------------------- checkpoints


class Gadget:
    """A custom class: unpickling it needs code outside the allow-list."""

    def __init__(self):
        self.value = 3


def real_checkpoint(path, legacy=False):
    torch.save({"model": {"w": torch.arange(4096.0)}, "epoch": 3}, path,
               _use_new_zipfile_serialization=not legacy)
    return path


def test_a_checkpoint_that_asks_for_code_is_refused(tmp_path):
    for legacy in (False, True):
        path = tmp_path / f"checkpoint-best{'-legacy' if legacy else ''}.pth"
        torch.save({"model": {"w": torch.zeros(2)}, "extra": Gadget()}, path,
                   _use_new_zipfile_serialization=not legacy)
        with pytest.raises(UserError) as err:
            ckpt.load_file(path, what="checkpoint")
        assert one_line(err) == (
            f"checkpoint {path}: refused: loading it would run arbitrary code (its pickle "
            f"asks for {Gadget.__module__}.Gadget, which is not on the allow-list); re-save "
            "its tensors with torch.save(state_dict)")


def damaged(path):
    with pytest.raises(UserError) as err:
        ckpt.load_file(path, what="checkpoint")
    text = one_line(err)
    assert "arbitrary code" not in text and "refused" not in text, text
    prefix = f"checkpoint {path}: not a PyTorch checkpoint, or a damaged or truncated one ("
    assert text.startswith(prefix) and text.endswith("); save or download it again"), text
    return text[len(prefix):-len("); save or download it again")]


def test_random_bytes_are_not_a_checkpoint_not_code(tmp_path):
    path = tmp_path / "checkpoint-best.pth"
    for seed in range(20):  # random bytes used to read as a pickle asking for code
        data = random.Random(seed).randbytes(4096)
        if data.startswith(b"PK") or data[:1] == b"\x80":
            continue
        path.write_bytes(data)
        assert damaged(path) == ("neither a zip archive nor a torch.save pickle; it starts "
                                 f"with {data[:12]!r}")


def test_text_empty_and_plain_pickle_files_are_not_checkpoints(tmp_path):
    text = tmp_path / "text.pth"
    text.write_text("<!DOCTYPE html><html>404 Not Found</html>\n")  # a failed download
    assert damaged(text) == ("neither a zip archive nor a torch.save pickle; it starts with "
                             "b'<!DOCTYPE ht'")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    assert damaged(empty) == "the file is empty"
    plain = tmp_path / "plain.pth"
    plain.write_bytes(pickle.dumps({"w": [1, 2]}, protocol=4))
    assert damaged(plain) == "a Python pickle, but not one written by torch.save"


def test_truncated_checkpoints_are_damaged_not_code(tmp_path):
    whole = real_checkpoint(tmp_path / "whole.pth")
    assert ckpt.load_file(whole)["epoch"] == 3
    cut = tmp_path / "cut.pth"
    cut.write_bytes(whole.read_bytes()[:whole.stat().st_size // 2])
    assert damaged(cut) == "a zip archive whose end is missing"
    legacy = real_checkpoint(tmp_path / "legacy.pth", legacy=True)
    assert ckpt.load_file(legacy)["epoch"] == 3
    cut.write_bytes(legacy.read_bytes()[:legacy.stat().st_size // 2])
    assert damaged(cut).startswith(("EOFError: ", "UnpicklingError: ", "RuntimeError: "))


# ----------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("num_bytes, text", [
    (0, "0 B"), (1, "1 B"), (999, "999 B"),
    (1000, "1.00 kB"), (20_000, "20.00 kB"), (28_672, "28.67 kB"),  # 28672 / 1000
    (999_994, "999.99 kB"), (999_995, "1.00 MB"),  # would round to "1000.00 kB"
    (1_500_000, "1.50 MB"), (12_345_678_901, "12.35 GB"), (5 * 10 ** 12, "5.00 TB"),
])
def test_sizes_are_readable_at_every_scale(num_bytes, text):
    assert format_size(num_bytes) == text


def test_small_sizes_in_the_space_error_are_not_zero(tiny_dataset, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    # 8 views of 6 x 128 float16 tokens (1536 B) + 2048 B each: 28672 B needed
    monkeypatch.setattr(fc.shutil, "disk_usage", lambda path: usage(10**6, 10**6, 20000))
    with pytest.raises(UserError) as err:
        open_cache(tmp_path, Dataset(tiny_dataset))
    assert ("the cache needs about 28.67 kB more for 8 views but only 20.00 kB are free; "
            "free some space") in one_line(err)


def test_small_sizes_in_the_memory_error_are_not_zero(tiny_dataset, monkeypatch):
    monkeypatch.setattr(fc, "_memory_available", lambda: 10_000)
    cache = fc.FeatureCache(fc.CacheSpec("ram", identity()), Dataset(tiny_dataset), 2)
    with pytest.raises(UserError) as err:
        cache.check_memory()
    assert "but 10.00 kB are available" in one_line(err)
