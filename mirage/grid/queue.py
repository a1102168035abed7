"""What became of each task of a SLURM job array, asked of SLURM without relying on sacct.

A task's state comes, in this order, from:

1. the queue: ``squeue --states=all`` lists the pending and running tasks, and the
   finished ones with their final state (COMPLETED, CANCELLED, TIMEOUT, ...) for MinJobAge
   after they ended (300 s by default);
2. the task's own result file (submitit's ``<task>_0_result.pkl``), written when its
   command returned: the exit code, the attempts, whether --runner-timeout stopped it;
3. ``sacct``, only where the cluster keeps accounting: whether it answers is found out
   once (:class:`Accounting`), so a cluster without it costs one call and no warning;
4. none of these: the task is ``lost`` (gone from the queue without a result), never
   ``done``.

A final state that SLURM imposed (cancelled, time limit, node failure) wins over the
result file: a task whose command SLURM killed may still have written one. submitit's own
status checks are not used on SLURM: they call sacct at every poll, and where there is no
accounting each call warns twice that the status "may be inaccurate".
"""
import pickle
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from mirage.grid.local import JobResult, failure_note, format_exit

# How long a task that SLURM reports finished may take to show its result file here: on
# a shared file system a file written on a node can take a while to appear elsewhere.
RESULT_GRACE_S = 30.0
# The final states of squeue and sacct: the runner's status for each, or None when the
# task's result file tells (its command ran to its end, well or not). Every other state
# (PENDING, RUNNING, COMPLETING, REQUEUED, SUSPENDED, ...) is a task not finished yet.
FINAL_STATES = {
    "COMPLETED": None, "FAILED": None,
    "CANCELLED": "cancelled", "PREEMPTED": "cancelled", "REVOKED": "cancelled",
    "TIMEOUT": "timed out", "DEADLINE": "timed out",
    "NODE_FAIL": "lost", "BOOT_FAIL": "lost",
    "OUT_OF_MEMORY": "failed",
}
RUNNING_STATES = {"RUNNING", "COMPLETING", "CONFIGURING"}  # what "running" counts
WAITING_STATES = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"}  # again, after a requeue


@dataclass(frozen=True)
class Task:
    """One array task: the grid's job it runs and where its files are."""

    position: int  # 0-based, in grid order
    job: object  # mirage.grid.expand.Job
    task_id: str  # as squeue names it: "<array id>_<index>", or "<job id>" for a lone job
    log_path: Path  # the job's log (the command's output)
    result_file: Path  # submitit's result of the task
    submitit_log: Path  # submitit's stderr of the task


# ----------------------------------------------------------------------------- results


def read_result(path):
    """The task's result file: ("success", {"exit_code", "attempts", "timed_out"}) or
    ("error", traceback text); None while there is none."""
    try:
        with open(path, "rb") as handle:
            return pickle.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as err:
        return ("error", f"unreadable result file {path}: {err}")


def result_of_task(task, outcome, retries):
    """The JobResult of a task whose command returned, from its result file ``outcome``."""
    kind, value = outcome
    if kind != "success" or not isinstance(value, dict):
        lines = [line.strip() for line in str(value).splitlines() if line.strip()]
        why = lines[-1][:200] if lines else "no message"
        return JobResult(task.job, "failed", None, 0, task.log_path,
                         note=f"the task failed: {why} (submitit log: {task.submitit_log})")
    code = value["exit_code"]
    if code == 0:
        return JobResult(task.job, "done", 0, value["attempts"], task.log_path)
    status = "timed out" if value.get("timed_out") else "failed"
    return JobResult(task.job, status, code, value["attempts"], task.log_path,
                     note=failure_note(code, task.log_path, retries))


