"""What the runner makes of SLURM's answers, without a cluster: fake ``squeue``, ``sacct``
and ``scancel`` on the PATH print what a test wrote for them and note every call.

The same paths run against a real SLURM in tests/test_slurm_real.py (where one can be
started); these run everywhere: task states from squeue and the result files, sacct asked
once, a task gone without a result lost (never done), ``--runner-status`` exit codes, the
run lock's rules for SLURM jobs, and a task's answer to SLURM's signals.
"""
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import REPO
from mirage.errors import UserError
from mirage.grid import runner
from mirage.grid.expand import Job
from mirage.grid.queue import Accounting, SlurmArray, Task
from mirage.grid.slurm import ARRAY_RECORD
from mirage.run import lock
from test_runner import env  # noqa: F401  (a fixture)

FAKE = r'''#!/usr/bin/env python3
import os, sys
folder = os.path.dirname(os.path.abspath(__file__))
name = os.path.basename(sys.argv[0])
with open(os.path.join(folder, "calls.txt"), "a") as calls:
    calls.write(name + " " + " ".join(sys.argv[1:]) + "\n")
def read(suffix):
    path = os.path.join(folder, name + suffix)
    return open(path).read() if os.path.exists(path) else None
error = read(".err")
if error is not None:
    sys.stderr.write(error)
    sys.exit(1)
sys.stdout.write(read(".out") or "")
'''


class FakeSlurm:
    """squeue, sacct and scancel that answer what ``answer`` set (or fail with ``fail``)."""

    def __init__(self, folder, monkeypatch):
        self.folder = Path(folder)
        self.folder.mkdir()
        for name in ("squeue", "sacct", "scancel"):
            path = self.folder / name
            path.write_text(FAKE)
            path.chmod(0o755)
        monkeypatch.setenv("PATH", f"{self.folder}{os.pathsep}{os.environ['PATH']}")
        self.fail("sacct", "Slurm accounting storage is disabled\n")

    def answer(self, name, text):
        (self.folder / f"{name}.err").unlink(missing_ok=True)
        (self.folder / f"{name}.out").write_text(text)

    def fail(self, name, message):
        (self.folder / f"{name}.err").write_text(message)

    def queue(self, *rows):
        """squeue's answer: rows (task id, state, reason)."""
        self.answer("squeue", "".join(f"{t}|{s}|{r}\n" for t, s, r in rows))

    def calls(self, name):
        path = self.folder / "calls.txt"
        lines = path.read_text().splitlines() if path.exists() else []
        return [line for line in lines if line.split(" ")[0] == name]


@pytest.fixture
def fake(tmp_path, monkeypatch):
    return FakeSlurm(tmp_path / "bin", monkeypatch)


def make_tasks(folder, count, array="7"):
    folder = Path(folder)
    return [Task(i, Job(i + 1, ["python", "x.py", "--v", str(i)], (), str(i)), f"{array}_{i}",
                 folder / f"{i + 1:03d}.log", folder / f"{array}_{i}_0_result.pkl",
                 folder / f"{array}_{i}_0_log.err") for i in range(count)]


def write_result(task, exit_code, attempts=1, timed_out=False):
    outcome = ("success", {"exit_code": exit_code, "attempts": attempts,
                           "timed_out": timed_out})
    task.result_file.write_bytes(pickle.dumps(outcome))


def statuses(results):
    return {position: result.status for position, result in results.items()}


# ----------------------------------------------------------------------------- task states


def test_states_come_from_the_queue_and_the_result_files(fake, tmp_path):
    tasks = make_tasks(tmp_path, 6)
    watch = SlurmArray("7", tasks, time_min=10, grace_s=0)
    fake.queue(("7_0", "RUNNING", "None"), ("7_1", "PENDING", "Resources"),
               ("7_2", "COMPLETED", "None"), ("7_3", "COMPLETED", "None"),
               ("7_4", "CANCELLED", "None"), ("7_5", "TIMEOUT", "TimeLimit"))
    write_result(tasks[2], 0)
    write_result(tasks[3], 3, attempts=2)
    write_result(tasks[4], -15)  # SLURM killed its command before the task ended: cancelled
    found = watch.poll()
    assert statuses(found) == {2: "done", 3: "failed", 4: "cancelled", 5: "timed out"}
    assert (found[3].exit_code, found[3].attempts) == (3, 2)
    assert found[4].exit_code is None
    assert found[4].note == ("cancelled in SLURM (scancel, or an administrator); submitit "
                             f"log: {tasks[4].submitit_log}")
    assert found[5].note.startswith("stopped by SLURM at its time limit (--runner-slurm-time "
                                    "10 min)")
    assert watch.running == 1 and sorted(watch.unfinished) == [0, 1]
    # Both leave the queue: 7_0 with its result (done), 7_1 without one: lost, never done.
    fake.queue()
    write_result(tasks[0], 0)
    found = watch.poll()
    assert statuses(found) == {0: "done", 1: "lost"}
    assert "no longer in SLURM's queue" in found[1].note and watch.unfinished == {}


