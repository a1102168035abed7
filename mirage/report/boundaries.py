"""Layer boundary errors in the HTML reports, from run_seg_eval.py's boundary file.

    read_boundaries(run_dir, external, notes)   -> DataFrame (one row per volume and
                                                   boundary) or None when there is none
    run_boundary_parts(frame)                   -> HTML of the run report: per-boundary
                                                   table and box plot
    study_boundary_parts(study)                 -> HTML of the study report: per dataset,
                                                   model x boundary table and box plot

The file (``layer_boundaries[_<external>].csv`` in the run folder, RunFolder's name for it)
holds per volume (ID) and boundary (Boundary) the numbers run_seg_eval.py measured: the
mean absolute and signed row errors in pixels and, with a spacing, micrometres (MAE_px,
bias_px, MAE_um, bias_um), the A-scan columns compared (columns) and the shares of columns
where only the truth or only the prediction has the boundary (only_truth, only_pred).
What is shown is what the file holds: every numeric column but the column count, in the
file's order, means over volumes (NaN left out); a share in %. The box plots and the study
table use MAE in micrometres where every run of the table has it, else in pixels.
"""
import numpy as np
import pandas as pd

from mirage.report import htmlpage as H
from mirage.report import plots
from mirage.report.metric_columns import unit_of
from mirage.run.folder import RunFolder

KIND = "layer_boundaries"  # RunFolder.measurement_file's kind of the boundary file
KEYS = ("ID", "Boundary")
COUNT = "columns"  # the A-scan columns compared: a count, not a score
SHARE_PREFIX = "only_"  # fractions of columns, shown in %
ERROR_COLUMNS = ("MAE_um", "MAE_px")  # the error of the box plots and the study, in order


def read_boundaries(run_dir, external="", notes=None):
    """The boundary file of a run's evaluation on ``external`` ("" = its test set) as a
    DataFrame (ID and Boundary as text, the rest as the file holds it), or None when the
    run has none (scored before boundaries were measured, or a dataset without layers). An
    unreadable file is a note in ``notes``, never an exception."""
    path = RunFolder(run_dir).measurement_file(KIND, external)
    if not path.is_file():
        return None
    try:
        frame = pd.read_csv(path, dtype={"ID": str, "Boundary": str})
    except (OSError, ValueError, pd.errors.ParserError) as err:
        if notes is not None:
            notes.append(f"{path.name}: unreadable ({str(err).splitlines()[0]}); no "
                         "boundary table")
        return None
    if not set(KEYS) <= set(frame.columns) or frame.empty:
        if notes is not None:
            notes.append(f"{path.name}: no ID and Boundary rows; no boundary table")
        return None
    return frame


def number_columns(frame):
    """The numeric columns of a boundary file to show, in its order (not the count)."""
    return [c for c in frame.columns if c not in KEYS and c != COUNT
            and frame[c].dtype.kind in "fiu"]


def error_column(frames):
    """MAE_um when every frame has a value of it, else MAE_px (None without either)."""
    for column in ERROR_COLUMNS:
        if frames and all(column in f and np.isfinite(f[column].to_numpy(dtype=float)).any()
                          for f in frames):
            return column
    return None


def _header(column):
    if column.startswith(SHARE_PREFIX):
        return f"{column.replace('_', ' ')} (%)"
    return f"{column} ({unit_of(column)})"


def boundary_table(frame):
    """Per boundary (in the file's order): the volumes, then the mean over volumes of each
    number the file holds (NaN left out; shares in %)."""
    records = []
    for boundary, rows in frame.groupby("Boundary", sort=False):
        record = {"boundary": boundary, "volumes": rows["ID"].nunique()}
        for column in number_columns(frame):
            values = rows[column].to_numpy(dtype=float)
            values = values[np.isfinite(values)]
            scale = 100.0 if column.startswith(SHARE_PREFIX) else 1.0
            record[_header(column)] = scale * values.mean() if values.size else float("nan")
        records.append(record)
    return pd.DataFrame(records)


