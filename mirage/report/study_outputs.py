"""Write a study's files (what run_seg_report.py does).

    write_study(paths, output_dir, ...) -> {file name: path}

Into ``output_dir``: summary.csv, summary.md, summary.tex, significance.csv, runs.csv (every
run directory found, with its status: nothing is dropped silently) and report.html (where
some runs were trained on part of their training split, also the label-efficiency files
and sections: mirage.report.label_efficiency_outputs); and into each run directory its
report.html when missing (or always, or never). A folder that
holds files this tool did not write is refused, so no user file is ever replaced; every
file is written atomically.
"""
import os
import sys
from pathlib import Path

import pandas as pd

from mirage.report import htmlpage
from mirage.errors import UserError
from mirage.fileio import atomic_path, write_text
from mirage.progress import progress
from mirage.report.grid_report import render_grid_report
from mirage.report.label_efficiency_outputs import write_label_efficiency
from mirage.report import RUN_REPORT_MODES, TABLE_COLUMNS
from mirage.report.run_report import write_run_report
from mirage.report.tensorboard_log import write_tensorboard
from mirage.run.catalog import find_runs
from mirage.run.folder import RunFolder
from mirage.run.identity import identity_hash
from mirage.report.significance import significance_table
from mirage.report.study import build_study, study_metrics, summary_table
from mirage.evaluate.intervals import BOOTSTRAP_RESAMPLES, check_resamples
from mirage.report.tables import paper_tables, to_latex, to_markdown

MARKER = ".mirage-study"  # marks an output folder as this tool's
OUTPUTS = ("summary.csv", "summary.md", "summary.tex", "significance.csv", "runs.csv",
           "report.html")


def check_output_dir(output_dir):
    """UserError unless ``output_dir`` is new, empty or written by this tool before."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output_dir {output_dir} is a file; choose a folder")
    if output_dir.is_dir() and not (output_dir / MARKER).exists() and any(output_dir.iterdir()):
        raise UserError(f"--output_dir {output_dir} holds files not written by "
                        "run_seg_report.py; choose a new or empty folder")


def make_output_dir(output_dir):
    """Create ``output_dir`` (and its parents) and check that it is writable; a one-line
    UserError naming it otherwise."""
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        # What failed may be a parent: a read-only one ("Permission denied" at it), or a
        # file in the way ("Not a directory": name the file).
        failed = Path(err.filename) if err.filename else output_dir
        where = "" if failed == output_dir else f" at {failed}"
        in_the_way = [p for p in output_dir.parents if p.is_file()]
        if in_the_way:
            where = f": {in_the_way[0]} is a file"
        raise UserError(f"--output_dir {output_dir}: cannot create the folder "
                        f"({err.strerror or err}{where}); choose a folder you can write to "
                        "with -o") from None
    if not os.access(output_dir, os.W_OK | os.X_OK):  # an existing read-only folder
        raise UserError(f"--output_dir {output_dir}: the folder is not writable; choose a "
                        "folder you can write to with -o")


def _group_of(study):
    """{(run path, id of the evaluation): (its column, group label)} of the evaluations
    used in a group."""
    found = {}
    for group in study.groups:
        for member in group.members:
            found[(member.run.path, id(member.evaluation))] = (group.key.column, group.label)
    return found


def runs_table(study):
    """One row per run directory (and evaluated dataset): where it went and why not."""
    used = _group_of(study)
    records = []
    for run in study.runs:
        base = {"run": run.name, "path": str(run.path), "seed": run.seed,
                "weights_sha256": run.weights_sha256,
                "identity": identity_hash(run.identity) if run.identity else "",
                "notes": " | ".join(run.notes)}
        if not run.evaluations:
            records.append(dict(base, dataset=run.train_dataset, label="", status=run.status))
            continue
        for evaluation in run.evaluations:
            dataset = evaluation.dataset if not evaluation.external else \
                f"{evaluation.dataset} (from {run.train_dataset})"
            dataset, label = used.get((run.path, id(evaluation)), (dataset, ""))
            status = "in the summary" if label else "not used (duplicate seed)"
            records.append(dict(base, dataset=dataset, label=label, status=status))
    columns = ["run", "dataset", "label", "seed", "status", "notes", "weights_sha256",
               "identity", "path"]
    return pd.DataFrame(records, columns=columns)


def missed_lines(summary):
    """'<label> on <dataset>: Fluid never predicted in 8 of 8 ...' per group with a class
    never predicted (from summary.csv's rows of all classes)."""
    rows = summary[(summary["class"] == "[all]") & (summary["missed"] > 0)]
    return [f"{row.label} on {row.dataset}: {row.missed_note} ({int(row.missed)} volume "
            f"score(s) in all)" for row in rows.itertuples()]


def _write_csv(path, frame, na_rep="NaN"):
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, na_rep=na_rep)


def _relative_href(target, start):
    try:
        return Path(os.path.relpath(target, start)).as_posix()
    except ValueError:  # another drive (Windows)
        return Path(target).resolve().as_uri()


def _write_run_reports(study, mode, datasets_path, tensorboard, quiet,
                       bootstrap=BOOTSTRAP_RESAMPLES):
    notes = []
    if mode == "none":
        return notes
    for run in progress(study.runs, desc="run reports", unit="run", disable=quiet,
                        file=sys.stderr):
        path = RunFolder(run.path).report_file
        if not run.config:
            continue
        if mode == "missing" and path.exists():
            if tensorboard and run.log:
                # The last per-epoch export came before the test lines of log.txt.
                write_tensorboard(run.path, run.log)
            continue
        if not htmlpage.is_ours(path):
            notes.append(f"{path} was not written by this tool; left alone")
            continue
        try:
            write_run_report(run.path, datasets_path, tensorboard=tensorboard, quiet=True,
                             bootstrap=bootstrap)
        except (UserError, OSError) as err:
            notes.append(f"{path}: not written ({err})")
    return notes


