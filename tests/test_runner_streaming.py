"""Grid size: ./runner counts the commands without building them and refuses a grid over
its job limit at once (docs/runner.md, "Grid size"); under the limit it runs as before."""
import contextlib
import itertools
import os
import random
import signal
import time
import tracemalloc

import pytest

from mirage.grid import checks, expand, runner
from mirage.grid.expand import build_grid
from test_runner import env, records, run  # noqa: F401  (env is a fixture)

# Nine options of ten values each: 10^9 combinations, a typo away from a real grid.
BILLION = [tok for k in range(9) for tok in [f"--o{k}"] + [str(v) for v in range(10)]]


@contextlib.contextmanager
def deadline(seconds):
    """Fail (instead of hanging) when the block is still running after ``seconds``."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def refused(argv, capsys):
    """Run the runner on ``argv``; (its one error line, seconds taken, peak traced bytes)."""
    tracemalloc.start()
    start = time.monotonic()
    try:
        with deadline(3), pytest.raises(SystemExit) as exc:
            runner.main(argv)
        seconds, peak = time.monotonic() - start, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0], seconds, peak


def test_a_grid_of_a_billion_commands_is_refused_at_once(env, capsys):
    line, seconds, peak = refused(env["base"] + ["--"] + BILLION, capsys)
    assert seconds < 1 and peak < 10 * 2 ** 20  # nothing was built
    axes = ", ".join(f"--o{k} x10" for k in range(9))
    assert line == (f"error: the grid has 1000000000 commands ({axes}); one ./runner call "
                    "runs at most 100000 commands: narrow the grid with fewer values per "
                    "option or a --runner-filter, or split it into several ./runner calls")
    assert records(env["out"]) == [] and os.listdir(env["work"]) == []  # no log folder


def test_a_filtered_billion_is_counted_exactly_and_refused_at_once(env, capsys):
    argv = env["base"] + ["--runner-filter", "o0=1,o1=2", "o3=4", "--"] + BILLION
    line, seconds, peak = refused(argv, capsys)
    assert seconds < 1 and peak < 10 * 2 ** 20
    # o0=1 with o1=2: 10^7 removed; o3=4: 10^8; both at once counted once: 10^6
    assert "the grid has 891000000 commands (" in line
    assert "1000000000 combinations, 109000000 removed by --runner-filter)" in line


def test_a_grid_under_the_limit_runs_as_before(env, capsys, monkeypatch):
    monkeypatch.setattr(checks, "MAX_JOBS", 5)
    argv = env["base"] + ["--runners", "3", "--runner-log", str(env["logs"]), "--",
                          "--a", "1", "2", "3", "--b", "x", "y", "z"]
    line, _, _ = refused(argv, capsys)
    assert line.startswith("error: the grid has 9 commands (--a x3, --b x3); one ./runner "
                           "call runs at most 5 commands")
    # A filter that brings it under the limit lets it run: 9 - 3 (a=1) - 2 (b=x, a!=1) = 4
    filtered = argv[:2] + ["--runner-filter", "a=1", "b=x"] + argv[2:]
    assert run(filtered) == 0
    assert "4 command(s), 5 removed by --runner-filter" in capsys.readouterr().out
    ran = sorted(tuple(r["argv"][1::2]) for r in records(env["out"]))
    assert ran == [(a, b) for a in "23" for b in "yz"]


def test_filters_too_intricate_to_count_are_refused(env, capsys, monkeypatch):
    monkeypatch.setattr(checks, "MAX_JOBS", 5)
    monkeypatch.setattr(expand, "MAX_FILTER_WORK", 10)
    argv = env["base"] + ["--runner-filter", "a=1,b=x", "a=2,b=y", "--",
                          "--a", "1", "2", "3", "--b", "x", "y", "z"]
    line, _, _ = refused(argv, capsys)
    assert line.startswith("error: the grid has 9 combinations (--a x3, --b x3), and its "
                           "--runner-filter groups are too many to count what they leave;")


def test_runner_info_lists_a_grid_over_the_limit_and_says_it_would_be_refused(
        env, capsys, monkeypatch):
    monkeypatch.setattr(checks, "MAX_JOBS", 3)
    monkeypatch.setattr(runner, "MAX_JOBS", 3)
    assert runner.main(env["base"] + ["--runner-info", "--", "--a", "1", "2", "--b",
                                      "x", "y"]) == 0
    out = capsys.readouterr().out
    assert out.count("] ") == 4
    assert "runner: more than the 3 commands one ./runner call runs" in out


def random_grid(rng):
    """A small random grid with filters written every way (value, last path part, option=)."""
    argv, pairs = ["prog"], []
    filters = []
    axes = []
    for a in range(rng.randint(1, 4)):
        values = list(dict.fromkeys(rng.choice(["p", "q", "r", f"d{a}/p", "s/t"])
                                    for _ in range(rng.randint(1, 4))))
        axes += [f"--a{a}", *values]
        pairs += [(f"a{a}", v) for v in values]
    for _ in range(rng.randint(0, 3)):
        items = []
        for _ in range(rng.randint(1, 3)):
            option, value = rng.choice(pairs)
            items.append(rng.choice([value, f"{option}={value}", value.split("/")[-1]]))
        filters.append(",".join(items))
    if filters:
        argv += ["--runner-filter", *filters]
    return argv + ["--", "--flag"] + axes


def test_the_count_matches_the_listing():
    rng = random.Random(7)
    for _ in range(300):
        grid = build_grid(random_grid(rng))
        assert grid.count_jobs() == sum(1 for _ in grid.iter_jobs()), grid.options.filters


def test_the_count_of_a_huge_grid_needs_no_listing():
    axes = [tok for k in range(12) for tok in [f"--o{k}"] + [str(v) for v in range(10)]]
    grid = build_grid(["prog", "--runner-filter", "o0=1,o11=2", "--"] + axes)
    start = time.monotonic()
    assert grid.count_jobs() == 10 ** 12 - 10 ** 10
    assert time.monotonic() - start < 1
    first = list(itertools.islice(grid.iter_jobs(), 3))  # listing stays lazy
    assert [job.index for job in first] == [1, 2, 3]
