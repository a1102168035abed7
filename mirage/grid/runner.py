"""Run a grid of commands (built by :mod:`mirage.grid.expand`) and report what failed.

Two ways to run the grid:

- locally, ``--runners N`` commands at a time, each optionally given one free GPU through
  ``CUDA_VISIBLE_DEVICES`` (``--runner-gpus``);
- on a cluster, as a SLURM job array submitted with submitit (``--runner-slurm``).

Either way each job's output goes to its own log file, failed commands can be retried
(never after exit 2, a user error), a job can be given a time limit (its whole process
group is stopped), a progress line shows done / failed / running, and the end shows a
table of the commands that failed with their exit codes and logs. The exit status is 0
only if every command succeeded. A grid of more than ``checks.MAX_JOBS`` commands is
refused before any job is built (``--runner-info`` still lists it, one command at a time).
Before a grid of ``run_seg_tuning.py`` trainings starts, each job's run directory is
resolved and a grid in which two jobs share one is refused.
Commands are argument lists run without a shell. See ``docs/runner.md``.

``./runner --runner-status DIR`` looks once at a grid submitted with ``--runner-slurm``
(e.g. with ``--runner-detach``) and reports it the same way.

This module is the entry point (:func:`main`), the log folder and the report; the work is
done in :mod:`mirage.grid.checks` (pre-flight checks), :mod:`mirage.grid.local` (the
local pool), :mod:`mirage.grid.one_command` (one command: each SLURM array task),
:mod:`mirage.grid.slurm` (the job array) and :mod:`mirage.grid.queue` (what SLURM says
became of each task); the command line is read by :mod:`mirage.grid.runner_options` and
:mod:`mirage.grid.expand`.
"""
import datetime
import json
import os
import shlex
import sys
from pathlib import Path

from mirage.errors import UserError, exit_on_user_error
from mirage.grid.checks import (MAX_JOBS, RunDirCheck, check_cluster, check_grid_size,
                                check_gpus, check_program, local_parallelism)
from mirage.grid.expand import build_grid
from mirage.grid.local import BAD_STATUSES, LocalPool, format_exit, sigterm_as_interrupt
from mirage.grid.one_command import EXIT_USER_ERROR, STOP_GRACE_S, format_seconds
from mirage.grid.runner_options import status_folder, usage_text
from mirage.grid.slurm import look_at_array, run_on_cluster

# Re-exported, so the runner's callers and tests find them here: the variables that fake
# the GPUs and pick the submitit cluster, and the body of each array task.
from mirage.grid.checks import CLUSTER_ENV, FAKE_GPUS_ENV
from mirage.grid.one_command import run_one_command

__all__ = ["main", "report", "write_summary", "print_info", "make_log_dir", "log_paths_for",
           "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_RUNNING", "SUMMARY_NAME",
           "CLUSTER_ENV", "FAKE_GPUS_ENV", "run_one_command"]

EXIT_FAILED = 1  # some command failed
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGTERM, as a shell reports SIGINT
EXIT_RUNNING = 3  # --runner-status: jobs still pending or running, none failed so far
SUMMARY_NAME = "runner_summary.json"


# ----------------------------------------------------------------------------- log folder


def make_log_dir(requested):
    """The log folder: --runner-log, or a new __output/runner/<date-time> folder."""
    if requested:
        path = Path(requested)
    else:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path("__output") / "runner" / stamp
        suffix = 2
        while path.exists():  # two sweeps started in the same second
            path = Path("__output") / "runner" / f"{stamp}-{suffix}"
            suffix += 1
    if path.exists() and not path.is_dir():
        raise UserError(f"--runner-log {path} is a file; give a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--runner-log: cannot create folder {path}: "
                        f"{err.strerror or err}") from None
    return path


def log_paths_for(jobs, log_dir):
    """``<log_dir>/<index>_<values>.log``: the index keeps names unique and sorted."""
    width = max(3, len(str(len(jobs))))
    return [log_dir / f"{job.index:0{width}d}_{job.name}.log" for job in jobs]


# ----------------------------------------------------------------------------- reporting


def _exit_cell(code):
    """The exit column: '-', '1', '-9 (SIGKILL)', '2 (user error)'."""
    if code is None:
        return "-"
    if code == EXIT_USER_ERROR:
        return f"{code} (user error)"
    return format_exit(code)[len("exit "):] if code < 0 else str(code)


def report(results, total):
    """Print the counts and the table of the commands that did not succeed (failed, timed
    out, cancelled, lost, stopped), each with its log and, where known, why."""
    counts = {}
    for result in results:
        counts[result.status] = counts.get(result.status, 0) + 1
    not_started = total - sum(r.status != "not started" for r in results)
    parts = [f"{counts.get('done', 0)} done", f"{counts.get('failed', 0)} failed"]
    for status in BAD_STATUSES[1:] + ("running", "pending"):
        if counts.get(status):
            parts.append(f"{counts[status]} {status}")
    if not_started:
        parts.append(f"{not_started} not started")
    print(f"runner: {total} commands: {', '.join(parts)}", flush=True)
    bad = [r for r in results if r.status in BAD_STATUSES]
    if not bad:
        return
    rows = [("job", "status", "exit", "tries", "log", "command")]
    for r in bad:
        rows.append((str(r.job.index), r.status, _exit_cell(r.exit_code), str(r.attempts),
                     str(r.log_path), shlex.join(r.job.command)))
    widths = [max(len(row[col]) for row in rows) for col in range(5)]
    kinds = sorted({r.status for r in bad}, key=BAD_STATUSES.index)
    heading = kinds[-1] if len(kinds) == 1 else f"{', '.join(kinds[:-1])} or {kinds[-1]}"
    print(f"{heading} commands:")
    for row in rows:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[5])
    for r in bad:
        if r.note:
            print(f"  job {r.job.index}: {r.note}")
    sys.stdout.flush()


