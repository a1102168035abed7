"""Evaluating runs end to end: score, write the results CSVs and evaluation.json, print the
tables, and the one-row-per-run summary.

    evaluate_run(model_path, datasets_path, ...)  -> RunEvaluation (rows, files)
    evaluate_runs([model_path, ...], ...)         -> [RunEvaluation, ...] (run_seg_eval.py)
    write_summary(evaluations, path)              -> one row per run and class group
                                                     (with 95% bootstrap intervals)
"""
import contextlib
import csv
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from mirage.errors import UserError
from mirage.fileio import atomic_path
from mirage.evaluate.inputs import apply_spacing, expand_run_paths, prepare_run
from mirage.evaluate.intervals import (BOOTSTRAP_RESAMPLES, check_resamples,
                                       interval_columns, interval_record, metric_columns,
                                       rows_interval)
from mirage.evaluate.measurements import (measurement_files, print_boundaries,
                                          record_measurements, remove_stale_measurements,
                                          spacing_record)
from mirage.evaluate.scoring import UM_METRICS, check_options, evaluate_prepared
from mirage.run import METRICS
from mirage.run.folder import CONFIG, IDENTITY, RunFolder
from mirage.run.identity import identity_hash
from mirage.run.results import COUNT_COLUMNS, MISSED, missed_counts, record_evaluation

# The first five columns are the original tool's; the pixel counts and the missed flag
# come after them so that readers of the original layout keep working.
CSV_COLUMNS = ("ID", "Class") + METRICS + COUNT_COLUMNS + (MISSED,)
MISSED_MARK = "†"  # marks a class (or class group) never predicted in a volume holding it


def result_files(evaluation):
    """{file path: group} of the CSVs for a run: results.csv, or one per class group."""
    folder = RunFolder(evaluation.run_dir)
    return {folder.results_file(group, evaluation.external): group
            for group in evaluation.groups}


def write_results(evaluation):
    """Write the run's CSV files (ID, Class, Dice, IoU, HD95, truth_pixels, pred_pixels,
    missed; with a spacing then HD95_um, ASSD_um, spacing_um, spacing_from) and its
    measurement files (layer boundaries, thicknesses, lesion areas and volumes); all of
    them or none.

    Each file goes to a temporary name first; all are renamed only once every one of
    them has been written, so an existing results file is never replaced by a partial one.
    Measurement files of an earlier scoring that this one does not write are removed.
    """
    files = result_files(evaluation)
    columns = list(CSV_COLUMNS)
    spacing_columns = {}
    if all(m in evaluation.rows for m in UM_METRICS):
        columns += list(UM_METRICS)
        spacing_columns = evaluation.spacing.columns() if evaluation.spacing else {}
        columns += list(spacing_columns)
    measured = measurement_files(evaluation)
    with contextlib.ExitStack() as stack:
        for path, group in files.items():
            tmp = stack.enter_context(atomic_path(path))
            evaluation.group_rows(group).assign(**spacing_columns).to_csv(
                tmp, columns=columns, index=False, na_rep="NaN")
        for path, frame in measured.items():
            frame.to_csv(stack.enter_context(atomic_path(path)), index=False, na_rep="NaN")
    evaluation.files = list(files)
    evaluation.measurement_files = list(measured)
    remove_stale_measurements(evaluation)
    return evaluation.files


def _percent_table(frame):
    """Dice and IoU x100, HD95 as is."""
    frame = frame.copy()
    frame[["Dice", "IoU"]] *= 100
    return frame


def results_table(evaluation):
    """DataFrame for printing: per-class means over volumes, then each group and overall.

    Dice and IoU in percent, HD95 in pixels; group rows are means over all (volume, class)
    rows of the group, NaN ignored.
    """
    metrics = _printed_metrics(evaluation)
    rows = _percent_table(evaluation.rows)
    per_class = rows.groupby("Class", sort=False)[metrics].mean()
    means = {f"[{group}]": evaluation.group_rows(group) for group in evaluation.groups}
    if len(evaluation.groups) > 1:
        means["[all]"] = evaluation.rows
    group_means = pd.DataFrame({name: _percent_table(part)[metrics].mean()
                                for name, part in means.items()}).T
    return pd.concat([per_class, group_means])