def run_boundary_parts(frame, name):
    """The run report's boundary section parts: the table and a box plot of the
    per-volume error of each boundary. name: the file, for the caption."""
    parts = ["<h3>Layer boundaries</h3>",
             H.paragraph(f"From {name}: per boundary, the means over test volumes (NaN left "
                         "out) of the mean absolute error (MAE) and bias (prediction - truth, "
                         "+ = deeper) of the boundary's row over the A-scan columns where "
                         "truth and prediction both have it, in micrometres where a spacing "
                         "was known and in pixels; and the % of columns where only one has "
                         "it.", cls="muted"),
             H.table(boundary_table(frame), digits=2, text_columns={"boundary"})]
    column = error_column([frame])
    if column is not None:
        values = {b: {"": rows[column].to_numpy(dtype=float)}
                  for b, rows in frame.groupby("Boundary", sort=False)}
        fig = plots.boundary_box_plots(values, f"{column} per volume ({unit_of(column)})")
        parts.append(H.image(plots.to_png(fig), f"boundary {column} per volume",
                             f"Per-volume {column} of each boundary (box: quartiles; "
                             "whiskers: 1.5 IQR; triangle: mean)."))
    return parts


# ----------------------------------------------------------------------------- studies
def _group_frames(group, notes):
    """[(seed, boundary frame)] of a study group's seeds that have one."""
    found = []
    for member in group.members:
        frame = read_boundaries(member.run.path, member.evaluation.external, notes)
        if frame is not None:
            found.append((member.seed, frame))
    return found


def study_boundary_parts(study):
    """The study report's boundary section parts ([] when no run has a boundary file):
    per column of the tables (dataset), a model x boundary table of the boundary MAE
    (mean ± sample std over the seeds of each run's mean over volumes) and a box plot of
    the per-volume MAE (averaged over seeds) of each boundary and model."""
    notes, parts = [], []
    for column in study.datasets:
        groups = [g for g in study.groups if g.key.column == column]
        frames = {g.label: _group_frames(g, notes) for g in groups}
        frames = {label: found for label, found in frames.items() if found}
        if not frames:
            continue
        error = error_column([f for found in frames.values() for _, f in found])
        if error is None:
            continue
        boundaries = list(dict.fromkeys(b for found in frames.values() for _, f in found
                                        for b in f["Boundary"]))
        parts.append(f"<h3>{H.esc(column)}: boundary {H.esc(error)} "
                     f"({H.esc(unit_of(error))})</h3>")
        parts.append(H.table(_study_table(frames, boundaries, error), digits=2,
                             text_columns={"model", *boundaries}))
        values = {b: {label: _seed_averaged(found, b, error) for label, found in
                      frames.items()} for b in boundaries}
        fig = plots.boundary_box_plots(values, f"{error} per volume ({unit_of(error)}), "
                                               f"{column}")
        parts.append(H.image(plots.to_png(fig), f"boundary {error} per volume, {column}",
                             f"Per-volume {error} of each boundary and model (each model's "
                             "volumes averaged over its seeds; box: quartiles; whiskers: 1.5 "
                             "IQR; triangle: mean)."))
    if not parts:
        return []
    intro = H.paragraph("Layer boundary errors from run_seg_eval.py's boundary files: per "
                        "model and boundary, the mean ± sample std over seeds of each run's "
                        "mean over test volumes of the mean absolute row error (in "
                        "micrometres where every run of the dataset has a spacing, else "
                        "pixels); lower is better.", cls="muted")
    return [intro, *parts, H.notes_list(notes)]


def _study_table(frames, boundaries, error):
    records = []
    for label, found in sorted(frames.items()):
        record = {"model": label}
        for boundary in boundaries:
            per_seed = []
            for _, frame in found:
                values = frame.loc[frame["Boundary"] == boundary, error].to_numpy(dtype=float)
                values = values[np.isfinite(values)]
                if values.size:
                    per_seed.append(values.mean())
            if not per_seed:
                record[boundary] = "n/a"
            elif len(per_seed) == 1:
                record[boundary] = f"{per_seed[0]:.2f}"
            else:
                record[boundary] = f"{np.mean(per_seed):.2f} ± {np.std(per_seed, ddof=1):.2f}"
        records.append(record)
    return pd.DataFrame(records, columns=["model", *boundaries])


def _seed_averaged(found, boundary, error):
    """Per volume, the mean over seeds of ``error`` at ``boundary`` (NaN left out)."""
    series = [f[f["Boundary"] == boundary].set_index("ID")[error].astype(float)
              for _, f in found]
    if not series:
        return np.array([])
    return pd.concat(series, axis=1).mean(axis=1, skipna=True).to_numpy(dtype=float)
