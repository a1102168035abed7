"""95% bootstrap confidence intervals over test volumes (``scipy.stats.bootstrap``).

    volume_sums(frames, metric, scale)         -> (sums, counts): (seeds, volumes) arrays
    mean_interval(sums, counts, resamples)     -> Interval of a mean over volumes (and seeds)
    rows_interval(frames, metric, scale, ...)  -> the two above in one call
    difference_interval(a, b, resamples)       -> Interval of mean(a - b), volumes paired
    interval_columns(metric)                   -> the CSV columns of one metric's interval
    metric_columns(rows)                       -> the score columns of results rows

What is resampled: the test volumes, with replacement, as many as there are; a volume is
the independent unit (its classes, B-scans and the seeds' scores of it move together).
The statistic recomputed on each resample is the very mean that is reported:

- a class of one run: the mean of its per-volume scores;
- a class group of one run: the mean over all (volume, class) rows of the resampled
  volumes, NaN left out (= sum of the volumes' finite scores / their number);
- a cell over seeds: each seed's mean over the same resampled volumes (as above), then
  the mean over the seeds with a value. The seeds are never pooled as extra volumes.

Sums over volumes are taken in ascending order of the volumes' values (and each volume's
own sum correctly rounded), so the result never depends on the order of rows or volumes.

Volumes without a value of the metric (every row NaN, in every seed) are left out, as they
are of the mean. Interval: BCa (bias-corrected and accelerated), two-sided 95%; where BCa
is undefined (e.g. every resample gives the same mean, or SciPy refuses it) the percentile
interval of the same resamples, and the method says so. The random state is fixed
(RANDOM_STATE, a ``numpy.random.default_rng`` seed), so the same scores give the same
interval on every run; the number of resamples is ``--bootstrap N`` (0: no intervals).

SciPy is imported when an interval is computed, never at import (``-h`` stays fast).
"""
import inspect
import math
import warnings
from dataclasses import dataclass

import numpy as np

from mirage.errors import UserError
from mirage.run import METRICS

BOOTSTRAP_RESAMPLES = 10000  # run_seg_eval.py / run_seg_report.py --bootstrap default
MIN_RESAMPLES = 1000  # fewer: the interval's ends move with the random state
RANDOM_STATE = 0  # numpy.random.default_rng seed of every interval
CONFIDENCE = 0.95
BCA, PERCENTILE = "BCa", "percentile"


@dataclass(frozen=True)
class Interval:
    """A confidence interval. method: BCA, PERCENTILE or "" (none: ``note`` says why);
    volumes: how many volumes were resampled."""

    low: float = float("nan")
    high: float = float("nan")
    method: str = ""
    volumes: int = 0
    note: str = ""

    @property
    def found(self):
        return bool(np.isfinite(self.low) and np.isfinite(self.high))

    @property
    def description(self):
        """The CSV's ``<metric>_ci_method``: 'BCa', 'percentile (BCa undefined: ...)',
        'none (only 1 volume with a value)'."""
        words = self.method or "none"
        return f"{words} ({self.note})" if self.note else words


def check_resamples(resamples, option="--bootstrap"):
    """UserError unless ``resamples`` is 0 (no intervals) or at least MIN_RESAMPLES."""
    if isinstance(resamples, bool) or not isinstance(resamples, (int, np.integer)) or \
            (resamples != 0 and resamples < MIN_RESAMPLES):
        raise UserError(f"{option} {resamples}: give the number of bootstrap resamples, at "
                        f"least {MIN_RESAMPLES} (default {BOOTSTRAP_RESAMPLES}), or 0 for no "
                        "confidence intervals")
    return int(resamples)


def interval_columns(metric):
    """The columns of one metric's interval in summary CSVs."""
    return [f"{metric}_ci_low", f"{metric}_ci_high", f"{metric}_ci_method"]


def interval_record(metric, interval):
    """{column: value} of ``interval`` under interval_columns(metric)."""
    low, high, method = interval_columns(metric)
    return {low: interval.low, high: interval.high, method: interval.description}


# ----------------------------------------------------------------------------- data
def metric_columns(rows):
    """The score columns of results rows: METRICS first, then every other numeric column
    that is not a key, a pixel count or the missed flag (later metrics such as HD95_um
    or ASSD_um, in the order of the file), so summaries take new metrics as they come."""
    from mirage.run.results import COUNT_COLUMNS, MISSED  # deferred: pandas
    known = {"ID", "Class", "Group", MISSED, *COUNT_COLUMNS}
    extra = [c for c in rows.columns if c not in known and c not in METRICS
             and rows[c].dtype.kind in "fiu"]
    return [m for m in METRICS if m in rows.columns] + extra


