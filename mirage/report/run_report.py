"""``report.html`` of one run: a static, self-contained page (no script, no network).

    write_run_report(run_dir, datasets_path=None) -> the path written

What it shows: the run (model, dataset, seed, training outcome) and its notes; per
evaluated dataset the per-class test table (Dice and IoU in %, HD95 in pixels, means over
volumes as run_seg_eval.py prints them, each with its 95% bootstrap interval over the test
volumes: mirage.evaluate.intervals), box plots of the per-volume scores and the overlay
gallery (best, median and worst B-scan by Dice); the training curves from log.txt; the
resolved config.yaml. Written by run_seg_eval.py after scoring, by run_seg_report.py, and
on demand with ``run_seg_eval.py --report_only -m <run>``.
"""
from pathlib import Path

import numpy as np
import pandas as pd

from mirage.report import htmlpage as H
from mirage.report import plots
from mirage.report.boundaries import KIND as BOUNDARIES, read_boundaries, run_boundary_parts
from mirage.errors import UserError
from mirage.evaluate.intervals import (BOOTSTRAP_RESAMPLES, BCA, check_resamples,
                                       metric_columns, rows_interval)
from mirage.report.gallery import gallery
from mirage.report.overlays import LEGEND
from mirage.report.metric_columns import scale_of, unit_of
from mirage.report.tables import MISSED_MARK
from mirage.report.tensorboard_log import write_tensorboard
from mirage.run.catalog import read_run
from mirage.run.folder import RunFolder
from mirage.run.results import missed_counts


def _number(value, scale=1.0, digits=2):
    if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
        return f"{scale * value:.{digits}f}"
    return "n/a"


def _training_facts(run):
    epochs = [e for e in run.log if isinstance(e.get("epoch"), int)]
    facts = {"epochs in log.txt": f"{len(epochs)} of {run.config.get('epochs', '?')}"}
    scored = [e for e in epochs if isinstance(e.get("val/mIoU"), (int, float))
              and np.isfinite(e["val/mIoU"])]
    if scored:
        best = max(scored, key=lambda e: e["val/mIoU"])
        facts["best validation mIoU"] = (f"{_number(best['val/mIoU'], 100)} % "
                                         f"(epoch {best['epoch']})")
    tests = [e for e in run.log if "test_epoch" in e]
    if tests:
        last = tests[-1]
        facts["test mIoU (log.txt)"] = (f"{_number(last.get('test/mIoU'), 100)} % "
                                        f"(checkpoint of epoch {last['test_epoch']})")
    return facts


def _facts_table(facts):
    frame = pd.DataFrame({"": list(facts), "value": [str(v) for v in facts.values()]})
    return H.table(frame, text_columns={"", "value"})


def class_table(evaluation, bootstrap=BOOTSTRAP_RESAMPLES):
    """DataFrame: per class, then per class group, the mean over volumes (NaN left out).

    A class never predicted in a volume that holds it is marked † (so is its class group)
    and a "missed" column says in how many of the volumes holding it; the column is only
    there when something was missed. With ``bootstrap`` resamples, the means are followed
    by each metric's 95% CI over the test volumes (an Interval; interval_notes makes it
    "(low, high)" and says where it is not BCa).
    """
    rows = evaluation.rows
    missed = missed_counts(rows)
    records = []

    def record(name, part):
        entry = {"class": name, "volumes": part["ID"].nunique()}
        metrics = metric_columns(rows)
        for metric in metrics:
            values = part[metric].to_numpy(dtype=float)
            values = values[np.isfinite(values)]
            entry[f"{metric} ({unit_of(metric)})"] = \
                scale_of(metric) * values.mean() if values.size else float("nan")
        for metric in metrics if bootstrap else ():  # after the means: their columns stay
            entry[f"{metric} 95% CI"] = rows_interval([part], metric, scale_of(metric),
                                                      bootstrap)
        return entry

    for label in dict.fromkeys(rows["Class"]):
        records.append(record(label, rows[rows["Class"] == label]))
    kinds = evaluation.kinds()
    for kind in kinds:
        records.append(record(f"[{kind}]", evaluation.group_rows(kind)))
    if len(kinds) > 1:
        records.append(record("[all]", rows))
    if missed:
        flagged = set(missed) | {f"[{k}]" for k in kinds if
                                 set(evaluation.group_rows(k)["Class"]) & set(missed)}
        flagged |= {"[all]"}
        for entry in records:
            name = entry["class"]
            entry["missed"] = "{} of {}".format(*missed[name]) if name in missed else ""
            if name in flagged:
                entry["class"] = f"{name} {MISSED_MARK}"
    return pd.DataFrame(records)


