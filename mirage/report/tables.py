"""The paper-style tables: rows = models, columns = datasets, cells mean ± std over seeds.

    paper_tables(summary, metrics, columns="dataset", ci=False) -> [PaperTable, ...]
    to_markdown(tables, ...)         -> summary.md text
    to_latex(tables)                 -> summary.tex text (booktabs)

columns="dataset" (run_seg_report.py's default): one table per metric and class group,
rows = the labels, columns = the datasets. columns="tuning": one table per metric, class
group and dataset, rows = the labels without the tuning protocol (summary.csv's
model_label), columns = the protocols in words (tuning_label) in the order of TUNINGS
(frozen, fully_frozen, linear_probe, lora, full; LoRA variants by rank).

Cells come from summary.csv's class-group rows ("[all]", "[layers]", "[lesions]"); the
best mean per column (highest Dice/IoU, lowest HD95, compared as printed with two
decimals) is in bold, ties all bold. A cell whose runs never predicted a class in a test
volume that holds it is marked † (MISSED_MARK) with a footnote and is never bold: its HD95
can look perfect (run_seg_eval.py --hd95_missing). A cell is the mean over the seeds with a
value of its metric: with fewer than the group's seeds (e.g. one seed's HD95 NaN in every
volume) a footnote says "1 of 2 seeds scored", and one seed shows no ± std.

In summary.md and the study's report.html each footnote is said once, under the first
table that needs it (document_layout); summary.tex keeps every table self-contained.

With ci=True (run_seg_report.py --ci) each cell also shows the 95% bootstrap interval of
its mean over the test volumes in parentheses, '81.20 ± 0.31 (79.90, 82.40)', from
summary.csv's <metric>_ci_low/_ci_high; the caption says how it was computed, and a
footnote says where it is a percentile interval (BCa undefined) or missing. Without it
the tables are exactly those of earlier versions.
"""
import re
from dataclasses import dataclass, field

import numpy as np

from mirage.protocol import TUNINGS
from mirage.report import TABLE_COLUMNS
from mirage.report.metric_columns import CI_RESAMPLES, lower_is_better, unit_of
from mirage.report.labels import ENSEMBLE_NOTE
from mirage.report.study import column_label

GROUP_TITLES = {"all": "all scored classes", "layers": "layers", "lesions": "lesions"}
MISSING_MD = "–"
MISSED_MARK = "†"
# What a volume with a missed class scores, per metric and --hd95_missing rule.
_MISSED_HD95 = {
    "original": "In those volumes its HD95 is the mean over the volume's B-scans, 0 where "
                "neither mask holds the class, so the cell looks better than it is (score "
                "strictly with run_seg_eval.py --hd95_missing diagonal or nan)",
    "nan": "Its HD95 leaves those volumes out (--hd95_missing nan)",
    "diagonal": "In those volumes its HD95 is the image diagonal (--hd95_missing diagonal)",
}


def missed_effect(metric, rule):
    """What a never-predicted class does to ``metric`` under the --hd95_missing ``rule``."""
    if not metric.startswith("HD95"):
        return f"In those volumes its {metric} is 0"
    return _MISSED_HD95.get(rule, _MISSED_HD95["original"])


@dataclass
class Cell:
    """One mean over seeds. seeds: the seeds with a value of the table's metric; runs: the
    seeds the group has (with a value or not; 0: not known, taken as ``seeds``)."""

    mean: float
    std: float
    seeds: int
    notes: list = field(default_factory=list)
    missed: str = ""  # which class was never predicted in how many volumes ("" if none)
    hd95_missing: str = "original"
    runs: int = 0
    ci_low: float = float("nan")  # the 95% bootstrap interval over test volumes
    ci_high: float = float("nan")
    ci_method: str = ""  # summary.csv's <metric>_ci_method ("BCa", "percentile (...)")

    def __post_init__(self):
        self.runs = max(self.runs, self.seeds)

    def reason(self, metric):
        """The note that explains a missing mean: a conflict first, then NaN values."""
        for words in (("empty_volume", "class sets"), (f"{metric}:",)):
            found = [n for n in self.notes if any(w in n for w in words)]
            if found:
                return found[0]
        return self.notes[0] if self.notes else "no value"

    @property
    def has_value(self):
        return np.isfinite(self.mean)

    @property
    def has_ci(self):
        return bool(np.isfinite(self.ci_low) and np.isfinite(self.ci_high))

    def ci_note(self):
        """The footnote of a cell whose interval is not BCa: how it was computed, or why
        there is none ("" for BCa)."""
        if self.has_ci and self.ci_method.startswith("BCa"):
            return ""
        if self.has_ci:
            return f"95% CI: {self.ci_method or 'method not recorded'}"
        return f"no 95% CI: {self.ci_method or 'not computed'}"