def test_sacct_is_asked_once_and_a_failure_prints_nothing(fake, tmp_path, capfd):
    tasks = make_tasks(tmp_path, 2)
    watch = SlurmArray("7", tasks, time_min=10, grace_s=3600)
    fake.queue(("7_0", "RUNNING", "None"))  # 7_1 gone, without a result: waits for one
    for _ in range(5):
        assert watch.poll() == {}
    assert len(fake.calls("sacct")) == 1 and len(fake.calls("squeue")) == 5
    assert watch.accounting.why_not == "Slurm accounting storage is disabled"
    assert capfd.readouterr() == ("", "")


def test_sacct_where_there_is_accounting_names_a_task_gone_from_the_queue(fake, tmp_path):
    tasks = make_tasks(tmp_path, 2)
    fake.answer("sacct", "7_0|COMPLETED\n7_1|CANCELLED by 0\n")
    fake.queue()
    write_result(tasks[0], 0)
    found = SlurmArray("7", tasks, time_min=10, grace_s=0).poll()
    assert statuses(found) == {0: "done", 1: "cancelled"}


def test_a_failed_squeue_decides_nothing(fake, tmp_path):
    tasks = make_tasks(tmp_path, 1)
    watch = SlurmArray("7", tasks, time_min=10, grace_s=0)
    fake.fail("squeue", "squeue: error: Unable to contact slurm controller\n")
    assert watch.poll() == {} and watch.unfinished  # not lost: SLURM was not reachable
    assert watch.error == "squeue: error: Unable to contact slurm controller"
    fake.fail("squeue", "slurm_load_jobs error: Invalid job id specified\n")
    assert statuses(watch.poll()) == {0: "lost"}  # SLURM forgot the whole array


def test_a_requeued_or_held_task_is_announced_once(fake, tmp_path):
    tasks = make_tasks(tmp_path, 1)
    watch = SlurmArray("7", tasks, time_min=10)
    for state, reason in [("RUNNING", "None"), ("PENDING", "BeginTime"),
                          ("PENDING", "BeginTime"), ("PENDING", "launch failed requeued held"),
                          ("PENDING", "launch failed requeued held")]:
        fake.queue(("7_0", state, reason))
        assert watch.poll() == {}
    assert watch.notices == [
        "runner: job 1 was requeued by SLURM (BeginTime); it will run again and resume",
        "runner: job 1 is held by SLURM (launch failed requeued held); it waits until "
        "released: scontrol release 7_0"]


def test_a_task_that_slurm_ended_before_its_command_reported_is_failed(fake, tmp_path):
    """FAILED without a result: the task could not run its command (e.g. no Python on
    the node); an unreadable result file is a failure too, never done."""
    tasks = make_tasks(tmp_path, 2)
    fake.queue(("7_0", "FAILED", "NonZeroExitCode"), ("7_1", "COMPLETED", "None"))
    tasks[1].result_file.write_bytes(b"torn")
    found = SlurmArray("7", tasks, time_min=10, grace_s=0).poll()
    assert statuses(found) == {0: "failed", 1: "failed"}
    assert "could not run its command" in found[0].note
    assert "unreadable result file" in found[1].note


