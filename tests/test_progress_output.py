"""Progress output (mirage/progress.py): tqdm's live bar on a terminal, plain lines
anywhere else, at most one every PLAIN_INTERVAL_S seconds (or TQDM_MININTERVAL), plus the
bar's final line, never a carriage return; and every loop of the package uses it."""
import ast
import io
import os
import re
import subprocess
import sys

import pytest
from tqdm import std as tqdm_std
from tqdm import tqdm

from conftest import REPO, make_dataset
from mirage import progress as progress_module
from mirage.progress import PLAIN_INTERVAL_S, PlainProgress, plain_interval, progress


class FakeClock:
    """Stands in for the clock tqdm reads (``tqdm.std.time``): time moves only by
    ``advance``."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(tqdm_std, "time", fake)
    for name in ("TQDM_MININTERVAL", "TQDM_DELAY"):
        monkeypatch.delenv(name, raising=False)
    return fake


class FakeTerminal(io.StringIO):
    def isatty(self):
        if self.closed:  # as a real stream
            raise ValueError("I/O operation on closed file")
        return True


def ticking(clock, count, seconds=1.0):
    """``range(count)`` that takes ``seconds`` per item on ``clock``."""
    for i in range(count):
        clock.advance(seconds)
        yield i


def counts(text):
    """The ``n`` of each progress line ('desc:  30%|...| 30/100 [...]' -> 30)."""
    return [int(re.search(r" (\d+)/\d+ \[", line).group(1)) for line in text.splitlines()]


def test_in_a_file_one_line_per_interval_and_the_final_line(clock):
    out = io.StringIO()
    bar = progress(ticking(clock, 100), total=100, desc="loop", file=out)
    assert type(bar) is PlainProgress and bar.mininterval == PLAIN_INTERVAL_S == 30.0
    for i in bar:
        bar.set_postfix(step=i)  # a redraw asked for at every step: still one a line due
    text = out.getvalue()
    assert "\r" not in text and text.endswith("\n")
    assert counts(text) == [30, 60, 90, 100]  # no line at 0%, one per 30 s, the last
    assert all(line.startswith("loop: ") for line in text.splitlines())
    assert "100/100 [01:40<00:00" in text.splitlines()[-1]


def test_a_short_bar_in_a_file_writes_its_final_line_only(clock):
    out = io.StringIO()
    with progress(total=5, desc="short", unit="job", file=out) as bar:
        for _ in range(5):
            clock.advance(1.0)
            bar.update()
    assert out.getvalue().count("\n") == 1 and "5/5" in out.getvalue()


def test_a_transient_bar_in_a_file_is_silent_when_short_and_finishes_when_long(clock):
    short, long = io.StringIO(), io.StringIO()
    for _ in progress(ticking(clock, 10), total=10, leave=False, file=short):
        pass
    assert short.getvalue() == ""  # a terminal would show nothing once it ended either
    for _ in progress(ticking(clock, 70), total=70, leave=False, file=long):
        pass
    assert "\r" not in long.getvalue()
    assert counts(long.getvalue()) == [30, 60, 70]  # not left at a stale 86%


def test_the_interval_comes_from_tqdm_mininterval(clock, monkeypatch):
    monkeypatch.setenv("TQDM_MININTERVAL", "10")
    assert plain_interval() == 10.0
    out = io.StringIO()
    for _ in progress(ticking(clock, 35), total=35, file=out):
        pass
    assert counts(out.getvalue()) == [10, 20, 30, 35]
    monkeypatch.setenv("TQDM_MININTERVAL", "soon")
    assert plain_interval() == PLAIN_INTERVAL_S  # not a number: the default


def test_delay_still_holds_a_bar_back_in_a_file(clock):
    out = io.StringIO()
    for _ in progress(ticking(clock, 20), total=20, delay=30, file=out):
        pass
    assert out.getvalue() == ""  # ran 20 s of a 30 s delay: never shown, as on a terminal
    for _ in progress(ticking(clock, 40), total=40, delay=30, file=out):
        pass
    assert counts(out.getvalue()) == [30, 40]  # from 30 s on, as without a delay


def test_tqdm_write_beside_a_plain_bar_adds_no_bar_line(clock):
    out = io.StringIO()
    for i in progress(ticking(clock, 100), total=100, desc="loop", file=out):
        if i % 10 == 0:
            tqdm.write(f"message {i}", file=out)  # how mirage/train/runtime.py logs
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert [line for line in lines if line.startswith("message")] == \
        [f"message {i}" for i in range(0, 100, 10)]
    assert counts("\n".join(line for line in lines if line.startswith("loop"))) == \
        [30, 60, 90, 100]


def test_on_a_terminal_the_bar_is_tqdms_own(clock):
    screen = FakeTerminal()
    bar = progress(ticking(clock, 5), total=5, desc="live", file=screen)
    assert type(bar) is tqdm  # today's behaviour, unchanged
    for _ in bar:
        pass
    text = screen.getvalue()
    assert text.startswith("\rlive:   0%")  # drawn at once, then redrawn in place
    assert text.count("\r") >= 2 and "5/5" in text


def test_a_closed_or_odd_stream_is_no_terminal():
    closed = FakeTerminal()
    closed.close()
    assert not progress_module.is_terminal(closed)
    assert not progress_module.is_terminal(object())
    assert progress_module.is_terminal(FakeTerminal())


def test_every_loop_of_the_package_uses_the_factory():
    """No module but mirage/progress.py makes a tqdm bar itself (``tqdm.write`` is fine)."""
    makers = {"tqdm", "trange"}
    found = []
    for path in sorted((REPO / "mirage").rglob("*.py")) + sorted(REPO.glob("run_*.py")):
        if path == REPO / "mirage" / "progress.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else \
                    func.attr if isinstance(func, ast.Attribute) else None
                if name in makers:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert found == []


def run_check_data(dataset, tmp_path, **env):
    """run_seg_check_data.py on ``dataset`` with stderr in a file; the file's bytes."""
    err_path = tmp_path / "stderr.txt"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TQDM_")}
    with open(err_path, "wb") as err:
        done = subprocess.run([sys.executable, str(REPO / "run_seg_check_data.py"),
                               "--data_path", str(dataset), "--num_workers", "1"],
                              stdout=subprocess.PIPE, stderr=err, cwd=tmp_path,
                              env={**environ, **env}, timeout=300)
    assert done.returncode == 0, err_path.read_text()
    return err_path.read_bytes()  # bytes: read_text would turn \r into \n


