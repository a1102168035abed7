"""The label-efficiency files of a study, and its sections of summary.md, summary.tex and
report.html (run_seg_report.py; the numbers: mirage.report.label_efficiency).

    write_label_efficiency(study, output_dir, metric, alpha, labels) -> {file name: path}

Into ``output_dir``, when some run of the study was trained on part of its training split:

    label_efficiency.csv        one row per dataset, model and size: mean, std, seeds
    label_efficiency_auc.csv    one row per dataset and model: the normalised AUC
    label_efficiency_tests.csv  per size, every pair of models: the paired Wilcoxon test
    label_efficiency.png        the metric against the training volumes (log x axis), one
                                line per model, a band of ± one std over seeds

and a section appended to summary.md and summary.tex and inserted into report.html before
its list of runs. A study without such runs gets none of these (earlier ones are removed:
the folder is run_seg_report.py's).
"""
import numpy as np
import pandas as pd

from mirage.fileio import atomic_path, write_text
from mirage.report import htmlpage as H
from mirage.report import plots
from mirage.report.label_efficiency import label_efficiency
from mirage.report.study import unit_of
from mirage.report.tables import GROUP_TITLES, latex_escape

FILES = ("label_efficiency.csv", "label_efficiency_auc.csv", "label_efficiency_tests.csv",
         "label_efficiency.png")
TEST_COLUMNS = ["dataset", "volumes", "model_a", "model_b", "n_volumes", "mean_a", "mean_b",
                "median_diff", "statistic", "p_value", "p_holm", "family_size",
                "significant", "better", "method", "note"]
MISSING = "–"


def title(table):
    return (f"Label efficiency: {table.metric} ({unit_of(table.metric)}), "
            f"{GROUP_TITLES.get(table.class_group, table.class_group)}, {table.column}")


def caption(table):
    unit = unit_of(table.metric)
    whole = (f"; {table.split_volumes} (all) = the whole training split"
             if table.split_volumes else "")
    direction = "lower" if table.lower_is_better else "higher"
    return (f"{title(table)}: mean ± sample std over seeds of each run's mean over test "
            f"volumes and classes, by the number of training volumes (columns{whole}). "
            f"AUC: the area under the mean curve over log(volumes), divided by the log "
            f"span of the sizes, in {unit} (the curve's mean level). {direction.capitalize()}"
            " is better; best per column in bold")


# ----------------------------------------------------------------------------- frames
def cells_frame(tables):
    """label_efficiency.csv: one row per table, model and size."""
    records = []
    for table in tables:
        for curve in table.curves:
            for volumes, point in sorted(curve.points.items()):
                records.append({
                    "dataset": table.column, "model": curve.label, "volumes": volumes,
                    "size": point.size, "all": volumes == table.split_volumes,
                    "metric": table.metric, "class_group": table.class_group,
                    "mean": point.mean, "std": point.std, "seeds": point.seeds,
                    "seed_list": point.seed_list, "cell": point.text,
                    "group_label": point.group.label, "note": point.note})
    columns = ["dataset", "model", "volumes", "size", "all", "metric", "class_group", "mean",
               "std", "seeds", "seed_list", "cell", "group_label", "note"]
    return pd.DataFrame(records, columns=columns)


def auc_frame(tables):
    """label_efficiency_auc.csv: one row per table and model."""
    records = [{"dataset": t.column, "model": c.label, "metric": t.metric,
                "class_group": t.class_group, "auc": c.auc,
                "sizes": " ".join(str(v) for v in t.sizes), "note": c.auc_note}
               for t in tables for c in t.curves]
    return pd.DataFrame(records, columns=["dataset", "model", "metric", "class_group", "auc",
                                          "sizes", "note"])


def tests_frame(tables):
    frames = [t.tests for t in tables if t.tests is not None and len(t.tests)]
    if not frames:
        return pd.DataFrame(columns=TEST_COLUMNS)
    frame = pd.concat(frames, ignore_index=True)
    return frame[[c for c in TEST_COLUMNS if c in frame]]