def ended_by_slurm(task, state, status, time_min, outcome=None):
    """The JobResult of a task that SLURM itself ended (cancelled, time limit, node
    failure, memory): the status, SLURM's word for it and where to look."""
    why = {
        "CANCELLED": "cancelled in SLURM (scancel, or an administrator)",
        "PREEMPTED": "preempted by SLURM and not requeued (--runner-slurm-requeue lets "
                     "SLURM requeue it)",
        "REVOKED": "revoked by SLURM",
        "TIMEOUT": f"stopped by SLURM at its time limit (--runner-slurm-time {time_min} "
                   "min)",
        "DEADLINE": "stopped by SLURM at its deadline",
        "NODE_FAIL": "its node failed (NODE_FAIL); --runner-slurm-requeue lets SLURM run it "
                     "again",
        "BOOT_FAIL": "its node failed to start (BOOT_FAIL)",
        "OUT_OF_MEMORY": "SLURM stopped it for using more memory than it was given "
                         "(--runner-slurm-mem)",
    }.get(state, f"ended by SLURM ({state})")
    attempts = outcome[1].get("attempts", 1) if outcome and outcome[0] == "success" \
        and isinstance(outcome[1], dict) else 1
    return JobResult(task.job, status, None, attempts, task.log_path,
                     note=f"{why}; submitit log: {task.submitit_log}")


def describe(result):
    """How a finished job is announced: 'failed with exit 1', 'was cancelled', ..."""
    if result.status == "failed":
        return f"failed with {format_exit(result.exit_code)}"
    return {"timed out": "timed out", "cancelled": "was cancelled", "lost": "was lost",
            "stopped": "was stopped"}.get(result.status, result.status)


# ----------------------------------------------------------------------------- asking SLURM


def _run(command, timeout_s=60):
    """(return code, stdout, first stderr line) of a SLURM command; 127 when missing."""
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError:
        return 127, "", f"{command[0]} is not found"
    except (OSError, subprocess.SubprocessError) as err:
        return 1, "", f"{command[0]}: {err}"
    lines = [line.strip() for line in out.stderr.splitlines() if line.strip()]
    return out.returncode, out.stdout, lines[0] if lines else f"exit {out.returncode}"


def read_queue(array_id):
    """({task id: (state, reason)} of the array's tasks that SLURM remembers, None) or
    (None, why squeue failed)."""
    code, out, error = _run(["squeue", "--noheader", "--array", "--states=all",
                             f"--jobs={array_id}", "--format=%i|%T|%r"])
    if code != 0:
        # Once every task ended more than MinJobAge ago, SLURM knows no such job.
        return ({}, None) if "Invalid job id" in error else (None, error)
    states = {}
    for line in out.splitlines():
        task_id, _, rest = line.strip().partition("|")
        state, _, reason = rest.partition("|")
        if task_id:
            states[task_id] = (state.strip().split(" ")[0], reason.strip())
    return states, None


class Accounting:
    """``sacct``, where the cluster keeps accounting: asked once whether it answers, then
    only about tasks that left the queue without a result."""

    def __init__(self):
        self.usable = None  # unknown until check()
        self.why_not = ""

    def check(self, array_id):
        """Whether sacct answers here (asked once; the first line of its error kept)."""
        if self.usable is None:
            code, _, error = _run(["sacct", "--noheader", "--parsable2", "--allocations",
                                   f"--jobs={array_id}", "--format=JobID,State"])
            self.usable, self.why_not = code == 0, "" if code == 0 else error
        return self.usable

    def states(self, array_id):
        """{task id: state} as sacct records them ('CANCELLED by 0' -> 'CANCELLED')."""
        if not self.check(array_id):
            return {}
        code, out, _ = _run(["sacct", "--noheader", "--parsable2", "--allocations",
                             f"--jobs={array_id}", "--format=JobID,State"])
        if code != 0:
            return {}
        states = {}
        for line in out.splitlines():
            task_id, _, state = line.strip().partition("|")
            if task_id and state:
                states[task_id] = state.split(" ")[0]
        return states


# ----------------------------------------------------------------------------- the array


