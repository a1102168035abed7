"""The grid runner: expansion, filtering, local pool, GPUs, retries, SLURM via submitit.

The jobs are a tiny Python "recorder" that writes its argv, CUDA_VISIBLE_DEVICES and
start/end times as JSON, so the tests see exactly what each child received and when.
"""
import contextlib
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
import yaml

from conftest import process_gone as gone
from mirage.grid import runner
from mirage.errors import UserError
from mirage.grid.expand import build_grid
from mirage.grid.runner_options import parse_duration, parse_slurm_time

REPO = Path(__file__).resolve().parents[1]
RUNNER_SCRIPT = REPO / "runner"

# The child every test runs. Options it acts on: --code N (exit status; 2 also prints an
# "error: ..." line as the project's scripts do), --sleep S, --fail-first KEY (fail the
# first time it sees KEY, succeed after), --spawn (start a grandchild that ignores SIGINT
# and SIGTERM, its pid in <pid>.grandchild), --stubborn yes (ignore SIGINT and SIGTERM).
# Anything else is only recorded.
RECORDER = r'''
import json, os, signal, subprocess, sys, time, uuid
out = os.environ["RUNNER_TEST_OUT"]
args = sys.argv[1:]
start = time.time()
def value(name, default):
    return args[args.index(name) + 1] if name in args else default
if "--spawn" in args:
    child = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                              "signal.signal(signal.SIGINT, signal.SIG_IGN); "
                              "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"])
    open(os.path.join(out, f"{child.pid}.grandchild"), "w").close()
if value("--stubborn", "no") == "yes":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(os.path.join(out, f"{os.getpid()}.started"), "w").close()
time.sleep(float(value("--sleep", 0)))
record = {"argv": args, "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
          "start": start, "end": time.time(), "pid": os.getpid()}
with open(os.path.join(out, uuid.uuid4().hex + ".json"), "w") as f:
    json.dump(record, f)
print("recorded", args, flush=True)
if value("--code", "0") == "2":
    print("error: --thing x: not a thing; give a real one", file=sys.stderr, flush=True)
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
    yield {"base": [sys.executable, str(script)], "out": out, "logs": tmp_path / "logs",
           "work": work}
    # A failed test must not leave its (signal-ignoring) processes behind.
    for pid in pids(out, "started") + pids(out, "grandchild"):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def pids(out, kind):
    """Process ids the recorders wrote as ``<pid>.<kind>`` files."""
    return [int(Path(p).name.split(".")[0]) for p in glob.glob(f"{out}/*.{kind}")]


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


def test_ctrl_c_kills_the_whole_process_group_of_every_job(env):
    """Grandchildren that ignore SIGINT die too, and a second Ctrl-C does not wait for a
    job that ignores the first."""
    cmd = [sys.executable, str(RUNNER_SCRIPT)] + env["base"] + [
        "--runners", "2", "--runner-log", str(env["logs"]), "--", "--stubborn", "no", "yes",
        "--spawn", "--sleep", "60"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while ((len(pids(env["out"], "started")) < 2 or len(pids(env["out"], "grandchild")) < 2)
           and time.time() < deadline):
        time.sleep(0.05)
    everyone = pids(env["out"], "started") + pids(env["out"], "grandchild")
    assert len(everyone) == 4
    proc.send_signal(signal.SIGINT)
    time.sleep(1.0)  # the runner now waits for the stubborn job (10 s grace) ...
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)  # ... unless the user presses Ctrl-C again
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == runner.EXIT_INTERRUPTED
    assert "2 commands: 0 done, 0 failed, 2 stopped" in out
    assert [pid for pid in everyone if not gone(pid)] == []


# ----------------------------------------------------------------------------- timeouts, exit 2


def test_timeout_stops_the_whole_process_group_and_is_reported(env, capsys):
    """The job ignores SIGTERM (so SIGKILL follows after the grace) and has a grandchild
    that ignores it too; a timed-out job is retried like a failed one."""
    argv = env["base"] + ["--runner-timeout", "1", "--runner-retry", "1", "--runner-log",
                          str(env["logs"]), "--", "--v", "slow", "--stubborn", "yes",
                          "--spawn", "--sleep", "60"]
    assert runner.main(argv, poll_s=0.02, stop_grace_s=0.5) == runner.EXIT_FAILED
    everyone = pids(env["out"], "started") + pids(env["out"], "grandchild")
    assert len(everyone) == 4  # two attempts, each with a grandchild
    assert [pid for pid in everyone if not gone(pid)] == []
    assert records(env["out"]) == []  # no attempt ran to its end
    out = capsys.readouterr().out
    assert "1 commands: 0 done, 0 failed, 1 timed out" in out
    assert "timed out commands:" in out
    summary = json.loads((env["logs"] / runner.SUMMARY_NAME).read_text())
    assert [(s["status"], s["exit_code"], s["attempts"]) for s in summary] == [
        ("timed out", -9, 2)]
    log = Path(summary[0]["log"])
    row = next(line.split() for line in out.splitlines() if line.startswith("  1 "))
    assert row[:7] == ["1", "timed", "out", "-9", "(SIGKILL)", "2", str(log)]
    assert log.read_text().count("timed out after 1s (--runner-timeout)") == 2


def test_a_job_within_its_timeout_is_left_alone(env):
    argv = env["base"] + ["--runner-timeout", "1m", "--runner-log", str(env["logs"]), "--",
                          "--v", "a", "b"]
    assert run(argv) == 0 and len(records(env["out"])) == 2


def test_exit_2_user_errors_are_not_retried(env, capsys):
    argv = env["base"] + ["--runner-retry", "2", "--runner-log", str(env["logs"]), "--",
                          "--code", "2", "3"]
    assert run(argv) == runner.EXIT_FAILED
    runs = [r["argv"][1] for r in records(env["out"])]
    assert sorted(runs) == ["2", "3", "3", "3"]  # exit 3 retried twice, exit 2 never
    summary = json.loads((env["logs"] / runner.SUMMARY_NAME).read_text())
    assert [(s["exit_code"], s["attempts"]) for s in summary] == [(2, 1), (3, 3)]
    out = capsys.readouterr().out
    row = next(line.split() for line in out.splitlines() if line.startswith("  1 "))
    assert row[:7] == ["1", "failed", "2", "(user", "error)", "1",
                       str(env["logs"] / "001_2.log")]
    assert ("job 1: exit 2 is a user error, not retried; fix the input and rerun: "
            "error: --thing x: not a thing; give a real one") in out
    assert "job 2:" not in out  # an ordinary failure has no note


def test_cluster_task_times_out_and_does_not_retry_user_errors(env, tmp_path):
    """The body of each SLURM array task, run here directly."""
    log = tmp_path / "task.log"
    slow = env["base"] + ["--stubborn", "yes", "--spawn", "--sleep", "60"]
    outcome = runner.run_one_command(slow, log, retries=1, timeout_s=1, grace_s=0.5)
    assert outcome == {"exit_code": -9, "attempts": 2, "timed_out": True}
    everyone = pids(env["out"], "started") + pids(env["out"], "grandchild")
    assert len(everyone) == 4 and [pid for pid in everyone if not gone(pid)] == []
    outcome = runner.run_one_command(env["base"] + ["--code", "2"], log, retries=3)
    assert outcome == {"exit_code": 2, "attempts": 1, "timed_out": False}


def test_timeout_values():
    assert [parse_duration(t) for t in ["3600", "90s", "90m", "12h", "1.5d", " 0.5 "]] == [
        3600, 90, 5400, 43200, 129600, 0.5]
    for bad in ["0", "-5", "soon", "1 week", "\uff11\uff10", "nan", "inf", ""]:
        with pytest.raises(UserError, match="--runner-timeout"):
            parse_duration(bad)


# ----------------------------------------------------------------------------- huge grids


def test_runner_info_streams_a_huge_grid(env):
    """10^10 combinations: counted arithmetically and listed lazily (building the list
    would never finish); the listing stops quietly when the reader goes away."""
    axes = [tok for k in range(10) for tok in [f"--o{k}"] + [str(v) for v in range(10)]]
    grid = build_grid(env["base"] + ["--"] + axes)
    assert grid.num_combinations == 10 ** 10
    first = list(itertools.islice(grid.iter_jobs(), 11))
    assert first[10].index == 11  # the last axis varies fastest: o8 steps up after 10
    assert first[10].command[-4:] == ["--o8", "1", "--o9", "0"]
    cmd = [sys.executable, str(RUNNER_SCRIPT)] + env["base"] + ["--runner-info", "--"] + axes
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = [proc.stdout.readline() for _ in range(3)]
    proc.stdout.close()  # like `| head -3`
    assert proc.wait(timeout=60) == 0
    assert proc.stderr.read() == ""  # no BrokenPipeError traceback
    assert lines[0].startswith("runner: 10000000000 combination(s) of --o0 x10")
    assert shlex.split(lines[2].split("] ", 1)[1]) == env["base"] + [
        tok for k in range(10) for tok in (f"--o{k}", "1" if k == 9 else "0")]


# ----------------------------------------------------------------------------- bad input

BAD = [
    ([], "no command"),
    (["python", "x.py"], "no '--'"),
    (["--runners", "2", "--", "--v", "a"], "no base command"),
    (["{base}", "--runners", "0", "--", "--v", "a"], "--runners must be at least 1"),
    (["{base}", "--runners", "two", "--", "--v", "a"], "whole number"),
    (["{base}", "--runner-filer", "a", "--", "--v", "a"], "did you mean --runner-filter"),
    (["{base}", "--runnerss", "2", "--", "--v", "a"], "unknown runner option '--runnerss'"),
    (["{base}", "--runner-gpu", "0", "--", "--v", "a"], "unknown runner option"),
    (["{base}", "--runner-gpus", "0,5", "--", "--v", "a"], "GPU 5 does not exist"),
    (["{base}", "--runner-gpus", "0,1", "--runners", "3", "--", "--v", "a"], "GPU slot"),
    (["{base}", "--", "--v", "a", "--runners", "2"], "must come before '--'"),
    (["{base}", "--", "a", "--v", "b"], "belongs to no option"),
    (["{base}", "--", "--v", "a", "a"], "listed twice"),
    (["{base}", "--runner-slurm", "--", "--v", "a"], "--runner-slurm-time"),
    (["{base}", "--runner-detach", "--", "--v", "a"], "only applies with --runner-slurm"),
    (["no-such-program-xyz", "--", "--v", "a"], "not found on PATH"),
    (["{base}", "--runner-timeout", "0", "--", "--v", "a"], "--runner-timeout takes"),
    (["{base}", "--runners", "\u0662", "--", "--v", "a"], "whole number"),  # Arabic-Indic 2
    (["{base}", "--runner-gpus", "\u0661", "--", "--v", "a"], "GPU ids"),
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


# ----------------------------------------------------------------------------- run directories
# Grids of run_seg_tuning.py on the tiny dataset: the runner resolves each job's run
# directory before starting anything (docs/runner.md, "One run directory per job").

TUNING = REPO / "run_seg_tuning.py"


def tuning_base(dataset, weights, out, *skip):
    """``python run_seg_tuning.py`` with the options every job shares (before ``--``)."""
    fixed = {"--weights": [weights], "--data_path": [dataset], "--input_size": ["32", "48"],
             "--patch_size": ["16"], "--batch_size": ["2"], "--num_workers": ["0"],
             "--base_output_dir": [out], "--lr": ["1e-3"], "--output_adapter": ["linear"],
             "--aug_name": ["none"], "--drop_path_encoder": ["0"], "--epochs": ["1"]}
    return [sys.executable, str(TUNING)] + [str(tok) for option, values in fixed.items()
                                            if option not in skip
                                            for tok in [option, *values]]


def one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_sweep_over_seed_and_lr_trains_into_distinct_run_directories(
        env, tiny_dataset, tiny_weights, tmp_path):
    """Seeds 1, 2 at lr 1e-3 and lrs 1e-3, 1e-2 at seed 1 (three jobs: each job is a
    process that imports torch, the slow part)."""
    out = tmp_path / "out"
    argv = tuning_base(tiny_dataset, tiny_weights, out, "--lr") + [
        "--runners", "2", "--runner-log", str(env["logs"]), "--runner-filter", "seed=2,lr=1e-2",
        "--", "--seed", "1", "2", "--lr", "1e-3", "1e-2"]
    assert run(argv) == 0
    run_dirs = sorted((out / "v1" / "Tiny").iterdir())
    assert len(run_dirs) == 3
    trained = set()
    for run_dir in run_dirs:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert f"_s{config['seed']}_" in run_dir.name
        assert (run_dir / "checkpoint-best.pth").is_file()
        trained.add((config["seed"], config["lr"]))
    assert trained == {(1, 1e-3), (1, 1e-2), (2, 1e-3)}
    for log in env["logs"].glob("*.log"):
        assert "skipping" not in log.read_text()  # each job trained, none found a run


@pytest.mark.parametrize("axis, differ", [
    (["--num_workers", "0", "1"], "(--num_workers 0 vs 1)"),  # not part of the identity
    (["--lr", "1e-3", "0.001"], "(--lr 1e-3 vs 0.001)"),  # one value written two ways
])
def test_grid_whose_jobs_share_a_run_directory_is_refused(
        env, tiny_dataset, tiny_weights, tmp_path, capsys, axis, differ):
    out = tmp_path / "out"
    base = tuning_base(tiny_dataset, tiny_weights, out, axis[0])
    with pytest.raises(SystemExit) as exc:
        runner.main(base + ["--runner-log", str(env["logs"]), "--", "--seed", "1", "2"] + axis)
    assert exc.value.code == 2
    line = one_error_line(capsys)
    assert f"jobs 1 and 2 {differ} would both train into one run directory " \
           f"{out.resolve()}/v1/Tiny/MIRAGE-Tiny_frozen_linear_CE-ignore-bg_s1_" in line
    assert "1 more group(s) of jobs collide as well" in line  # jobs 3 and 4 (seed 2)
    assert not out.exists() and not env["logs"].exists()  # nothing started
    # --runner-info lists the commands, then says the same.
    with pytest.raises(SystemExit) as exc:
        runner.main(base + ["--runner-info", "--", "--seed", "1", "2"] + axis)
    assert exc.value.code == 2 and "jobs 1 and 2" in one_error_line(capsys)


def test_test_jobs_may_share_their_run_directory(env, tiny_dataset, tiny_weights, tmp_path,
                                                 capsys):
    base = tuning_base(tiny_dataset, tiny_weights, tmp_path / "out", "--num_workers")
    argv = base + ["--runner-info", "--", "--num_workers", "0", "1", "--test"]
    assert runner.main(argv) == 0
    assert "nothing was run" in capsys.readouterr().out


@pytest.mark.parametrize("axis, message", [
    (["--lr", "1e-3", "abc"], "job 2 (--lr abc) has bad arguments, so the grid is not "
                              "started: "),
    (["--no_such_option", "1", "2"], "job 1 (--no_such_option 1) has bad arguments, so the "
                                     "grid is not started: error: unknown option "
                                     "--no_such_option"),
])
def test_a_job_with_bad_arguments_stops_the_grid_before_it_starts(
        env, tiny_dataset, tiny_weights, tmp_path, capsys, axis, message):
    base = tuning_base(tiny_dataset, tiny_weights, tmp_path / "out", axis[0])
    with pytest.raises(SystemExit) as exc:
        runner.main(base + ["--runner-log", str(env["logs"]), "--"] + axis)
    assert exc.value.code == 2
    assert message in one_error_line(capsys)
    assert not env["logs"].exists()
