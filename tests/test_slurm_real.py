"""The runner's SLURM path against a real one-node SLURM (tests/slurm_cluster.py).

Grids go through sbatch, squeue and scancel of a running slurmctld and slurmd, without
accounting (sacct fails, as on many small clusters), and SLURM itself ends tasks: scancel,
the time limit, a node failure, a requeue. Skipped where SLURM is not installed or cannot
be started (see tests/slurm_cluster.py). The runner runs in this process (in a thread
where the test acts on its tasks meanwhile) and polls every half second: the cluster
forgets finished jobs after 10 s.
"""
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO
from mirage import checkpoint_io as ckpt
from mirage.errors import UserError
from mirage.grid import runner
from mirage.grid.slurm import ARRAY_RECORD
from mirage.run.lock import run_lock
from slurm_cluster import slurm_cluster  # noqa: F401  (a fixture)
from test_distributed import TOLERANCE
from test_runner import env, records, tuning_base  # noqa: F401  (env is a fixture)

POLL_S = 0.5
SACCT_WARNING = "Bypassing sacct error"
# Epochs of the trainings that SLURM interrupts: an epoch of the tiny dataset takes 0.05 to
# 0.5 s, and the run must still be training when the test acts after its first checkpoint.
EPOCHS = 100


@pytest.fixture
def slurm(slurm_cluster, monkeypatch):  # noqa: F811
    """The cluster, with the runner (and every task, through sbatch's environment) pointed
    at it; whatever a test leaves in the queue is cancelled after it."""
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tasks share two cores
    yield slurm_cluster
    # pytest shows this only for a failed test: what the daemons said meanwhile
    print(slurm_cluster.log_tail(40))
    slurm_cluster.run("scancel", f"--user={os.getuid()}", check=False)
    slurm_cluster.wait_for(lambda: not slurm_cluster.run("squeue", "--noheader").stdout.strip(),
                           60, "the queue to empty")
    # A runner left waiting by a failed test sees its tasks cancelled now, and returns
    # while it can still reach the cluster.
    for thread in Background.started:
        thread.join(30)
    Background.started.clear()


class Background:
    """``runner.main`` in a thread, so that the test can act on the tasks it waits for."""

    started = []  # every thread, so that a failed test's runner is waited for after it

    def __init__(self, argv):
        self.code = None
        self.thread = threading.Thread(target=self._main, args=(argv,), daemon=True)
        self.thread.start()
        self.started.append(self.thread)

    def _main(self, argv):
        try:
            self.code = runner.main(argv, poll_s=POLL_S)
        except SystemExit as exit_:
            self.code = exit_.code

    def wait(self, timeout_s):
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), f"the runner still waits after {timeout_s} s"
        return self.code


def slurm_options(minutes=10, *extra):
    return ["--runner-slurm", "--runner-slurm-time", str(minutes), "--runner-slurm-gpus", "0",
            *extra]


def task_id(log_dir, job, timeout_s=60):
    """SLURM's id of the grid's job ``job`` (from the array record of the runner)."""
    record = Path(log_dir) / ARRAY_RECORD
    deadline = time.monotonic() + timeout_s
    while not record.exists():
        assert time.monotonic() < deadline, f"no {record}"
        time.sleep(0.1)
    tasks = json.loads(record.read_text())["tasks"]
    return next(t["task_id"] for t in tasks if t["job"] == job)


def wait_for_file(pattern_dir, pattern, timeout_s=120):
    """The first file matching ``pattern`` in ``pattern_dir`` once one exists."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = sorted(Path(pattern_dir).glob(pattern))
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"no {pattern} in {pattern_dir}"
        time.sleep(0.1)


def wait_for_text(path, text, timeout_s=120):
    deadline = time.monotonic() + timeout_s
    while not (Path(path).exists() and text in Path(path).read_text()):
        assert time.monotonic() < deadline, f"{text!r} never appeared in {path}"
        time.sleep(0.1)


def summary(log_dir):
    rows = json.loads((Path(log_dir) / runner.SUMMARY_NAME).read_text())
    return [(row["job"], row["status"]) for row in rows]


def table_row(out, job):
    """The words of job ``job``'s row in the failure table."""
    return next(line.split() for line in out.splitlines() if line.startswith(f"  {job} "))


def quiet_without_accounting(captured):
    """No sacct warning at all (submitit logs them to stderr), and the one line saying
    there is no accounting, once."""
    assert SACCT_WARNING not in captured.out + captured.err
    assert "Slurm accounting storage is disabled" in captured.out
    assert captured.out.count("no SLURM accounting here") == 1