def test_a_real_command_writes_no_carriage_return_into_a_file(tmp_path):
    # 50+ B-scans: the dataset check shows its bar (mirage/data/layout.py)
    dataset = make_dataset(tmp_path / "datasets", splits={"train": 56, "val": 4, "test": 4},
                           size=(16, 24))
    every_redraw = run_check_data(dataset, tmp_path, TQDM_MININTERVAL="0")
    assert b"checking Tiny:" in every_redraw and b"64/64" in every_redraw
    assert b"\r" not in every_redraw
    default = run_check_data(dataset, tmp_path)
    assert b"\r" not in default and b"checking Tiny" not in default  # short, transient


def test_the_runners_job_logs_get_the_toolkits_bars_as_plain_lines(tmp_path, monkeypatch):
    """The runner's TQDM_* variables (mirage/grid/one_command.py) reach the toolkit's bars:
    a 30 s delay keeps a short bar out of the job's log, and nothing is ever a \\r."""
    from mirage.grid import runner
    for name in (runner.FAKE_GPUS_ENV, runner.CLUSTER_ENV, "TQDM_DELAY", "TQDM_MININTERVAL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get(
        "PYTHONPATH", "")]))
    monkeypatch.chdir(tmp_path)
    job = tmp_path / "bars.py"
    job.write_text("import sys, time\nfrom mirage.progress import progress\n"
                   "bar = progress(range(20), desc='steps')\n"
                   "print(type(bar).__name__, bar.delay, bar.mininterval, flush=True)\n"
                   "for _ in bar:\n    time.sleep(0.01)\nprint('finished')\n")
    logs = tmp_path / "logs"
    assert runner.main([sys.executable, str(job), "--runner-log", str(logs), "--",
                        "--v", "1"], poll_s=0.02) == 0
    text = next(logs.glob("*.log")).read_bytes()
    assert b"PlainProgress 30.0 30.0" in text and b"finished" in text
    assert b"\r" not in text and b"steps" not in text