def interval_notes(table):
    """The intervals of class_table's ``table`` as shown: (the table with each interval
    as text, '(79.10, 83.90)' or 'n/a', and the notes on the intervals that are not BCa)."""
    table = table.copy()
    notes = []
    for column in [c for c in table.columns if c.endswith(" 95% CI")]:
        texts = []
        for name, interval in zip(table["class"], table[column]):
            texts.append(f"({interval.low:.2f}, {interval.high:.2f})" if interval.found
                         else "n/a")
            if interval.method != BCA:
                metric = column[:-len(" 95% CI")]
                notes.append(f"{metric} of {name}: "
                             + (f"95% CI {interval.description}" if interval.found
                                else f"no 95% CI ({interval.note})"))
        table[column] = texts
    return table, notes


def scoring_rules(evaluation):
    """How the scores were computed, in words (the options evaluation.json records)."""
    words = {"zero": "a class absent from both a volume's truth and its prediction scores "
                     "Dice = IoU = 0 there (as the original tool)",
             "nan": "a class absent from both a volume's truth and its prediction is left "
                    "out of the means for that volume"}
    rules = [words.get(evaluation.empty_volume, "how classes absent from a whole volume "
                                                "were scored is not recorded")]
    one_empty = evaluation.options.get("empty_sets_nan")
    if one_empty is not None:
        rules.append("a B-scan where only one of truth and prediction holds a class "
                     + ("has no HD95 for it (left out of the volume's mean)" if one_empty
                        else "counts the image diagonal as its HD95"))
    rules.append({"original": "a volume where a class is never in the truth and the "
                              "prediction of the same B-scan (e.g. never predicted) keeps "
                              "the mean over its B-scans as HD95, 0 where neither mask holds "
                              "the class (as the original tool)",
                  "nan": "a volume where a class is never in the truth and the prediction "
                         "of the same B-scan (e.g. never predicted) has no HD95 (left out)",
                  "diagonal": "a volume where a class is never in the truth and the "
                              "prediction of the same B-scan (e.g. never predicted) gets the "
                              "image diagonal as HD95"}.get(evaluation.hd95_missing, ""))
    return "; ".join(r for r in rules if r)


def _datasets_path(run, evaluation, given):
    """The first existing of: ``given``, the folder recorded at evaluation, the parent of
    config.yaml's data_path; (path or None, the candidates tried)."""
    data_path = run.config.get("data_path")
    candidates = [given, evaluation.options.get("datasets_path"),
                  Path(str(data_path)).parent if data_path else None]
    tried = [Path(str(c)) for c in candidates if c]
    found = next((c for c in tried if (c / evaluation.dataset).is_dir()), None)
    return found, tried