def epochs_logged(run_dir):
    lines = (run_dir / "log.txt").read_text().splitlines()
    return [json.loads(line)["epoch"] for line in lines if '"epoch"' in line]


def run_dirs(out):
    return {yaml.safe_load((d / "config.yaml").read_text())["seed"]: d
            for d in (out / "v1" / "Tiny").iterdir()}


# ----------------------------------------------------------------------------- training


def test_grid_trains_cancelled_run_is_reported_and_a_rerun_resumes_it(
        slurm, env, tiny_dataset, tiny_weights, tmp_path, capfd):
    """Two seeds train as an array; seed 2 is cancelled with scancel after its first
    checkpoint. The runner reports it cancelled (not done) and exits 1; the same grid run
    again skips seed 1 and resumes seed 2 from its checkpoint (its lock, left by the
    killed training, detected as stale)."""
    out = tmp_path / "out"
    base = tuning_base(tiny_dataset, tiny_weights, out, "--epochs") + [
        "--epochs", str(EPOCHS), "--save_ckpt_freq", "1", "--device", "cpu"]
    first, again = env["logs"] / "first", env["logs"] / "again"
    grid = ["--", "--seed", "1", "2"]
    background = Background(base + slurm_options() + ["--runner-log", str(first)] + grid)
    cancelled = task_id(first, 2)
    run_2 = wait_for_file(out / "v1" / "Tiny", "*_s2_*")
    wait_for_file(run_2, "checkpoint-*.pth")
    slurm.run("scancel", cancelled)
    assert background.wait(300) == runner.EXIT_FAILED
    captured = capfd.readouterr()
    output = captured.out
    quiet_without_accounting(captured)
    assert summary(first) == [(1, "done"), (2, "cancelled")]
    assert "2 commands: 1 done, 0 failed, 1 cancelled" in output
    log_2 = first / "002_2.log"
    assert table_row(output, 2)[:5] == ["2", "cancelled", "-", "1", str(log_2)]
    assert f"job 2: cancelled in SLURM (scancel, or an administrator); submitit log: " \
           f"{first}/submitit/{cancelled}_0_log.err" in output
    assert "ended by SLURM (SIGTERM" in log_2.read_text()
    runs = run_dirs(out)
    assert sorted(runs) == [1, 2] and runs[1] != runs[2]
    assert epochs_logged(runs[1]) == list(range(EPOCHS))
    interrupted_at = len(epochs_logged(runs[2]))
    assert 1 <= interrupted_at < EPOCHS  # killed mid-training
    assert (runs[2] / ".lock").exists()  # left by the killed training

    assert runner.main(base + slurm_options() + ["--runner-log", str(again)] + grid,
                       poll_s=POLL_S) == 0
    assert summary(again) == [(1, "done"), (2, "done")]
    assert "skipping training" in (again / "001_1.log").read_text()
    resumed = (again / "002_2.log").read_text()
    assert "removing a stale lock" in resumed and "resumed from" in resumed
    assert epochs_logged(runs[2]) == list(range(EPOCHS))  # no epoch trained twice or skipped
    assert (runs[2] / "checkpoint-best.pth").is_file() and not (runs[2] / ".lock").exists()
    quiet_without_accounting(capfd.readouterr())


def test_a_requeued_task_resumes_its_training(slurm, env, tiny_dataset, tiny_weights,
                                              tmp_path, capfd):
    """--runner-slurm-requeue: the task is requeued mid-training, as a preemption does
    (the cluster's default is JobRequeue=0: SLURM requeues only because the runner asked);
    its second run detects the lock of the first as stale, resumes from the last
    checkpoint and finishes."""
    out = tmp_path / "out"
    base = tuning_base(tiny_dataset, tiny_weights, out, "--epochs") + [
        "--epochs", str(EPOCHS), "--save_ckpt_freq", "1", "--device", "cpu"]
    background = Background(base + slurm_options(10, "--runner-slurm-requeue") + [
        "--runner-log", str(env["logs"]), "--", "--seed", "3"])
    task = task_id(env["logs"], 1)
    run_dir = wait_for_file(out / "v1" / "Tiny", "*_s3_*")
    wait_for_file(run_dir, "checkpoint-*.pth")
    slurm.requeue_now(task)
    assert background.wait(300) == 0
    captured = capfd.readouterr()
    output = captured.out
    assert "job 1 was requeued by SLURM" in output
    assert "1 commands: 1 done, 0 failed" in output
    log = (env["logs"] / "001_job.log").read_text()  # one job: no value names it
    assert "ended by SLURM (SIGTERM" in log and "(restart 1) ====" in log
    assert "removing a stale lock" in log and "resumed from" in log
    assert epochs_logged(run_dir) == list(range(EPOCHS))
    quiet_without_accounting(captured)