class SlurmArray:
    """Follows the tasks of one submitted array; each :meth:`poll` asks squeue once.

    ``grace_s``: how long a task that SLURM reports finished may go without a result file
    before it counts as lost (0 for a single look, ``--runner-status``).
    """

    def __init__(self, array_id, tasks, time_min, retries=0, accounting=None,
                 grace_s=RESULT_GRACE_S):
        self.array_id = array_id
        self.unfinished = {task.position: task for task in tasks}
        self.time_min = time_min
        self.retries = retries
        self.accounting = accounting or Accounting()
        self.grace_s = grace_s
        self.states = {}  # position -> the last state squeue gave
        self.without_result = {}  # position -> when it was first found over, with no result
        self.running = 0
        self.error = None  # why the last squeue call failed, or None
        self.notices = []  # lines to show once (a task requeued), taken by the caller
        self._sacct = None  # sacct's states during one poll

    def poll(self):
        """Ask SLURM once; returns {position: JobResult} of the tasks found finished now.
        When squeue fails nothing is decided (``error`` says why)."""
        listed, self.error = read_queue(self.array_id)
        if listed is None:
            return {}
        self._sacct = None
        finished = {}
        for position, task in list(self.unfinished.items()):
            result = self._outcome(task, listed.get(task.task_id))
            if result is not None:
                finished[position] = result
                del self.unfinished[position]
        self.running = sum(self.states.get(p, ("",))[0] in RUNNING_STATES
                           for p in self.unfinished)
        return finished

    def _outcome(self, task, listed):
        """The JobResult of a finished task, or None while it is not finished (or its
        result file may still be on its way)."""
        if listed is not None:
            self._note_change(task, listed)
            self.states[task.position] = listed
            state = listed[0]
            if state not in FINAL_STATES:
                return None
        else:  # gone from the queue: what it last said of the task, if that was final
            state = self.states.get(task.position, ("",))[0]
            state = state if state in FINAL_STATES else None
        outcome = read_result(task.result_file)
        status = FINAL_STATES.get(state)
        if status is not None:
            return ended_by_slurm(task, state, status, self.time_min, outcome)
        if outcome is not None:
            return result_of_task(task, outcome, self.retries)
        if state is None:
            state = self._accounted().get(task.task_id)
            if state not in FINAL_STATES:
                state = None  # sacct lags behind squeue: nothing to learn from it
            elif FINAL_STATES[state] is not None:
                return ended_by_slurm(task, state, FINAL_STATES[state], self.time_min)
        return self._without_result(task, state)

    def _accounted(self):
        """sacct's states of the array, asked at most once per poll (none without it)."""
        if self._sacct is None:
            self._sacct = self.accounting.states(self.array_id)
        return self._sacct

    def _without_result(self, task, state):
        """A task over (or gone) without a result file: lost, or failed if SLURM says so,
        once the grace for the file to appear has passed."""
        first = self.without_result.setdefault(task.position, time.monotonic())
        if time.monotonic() - first < self.grace_s:
            return None
        if state == "FAILED":
            return JobResult(task.job, "failed", None, 1, task.log_path,
                             note="SLURM says FAILED and the task left no result: it could "
                                  f"not run its command (submitit log: {task.submitit_log})")
        where = (f"SLURM says {state}" if state else
                 "it is no longer in SLURM's queue (squeue forgets finished tasks after "
                 "MinJobAge)")
        return JobResult(task.job, "lost", None, 0, task.log_path,
                         note=f"{where} and it left no result, so how it ended is unknown; "
                              f"see its log and submitit's {task.submitit_log}")

    def _note_change(self, task, listed):
        """A line for the user when a task went back to the queue (requeued), or is held:
        the runner then waits for something the progress line does not show."""
        before_state, before_reason = self.states.get(task.position, ("", ""))
        state, reason = listed
        if before_state in RUNNING_STATES and state in WAITING_STATES:
            self.notices.append(f"runner: job {task.job.index} was requeued by SLURM "
                                f"({reason}); it will run again and resume")
        if "held" in reason.lower() and "held" not in before_reason.lower():
            self.notices.append(f"runner: job {task.job.index} is held by SLURM ({reason}); "
                                f"it waits until released: scontrol release {task.task_id}")

    def unfinished_results(self):
        """JobResults 'running' or 'pending' of the tasks not finished (for a single look)."""
        return {p: JobResult(task.job, "running" if self.states.get(p, ("",))[0]
                             in RUNNING_STATES else "pending", None, 0, task.log_path)
                for p, task in self.unfinished.items()}

    def cancel(self):
        """scancel every unfinished task (one call); returns their JobResults 'stopped'."""
        ids = [task.task_id for task in self.unfinished.values()]
        if ids:
            _run(["scancel", *ids])
        return {p: JobResult(task.job, "stopped", None, 0, task.log_path,
                             note=f"cancelled (SLURM job {task.task_id})")
                for p, task in self.unfinished.items()}