def _printed_metrics(evaluation):
    """METRICS, then HD95_um and ASSD_um where the rows hold them (a spacing was known)."""
    return list(METRICS) + [m for m in UM_METRICS if m in evaluation.rows]


def print_results(evaluation, stream=None):
    """Print the per-class table and the group means of one run."""
    stream = stream or sys.stdout
    volumes = evaluation.rows["ID"].nunique()
    target = f" on {evaluation.external}" if evaluation.external else ""
    microns = ""
    if any(m in evaluation.rows for m in UM_METRICS):
        microns = f", HD95_um and ASSD_um in micrometres ({evaluation.spacing.describe()})"
    print(f"\n{evaluation.run_dir}{target}: {volumes} volume(s), {evaluation.num_slices} "
          f"B-scans. Dice and IoU in %, HD95 in pixels{microns}; means over volumes",
          file=stream)
    table = results_table(evaluation)
    flagged = _flagged_rows(evaluation)
    names = [f"{name} {MISSED_MARK}" if name in flagged else name for name in table.index]
    width = max(len("class"), *(len(name) for name in names))
    print(f"{'class':<{width}}" + "".join(f"{m:>9}" for m in table.columns), file=stream)
    for name, (_, row) in zip(names, table.iterrows()):
        cells = "".join("      n/a" if np.isnan(v) else f"{v:9.2f}" for v in row)
        print(f"{name:<{width}}{cells}", file=stream)
    for label, (missed, holding) in missed_counts(evaluation.rows).items():
        print(f"{MISSED_MARK} {label}: never predicted in {missed} of {holding} volume(s) "
              f"that hold it; {_missed_hd95(evaluation.hd95_missing)}", file=stream)
    print_boundaries(evaluation.measurements, stream)
    if evaluation.files:
        names = ", ".join(Path(path).name for path in evaluation.files
                          + evaluation.measurement_files)
        print(f"wrote {names} in {evaluation.run_dir}", file=stream)


def _flagged_rows(evaluation):
    """Names of the printed rows (classes and [groups]) holding a missed class."""
    missed = evaluation.rows[evaluation.rows[MISSED].astype(bool)]
    flagged = set(missed["Class"])
    for group in evaluation.groups:
        if (missed["Group"] == group).any():
            flagged.add(f"[{group}]")
    if flagged:
        flagged.add("[all]")
    return flagged


def _missed_hd95(rule):
    """What HD95 a missed volume got under ``rule`` (--hd95_missing), in words."""
    return {"original": "HD95 there is the mean over its B-scans (0 where neither mask "
                        "holds the class), so it can look perfect (--hd95_missing "
                        "original, as the original tool)",
            "nan": "HD95 there is NaN, left out of the means (--hd95_missing nan)",
            "diagonal": "HD95 there is the image diagonal (--hd95_missing diagonal)"}[rule]


def evaluate_run(model_path, datasets_path, external=None, ignore_bg=True,
                 empty_sets_nan=True, empty_volume="zero", workers=1, quiet=False,
                 foreign_predictions=False, hd95_missing="original", spacing=None,
                 measure=True):
    """Evaluate one run directory, write its CSV files and print its tables.

    model_path: ``.../<dataset>/<run name>/`` holding ``preds/`` (or ``preds_<external>/``).
    datasets_path: the folder holding ``<dataset>/`` (and ``<external>/``).
    ignore_bg: leave background-like classes (bg, background, above ilm) unscored.
    empty_sets_nan: HD95 of a B-scan where exactly one mask is empty is NaN (True) or the
    image diagonal (False). empty_volume: "zero" (Dice = IoU = 0 when a class is absent from
    both volumes, as the original tool) or "nan" (such pairs left out of the means).
    workers: processes scoring B-scans in parallel. foreign_predictions: score predictions
    that carry no manifest of the run's best checkpoint (made by another tool).
    hd95_missing: HD95 of a volume where a class is never in the truth and the prediction
    of the same B-scan, e.g. never predicted: "original" (the mean over B-scans, often 0),
    "nan" or "diagonal" (see mirage.evaluate.scoring.volume_scores).
    spacing: (axial, lateral[, B-scan]) micrometres per pixel (or a Spacing) instead of
    the dataset's INFO.json "spacing"; None: INFO.json's, if any (else pixels only).
    measure: also write the layer boundary, thickness and lesion area/volume files.
    Returns a RunEvaluation (``.rows`` is the DataFrame of all rows, ``.files`` the CSVs,
    ``.measurements`` and ``.measurement_files`` the rest).
    """
    return evaluate_runs([model_path], datasets_path, external, ignore_bg, empty_sets_nan,
                         empty_volume, workers, quiet=quiet,
                         foreign_predictions=foreign_predictions,
                         hd95_missing=hd95_missing, spacing=spacing, measure=measure)[0]