def test_ctrl_c_cancels_the_unfinished_tasks_with_one_scancel(fake, tmp_path):
    tasks = make_tasks(tmp_path, 3)
    watch = SlurmArray("7", tasks, time_min=10, grace_s=0)
    fake.queue(("7_0", "COMPLETED", "None"), ("7_1", "RUNNING", "None"),
               ("7_2", "PENDING", "Resources"))
    write_result(tasks[0], 0)
    assert statuses(watch.poll()) == {0: "done"}
    fake.answer("scancel", "")
    stopped = watch.cancel()
    assert statuses(stopped) == {1: "stopped", 2: "stopped"}
    assert fake.calls("scancel") == ["scancel 7_1 7_2"]


def test_a_final_state_seen_before_the_task_left_the_queue_is_kept(fake, tmp_path):
    """FAILED without a result, waiting for the file, then forgotten by SLURM: failed, as
    SLURM said, not lost."""
    tasks = make_tasks(tmp_path, 1)
    watch = SlurmArray("7", tasks, time_min=10, grace_s=0.5)
    fake.queue(("7_0", "FAILED", "NonZeroExitCode"))
    assert watch.poll() == {}  # its result file may still be on its way
    fake.queue()
    time.sleep(0.6)
    found = watch.poll()
    assert statuses(found) == {0: "failed"} and "SLURM says FAILED" in found[0].note


def test_accounting_check_reads_the_error_line(fake):
    accounting = Accounting()
    assert accounting.check("7") is False and accounting.check("8") is False
    assert len(fake.calls("sacct")) == 1


# ----------------------------------------------------------------------------- --runner-status


def record(log_dir, tasks):
    log_dir.mkdir(exist_ok=True)
    (log_dir / ARRAY_RECORD).write_text(json.dumps({
        "array_id": "7", "time_min": 10, "retry": 0, "submitted": "2026-01-01 00:00:00",
        "tasks": [{"job": t.job.index, "name": t.job.name, "command": t.job.command,
                   "task_id": t.task_id, "log": str(t.log_path), "result": str(t.result_file),
                   "submitit_log": str(t.submitit_log)} for t in tasks]}))


def test_runner_status_exit_codes(fake, tmp_path, capsys):
    log_dir = tmp_path / "logs"
    tasks = make_tasks(log_dir, 2)
    record(log_dir, tasks)
    fake.queue(("7_0", "COMPLETED", "None"), ("7_1", "RUNNING", "None"))
    write_result(tasks[0], 0)
    assert runner.main(["--runner-status", str(log_dir)]) == runner.EXIT_RUNNING
    assert "2 commands: 1 done, 0 failed, 1 running" in capsys.readouterr().out
    fake.queue(("7_0", "COMPLETED", "None"), ("7_1", "COMPLETED", "None"))
    write_result(tasks[1], 0)
    assert runner.main([f"--runner-status={log_dir}"]) == 0
    fake.queue()
    tasks[1].result_file.unlink()
    assert runner.main(["--runner-status", str(log_dir)]) == runner.EXIT_FAILED
    out = capsys.readouterr().out
    assert "2 commands: 1 done, 0 failed, 1 lost" in out and "lost commands:" in out
    summary = json.loads((log_dir / runner.SUMMARY_NAME).read_text())
    assert [row["status"] for row in summary] == ["done", "lost"]


@pytest.mark.parametrize("argv, message", [
    (["--runner-status"], "--runner-status takes one folder"),
    (["--runner-status", "a", "b"], "--runner-status takes one folder"),
    (["--runner-status", "{empty}"], "holds no runner_array.json"),
    (["python", "x.py", "--runner-status", "d", "--", "--v", "1"], "is used alone"),
    (["python", "x.py", "--runner-slurm-requeue", "--", "--v", "1"],
     "only applies with --runner-slurm"),
])
def test_bad_status_and_requeue_input_is_a_one_line_error(tmp_path, capsys, argv, message):
    argv = [str(tmp_path) if token == "{empty}" else token for token in argv]
    with pytest.raises(SystemExit) as exc:
        runner.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


# ----------------------------------------------------------------------------- the run lock


def write_lock(run_dir, **holder):
    run_dir.mkdir(exist_ok=True)
    base = {"pid": os.getppid(), "host": "another-node", "started": "2026-01-01 00:00:00"}
    (run_dir / ".lock").write_text(json.dumps({**base, **holder}))


