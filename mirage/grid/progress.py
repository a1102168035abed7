"""The runner's progress line: jobs finished of all, elapsed time, the counts, the time left.

Shown on stderr while the local pool (:mod:`mirage.grid.local`) or a SLURM job array
(:mod:`mirage.grid.slurm`) runs; only the local pool shows a time-left estimate
(:func:`time_left_estimate`): how long SLURM's tasks wait in the queue is not known.
"""
import time

from mirage.progress import progress

# The runner's progress line: finished/total, elapsed time and the counts. tqdm's own rate
# and time left ({rate}, {remaining}) are left out: its rate over jobs of very different
# lengths jumps (a few quick failures make a long grid look nearly done).
PROGRESS_FORMAT = "{desc}: {n_fmt}/{total_fmt} jobs finished |{bar}| {elapsed} elapsed{postfix}"


def progress_bar(total):
    """The runner's live progress line (on stderr; where that is not a terminal, a plain
    line at most every ``mirage.progress.PLAIN_INTERVAL_S`` seconds and the last one)."""
    return progress(total=total, desc="runner", unit="job", dynamic_ncols=True,
                    bar_format=PROGRESS_FORMAT)


def show_progress(bar, results, running, estimate=None):
    """Redraw the line when a count changed, else at most once a second (elapsed time).
    ``estimate``: words on the time left, or None for none (e.g. a SLURM queue)."""
    results = list(results)
    counts = {status: sum(r.status == status for r in results)
              for status in ("done", "failed", "timed out", "cancelled", "lost")}
    state = (tuple(counts.values()), running)
    now = time.monotonic()
    if state == getattr(bar, "runner_state", None) and now - bar.runner_shown < 1.0:
        return
    bar.runner_state, bar.runner_shown = state, now
    # done and failed always, the rarer outcomes once they happen
    text = "".join(f"{status} {count}, " for status, count in counts.items()
                   if count or status in ("done", "failed")) + f"running {running}"
    bar.set_postfix_str(text + (f"; {estimate}" if estimate else ""), refresh=False)
    bar.update(len(results) - bar.n)  # redraws, also when the count is unchanged
    bar.refresh()


def time_left_estimate(done_seconds, running_seconds, pending, parallel):
    """Seconds until every job is finished, from the mean time of the jobs done so far:
    a mean job for each pending job, the rest of one for each running job (none once it
    ran longer), the sum shared by the jobs that can run at once. None before the first
    job is done (nothing measured: no guess)."""
    if not done_seconds:
        return None
    mean = sum(done_seconds) / len(done_seconds)
    work = pending * mean + sum(max(mean - seconds, 0.0) for seconds in running_seconds)
    slots = max(1, min(parallel, pending + len(running_seconds)))
    return work / slots