def _evaluation_section(run, evaluation, datasets_path, with_gallery, quiet,
                        bootstrap=BOOTSTRAP_RESAMPLES):
    title = f"Test scores: {evaluation.dataset}"
    if evaluation.external:
        title += f" (external test set; trained on {run.train_dataset})"
    options = evaluation.options
    facts = (f"{evaluation.rows['ID'].nunique()} volumes; files "
             f"{', '.join(p.name for p in evaluation.files)}. Dice and IoU in %, HD95 in "
             f"pixels; means over volumes, NaN left out. Scoring: {scoring_rules(evaluation)}.")
    microns = [m for m in metric_columns(evaluation.rows) if unit_of(m) == "µm"]
    if microns:
        facts += f" {' and '.join(microns)} in micrometres (a spacing was known)."
    if bootstrap:
        facts += (f" 95% CI: BCa bootstrap confidence interval of the mean, the test volumes "
                  f"resampled ({bootstrap} resamples, fixed random state).")
    table, interval_words = interval_notes(class_table(evaluation, bootstrap))
    parts = [H.paragraph(facts),
             H.table(table, digits=2, text_columns={"class", "missed"}),
             H.notes_list(interval_words)]
    missed = missed_counts(evaluation.rows)
    if missed:
        parts.append(H.notes_list([
            f"{MISSED_MARK} {label} never predicted in {n} of {holding} test volume(s) that "
            f"hold it: its Dice there is 0; its HD95 there: see Scoring above"
            for label, (n, holding) in missed.items()]))
    parts.append(H.image(plots.to_png(plots.box_plots(evaluation.rows)),
                         f"per-volume scores on {evaluation.dataset}",
                         "Per-volume Dice and HD95 of each class (box: quartiles; "
                         "whiskers: 1.5 IQR; triangle: mean)."))
    parts += _boundary_parts(run, evaluation)
    if with_gallery:
        root, tried = _datasets_path(run, evaluation, datasets_path)
        if root is None:
            where = ", ".join(str(t) for t in tried) or "nowhere"
            parts.append(H.notes_list([f"no overlay gallery: dataset {evaluation.dataset} "
                                       f"not found (looked in {where}); pass "
                                       "--datasets_path"]))
        else:
            found = gallery(run.path, root, evaluation.external,
                            options.get("ignore_bg", True), quiet=quiet)
            parts.append("<h3>Best, median and worst B-scans by Dice</h3>")
            parts.append(H.legend(found.legend))
            parts += [H.image(png, caption, caption, zoom=found.zoom)
                      for caption, png in found.images]
            parts.append(H.notes_list(found.notes))
    parts.append(_overlays_note(run, evaluation))
    anchor = f"test-{evaluation.dataset}"
    return H.section(title, *parts, anchor=anchor)


def _boundary_parts(run, evaluation):
    """The boundary table and box plot when run_seg_eval.py measured the layer boundaries
    (their file is in the run folder), else []."""
    notes = []
    frame = read_boundaries(run.path, evaluation.external, notes)
    if frame is None:
        return [H.notes_list(notes)]
    name = RunFolder(run.path).measurement_file(BOUNDARIES, evaluation.external).name
    return run_boundary_parts(frame, name) + [H.notes_list(notes)]


def _overlays_note(run, evaluation):
    """Where every test B-scan is drawn (run_seg_eval.py --overlays) and its colour legend;
    "" when they were not drawn."""
    folder = RunFolder(run.path).overlays_dir(evaluation.external)
    legend = folder / LEGEND
    if not legend.is_file():
        return ""
    count = sum(1 for p in folder.glob("*.png") if p.name != LEGEND)
    href = f"{folder.name}/{LEGEND}"  # relative: the report sits in the run folder
    return (f'<p>Every test B-scan ({count}) is drawn in <code>{H.esc(folder.name)}/</code> '
            f"as B-scan | truth | prediction | errors, in the colours above; their legend: "
            f'<a href="{H.esc(href)}">{H.esc(href)}</a>.</p>')