@pytest.fixture
def in_slurm_job(monkeypatch):
    """This process as the second run (restart 1) of array task 7_3 of cluster 'c1'."""
    for name, value in {"SLURM_JOB_ID": "12", "SLURM_ARRAY_JOB_ID": "7",
                        "SLURM_ARRAY_TASK_ID": "3", "SLURM_RESTART_COUNT": "1",
                        "SLURM_CLUSTER_NAME": "c1"}.items():
        monkeypatch.setenv(name, value)


def test_a_lock_of_an_earlier_run_of_this_job_is_stale_on_any_node(tmp_path, in_slurm_job,
                                                                   capsys):
    run_dir = tmp_path / "run"
    write_lock(run_dir, slurm_job="7_3", slurm_restart=0, slurm_cluster="c1")
    with lock.run_lock(run_dir):
        held = json.loads((run_dir / ".lock").read_text())
    assert (held["slurm_job"], held["slurm_restart"], held["slurm_cluster"]) == ("7_3", 1, "c1")
    assert "an earlier run of SLURM job 7_3, requeued since" in capsys.readouterr().out
    # The same run of the job (a second writer inside it): held.
    write_lock(run_dir, slurm_job="7_3", slurm_restart=1, slurm_cluster="c1")
    with pytest.raises(UserError, match="in use by process .* on another-node, SLURM job 7_3"):
        with lock.run_lock(run_dir):
            pass


def test_a_lock_of_another_job_is_stale_only_when_squeue_says_so(fake, tmp_path, in_slurm_job):
    run_dir = tmp_path / "run"

    def taken():
        write_lock(run_dir, slurm_job="5_0", slurm_restart=0, slurm_cluster="c1")
        try:
            with lock.run_lock(run_dir):
                return True
        except UserError:
            return False

    fake.answer("squeue", "RUNNING\n")
    assert not taken()
    fake.answer("squeue", "PENDING\n")  # requeued and waiting: nothing of it runs
    assert taken()
    fake.fail("squeue", "slurm_load_jobs error: Invalid job id specified\n")
    assert taken()
    fake.fail("squeue", "squeue: error: Unable to contact slurm controller\n")
    assert not taken()  # cannot tell: left alone
    assert [call.split()[-1] for call in fake.calls("squeue")] == ["--jobs=5_0"] * 4
    write_lock(run_dir, slurm_job="5_0", slurm_cluster="another-cluster")
    fake.fail("squeue", "slurm_load_jobs error: Invalid job id specified\n")
    with pytest.raises(UserError, match="in use"):  # job numbers of another cluster
        with lock.run_lock(run_dir):
            pass


def test_a_lock_of_a_dead_process_here_is_stale(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_dir = tmp_path / "run"
    write_lock(run_dir, pid=dead.pid, host=socket.gethostname())
    with lock.run_lock(run_dir):
        pass


# ----------------------------------------------------------------------------- SLURM's signals

TASK = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    from mirage.grid.one_command import run_one_command
    print(run_one_command({command!r}, {log!r}, retries=2), flush=True)
""")


def test_a_task_notes_the_warning_signal_and_ends_without_a_result_at_sigterm(env, tmp_path):
    """As SLURM does, both signals go to every process of the task (its process group
    here): the command ignores SIGUSR2 (its default action would kill it) and the task
    notes it; SIGTERM ends the task with 143 and no result, not retried."""
    log = tmp_path / "task.log"
    command = env["base"] + ["--sleep", "60"]
    task = subprocess.Popen(
        [sys.executable, "-c", TASK.format(repo=str(REPO), command=command, log=str(log))],
        env={**os.environ, "SUBMITIT_EXECUTOR": "slurm"}, stdout=subprocess.PIPE, text=True,
        start_new_session=True)
    deadline = time.monotonic() + 30
    while not list(env["out"].glob("*.started")):
        assert time.monotonic() < deadline and task.poll() is None
        time.sleep(0.05)
    os.killpg(task.pid, signal.SIGUSR2)
    time.sleep(1.0)
    assert task.poll() is None and "SLURM sent SIGUSR2" in log.read_text()
    assert len(list(env["out"].glob("*.started"))) == 1  # the command lives on
    os.killpg(task.pid, signal.SIGTERM)
    assert task.wait(timeout=30) == 128 + signal.SIGTERM
    assert task.stdout.read() == ""  # no result returned
    text = log.read_text()
    assert "ended by SLURM (SIGTERM" in text and "attempt 2/3" not in text