def write_summary(results, log_dir):
    """``runner_summary.json`` in the log folder: every job's command and outcome."""
    # deferred: heavy, mirage.fileio loads OpenCV and numpy, which ./runner -h must not
    from mirage.fileio import write_text

    rows = [{"job": r.job.index, "status": r.status, "exit_code": r.exit_code,
             "attempts": r.attempts, "gpu": r.gpu, "log": str(r.log_path),
             "command": r.job.command, "note": r.note} for r in results]
    write_text(Path(log_dir) / SUMMARY_NAME, json.dumps(rows, indent=1) + "\n")


def _describe_grid(grid, count=None):
    """The first line: combinations, axes, flags; and the number of commands if known."""
    varying = [f"{axis.option} x{len(axis.values)}" for axis in grid.axes if axis.values]
    flags = [axis.option for axis in grid.axes if not axis.values]
    text = f"runner: {grid.num_combinations} combination(s)"
    if varying:
        text += f" of {', '.join(varying)}"
    if flags:
        text += f" (flags in every command: {' '.join(flags)})"
    if count is not None:
        text += "; " + _count_text(grid, count)
    return text


def _count_text(grid, count):
    text = f"{count} command(s)"
    if grid.options.filters:
        text += f", {grid.num_combinations - count} removed by --runner-filter"
    return text


def print_info(grid):
    """``--runner-info``: stream the commands (a huge grid is never held in memory) and
    check their run directories; returns the exit status."""
    print(_describe_grid(grid), flush=True)
    check, count = RunDirCheck(), 0
    try:
        for job in grid.iter_jobs():
            print(f"[{job.index}] {shlex.join(job.command)}")
            check.add(job)
            count = job.index
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. ./runner ... --runner-info | head
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    print(f"runner: {_count_text(grid, count)}", flush=True)
    if count > MAX_JOBS:
        print(f"runner: more than the {MAX_JOBS} commands one ./runner call runs: running "
              "this grid would be refused (docs/runner.md, \"Grid size\")", flush=True)
    check.check()
    print("runner: --runner-info given, nothing was run", flush=True)
    return 0


def show_status(log_dir):
    """``./runner --runner-status DIR``: one look at a grid submitted with --runner-slurm;
    the counts and table of the report, and its summary file. Returns the exit status: 0
    when every job is done, 1 when one did not succeed, EXIT_RUNNING while jobs are still
    pending or running and none has failed."""
    results, array_id = look_at_array(log_dir)
    print(f"runner: array {array_id}, submitted into {log_dir}", flush=True)
    report(results, len(results))
    write_summary(results, log_dir)
    if any(r.status in BAD_STATUSES for r in results):
        return EXIT_FAILED
    return EXIT_RUNNING if any(r.status != "done" for r in results) else 0


# ----------------------------------------------------------------------------- main


@exit_on_user_error
def main(argv=None, poll_s=None, stop_grace_s=STOP_GRACE_S):
    """Entry point of ``./runner``; returns the exit status (0: every command succeeded)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(usage_text())
        return 0
    status_dir = status_folder(argv)
    if status_dir is not None:
        return show_status(status_dir)
    grid = build_grid(argv)
    options = grid.options
    if options.info:
        return print_info(grid)
    count = check_grid_size(grid)  # before any job is built: a typo can mean billions
    print(_describe_grid(grid, count), flush=True)
    if not count:
        raise UserError(f"--runner-filter removes all {grid.num_combinations} combinations; "
                        "nothing is left to run")
    if options.slurm:
        cluster = check_cluster()
    else:
        check_program(grid.base[0])
        if options.gpus is not None:
            check_gpus(options.gpus)
        parallel = local_parallelism(options)
    check = RunDirCheck()
    for job in grid.jobs:
        check.add(job)
    check.check()
    if check.by_dir:
        print(f"runner: {len(check.by_dir)} training job(s), each with its own run directory",
              flush=True)
    log_dir = make_log_dir(options.log_dir)
    log_paths = log_paths_for(grid.jobs, log_dir)
    with sigterm_as_interrupt():
        if options.slurm:
            results, interrupted = run_on_cluster(grid, log_paths, log_dir, cluster, poll_s)
            if results is None:
                return 0  # detached
        else:
            where = f" on GPUs {','.join(map(str, options.gpus))}" if options.gpus else ""
            limit = (f", each stopped after {format_seconds(options.timeout_s)}"
                     if options.timeout_s is not None else "")
            print(f"runner: running {len(grid.jobs)} command(s), {parallel} at a time{where}"
                  f"{limit}; logs in {log_dir}", flush=True)
            pool = LocalPool(grid.jobs, log_paths, parallel, options.gpus, options.retry,
                             poll_s=0.1 if poll_s is None else poll_s,
                             stop_grace_s=stop_grace_s, timeout_s=options.timeout_s)
            results, interrupted = pool.run()
    report(results, len(grid.jobs))
    write_summary(results, log_dir)
    if interrupted:
        print("runner: interrupted by the user", flush=True)
        return EXIT_INTERRUPTED
    return EXIT_FAILED if any(r.status != "done" for r in results) else 0