def test_a_task_lost_with_its_node_is_reported_lost(slurm, env, capfd):
    """Without --runner-slurm-requeue a task cannot be requeued on this cluster, and a
    node failure ends it (NODE_FAIL): reported lost."""
    background = Background(env["base"] + slurm_options() + [
        "--runner-log", str(env["logs"]), "--", "--v", "x", "--sleep", "300"])
    wait_for_text(env["logs"] / "001_job.log", "$ ")
    refused = slurm.run("scontrol", "requeue", task_id(env["logs"], 1), check=False)
    assert refused.returncode != 0 and "disabled" in refused.stderr
    slurm.run("scontrol", "update", f"NodeName={slurm.node}", "State=DOWN",
              "Reason=test: node failure")
    assert background.wait(120) == runner.EXIT_FAILED
    output = capfd.readouterr().out
    assert summary(env["logs"]) == [(1, "lost")]
    assert "job 1: its node failed (NODE_FAIL)" in output
    slurm.wait_for_node()  # back, for the next tests


def test_two_process_torchrun_as_one_task_equals_one_process(slurm, env, tiny_dataset,
                                                             tiny_weights, tmp_path):
    """torchrun with 2 CPU processes (gloo) as one SLURM task trains what one process
    with the same global batch trains (as tests/test_distributed.py, here under SLURM)."""
    def args(out, batch_size):
        return ["--weights", str(tiny_weights), "--data_path", str(tiny_dataset),
                "--input_size", "32", "48", "--patch_size", "16",
                "--batch_size", str(batch_size), "--num_workers", "0",
                "--base_output_dir", str(out), "--epochs", "2", "--save_ckpt_freq", "1",
                "--keep_ckpts", "2", "--lr", "1e-3", "--loss", "CEGDice",
                "--output_adapter", "convnext", "--aug_name", "none",
                "--drop_path_encoder", "0", "--device", "cpu"]
    script = str(REPO / "run_seg_tuning.py")
    single = subprocess.run([sys.executable, script, *args(tmp_path / "single", 4)],
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2", script, *args(tmp_path / "multi", 2)]
    argv = torchrun + slurm_options(10, "--runner-slurm-cpus", "2") + [
        "--runner-log", str(env["logs"]), "--", "--seed", "42"]
    assert runner.main(argv, poll_s=POLL_S) == 0
    log = next(env["logs"].glob("001_*.log")).read_text()
    assert "SLURM job" in log and log.count("epoch 1/1") == 1  # one task; rank 0 logs
    found = [next((tmp_path / name / "v1" / "Tiny").iterdir()) for name in ("single", "multi")]
    a, b = (ckpt.load_file(path / "checkpoint-1.pth")["model"] for path in found)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], **TOLERANCE)
    first = ckpt.load_file(found[0] / "checkpoint-0.pth")["model"]
    assert not torch.equal(first["decoder.final_layer.weight"], a["decoder.final_layer.weight"])


# ----------------------------------------------------------------------------- SLURM ends tasks