@dataclass
class PaperTable:
    metric: str
    class_group: str
    columns: list  # the datasets, or (columns="tuning") the protocols in words
    labels: list
    cells: dict = field(default_factory=dict)  # (label, column) -> Cell
    seeds: int = 0  # the most seeds of any cell's group
    dataset: str = ""  # the dataset of a table by protocol ("": columns are datasets)
    ci: bool = False  # show each cell's 95% bootstrap interval (run_seg_report.py --ci)
    resamples: int = 0  # the bootstrap resamples behind the intervals

    @property
    def unit(self):
        return unit_of(self.metric)

    @property
    def lower_is_better(self):
        return lower_is_better(self.metric)

    @property
    def title(self):
        title = f"{self.metric} ({self.unit}), {GROUP_TITLES[self.class_group]}"
        return f"{title}, {self.dataset}" if self.dataset else title

    def where(self, label, column):
        """A cell in words: 'MIRAGE-Base on AROI', 'MIRAGE-Base, LoRA r8 on AROI'."""
        if self.dataset:
            return f"{label}, {column} on {self.dataset}"
        return f"{label} on {column}"

    def best(self, column):
        """Labels whose cell is the best of the column (as printed)."""
        values = {label: round(cell.mean, 2) for (label, col), cell in self.cells.items()
                  if col == column and cell.has_value and not cell.missed}
        if not values:
            return set()
        pick = min if self.lower_is_better else max
        target = pick(values.values())
        return {label for label, value in values.items() if value == target}

    def text(self, label, column):
        """'81.20 ± 0.31', '81.20' (one seed with a value), 'n/a' (no mean), or '' (no
        run)."""
        cell = self.cells.get((label, column))
        if cell is None:
            return ""
        if not cell.has_value:
            return "n/a"
        text = f"{cell.mean:.2f}"
        if cell.seeds > 1:
            text += f" ± {cell.std:.2f}"
        if self.ci and cell.has_ci:
            text += f" ({cell.ci_low:.2f}, {cell.ci_high:.2f})"
        return text

    def footnote(self, label, column):
        cell = self.cells.get((label, column))
        if cell is None:
            return ""
        note = self._footnote(cell)
        if self.ci and cell.has_value and cell.ci_note():
            return f"{note}; {cell.ci_note()}" if note else cell.ci_note()
        return note

    def _footnote(self, cell):
        if not cell.has_value:
            return cell.reason(self.metric)
        if cell.seeds < cell.runs:  # e.g. a seed whose every volume has a NaN HD95
            prefix = f"{self.metric}: {cell.seeds} of {cell.runs} seeds scored"
            said = next((n for n in cell.notes if n.startswith(prefix)), prefix)
            return said[len(f"{self.metric}: "):]
        ensemble = next((n for n in cell.notes if n.startswith(ENSEMBLE_NOTE)), "")
        if ensemble:  # one prediction of several runs: no std over seeds, by design
            return ensemble
        if cell.runs < self.seeds:
            return f"{cell.seeds} seed(s) only"
        return ""

    def layout(self, footnotes=None):
        """The table as shown: (rows, footnotes said here, missed).

        rows: [(label, [CellView per column])]; footnotes: [(number, text)] of the notes
        first needed by this table (a cell's ``number`` refers to one); ``footnotes`` (a
        Footnotes shared by the tables of one document) numbers them across tables, so a
        note already said under an earlier table is referred to, not repeated; without it
        the table numbers its own from 1. missed: the † footnote's items (empty when no
        cell is marked).
        """
        footnotes = Footnotes() if footnotes is None else footnotes
        rows, said, missed = [], [], []
        for label in self.labels:
            views = []
            for column in self.columns:
                cell = self.cells.get((label, column))
                view = CellView(text=self.text(label, column),
                                bold=label in self.best(column))
                if cell is not None and cell.missed:
                    view.mark = MISSED_MARK
                    missed.append(f"{self.where(label, column)}: {cell.missed}")
                note = self.footnote(label, column)
                if note:
                    view.number, new = footnotes.number(note)
                    if new:
                        said.append((view.number, note))
                views.append(view)
            rows.append((label, views))
        return rows, said, missed

    def missed_footnote(self, missed):
        """The † footnote of this table alone: which cells, and what a missed class does
        to this metric (summary.tex, where each table stands on its own)."""
        rules = {c.hd95_missing for c in self.cells.values() if c.missed} or {"original"}
        effect = "; ".join(missed_effect(self.metric, rule) for rule in sorted(rules))
        return f"{MISSED_MARK} {'; '.join(missed)}. {effect}. Never in bold."