def volume_sums(frames, metric, scale=1.0):
    """Per seed and volume, the sum and the number of the finite scores of ``metric``.

    frames: one DataFrame per seed with columns ID and ``metric`` (any rows: one class,
    or every class of a class group). Returns (sums, counts), arrays (seeds, volumes) over
    the volumes any seed has a finite value of (in the order of their IDs); a seed lacking
    a volume counts 0 there. ``scale``: Dice and IoU are summarised in percent (100).
    Each sum is correctly rounded (math.fsum), so it never depends on the order of the
    rows: BCa's bias term counts the resamples equal to the mean, and a last-bit
    difference would move the interval.
    """
    per_seed = []
    for frame in frames:
        values = scale * frame[metric].to_numpy(dtype=float)
        finite = np.isfinite(values)
        by_volume = {}
        for volume, value in zip(frame["ID"].astype(str).to_numpy()[finite], values[finite]):
            by_volume.setdefault(volume, []).append(value)
        per_seed.append(by_volume)
    volumes = sorted({v for by_volume in per_seed for v in by_volume})
    sums = np.zeros((len(per_seed), len(volumes)))
    counts = np.zeros((len(per_seed), len(volumes)))
    for row, by_volume in enumerate(per_seed):
        for column, volume in enumerate(volumes):
            found = by_volume.get(volume, ())
            sums[row, column] = math.fsum(found)
            counts[row, column] = len(found)
    return sums, counts


def _cell_mean(*arrays, axis=-1):
    """The reported mean: per seed, (sum of scores) / (their number) over the volumes;
    then the mean over the seeds with a value. arrays: sums_1, counts_1, sums_2, ...

    The volumes' sums are added in ascending order, so a resample holding the data's
    volumes in another order gives exactly the data's mean (BCa's bias term counts the
    resamples below and equal to it; a last-bit difference would move the interval)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        per_seed = [np.sort(s, axis=axis).sum(axis=axis) / c.sum(axis=axis)
                    for s, c in zip(arrays[0::2], arrays[1::2])]
    if len(per_seed) == 1:
        return per_seed[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample no seed has a value in
        return np.nanmean(np.stack(per_seed), axis=0)


def _mean_difference(a, b, axis=-1):
    """mean(a - b), the differences added in ascending order (as _cell_mean)."""
    return np.mean(np.sort(a - b, axis=axis), axis=axis)


# ----------------------------------------------------------------------------- intervals
def _random_keyword():
    """SciPy >= 1.15 names the random state ``rng``, older versions ``random_state``; both
    take a numpy Generator and use it as given, so the draws are the same."""
    from scipy import stats
    parameters = inspect.signature(stats.bootstrap).parameters
    return "rng" if "rng" in parameters else "random_state"


def bootstrap(data, statistic, resamples, method, paired=True):
    """scipy.stats.bootstrap of ``data`` with the fixed random state; (low, high)."""
    from scipy import stats
    kwargs = {_random_keyword(): np.random.default_rng(RANDOM_STATE)}
    result = stats.bootstrap(data, statistic, n_resamples=resamples, paired=paired,
                             vectorized=True, confidence_level=CONFIDENCE, method=method,
                             **kwargs)
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def _interval(data, statistic, resamples, volumes):
    """BCa, else the percentile interval (noted); Interval()."""
    if volumes < 2:
        return Interval(volumes=volumes, note=f"only {volumes} volume(s) with a value")
    reason = ""
    for method in (BCA, PERCENTILE):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DegenerateDataWarning: checked below
            try:
                low, high = bootstrap(data, statistic, resamples, method)
            except (ValueError, FloatingPointError, ZeroDivisionError) as err:
                reason = f"SciPy: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
                continue
        if np.isfinite(low) and np.isfinite(high):
            note = f"BCa undefined: {reason}" if method == PERCENTILE else ""
            return Interval(low, high, method, volumes, note)
        reason = "every resample gives the same mean" if _degenerate(data, statistic) \
            else "SciPy's BCa gave no value"
    return Interval(volumes=volumes, note=f"no interval ({reason})")


def _degenerate(data, statistic):
    """True when every volume alone gives the same statistic: every resample's is equal."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        alone = statistic(*[np.asarray(d, dtype=float)[:, None] for d in data], axis=-1)
    alone = alone[np.isfinite(alone)]
    return bool(alone.size and np.all(alone == alone[0]))


def mean_interval(sums, counts, resamples=BOOTSTRAP_RESAMPLES):
    """The interval of the reported mean (module docstring) from volume_sums' arrays."""
    sums, counts = np.atleast_2d(sums), np.atleast_2d(counts)
    if resamples == 0:
        return Interval()
    data = [a for pair in zip(sums, counts) for a in pair]
    return _interval(data, _cell_mean, resamples, sums.shape[1])


def rows_interval(frames, metric, scale=1.0, resamples=BOOTSTRAP_RESAMPLES):
    """mean_interval(*volume_sums(frames, metric, scale))."""
    sums, counts = volume_sums(frames, metric, scale)
    return mean_interval(sums, counts, resamples)


def difference_interval(a, b, resamples=BOOTSTRAP_RESAMPLES):
    """The interval of mean(a - b), ``a`` and ``b`` the two models' scores of the same
    volumes ((n,) arrays, finite): the volumes are resampled in pairs."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if resamples == 0:
        return Interval()
    return _interval([a, b], _mean_difference, resamples, int(a.size))