# ----------------------------------------------------------------------------- layout
def layout(table):
    """(headers, [(label, [cell texts], {bold column indices})]) of a table: the sizes
    then the AUC."""
    headers = [table.size_label(v) for v in table.sizes] + ["AUC"]
    columns = [[c.mean_at(v) for c in table.curves] for v in table.sizes]
    columns.append([c.auc for c in table.curves])
    bold = [table.best(values) for values in columns]
    rows = []
    for i, curve in enumerate(table.curves):
        texts = [curve.points[v].text if v in curve.points else MISSING
                 for v in table.sizes]
        texts.append(f"{curve.auc:.2f}" if np.isfinite(curve.auc) else "n/a")
        rows.append((curve.label, texts, {j for j, best in enumerate(bold) if i in best}))
    return headers, rows


def test_lines(table):
    """One line per tested pair and size, in words."""
    lines = []
    if table.tests is None or not len(table.tests):
        return lines
    for row in table.tests.itertuples():
        p, holm = float(row.p_value), float(row.p_holm)
        if np.isfinite(p):
            verdict = f"{row.better} better" if row.better else "no significant difference"
            text = f"p = {p:.4g} (Holm {holm:.4g}), {verdict}"
        else:
            text = "no p-value"
        note = f"; {row.note}" if row.note else ""
        lines.append(f"{row.volumes} volume(s): {row.model_a} vs {row.model_b}: {text} "
                     f"({row.n_volumes} paired test volumes{note})")
    return lines


def notes_of(table):
    return list(dict.fromkeys(table.notes + [f"{c.label}: {c.auc_note}" for c in
                                             table.curves if c.auc_note]))


def _md(text):
    return str(text).replace("|", "\\|").replace("*", "\\*")


def to_markdown(tables):
    """The section of summary.md: per table, the table, the tests and the notes."""
    lines = []
    for table in tables:
        headers, rows = layout(table)
        lines += [f"## {title(table)}", "", caption(table) + ". Figure: "
                  "label_efficiency.png.", "",
                  "| model | " + " | ".join(headers) + " |",
                  "|:--|" + "--:|" * len(headers)]
        for label, texts, bold in rows:
            cells = [f"**{t}**" if j in bold else t for j, t in enumerate(texts)]
            lines.append(f"| {_md(label)} | " + " | ".join(cells) + " |")
        lines.append("")
        tests = test_lines(table)
        if tests:
            lines += ["Paired Wilcoxon tests per size (test volumes, each model's per-volume "
                      "score averaged over its seeds; Holm-Bonferroni over the pairs of one "
                      "size):", ""] + [f"- {_md(line)}" for line in tests] + [""]
        notes = notes_of(table)
        if notes:
            lines += ["Notes:", ""] + [f"- {_md(note)}" for note in notes] + [""]
    return "\n".join(lines)


def to_latex(tables):
    """The tables of summary.tex (booktabs), one float each."""
    out = []
    for table in tables:
        headers, rows = layout(table)
        out += [f"% {caption(table)}", "\\begin{table}[t]", "\\centering",
                f"\\caption{{{latex_escape(caption(table))}.}}".replace("±", "$\\pm$"),
                "\\begin{tabular}{l" + "c" * len(headers) + "}", "\\toprule",
                "Model & " + " & ".join(latex_escape(h) for h in headers) + " \\\\",
                "\\midrule"]
        for label, texts, bold in rows:
            cells = [latex_escape(t).replace("±", "$\\pm$").replace(MISSING, "--")
                     for t in texts]
            cells = [f"\\textbf{{{c}}}" if j in bold else c for j, c in enumerate(cells)]
            out.append(latex_escape(label) + " & " + " & ".join(cells) + " \\\\")
        out += ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]
    return "\n".join(out)