def _training_section(run):
    parts = [_facts_table(_training_facts(run))]
    curves = plots.training_curves(run.log)
    if curves is None:
        parts.append(H.notes_list(["no epoch in log.txt: no training curves"]))
    else:
        parts.append(H.image(plots.to_png(curves), "training curves",
                             "Training and validation loss; mIoU (% of the log's "
                             "fractions): validation per epoch and, dashed, the test score "
                             "of the best checkpoint; the learning rate per epoch."))
    per_class = plots.class_iou_curves(run.log)
    if per_class is not None:
        parts.append(H.image(plots.to_png(per_class), "validation IoU per class"))
    return H.section("Training", *parts, anchor="training")


def precision_used(run):
    """What --fp16 / --amp_dtype did, in words: mixed precision only runs on CUDA.

    The device is the last one log.txt names (a "device" entry), else the configured
    --device; with --device auto and no such entry it cannot be known afterwards.
    """
    if not run.config.get("fp16"):
        return "float32"
    logged = [e["device"] for e in run.log if isinstance(e.get("device"), str)]
    device = (logged[-1] if logged else str(run.config.get("device") or "auto")).lower()
    if device.startswith("cpu"):
        return "not used: CPU run, float32"
    if device.startswith("cuda"):
        return f"used: {run.config.get('amp_dtype', 'fp16')} autocast on CUDA"
    return ("CUDA only; --device auto and log.txt does not record the device; a CPU run "
            "is float32")


def _config_section(run):
    items = sorted(run.config.items())
    precision = precision_used(run)
    shown = {"fp16": precision, "amp_dtype": precision if precision.startswith("not") else ""}
    frame = pd.DataFrame({"option": [k for k, _ in items],
                          "value": [f"{v} ({shown[k]})" if shown.get(k) else str(v)
                                    for k, v in items]})
    return H.section("Configuration (config.yaml)",
                     H.table(frame, text_columns={"option", "value"}), anchor="config")


def render_run_report(run, datasets_path=None, with_gallery=True, quiet=True,
                      bootstrap=BOOTSTRAP_RESAMPLES):
    """The report page of a mirage.run.catalog.Run, as HTML text; ``bootstrap``: the
    resamples of the test tables' 95% intervals (0: none)."""
    facts = {"run directory": run.path, "trained on": run.train_dataset,
             "model (weights)": run.config.get("weights", "?"), "decoder": run.decoder,
             "loss": run.loss, "seed": run.seed, "status": run.status}
    sections = [H.section("Run", _facts_table(facts), H.notes_list(run.notes), anchor="run")]
    for evaluation in run.evaluations:
        sections.append(_evaluation_section(run, evaluation, datasets_path, with_gallery,
                                            quiet, bootstrap))
    if not run.evaluations:
        sections.append(H.section("Test scores", H.notes_list([run.status])))
    sections.append(_training_section(run))
    sections.append(_config_section(run))
    return H.page(f"Run report: {run.name}", sections,
                  subtitle=H.esc(f"{run.train_dataset} / {run.model} / {run.decoder} / "
                                 f"{run.loss} / seed {run.seed}"))


def write_run_report(run_dir, datasets_path=None, tensorboard=True, with_gallery=True,
                     quiet=True, bootstrap=BOOTSTRAP_RESAMPLES):
    """Write ``<run_dir>/report.html`` (and the TensorBoard files when tensorboard is
    installed); returns the report's path. datasets_path: the folder holding the datasets,
    for the overlay gallery (default: the one recorded at evaluation, else the parent of
    config.yaml's data_path). bootstrap: resamples of the 95% intervals of the test
    tables (run_seg_eval.py / run_seg_report.py --bootstrap; 0: none)."""
    bootstrap = check_resamples(bootstrap)
    if not Path(run_dir).is_dir():
        raise UserError(f"run directory {run_dir} not found; give <output>/<version>/"
                        "<dataset>/<run name>/")
    run = read_run(run_dir)
    text = render_run_report(run, datasets_path, with_gallery, quiet, bootstrap)
    path = H.write_page(RunFolder(run.path).report_file, text)
    if tensorboard and run.log:
        write_tensorboard(run.path, run.log)
    return path