def check_metrics(study, metric, table_metrics):
    """UserError naming a metric (--metric, --metrics) that no run's results hold, with the
    ones they do."""
    available = study_metrics(study)
    for option, names in (("--metric", [metric]), ("--metrics", list(table_metrics))):
        unknown = [name for name in names if name not in available]
        if unknown:
            raise UserError(f"{option} {' '.join(unknown)}: no run's results hold "
                            f"{'it' if len(unknown) == 1 else 'them'}; the metrics of "
                            f"these runs: {' '.join(available)}")
    if not table_metrics:
        raise UserError("--metrics: name at least one metric, e.g. --metrics Dice HD95")


def write_study(paths, output_dir, datasets_path=None, run_reports="missing",
                metric="Dice", table_metrics=("Dice", "HD95"), alpha=0.05,
                tensorboard=True, quiet=False, labels=None, columns="dataset",
                bootstrap=BOOTSTRAP_RESAMPLES, ci=False):
    """Find, group and summarise the runs at or under ``paths``; write every output.

    Returns {file name: path}. run_reports: "missing" (write a run's report.html when it
    has none), "all" (rewrite them) or "none". metric: the one the heat map and the HTML
    significance table show; table_metrics: the metrics of summary.md/.tex (--metrics:
    any the runs' results hold, e.g. IoU or HD95_um). labels: {weights file name or
    stem, or automatic row label: the row label to show}. columns: the paper tables'
    columns, "dataset" (rows = models) or "tuning" (one table per dataset, rows = models,
    columns = the tuning protocols). bootstrap: resamples of the 95% intervals in
    summary.csv, significance.csv and the run reports (0: none); ci: show them in the
    paper tables (summary.md, summary.tex, report.html).
    """
    if run_reports not in RUN_REPORT_MODES:
        raise UserError(f"--run_reports must be one of {', '.join(RUN_REPORT_MODES)}")
    if columns not in TABLE_COLUMNS:
        raise UserError(f"--columns must be one of {', '.join(TABLE_COLUMNS)}")
    bootstrap = check_resamples(bootstrap)
    if ci and not bootstrap:
        raise UserError("--ci shows the bootstrap intervals: leave --bootstrap at its "
                        f"default ({BOOTSTRAP_RESAMPLES}) or give N > 0, not 0")
    output_dir = Path(output_dir).expanduser()
    check_output_dir(output_dir)
    runs = find_runs(paths)
    study = build_study(runs, labels)
    check_metrics(study, metric, table_metrics)
    study.notes += _write_run_reports(study, run_reports, datasets_path, tensorboard, quiet,
                                      bootstrap)
    summary = summary_table(study, bootstrap)
    significance = significance_table(study, alpha=alpha, bootstrap=bootstrap)
    tables = paper_tables(summary, list(dict.fromkeys([metric, *table_metrics])), columns,
                          ci=ci)
    runs_frame = runs_table(study)
    unused = [(row.path, row.status) for row in runs_frame.itertuples()
              if row.status != "in the summary"]

    make_output_dir(output_dir)
    write_text(output_dir / MARKER, "Written by run_seg_report.py; its files may be "
                                    "replaced by the next run_seg_report.py.\n")
    written = {name: output_dir / name for name in OUTPUTS}
    _write_csv(written["summary.csv"], summary)
    _write_csv(written["significance.csv"], significance, na_rep="")  # no p: empty cell
    _write_csv(written["runs.csv"], runs_frame)
    md_tables = [t for t in tables if t.metric in table_metrics]
    missed = missed_lines(summary)
    write_text(written["summary.md"], to_markdown(md_tables, unused, study.notes, missed))
    write_text(written["summary.tex"], to_latex(md_tables))
    run_links = {}
    for run in study.runs:
        report = RunFolder(run.path).report_file
        if report.is_file() and htmlpage.is_ours(report):
            run_links[str(run.path)] = _relative_href(report, output_dir)
    files = {name: name for name in OUTPUTS if name != "report.html"}
    page = render_grid_report(study, tables, significance, runs_frame, run_links, files,
                              metric=metric, alpha=alpha, missed=missed)
    htmlpage.write_page(written["report.html"], page)
    if not quiet:
        _print_overview(study, tables, metric, unused, output_dir, missed)
    written.update(write_label_efficiency(study, output_dir, metric, alpha, labels, quiet))
    return written


def _print_overview(study, tables, metric, unused, output_dir, missed=()):
    evaluated = sum(1 for run in study.runs if run.evaluated)
    print(f"{len(study.runs)} run directories, {evaluated} evaluated, {len(study.groups)} "
          f"groups over seeds")
    shown = [t for t in tables if t.metric == metric and t.class_group == "all"]
    if shown:  # one document: each footnote printed once
        print(to_markdown(shown).split("\n", 2)[2].strip())
    for line in missed:
        print(f"never predicted (†): {line}")
    for path, status in unused:
        print(f"not in the summary: {path}: {status}")
    print(f"wrote summary.csv, summary.md, summary.tex, significance.csv, runs.csv and "
          f"report.html in {output_dir}")