class Footnotes:
    """The numbered footnotes of one document: each text gets one number, the first time a
    table needs it."""

    def __init__(self):
        self._numbers = {}

    def number(self, text):
        """(the number of ``text``, whether it is new)."""
        if text in self._numbers:
            return self._numbers[text], False
        self._numbers[text] = len(self._numbers) + 1
        return self._numbers[text], True


def missed_footnote(tables, listed_in=""):
    """The † footnote of a document of ``tables``, said once: which cells (or, with
    ``listed_in``, where they are listed) and what a class never predicted does to each
    metric of the tables that mark one ("" when none does)."""
    cells = [(table, label, column, cell) for table in tables
             for (label, column), cell in table.cells.items() if cell.missed]
    if not cells:
        return ""
    if listed_in:
        which = (f"a class never predicted in test volumes that hold it (which, and how "
                 f"often: {listed_in})")
    else:
        which = "; ".join(dict.fromkeys(f"{table.where(label, column)}: {cell.missed}"
                                        for table, label, column, cell in cells))
    rules = sorted({cell.hd95_missing for *_, cell in cells})
    effects = []
    for metric in dict.fromkeys(table.metric for table, *_ in cells):
        effects += [missed_effect(metric, rule) for rule in (rules if metric == "HD95"
                                                             else rules[:1])]
    return f"{MISSED_MARK} {which}. {'. '.join(dict.fromkeys(effects))}. Never in bold."


def document_layout(tables, listed_in=""):
    """The tables of one document (summary.md, the study's report.html) as shown: [(table,
    rows, notes)], notes being the footnote lines said under that table. Each footnote is
    said once, under the first table that needs it (later tables refer to its number),
    and so is the † footnote (missed_footnote; ``listed_in``: where the cells are listed).
    """
    numbered, dagger = Footnotes(), missed_footnote(tables, listed_in)
    shown = []
    for table in tables:
        rows, said, missed = table.layout(numbered)
        notes = [f"[{number}] {text}" for number, text in said]
        if missed and dagger:
            notes.append(dagger)
            dagger = ""
        shown.append((table, rows, notes))
    return shown


@dataclass
class CellView:
    """One shown cell: its text ('' when the model has no run), bold, its † mark and the
    number of its footnote (0: none)."""

    text: str
    bold: bool = False
    mark: str = ""
    number: int = 0