def test_cancelled_and_time_limited_tasks_are_reported_with_their_logs(slurm, env, capfd):
    """A grid of three: one finishes, one is cancelled with scancel, one runs into
    --runner-slurm-time 1 (SLURM's warning signal, sent at once for so short a limit, does
    not end it early). Each is reported as what it is, with its log; exit status 1."""
    logs = env["logs"]
    started = time.monotonic()
    background = Background(env["base"] + slurm_options(1) + [
        "--runner-retry", "1", "--runner-log", str(logs), "--", "--sleep", "0", "300", "301"])
    wait_for_text(logs / "002_300.log", "$ ")  # the command runs: the task is the runner's
    slurm.run("scancel", task_id(logs, 2))
    code = background.wait(240)
    captured = capfd.readouterr()
    output = captured.out
    assert code == runner.EXIT_FAILED
    quiet_without_accounting(captured)
    assert summary(logs) == [(1, "done"), (2, "cancelled"), (3, "timed out")]
    assert "3 commands: 1 done, 0 failed, 1 timed out, 1 cancelled" in output
    assert table_row(output, 2)[:5] == ["2", "cancelled", "-", "1", str(logs / "002_300.log")]
    assert table_row(output, 3)[:6] == ["3", "timed", "out", "-", "1",
                                        str(logs / "003_301.log")]
    assert "job 2: cancelled in SLURM (scancel, or an administrator); submitit log: " in output
    assert "job 3: stopped by SLURM at its time limit (--runner-slurm-time 1 min)" in output
    slow = (logs / "003_301.log").read_text()
    assert "SLURM sent SIGUSR2" in slow and "the command goes on" in slow
    assert "ended by SLURM (SIGTERM" in slow
    assert "attempt 2/2" not in slow  # SLURM ended it: not retried inside the task
    assert time.monotonic() - started > 55  # ran to the limit, not ended by the warning
    assert [r["argv"] for r in records(env["out"])] == [["--sleep", "0"]]


def test_detached_grid_is_followed_by_status_checks_without_sacct(slurm, env, capfd):
    """--runner-detach prints the array id; ./runner --runner-status DIR then follows the
    array with squeue and the result files alone: running, then cancelled and, once SLURM
    has forgotten the array, done for the job that left its result and lost (never done)
    for the cancelled one."""
    logs = env["logs"]
    assert runner.main(env["base"] + slurm_options() + [
        "--runner-detach", "--runner-log", str(logs), "--", "--sleep", "0", "300"]) == 0
    output = capfd.readouterr().out
    assert "--runner-detach given, not waiting" in output
    assert f"./runner --runner-status {logs}" in output
    array_id = output.split(" as array ")[1].split()[0]
    assert set(slurm.states(array_id)) == {f"{array_id}_0", f"{array_id}_1"}

    def status():
        code = runner.main(["--runner-status", str(logs)])
        captured = capfd.readouterr()
        assert SACCT_WARNING not in captured.out + captured.err
        return code, captured.out

    wait_for_text(logs / "002_300.log", "$ ")
    slurm.wait_for(lambda: status()[0] == runner.EXIT_RUNNING
                   and summary(logs) == [(1, "done"), (2, "running")], 60, "job 1 done")
    slurm.run("scancel", task_id(logs, 2))
    slurm.wait_for(lambda: slurm.state(task_id(logs, 2)) == "CANCELLED", 60, "the cancel")
    code, output = status()
    assert code == runner.EXIT_FAILED and summary(logs) == [(1, "done"), (2, "cancelled")]
    assert f"runner: array {array_id}" in output and table_row(output, 2)[1] == "cancelled"
    slurm.wait_for(lambda: slurm.states(array_id) == {}, 120, "SLURM to forget the array")
    code, output = status()
    assert code == runner.EXIT_FAILED and summary(logs) == [(1, "done"), (2, "lost")]
    assert "2 commands: 1 done, 0 failed, 1 lost" in output
    assert "job 2: it is no longer in SLURM's queue" in output


def test_run_lock_of_another_node_is_checked_with_squeue(slurm, tmp_path, capsys):
    """A lock written on another node names its SLURM job: held while squeue shows that
    job running, stale once it is not."""
    running = slurm.submit("--output=/dev/null", "--wrap", "sleep 120")
    slurm.wait_for(lambda: slurm.state(running) == "RUNNING", 60, "the job to run")
    finished = slurm.submit("--output=/dev/null", "--wrap", "true")
    slurm.wait_for(lambda: slurm.state(finished) in ("COMPLETED", None), 60,
                   "the job to finish")
    run_dir = tmp_path / "run"
    run_dir.mkdir()

    def lock_of(job):
        (run_dir / ".lock").write_text(json.dumps({
            "pid": 4242, "host": "another-node", "started": "2026-01-01 00:00:00",
            "slurm_job": job, "slurm_restart": 0}))

    lock_of(running)
    with pytest.raises(UserError, match=f"in use by process 4242 on another-node, SLURM job "
                                        f"{running}"):
        with run_lock(run_dir):
            pass
    lock_of(finished)
    with run_lock(run_dir):
        assert json.loads((run_dir / ".lock").read_text())["pid"] == os.getpid()
    assert (f"removing a stale lock of process 4242 on another-node in {run_dir}: SLURM job "
            f"{finished} that held it is no longer running") in capsys.readouterr().out
