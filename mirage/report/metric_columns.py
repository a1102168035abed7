"""The metrics of a study's results: which there are, their units and direction, and the
95% intervals of a summary row.

    study_metrics(study)                       -> Dice, IoU, HD95, then any later metric
    unit_of(metric), lower_is_better(metric)   -> '%', 'px', 'µm'; True for distances
    row_intervals(parts, metrics, bootstrap)   -> a summary.csv row's interval columns

Generic over metric columns: a metric the results files gain (e.g. HD95_um, ASSD_um with a
known spacing) gets the same summary columns, tables and tests as Dice and HD95, its unit
from its name's ending and its direction from its kind (overlap: higher is better; any
distance or error: lower).
"""
from mirage.evaluate.intervals import Interval, interval_record, metric_columns, rows_interval
from mirage.run import METRICS

PERCENT_METRICS = ("Dice", "IoU")  # fractions in the CSVs, percent in every summary
LOWER_IS_BETTER = ("HD95",)
# Metrics of overlap or agreement, where higher is better; every other metric (HD95,
# HD95_um, ASSD_um, boundary and volume errors) is a distance or an error: lower is better.
HIGHER_IS_BETTER_WORDS = ("dice", "iou", "auc", "sensitivity", "specificity", "precision",
                          "recall", "accuracy")
# A metric's unit from its name's ending (HD95_um: micrometres); otherwise pixels.
UNIT_SUFFIXES = (("_um", "µm"), ("_mm3", "mm³"), ("_nl", "nl"), ("_mm", "mm"), ("_px", "px"))
CI_RESAMPLES = "ci_resamples"  # summary.csv / significance.csv: the resamples behind them


def lower_is_better(metric):
    """True for distances and errors (HD95, HD95_um, BoundaryMAE_um, ...)."""
    if metric in LOWER_IS_BETTER:
        return True
    return not any(word in metric.lower() for word in HIGHER_IS_BETTER_WORDS)


def unit_of(metric):
    """'%' (Dice, IoU), 'µm' (a name ending in _um), ..., else 'px'."""
    if metric in PERCENT_METRICS:
        return "%"
    return next((unit for suffix, unit in UNIT_SUFFIXES if metric.endswith(suffix)), "px")


def scale_of(metric):
    """Dice and IoU are fractions in the results and percent in every summary."""
    return 100.0 if metric in PERCENT_METRICS else 1.0


def study_metrics(study):
    """The metrics of the study's results: Dice, IoU, HD95, then any later metric the
    results files of some run hold (e.g. HD95_um), in the order found."""
    found = {}
    for group in study.groups:
        for member in group.members:
            found.update(dict.fromkeys(metric_columns(member.evaluation.rows)))
    return list(dict.fromkeys([*METRICS, *found]))


def row_intervals(parts, metrics, bootstrap, blocked=""):
    """{column: value} of one summary row's 95% intervals (none without ``bootstrap``).

    parts: the row's results rows, one DataFrame per seed. The volumes are resampled once
    for all seeds (a volume is one unit, whichever seeds scored it), and each resample's
    statistic is the row's mean: per seed the mean of its rows of the resampled volumes,
    then the mean over the seeds with a value (mirage.evaluate.intervals). blocked: why
    the row has no mean ("" when it has one).
    """
    if not bootstrap:
        return {}
    record = {CI_RESAMPLES: bootstrap}
    for metric in metrics:
        frames = [p for p in parts if len(p) and metric in p]
        if blocked or not frames:
            interval = Interval(note=f"no mean: {blocked}" if blocked else "no value")
        else:
            interval = rows_interval(frames, metric, scale_of(metric), bootstrap)
        record.update(interval_record(metric, interval))
    return record