def _note_unscored(inputs):
    if inputs.unscored_predictions > 0:
        print(f"note: {inputs.unscored_predictions} prediction(s) in {inputs.pred_dir} have no "
              "ground-truth mask and were not scored", file=sys.stderr)


# ----------------------------------------------------------------------------- summary
# The columns of the --summary CSV, in order. The first tool wrote only the run, dataset,
# group, volumes, path and metric columns; its files are recognised too (check_summary_path).
SUMMARY_COLUMNS = ("run", "dataset", "group", "seed", "identity", "volumes", "path", "note",
                   "missed", *[f"{metric}{part}" for metric in METRICS
                               for part in ("", "_mean", "_std")])
_SUMMARY_CORE = ("run", "dataset", "group", "volumes", "path",
                 *[f"{metric}_mean" for metric in METRICS])
# Appended after SUMMARY_COLUMNS (never between them): per metric its 95% bootstrap
# interval over volumes, then the resample count; metrics beyond METRICS (e.g. HD95_um,
# when the results hold them) follow with their own columns.
_METRIC_PARTS = ("", "_mean", "_std", "_ci_low", "_ci_high", "_ci_method")
CI_RESAMPLES = "ci_resamples"
DATASET_MARK = "INFO.json"  # a folder holding it (or under one that does) is a dataset's
_HEADER_BYTES = 1 << 16  # a summary's header is a few hundred bytes


