"""``report.html`` of a study (a grid of runs): tables, heat maps, tests, links to runs.

    render_grid_report(study, tables, significance, run_links, files) -> HTML text

Static and self-contained like the run reports: heat maps are embedded PNGs; the only
links are relative ones to the files written next to it and to each run's report.html.
"""
import numpy as np
import pandas as pd

from mirage.report import htmlpage as H
from mirage.report import plots
from mirage.report.boundaries import study_boundary_parts
from mirage.report.metric_columns import PERCENT_METRICS
from mirage.report.tables import MISSED_MARK, ci_caption, document_layout

# The narrowest colour scale of a heat map, in the metric's unit (Dice and IoU in %, HD95
# in pixels), and the metric's own range: differences smaller than this keep similar
# colours, so noise between models never looks like a finding (docs: "The grid report").
HEAT_MAP_MIN_SPAN = 10.0
PERCENT_RANGE = (0.0, 100.0)
DISTANCE_RANGE = (0.0, np.inf)

# The significance table's columns, p-values first after the pair so that they stay in
# view on narrow screens; long labels and notes wrap (htmlpage's CSS).
SIGNIFICANCE_COLUMNS = ["dataset", "class_group", "model_a", "model_b", "p_value", "p_holm",
                        "significant", "better", "median_diff", "n_volumes", "note"]


def _paper_table_html(table, rows, notes):
    """The table (cells with their † and [n] marks, never-predicted cells not bold) and
    the footnotes said under it (tables.document_layout)."""
    columns = ["model", *table.columns]
    records, bold = [], set()
    for i, (label, views) in enumerate(rows):
        record = {"model": label}
        for column, view in zip(table.columns, views):
            text = (view.text or "–") + (f" {view.mark}" if view.mark else "")
            record[column] = text + (f" [{view.number}]" if view.number else "")
            if view.bold:
                bold.add((i, column))
        records.append(record)
    return H.table(pd.DataFrame(records, columns=columns), bold=bold,
                   text_columns={"model"}) + H.notes_list(notes)


def _heat_map(table):
    values = np.full((len(table.labels), len(table.columns)), np.nan)
    marks = np.full(values.shape, "", dtype=object)
    for i, label in enumerate(table.labels):
        for j, column in enumerate(table.columns):
            cell = table.cells.get((label, column))
            if cell is not None and cell.has_value:
                values[i, j] = cell.mean
                marks[i, j] = MISSED_MARK if cell.missed else ""
    if not np.isfinite(values).any():
        return ""
    columns, legend = plots.short_labels(table.columns)
    natural = PERCENT_RANGE if table.metric in PERCENT_METRICS else DISTANCE_RANGE
    fig = plots.heat_map(values, table.labels, columns, f"mean {table.title}",
                         higher_is_better=not table.lower_is_better, marks=marks,
                         min_span=HEAT_MAP_MIN_SPAN, natural=natural, unit=table.unit)
    across = "protocol" if table.dataset else "dataset"
    low, high = plots.colour_limits(values, HEAT_MAP_MIN_SPAN, natural)
    caption = (f"Mean {table.title} over seeds, model x {across}. Colours: "
               f"{plots.scale_text(low, high, HEAT_MAP_MIN_SPAN, table.unit)} and centred "
               "on the values, so differences of a few tenths keep similar colours.")
    if legend:
        caption += " Columns: " + "; ".join(f"{short} = {name}" for short, name in legend) + "."
    if marks.any():
        caption += f" {MISSED_MARK}: a class never predicted in test volumes that hold it."
    return H.image(plots.to_png(fig), f"heat map: mean {table.title}", caption)


DIFFERENCE = "mean_diff (95% CI)"  # the paired bootstrap interval, beside median_diff


def _significance_html(significance, metric):
    if significance.empty:
        return H.paragraph("No pair of models shares a dataset: nothing to test.")
    shown = significance[significance["metric"] == metric]
    columns = list(SIGNIFICANCE_COLUMNS)
    frame = shown[columns].copy()
    for column in ("p_value", "p_holm"):
        frame[column] = [("n/a" if not np.isfinite(p) else f"{p:.4g}")
                         for p in frame[column].to_numpy(dtype=float)]
    if "diff_ci_low" in shown:
        frame.insert(columns.index("median_diff") + 1, DIFFERENCE, difference_texts(shown))
    return H.table(frame.reset_index(drop=True), digits=2, ident="significance-table",
                   text_columns={"dataset", "class_group", "model_a", "model_b",
                                 "significant", "better", "note", DIFFERENCE},
                   classes={"p_value": "p", "p_holm": "p", "note": "wide"})