def paper_tables(summary, metrics=("Dice", "HD95"), columns="dataset", ci=False):
    """The PaperTables of ``summary`` (summary.csv): one per metric and class group present
    (columns="dataset"), or one per metric, class group and dataset (columns="tuning").
    ci: the cells show their 95% bootstrap interval (summary.csv's <metric>_ci_* columns;
    ValueError when they are not there)."""
    if ci and not all(f"{metric}_ci_low" in summary for metric in metrics):
        raise ValueError("the summary has no confidence intervals for "
                         f"{', '.join(m for m in metrics if f'{m}_ci_low' not in summary)}")
    if columns not in TABLE_COLUMNS:
        raise ValueError(f"columns must be one of {TABLE_COLUMNS}, not {columns!r}")
    tables = []
    group_rows = summary[summary["class"].str.startswith("[")].copy()
    # A dataset whose runs have several class tables is a column per table.
    group_rows["column"] = [column_label(dataset, _text(table)) for dataset, table in zip(
        group_rows["dataset"], group_rows.get("class_table", [""] * len(group_rows)))]
    for metric in metrics:
        for class_group in ("all", "layers", "lesions"):
            rows = group_rows[group_rows["class_group"] == class_group]
            if rows.empty:
                continue
            # own test sets first, then external ones ("X (from Y)"), each alphabetically
            order = sorted(set(zip(rows["dataset"] != rows["trained_on"], rows["dataset"],
                                   rows["column"])))
            datasets = [column for *_, column in order]
            if columns == "dataset":
                tables.append(_table(metric, class_group, rows, "label", "column",
                                     datasets))
                continue
            for dataset in datasets:
                on = rows[rows["column"] == dataset]
                protocols = sorted(set(zip(on["tuning"], on["tuning_label"])),
                                   key=_protocol_order)
                tables.append(_table(metric, class_group, on, "model_label", "tuning_label",
                                     list(dict.fromkeys(t for _, t in protocols)),
                                     dataset=dataset))
    if ci:
        resamples = _count(summary[CI_RESAMPLES].max()) if CI_RESAMPLES in summary else 0
        for table in tables:
            table.ci, table.resamples = True, resamples
    return tables


def _protocol_order(protocol):
    """(tuning, words) in the order of TUNINGS, then by the numbers in the words (LoRA r8
    before LoRA r16)."""
    tuning, words = protocol
    rank = TUNINGS.index(tuning) if tuning in TUNINGS else len(TUNINGS)
    pieces = re.split(r"(\d+(?:\.\d+)?)", str(words))
    return rank, [(0, float(p), "") if i % 2 else (1, 0.0, p) for i, p in enumerate(pieces)]


def _table(metric, class_group, rows, row_column, cell_column, columns, dataset=""):
    """A PaperTable of summary.csv's ``rows``: rows = their ``row_column``, columns =
    their ``cell_column`` (``columns`` in order)."""
    table = PaperTable(metric=metric, class_group=class_group, columns=columns,
                       labels=sorted(set(rows[row_column])), dataset=dataset)
    for _, row in rows.iterrows():
        # The seeds with a value of this metric (summaries written before the <metric>_seeds
        # columns: the seeds with a Dice value).
        seeds = _count(row.get(f"{metric}_seeds", row["seeds"]))
        cell = Cell(mean=float(row[f"{metric}_mean"]), std=float(row[f"{metric}_std"]),
                    seeds=seeds, notes=[n for n in str(row["notes"] or "").split(" | ") if n],
                    missed=_text(row.get("missed_note")),
                    hd95_missing=_text(row.get("hd95_missing")) or "original",
                    runs=len(_text(row.get("seed_list")).split()),
                    ci_low=_number(row.get(f"{metric}_ci_low")),
                    ci_high=_number(row.get(f"{metric}_ci_high")),
                    ci_method=_text(row.get(f"{metric}_ci_method")))
        table.cells[(row[row_column], row[cell_column])] = cell
        table.seeds = max(table.seeds, cell.runs)
    return table


def _count(value):
    """A summary.csv count cell as an int (0 when missing)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return 0
    return int(value) if np.isfinite(value) else 0


def _number(value):
    """A summary.csv number cell as a float (NaN when missing or empty)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _text(value):
    """A summary.csv text cell: '' for a missing value (NaN when read back)."""
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else \
        str(value)


def _caption(table):
    seeds = f"over {table.seeds} seeds" if table.seeds > 1 else "one seed"
    direction = "lower" if table.lower_is_better else "higher"
    return (f"{table.title}: mean ± sample std {seeds} of each run's mean over test volumes "
            f"and classes ({direction} is better; best per column in bold)"
            f"{ci_caption(table)}")