def html_section(tables, png):
    """The section of report.html: the figure, then per table the table and the tests."""
    parts = [H.image(png, "label-efficiency curves", "Mean over seeds against the number "
                     "of training volumes (log scale), one line per model; the band is ± "
                     "one sample std over seeds.") if png else ""]
    for table in tables:
        headers, rows = layout(table)
        records, bold = [], set()
        for i, (label, texts, best) in enumerate(rows):
            records.append({"model": label, **dict(zip(headers, texts))})
            bold |= {(i, headers[j]) for j in best}
        parts += [f"<h3>{H.esc(title(table))}</h3>", H.paragraph(caption(table) + ".",
                                                                 cls="muted"),
                  H.table(pd.DataFrame(records, columns=["model", *headers]), bold=bold,
                          text_columns={"model"})]
        tests = test_lines(table)
        if tests:
            parts.append(H.paragraph("Paired Wilcoxon tests per size (Holm-Bonferroni over "
                                     "the pairs of one size):", cls="muted"))
            parts.append("<ul>" + "".join(f"<li>{H.esc(t)}</li>" for t in tests) + "</ul>")
        parts.append(H.notes_list(notes_of(table)))
    return H.section("Label efficiency", *parts, anchor="label-efficiency")


def insert_section(page, section):
    """``page`` with ``section`` before its list of runs (else at the end of the body)."""
    for marker in ('<h2 id="runs">', "</body>"):
        if marker in page:
            return page.replace(marker, section + "\n" + marker, 1)
    return page + section


# ----------------------------------------------------------------------------- figure
def plot(tables):
    """PNG bytes: one panel per table; per model its mean against the training volumes
    (log x axis) with a band of ± one std over seeds."""
    from matplotlib.ticker import NullLocator  # deferred with the figure (matplotlib)
    from matplotlib.figure import Figure
    fig = Figure(figsize=(5.2 * len(tables), 3.8), layout="constrained")
    axes = fig.subplots(1, len(tables), squeeze=False)[0]
    for ax, table in zip(axes, tables):
        for curve in table.curves:
            points = [curve.points[v] for v in table.sizes if v in curve.points
                      and np.isfinite(curve.points[v].mean)]
            if not points:
                continue
            x = np.array([p.volumes for p in points], dtype=float)
            mean = np.array([p.mean for p in points])
            std = np.nan_to_num(np.array([p.std for p in points]))
            line, = ax.plot(x, mean, marker="o", label=curve.label)
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2,
                            linewidth=0)
        ax.set_xscale("log")
        ax.set_xticks(table.sizes, [table.size_label(v) for v in table.sizes], fontsize=8)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("training volumes (log scale)", fontsize=9)
        ax.set_ylabel(f"{table.metric} ({unit_of(table.metric)}), "
                      f"{GROUP_TITLES.get(table.class_group, table.class_group)}", fontsize=9)
        ax.set_title(table.column, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return plots.to_png(fig)


# ----------------------------------------------------------------------------- files
def _write_csv(path, frame):
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, na_rep="NaN")


def write_label_efficiency(study, output_dir, metric="Dice", alpha=0.05, labels=None,
                           quiet=True):
    """Write the label-efficiency files and sections (see the module's docstring) after
    run_seg_report.py's other outputs; returns {file name: path} ({} when the study has
    no run trained on part of its split)."""
    tables = label_efficiency(study, metric, "all", alpha, labels)
    written = {name: output_dir / name for name in FILES}
    if not tables:
        for path in written.values():
            path.unlink(missing_ok=True)  # of an earlier study into this folder
        return {}
    _write_csv(written["label_efficiency.csv"], cells_frame(tables))
    _write_csv(written["label_efficiency_auc.csv"], auc_frame(tables))
    _write_csv(written["label_efficiency_tests.csv"], tests_frame(tables))
    png = plot(tables)
    with atomic_path(written["label_efficiency.png"]) as tmp:
        tmp.write_bytes(png)
    for name, text in (("summary.md", to_markdown(tables)), ("summary.tex", to_latex(tables))):
        path = output_dir / name
        if path.is_file():
            write_text(path, path.read_text(encoding="utf-8").rstrip("\n") + "\n\n" + text)
    report = output_dir / "report.html"
    if report.is_file():
        H.write_page(report, insert_section(report.read_text(encoding="utf-8"),
                                            html_section(tables, png)))
    if not quiet:
        print(f"label efficiency: {len(tables)} table(s) of {metric} by training volumes; "
              f"wrote {', '.join(FILES)} and their sections of summary.md, summary.tex and "
              "report.html")
    return written