def difference_texts(significance):
    """'1.23 (0.45, 2.01)': the mean of A - B and its 95% paired bootstrap interval, per
    row of significance.csv ('n/a' without pairs; the mean alone without an interval)."""
    texts = []
    for row in significance.itertuples():
        mean, low, high = (float(v) for v in (row.mean_diff, row.diff_ci_low,
                                                row.diff_ci_high))
        if not np.isfinite(mean):
            texts.append("n/a")
        elif np.isfinite(low) and np.isfinite(high):
            texts.append(f"{mean:.2f} ({low:.2f}, {high:.2f})")
        else:
            texts.append(f"{mean:.2f}")
    return texts


def _runs_html(runs_frame, run_links):
    frame = runs_frame[["dataset", "label", "seed", "status", "notes"]].copy()
    frame.insert(0, "run", runs_frame["run"])
    links = {"run": [run_links.get(path) for path in runs_frame["path"]]}
    return H.table(frame.reset_index(drop=True), links=links,
                   text_columns={"run", "dataset", "label", "status", "notes"})


def _difference_words(significance):
    if "diff_ci_low" not in significance:
        return ""
    resamples = significance["ci_resamples"].max() if len(significance) else 0
    return (f"; {DIFFERENCE} = the mean of A - B over the paired volumes and its 95% "
            f"paired bootstrap interval (the volumes resampled in pairs, BCa, "
            f"{int(resamples) if np.isfinite(resamples) else 0} resamples; an interval "
            "without 0 is not corrected for the number of pairs)")


def render_grid_report(study, tables, significance, runs_frame, run_links, files,
                       metric="Dice", alpha=0.05, missed=()):
    """The study page. runs_frame: runs.csv as a DataFrame; run_links: {run path: href}
    (only for reports that exist); files: {name: href} of the other outputs; missed:
    lines about classes never predicted (see study_outputs.missed_lines)."""
    evaluated = sum(1 for run in study.runs if run.evaluated)
    overview = (f"{len(study.runs)} run directories, {evaluated} evaluated; "
                f"{len(study.groups)} groups (dataset x model x decoder x loss x protocol); "
                f"datasets: {', '.join(study.datasets) or 'none'}.")
    links = " · ".join(f'<a href="{H.esc(href)}">{H.esc(name)}</a>'
                       for name, href in files.items())
    never = [f"{MISSED_MARK} never predicted: {line}" for line in missed]
    sections = [H.section("Overview", H.paragraph(overview), f"<p>Files: {links}</p>",
                          H.notes_list(never + list(study.notes)), anchor="overview")]
    primary = [t for t in tables if t.metric == metric]
    maps = [_heat_map(t) for t in primary]
    sections.append(H.section(f"Heat map of mean {metric}", *maps, anchor="heatmap")
                    if any(maps) else H.section(f"Heat map of mean {metric}",
                                                H.paragraph("No value to show.")))
    table_parts = []
    for table, rows, notes in document_layout(tables, "the Overview" if missed else ""):
        table_parts.append(f"<h3>{H.esc(table.title)}</h3>")
        seeds = f"over {table.seeds} seeds" if table.seeds > 1 else "one seed"
        table_parts.append(H.paragraph(f"Mean ± sample std {seeds}{ci_caption(table)}; "
                                       f"best per column in bold (never a cell marked "
                                       f"{MISSED_MARK}).", cls="muted"))
        table_parts.append(_paper_table_html(table, rows, notes))
    sections.append(H.section("Tables", *table_parts, anchor="tables"))
    boundary_parts = study_boundary_parts(study)
    if boundary_parts:
        sections.append(H.section("Layer boundaries", *boundary_parts, anchor="boundaries"))
    sections.append(H.section(
        f"Paired Wilcoxon tests ({metric})",
        H.paragraph(f"Per dataset and class group, every pair of models: two-sided Wilcoxon "
                    f"signed-rank test over the test volumes (each model's per-volume "
                    f"score averaged over its seeds), Holm-Bonferroni corrected over the "
                    f"pairs; significant: corrected p < {alpha}. median_diff = median of "
                    f"A - B{_difference_words(significance)}. All metrics: "
                    f"significance.csv.", cls="muted"),
        _significance_html(significance, metric), anchor="significance"))
    sections.append(H.section("Runs", _runs_html(runs_frame, run_links), anchor="runs"))
    return H.page("Study report", sections)