def ci_caption(table):
    """'; in parentheses: the 95% CI ...' of a table showing intervals, else ""."""
    if not table.ci:
        return ""
    resamples = f" {table.resamples}" if table.resamples else ""
    return ("; in parentheses: the 95% confidence interval of the mean over the test "
            f"volumes, BCa bootstrap from{resamples} resamples of the volumes (the same "
            "resample for every seed)")


# ----------------------------------------------------------------------------- Markdown
def to_markdown(tables, unused_runs=(), notes=(), missed=()):
    """summary.md: every table, its footnotes, the classes never predicted (``missed``:
    lines of text), then the runs that are in no table."""
    lines = ["# Summary", ""]
    if not tables:
        lines += ["No evaluated run was found.", ""]
    listed_in = "Classes never predicted, below" if missed else ""
    for table, rows, footnotes in document_layout(tables, listed_in):
        lines += [f"## {table.title}", "", _caption(table) + ".", ""]
        lines.append("| model | " + " | ".join(_md_escape(c) for c in table.columns) + " |")
        lines.append("|:--|" + "--:|" * len(table.columns))
        for label, views in rows:
            cells = []
            for view in views:
                text = view.text or MISSING_MD
                text = f"**{text}**" if view.bold else text
                text += f" {view.mark}" if view.mark else ""
                text += f" [{view.number}]" if view.number else ""
                cells.append(text)
            lines.append(f"| {_md_escape(label)} | " + " | ".join(cells) + " |")
        lines.append("")
        lines += [f"{_md_escape(note)}  " for note in footnotes]
        lines += [""] if footnotes else []
    if missed:
        lines += ["## Classes never predicted", "",
                  "A class in a test volume's truth that the model never predicted in that "
                  "volume (marked † in the tables):", ""]
        lines += [f"- {_md_escape(line)}" for line in missed] + [""]
    if notes:
        lines += ["## Notes", ""] + [f"- {_md_escape(n)}" for n in notes] + [""]
    if unused_runs:
        lines += ["## Runs not in the tables", ""]
        lines += [f"- `{path}`: {_md_escape(status)}" for path, status in unused_runs] + [""]
    return "\n".join(lines)


def _md_escape(text):
    return str(text).replace("|", "\\|").replace("*", "\\*")


# ----------------------------------------------------------------------------- LaTeX
_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}"}


def latex_escape(text):
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def to_latex(tables):
    """summary.tex: one booktabs table environment per PaperTable.

    Unlike summary.md, each table carries all of its own footnotes (numbered from 1): a
    table float is pasted into a paper alone, and floats move away from each other.
    """
    out = ["% Written by run_seg_report.py. Needs \\usepackage{booktabs}.", ""]
    for table in tables:
        out += [f"% {_caption(table)}", "\\begin{table}[t]", "\\centering",
                f"\\caption{{{latex_escape(_caption(table))}.}}".replace("±", "$\\pm$"),
                "\\begin{tabular}{l" + "c" * len(table.columns) + "}", "\\toprule",
                "Model & " + " & ".join(latex_escape(c) for c in table.columns) + " \\\\",
                "\\midrule"]
        rows, footnotes, missed = table.layout()
        for label, views in rows:
            cells = []
            for view in views:
                text = latex_escape(view.text).replace("±", "$\\pm$") if view.text else "--"
                text = f"\\textbf{{{text}}}" if view.bold else text
                text += "$^\\dagger$" if view.mark else ""
                text += f"$^{{{view.number}}}$" if view.number else ""
                cells.append(text)
            out.append(latex_escape(label) + " & " + " & ".join(cells) + " \\\\")
        out += ["\\bottomrule", "\\end{tabular}"]
        marks = [f"$^{{{i}}}$ {latex_escape(note)}" for i, note in footnotes]
        if missed:
            marks.append(latex_escape(table.missed_footnote(missed)).replace(
                MISSED_MARK, "$^\\dagger$"))
        if marks:
            out.append("\\par\\footnotesize " + "; ".join(marks))
        out += ["\\end{table}", ""]
    return "\n".join(out)