def _is_summary_csv(path):
    """True when ``path`` starts with the header of a summary CSV this tool wrote."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(_HEADER_BYTES)
    except OSError:
        return False
    try:
        first = head.decode("utf-8").splitlines()[0]
    except (UnicodeDecodeError, IndexError):
        return False  # binary (a checkpoint, an image) or empty
    columns = next(csv.reader([first]), [])
    return columns[:3] == list(SUMMARY_COLUMNS[:3]) and set(_SUMMARY_CORE) <= set(columns) \
        and all(_summary_column(c, columns) for c in columns)


def _summary_column(name, columns):
    """True for a column a summary CSV of this tool may hold: SUMMARY_COLUMNS, the
    intervals' and the resample count, and a later metric's (``M`` with ``M_mean``)."""
    return name in SUMMARY_COLUMNS or name == CI_RESAMPLES \
        or f"{name}_mean" in columns or any(name.endswith(part) and len(name) > len(part)
                                            for part in _METRIC_PARTS[1:])


def _protected_folder(path):
    """(folder, what it is) of the run or dataset folder ``path`` lies in, or None."""
    for folder in path.parents:
        for mark, what in ((CONFIG, "a run folder"), (IDENTITY, "a run folder"),
                           (DATASET_MARK, "a dataset folder")):
            if (folder / mark).is_file():
                return folder, f"{what} (it holds {mark})"
    return None


def check_summary_path(path):
    """UserError unless ``path`` (--summary) may be written: a new file, or a summary CSV
    an earlier run_seg_eval.py wrote, outside every run folder and dataset folder.

    Checked before anything is scored, so a mistyped --summary never costs an evaluation,
    and never replaces a checkpoint, a log, a prediction or a dataset's file.
    """
    given = Path(path).expanduser()
    fix = "give --summary a new .csv file outside run and dataset folders"
    resolved = given.resolve()  # a link is judged by what it points to
    inside = _protected_folder(resolved)
    if inside is not None:
        folder, what = inside
        raise UserError(f"--summary {given}: {folder} is {what}, whose files must not be "
                        f"replaced; {fix}")
    if resolved.is_dir():
        raise UserError(f"--summary {given} is a folder; {fix}")
    if resolved.exists() and not _is_summary_csv(resolved):
        raise UserError(f"--summary {given} exists and is not a summary CSV written by "
                        f"run_seg_eval.py (no run,dataset,group,... header); it is left as it "
                        f"is: {fix}, or move the file away")
    blocking = next((p for p in resolved.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise UserError(f"--summary {given}: {blocking} is a file, not a folder; {fix}")


def summary_table(evaluations, bootstrap=BOOTSTRAP_RESAMPLES):
    """One row per run and class group (and "all" where there are several groups).

    Mean: over all (volume, class) rows of the group, NaN ignored (as printed). Std: the
    sample standard deviation over volumes of each volume's mean over the group's classes.
    Dice and IoU in percent, HD95 in pixels; the text columns read "mean ± std". Each row
    names its run's seed and identity hash (identity.json), so seeds of one configuration
    are told apart and runs of different options are never mistaken for one another.
    ``missed``: how many (volume, class) rows of the group hold a class never predicted.
    bootstrap: resamples of the 95% intervals appended after these columns
    (summary_intervals); 0 leaves them out.
    """
    records = []
    for ev in evaluations:
        identity = RunFolder(ev.run_dir).read_identity() or {}  # none for runs of the first version
        groups = list(ev.groups) + (["all"] if len(ev.groups) > 1 else [])
        for group in groups:
            rows = _percent_table(ev.group_rows(group))
            per_volume = rows.groupby("ID")[list(METRICS)].mean()
            record = {"run": ev.run_dir.name, "dataset": ev.dataset, "group": group,
                      "seed": identity.get("seed"),
                      "identity": identity_hash(identity) if identity else "",
                      "volumes": len(per_volume), "path": str(ev.run_dir), "note": ev.note,
                      "missed": sum(n for n, _ in missed_counts(rows).values())}
            for metric in METRICS:
                mean, std = rows[metric].mean(), per_volume[metric].std()
                spread = "n/a" if np.isnan(std) else f"{std:.2f}"  # n/a: one volume
                record[metric] = f"{mean:.2f} ± {spread}"
                record[f"{metric}_mean"], record[f"{metric}_std"] = mean, std
            record.update(summary_intervals(rows, bootstrap))
            records.append(record)
    extra = list(dict.fromkeys(m for ev in evaluations for m in metric_columns(ev.rows)
                               if m not in METRICS))
    return pd.DataFrame(records, columns=list(SUMMARY_COLUMNS)
                        + summary_interval_columns(extra, bootstrap))


def summary_interval_columns(extra, bootstrap):
    """The columns appended to SUMMARY_COLUMNS: each metric's interval, the resample
    count, then each ``extra`` metric's columns (its own, then its interval's)."""
    columns = []
    if bootstrap:
        columns += [c for metric in METRICS for c in interval_columns(metric)]
        columns.append(CI_RESAMPLES)
    for metric in extra:
        columns += [f"{metric}{part}" for part in _METRIC_PARTS[:3]]
        columns += interval_columns(metric) if bootstrap else []
    return columns


def summary_intervals(rows, bootstrap):
    """{column: value} of one summary row's intervals (and of the metrics beyond METRICS).

    rows: the group's results rows, Dice and IoU already in percent. The interval of each
    metric is that of the row's mean: the volumes resampled, the mean over all (volume,
    class) rows of each resample (mirage.evaluate.intervals).
    """
    record = {}
    for metric in metric_columns(rows):
        if metric not in METRICS:
            values = rows[metric].to_numpy(dtype=float)
            mean = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
            std = rows.groupby("ID")[metric].mean().std()
            spread = "n/a" if np.isnan(std) else f"{std:.2f}"
            record.update({metric: f"{mean:.2f} ± {spread}", f"{metric}_mean": mean,
                           f"{metric}_std": std})
        if bootstrap:
            record.update(interval_record(metric, rows_interval([rows], metric,
                                                                resamples=bootstrap)))
    if bootstrap:
        record[CI_RESAMPLES] = bootstrap
    return record


def write_summary(evaluations, path, bootstrap=BOOTSTRAP_RESAMPLES):
    """Write summary_table(evaluations, bootstrap) to the CSV file ``path`` (atomically);
    returns it.

    UserError (nothing written) when ``path`` is not one to write (check_summary_path)
    or ``bootstrap`` is not a resample count (check_resamples).
    """
    check_summary_path(path)
    table = summary_table(evaluations, check_resamples(bootstrap))
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, na_rep="NaN")
    return table


def evaluate_runs(model_paths, datasets_path, external=None, ignore_bg=True,
                  empty_sets_nan=True, empty_volume="zero", workers=1, summary=None,
                  quiet=False, foreign_predictions=False, on_scored=None,
                  hd95_missing="original", bootstrap=BOOTSTRAP_RESAMPLES,
                  spacing=None, measure=True):
    """Evaluate several runs (what run_seg_eval.py does); returns their RunEvaluations.

    A path that is not a run folder but holds run folders (an output root such as
    ``./__output/seg/v1``) stands for those of them that have predictions to score.
    Every run's files are checked before any is scored, so a typo in the last path fails
    at once. Each run's CSVs are written when that run is done, with evaluation.json
    (how they were scored); then ``on_scored(evaluation)`` is called if given (the command
    line writes the run's report there). ``summary`` (a CSV path) is written at the end;
    it is checked first (check_summary_path), with ``bootstrap``: the resamples of its
    95% intervals (0: none). ``spacing`` (run_seg_eval.py --spacing) replaces the
    datasets' INFO.json spacing; it may only be given for runs of one evaluated dataset.
    ``measure``: write the measurement files too (see evaluate_run).
    """
    check_options(empty_volume, workers, hd95_missing)
    override = apply_spacing([], spacing)  # a bad --spacing fails before anything is read
    if summary:
        check_summary_path(summary)
        check_resamples(bootstrap)
    run_dirs, skipped, notes = expand_run_paths(model_paths, external)
    for note in [] if quiet else notes:
        print(f"note: {note}")
    if skipped and not quiet:
        print(f"note: {len(skipped)} run folder(s) without predictions to score skipped: "
              f"{', '.join(p.name for p in skipped)}")
    prepared = [prepare_run(path, datasets_path, external, ignore_bg, foreign_predictions)
                for path in run_dirs]
    apply_spacing(prepared, override)
    evaluations = []
    for inputs in prepared:
        if inputs.note and not quiet:
            print(f"note: {inputs.run_dir.name}: {inputs.note}")
        evaluation = evaluate_prepared(inputs, empty_sets_nan, empty_volume, workers, quiet,
                                       hd95_missing, measure)
        evaluation.note = inputs.note
        write_results(evaluation)
        record_evaluation(evaluation, datasets_path=str(Path(datasets_path).resolve()),
                          ignore_bg=ignore_bg, empty_sets_nan=empty_sets_nan,
                          empty_volume=empty_volume, hd95_missing=hd95_missing,
                          note=inputs.note or "", **spacing_record(inputs.spacing))
        record_measurements(evaluation)
        if not quiet:
            _note_unscored(inputs)
            print_results(evaluation)
        if on_scored is not None:
            on_scored(evaluation)
        evaluations.append(evaluation)
    if summary:
        table = write_summary(evaluations, summary, bootstrap)
        if not quiet:
            print(f"\nsummary ({summary}):")
            print(table[["run", "dataset", "group", "volumes", *METRICS]].to_string(index=False))
    return evaluations
