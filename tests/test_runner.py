"""The grid runner: expansion, filtering, local pool, GPUs, retries, SLURM via submitit.

The jobs are a tiny Python "recorder" that writes its argv, CUDA_VISIBLE_DEVICES and
start/end times as JSON, so the tests see exactly what each child received and when.
"""
import glob
import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mirage import runner
from mirage.errors import UserError
from mirage.grid import build_grid, parse_slurm_time

REPO = Path(__file__).resolve().parents[1]
RUNNER_SCRIPT = REPO / "runner"

# The child every test runs. Options it acts on: --code N (exit status), --sleep S,
# --fail-first KEY (fail the first time it sees KEY, succeed after). Anything else is
# only recorded.
RECORDER = r'''
import json, os, sys, time, uuid
out = os.environ["RUNNER_TEST_OUT"]
args = sys.argv[1:]
start = time.time()
open(os.path.join(out, f"{os.getpid()}.started"), "w").close()
def value(name, default):
    return args[args.index(name) + 1] if name in args else default
time.sleep(float(value("--sleep", 0)))
record = {"argv": args, "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
          "start": start, "end": time.time(), "pid": os.getpid()}
with open(os.path.join(out, uuid.uuid4().hex + ".json"), "w") as f:
    json.dump(record, f)
print("recorded", args, flush=True)
key = value("--fail-first", None)
if key is not None:
    marker = os.path.join(out, "seen_" + key)
    if not os.path.exists(marker):
        open(marker, "w").close()
        sys.exit(1)
sys.exit(int(value("--code", 0)))
'''


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A recorder script, its output folder and a log folder; cwd is a scratch folder."""
    script = tmp_path / "recorder.py"
    script.write_text(RECORDER)
    out = tmp_path / "records"
    out.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("RUNNER_TEST_OUT", str(out))
    monkeypatch.delenv(runner.FAKE_GPUS_ENV, raising=False)
    monkeypatch.delenv(runner.CLUSTER_ENV, raising=False)
    monkeypatch.chdir(work)
    return {"base": [sys.executable, str(script)], "out": out, "logs": tmp_path / "logs",
            "work": work}


def records(out):
    return [json.loads(Path(p).read_text()) for p in sorted(glob.glob(f"{out}/*.json"))]


def overlaps(a, b):
    return a["start"] < b["end"] and b["start"] < a["end"]


def max_concurrent(recs):
    """Most recorded intervals alive at one instant (checked at every start time)."""
    return max(sum(r["start"] <= a["start"] < r["end"] for r in recs) for a in recs)


def run(argv):
    return runner.main(argv, poll_s=0.02)


# ----------------------------------------------------------------------------- expansion


def test_expansion_is_the_cartesian_product_with_flags_in_every_command():
    argv = ["--runners", "2", "python", "train.py", "--epochs", "3", "--runner-info", "--",
            "--weights", "a.pth", "b.pth", "--fp16", "--data_path", "d1/", "d2/", "d3/",
            "--lr=0.1", "-s", "-1"]
    grid = build_grid(argv)
    assert grid.base == ["python", "train.py", "--epochs", "3"]  # runner options removed
    assert grid.options.runners == 2 and grid.options.info
    expected = []
    for weights in ["a.pth", "b.pth"]:  # first option varies slowest
        for data in ["d1/", "d2/", "d3/"]:
            expected.append(["python", "train.py", "--epochs", "3", "--weights", weights,
                             "--fp16", "--data_path", data, "--lr=0.1", "-s", "-1"])
    assert [job.command for job in grid.jobs] == expected
    assert grid.num_combinations == 6
    assert [job.index for job in grid.jobs] == [1, 2, 3, 4, 5, 6]
    assert grid.jobs[4].name == "b.pth_d2"  # log names: the values that differ
    assert len({job.name for job in grid.jobs}) == 6


def test_filter_drops_every_combination_holding_all_values_of_a_group():
    weights = ["./w/MIRAGE-Base.pth", "./w/MIRAGE-Large.pth"]
    data = ["./d/AROI/", "./d/Duke_DME/"]
    losses = ["CE", "CEGDice"]
    argv = (["python", "t.py", "--runner-filter", "MIRAGE-Large.pth,AROI", "loss=CE,Duke_DME",
             "--runners", "1", "--", "--weights"] + weights + ["--data_path"] + data
            + ["--loss"] + losses)
    grid = build_grid(argv)
    assert grid.num_combinations == 8
    kept = {(c[c.index("--weights") + 1], c[c.index("--data_path") + 1], c[c.index("--loss") + 1])
            for c in (job.command for job in grid.jobs)}
    expected = {combo for combo in itertools.product(weights, data, losses)
                if not (combo[0].endswith("Large.pth") and "AROI" in combo[1])
                and not (combo[2] == "CE" and "Duke_DME" in combo[1])}
    assert kept == expected and len(kept) == 4


def test_filter_value_that_matches_nothing_is_an_error():
    with pytest.raises(UserError, match="MIRAGE-Larg.pth"):
        build_grid(["python", "t.py", "--runner-filter", "MIRAGE-Larg.pth,AROI", "--",
                    "--weights", "MIRAGE-Large.pth", "--data_path", "AROI"])


def test_slurm_time_formats():
    assert parse_slurm_time("90") == 90
    assert parse_slurm_time("12:00:00") == 720
    assert parse_slurm_time("1:30") == 90
    assert parse_slurm_time("2-01:00:30") == 2 * 1440 + 60 + 1
    with pytest.raises(UserError):
        parse_slurm_time("soon")


# ----------------------------------------------------------------------------- local runs

ODD_VALUES = ["two words", "it's", 'say "hi"', "$(touch pwned1)", "`touch pwned2`",
              "a;touch pwned3", "x|y&z>out.txt", "*", "back\\slash", "tab\there", "ünï",
              "", "-1", "-.5"]


def test_values_with_spaces_and_shell_metacharacters_reach_the_child_unchanged(env):
    argv = env["base"] + ["--runners", "2", "--runner-log", str(env["logs"]), "--",
                          "--v"] + ODD_VALUES + ["--w", "a b", "c"]
    assert run(argv) == 0
    got = sorted(json.dumps(r["argv"]) for r in records(env["out"]))
    want = sorted(json.dumps(["--v", v, "--w", w]) for v in ODD_VALUES for w in ["a b", "c"])
    assert got == want
    # Nothing went through a shell: no file appeared where a shell would have made one.
    assert sorted(os.listdir(env["work"])) == []


def test_parallel_run_with_a_failing_job_reports_it_and_exits_nonzero(env, capsys):
    argv = env["base"] + ["--runners", "2", "--runner-log", str(env["logs"]), "--",
                          "--job", "a", "b", "--code", "0", "7", "--sleep", "0.4"]
    assert run(argv) == runner.EXIT_FAILED
    recs = records(env["out"])
    assert sorted(r["argv"][1] + r["argv"][3] for r in recs) == ["a0", "a7", "b0", "b7"]
    assert any(overlaps(a, b) for a, b in itertools.combinations(recs, 2))  # in parallel
    assert max_concurrent(recs) == 2  # --runners 2: never more at once
    out = capsys.readouterr().out
    assert "4 combination(s)" in out and "4 command(s)" in out
    assert "4 commands: 2 done, 2 failed" in out
    for index, log in [(2, env["logs"] / "002_a_7.log"), (4, env["logs"] / "004_b_7.log")]:
        rows = [line.split() for line in out.splitlines() if str(log) in line]
        assert [str(index), "failed", "7", "1", str(log)] in [row[:5] for row in rows]
        assert "'--code', '7'" in log.read_text()
    summary = json.loads((env["logs"] / runner.SUMMARY_NAME).read_text())
    assert [(s["job"], s["status"], s["exit_code"]) for s in summary] == [
        (1, "done", 0), (2, "failed", 7), (3, "done", 0), (4, "failed", 7)]


def test_each_job_gets_one_free_gpu(env, monkeypatch):
    monkeypatch.setenv(runner.FAKE_GPUS_ENV, "0,1,2,3")
    argv = env["base"] + ["--runner-gpus", "1,3", "--runner-log", str(env["logs"]), "--",
                          "--job", "a", "b", "c", "d", "e", "--sleep", "0.3"]
    assert run(argv) == 0
    recs = records(env["out"])
    assert len(recs) == 5
    assert {r["cuda"] for r in recs} == {"1", "3"}
    assert max_concurrent(recs) == 2  # --runners defaults to the number of GPUs
    for a, b in itertools.combinations(recs, 2):
        if overlaps(a, b):
            assert a["cuda"] != b["cuda"], "two concurrent jobs shared a GPU"


def test_retry_reruns_failed_commands(env, capsys):
    argv = env["base"] + ["--runner-retry", "1", "--runner-log", str(env["logs"]), "--",
                          "--fail-first", "k1", "k2"]
    assert run(argv) == 0  # each failed once, then succeeded
    assert len(records(env["out"])) == 4
    log = (env["logs"] / "001_k1.log").read_text()
    assert "attempt 1/2" in log and "attempt 2/2" in log

    capsys.readouterr()
    argv = env["base"] + ["--runner-retry", "2", "--runner-log", str(env["logs"] / "b"), "--",
                          "--code", "3"]
    assert run(argv) == runner.EXIT_FAILED
    assert len(records(env["out"])) == 4 + 3  # 1 + 2 retries
    summary = json.loads((env["logs"] / "b" / runner.SUMMARY_NAME).read_text())
    assert summary[0]["attempts"] == 3 and summary[0]["exit_code"] == 3


def test_runner_info_prints_the_commands_and_runs_nothing(env, capsys):
    argv = env["base"] + ["--runner-info", "--runner-log", str(env["logs"]), "--",
                          "--v", "a b", "$(x)", "--flag"]
    assert run(argv) == 0
    assert records(env["out"]) == [] and os.listdir(env["work"]) == []  # no log folder
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    printed = [shlex.split(line.split("] ", 1)[1]) for line in lines]
    assert printed == [env["base"] + ["--v", "a b", "--flag"],
                       env["base"] + ["--v", "$(x)", "--flag"]]


# ----------------------------------------------------------------------------- SLURM


def test_slurm_path_runs_the_array_through_submitit(env, monkeypatch, capsys):
    monkeypatch.setenv(runner.CLUSTER_ENV, "local")  # submitit's LocalExecutor
    argv = env["base"] + ["--runner-slurm", "--runner-slurm-time", "5", "--runner-retry", "1",
                          "--runner-log", str(env["logs"]), "--",
                          "--v", "a b", "$(touch pwned)", "--code", "0", "4"]
    assert run(argv) == runner.EXIT_FAILED
    got = sorted(json.dumps(r["argv"]) for r in records(env["out"]))
    want = sorted(json.dumps(["--v", v, "--code", c])
                  for v in ["a b", "$(touch pwned)"] for c in ["0", "4", "4"])  # 4: retried
    assert got == want
    out = capsys.readouterr().out
    assert "submitted 4 job(s)" in out and "4 commands: 2 done, 2 failed" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("2 "))
    assert row.split()[:4] == ["2", "failed", "4", "2"]
    assert (env["logs"] / "submitit").is_dir()  # submitit's own logs in the runner folder
    assert "attempt 2/2" in (env["logs"] / "002_a-b_4.log").read_text()
    assert not (env["work"] / "pwned").exists()


def test_slurm_detach_submits_and_returns(env, monkeypatch, capsys):
    monkeypatch.setenv(runner.CLUSTER_ENV, "local")
    argv = env["base"] + ["--runner-slurm", "--runner-slurm-time", "5", "--runner-detach",
                          "--runner-log", str(env["logs"]), "--", "--v", "x"]
    assert run(argv) == 0
    assert "not waiting" in capsys.readouterr().out
    deadline = time.time() + 20  # the job still runs after the runner returned
    while not records(env["out"]) and time.time() < deadline:
        time.sleep(0.1)
    assert [r["argv"] for r in records(env["out"])] == [["--v", "x"]]


# ----------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_stops_the_running_jobs(env):
    assert os.access(RUNNER_SCRIPT, os.X_OK)
    assert RUNNER_SCRIPT.read_text().startswith("#!/usr/bin/env python3\n")
    cmd = [sys.executable, str(RUNNER_SCRIPT)] + env["base"] + [
        "--runners", "2", "--runner-log", str(env["logs"]), "--", "--v", "1", "2", "3",
        "--sleep", "60"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 20
    while len(glob.glob(f"{env['out']}/*.started")) < 2 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == runner.EXIT_INTERRUPTED
    assert "2 stopped, 1 not started" in out
    for started in glob.glob(f"{env['out']}/*.started"):
        pid = int(Path(started).stem)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert records(env["out"]) == []  # no job ran to its end


# ----------------------------------------------------------------------------- bad input

BAD = [
    ([], "no command"),
    (["python", "x.py"], "no '--'"),
    (["--runners", "2", "--", "--v", "a"], "no base command"),
    (["{base}", "--runners", "0", "--", "--v", "a"], "--runners must be at least 1"),
    (["{base}", "--runners", "two", "--", "--v", "a"], "whole number"),
    (["{base}", "--runner-filer", "a", "--", "--v", "a"], "did you mean --runner-filter"),
    (["{base}", "--runnerss", "2", "--", "--v", "a"], "unknown runner option '--runnerss'"),
    (["{base}", "--runner_gpus", "0", "--", "--v", "a"], "unknown runner option"),
    (["{base}", "--runner-gpus", "0,5", "--", "--v", "a"], "GPU 5 does not exist"),
    (["{base}", "--runner-gpus", "0,1", "--runners", "3", "--", "--v", "a"], "GPU slot"),
    (["{base}", "--", "--v", "a", "--runners", "2"], "must come before '--'"),
    (["{base}", "--", "a", "--v", "b"], "belongs to no option"),
    (["{base}", "--", "--v", "a", "a"], "listed twice"),
    (["{base}", "--runner-slurm", "--", "--v", "a"], "--runner-slurm-time"),
    (["{base}", "--runner-detach", "--", "--v", "a"], "only applies with --runner-slurm"),
    (["no-such-program-xyz", "--", "--v", "a"], "not found on PATH"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_a_one_line_error(env, monkeypatch, capsys, argv, message):
    monkeypatch.setenv(runner.FAKE_GPUS_ENV, "0,1")
    argv = [part for token in argv
            for part in (env["base"] if token == "{base}" else [token])]
    with pytest.raises(SystemExit) as exc:
        runner.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert records(env["out"]) == [] and os.listdir(env["work"]) == []  # no log folder
