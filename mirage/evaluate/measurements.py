"""A run's layer and lesion measurements per volume: boundary errors, layer thicknesses,
lesion areas per B-scan and lesion volumes, the tables of their CSV files and the printed
boundary table.

    measurement_tables(plan, volumes, results, spacing) -> {kind: DataFrame}
    print_boundaries(tables, stream)                    -> the boundary-error table
    measurement_files(evaluation)                       -> {path: DataFrame} to write

Kinds (file names: mirage.run.folder.MEASUREMENTS, ``<kind>[_<external>].csv``):

    layer_boundaries  ID, Boundary, MAE_px, bias_px, [MAE_um, bias_um], columns,
                      only_truth, only_pred                      (a dataset with layers)
    layer_thickness   ID, Layer, truth_px, pred_px, MAE_px, [truth_um, pred_um, MAE_um],
                      columns, only_truth, only_pred
    lesion_areas      ID, slice, Class, truth_pixels, pred_pixels, [truth_mm2, pred_mm2]
                      (a dataset with lesion classes; one row per B-scan)
    lesion_volumes    ID, Class, truth_mm3, pred_mm3, truth_nL, pred_nL, abs_diff_mm3,
                      abs_diff_nL, rel_diff                      (with all three spacings)

Micrometre and millimetre columns appear only where the spacing they need is known (axial
for boundaries and thicknesses, axial and lateral for areas, all three for volumes), with
the text columns spacing_um and spacing_from after them; without a spacing the files hold
pixels only, never a guessed scale. Definitions: docs/segmentation_tuning.md
("Layer boundaries and thickness", "Lesion areas and volumes").
"""
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from mirage.evaluate.layers import SUMS, boundary_names
from mirage.run.folder import MEASUREMENTS, RunFolder

BOUNDARIES, THICKNESS, AREAS, VOLUMES = MEASUREMENTS  # the kinds, as the files name them
UM2_PER_MM2 = 1e6
UM3_PER_MM3 = 1e9
NL_PER_MM3 = 1e3  # 1 mm^3 = 1 uL = 1000 nL
_COL = {name: i for i, name in enumerate(SUMS)}


def _ratio(numerator, denominator):
    """numerator / denominator, NaN where the denominator is 0."""
    numerator = np.asarray(numerator, np.float64)
    denominator = np.asarray(denominator, np.float64)
    out = np.full(np.broadcast(numerator, denominator).shape, np.nan)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def _error_columns(sums, axial_um, prefix_values=()):
    """{column: (m,) values} of error sums (m, len(SUMS)): the means over the columns where
    truth and prediction both have it, and the shares of columns with only one of them."""
    both = sums[:, _COL["both"]]
    columns = both + sums[:, _COL["only_truth"]] + sums[:, _COL["only_pred"]]
    means = {name: _ratio(sums[:, _COL[part]], both) for name, part in prefix_values}
    out = dict(means)
    if axial_um is not None:
        out.update({name.replace("_px", "_um"): values * axial_um
                    for name, values in means.items()})
    out.update(columns=columns.astype(np.int64),
               only_truth=_ratio(sums[:, _COL["only_truth"]], columns),
               only_pred=_ratio(sums[:, _COL["only_pred"]], columns))
    return out


def _frame(records, spacing_columns):
    frame = pd.DataFrame(records)
    for name, value in spacing_columns.items():
        frame[name] = value
    return frame


def _layer_tables(plan, volume_sums, spacing):
    """(layer_boundaries, layer_thickness) DataFrames from {scan id: (2n + 1, SUMS) sums}."""
    stack = plan.layer_stack
    n = len(stack)
    axial = spacing.axial_um if spacing is not None else None
    extra = spacing.columns() if axial is not None else {}
    names = boundary_names(plan.labels, stack)
    layers = [plan.labels[c] for c in stack]
    boundary_records, thickness_records = [], []
    for scan_id, sums in volume_sums.items():
        edges = _error_columns(sums[:n + 1], axial, (("MAE_px", "abs_error"),
                                                     ("bias_px", "signed_error")))
        for k, name in enumerate(names):
            boundary_records.append({"ID": scan_id, "Boundary": name,
                                     **{c: v[k] for c, v in edges.items()}})
        thick = _error_columns(sums[n + 1:], axial, (("truth_px", "truth"), ("pred_px", "pred"),
                                                     ("MAE_px", "abs_error")))
        for k, name in enumerate(layers):
            thickness_records.append({"ID": scan_id, "Layer": name,
                                      **{c: v[k] for c, v in thick.items()}})
    return _frame(boundary_records, extra), _frame(thickness_records, extra)


def _lesion_tables(plan, volumes, results, spacing):
    """(lesion_areas, lesion_volumes or None) DataFrames from the per-B-scan pixel counts."""
    in_plane = spacing is not None and spacing.in_plane
    pixel_mm2 = spacing.axial_um * spacing.lateral_um / UM2_PER_MM2 if in_plane else None
    voxel = spacing is not None and spacing.voxel
    area_records, volume_records, start = [], [], 0
    for scan_id, slices in volumes.items():
        counts = results[start:start + len(slices)]
        start += len(slices)
        for (number, _, _), (_, pred_count, true_count) in zip(slices, (r[0] for r in counts)):
            for c in plan.lesion_classes:
                record = {"ID": scan_id, "slice": number, "Class": plan.labels[c],
                          "truth_pixels": int(true_count[c]), "pred_pixels": int(pred_count[c])}
                if in_plane:
                    record.update(truth_mm2=true_count[c] * pixel_mm2,
                                  pred_mm2=pred_count[c] * pixel_mm2)
                area_records.append(record)
        if voxel:
            voxel_mm3 = (spacing.axial_um * spacing.lateral_um * spacing.bscan_um
                         / UM3_PER_MM3)
            for c in plan.lesion_classes:
                truth = sum(int(r[0][2][c]) for r in counts) * voxel_mm3
                pred = sum(int(r[0][1][c]) for r in counts) * voxel_mm3
                volume_records.append({
                    "ID": scan_id, "Class": plan.labels[c], "truth_mm3": truth,
                    "pred_mm3": pred, "truth_nL": truth * NL_PER_MM3,
                    "pred_nL": pred * NL_PER_MM3, "abs_diff_mm3": abs(pred - truth),
                    "abs_diff_nL": abs(pred - truth) * NL_PER_MM3,
                    "rel_diff": float(_ratio(pred - truth, truth))})
    areas = _frame(area_records, spacing.columns() if in_plane else {})
    return areas, (_frame(volume_records, spacing.columns()) if voxel else None)


def measurement_tables(plan, volumes, results, spacing=None):
    """{kind: DataFrame} of the measurement files of one scored run (kinds above; those
    without rows left out).

    plan: the ClassPlan (layer_stack, lesion_classes). volumes: {scan id: [(slice number,
    truth path, prediction path), ...]} in scoring order; results: score_slice's results in
    the same order, whose last item holds each B-scan's layer_sums (None without layers).
    spacing: a Spacing, or None (pixels only).
    """
    tables = {}
    if plan.layer_stack:
        volume_sums, start = {}, 0
        for scan_id, slices in volumes.items():
            volume_sums[scan_id] = sum(r[3].layers for r in results[start:start + len(slices)])
            start += len(slices)
        tables[BOUNDARIES], tables[THICKNESS] = _layer_tables(plan, volume_sums, spacing)
    if plan.lesion_classes:
        tables[AREAS], lesion_volumes = _lesion_tables(plan, volumes, results, spacing)
        if lesion_volumes is not None:
            tables[VOLUMES] = lesion_volumes
    return tables


def boundary_summary(tables):
    """Per boundary, the means over volumes (NaN left out) of the boundary table's
    numbers, in its order (DataFrame indexed by boundary), or None without layers."""
    frame = tables.get(BOUNDARIES)
    if frame is None or frame.empty:
        return None
    numbers = [c for c in frame.columns if c not in ("ID", "Boundary", "columns")
               and frame[c].dtype.kind == "f"]
    return frame.groupby("Boundary", sort=False)[numbers].mean()


def print_boundaries(tables, stream=None):
    """Print the mean boundary errors per boundary (px, and um where known) and the shares
    of columns where only the truth or only the prediction has the boundary."""
    summary = boundary_summary(tables)
    if summary is None:
        return
    stream = stream or sys.stdout
    shown = [c for c in ("MAE_um", "bias_um", "MAE_px", "bias_px") if c in summary]
    unit = "um and pixels" if "MAE_um" in summary else "pixels (no spacing known)"
    print(f"layer boundaries: mean absolute error (MAE) and bias (prediction - truth, + = "
          f"deeper) in {unit}, over the columns where truth and prediction both have the "
          "boundary; % of columns where only one has it; means over volumes", file=stream)
    width = max(len("boundary"), *(len(name) for name in summary.index))
    header = "".join(f"{c:>9}" for c in shown) + f"{'only truth':>12}{'only pred':>11}"
    print(f"{'boundary':<{width}}{header}", file=stream)
    for name, row in summary.iterrows():
        cells = "".join("      n/a" if np.isnan(row[c]) else f"{row[c]:9.2f}" for c in shown)
        shares = "".join("n/a".rjust(w) if np.isnan(row[c]) else f"{100 * row[c]:{w - 1}.1f}%"
                         for c, w in (("only_truth", 12), ("only_pred", 11)))
        print(f"{name:<{width}}{cells}{shares}", file=stream)


# ----------------------------------------------------------------------------- files
def measurement_files(evaluation):
    """{path: DataFrame} of a RunEvaluation's measurement files (``<kind>[_<external>].csv``
    in the run folder); written with its results files (outputs.write_results)."""
    folder = RunFolder(evaluation.run_dir)
    return {folder.measurement_file(kind, evaluation.external): frame
            for kind, frame in evaluation.measurements.items()}


def remove_stale_measurements(evaluation):
    """Remove the measurement files of the same dataset that an earlier scoring wrote and
    this one did not (e.g. lesion volumes of a spacing no longer given): never a file
    from another scoring beside the new ones."""
    folder = RunFolder(evaluation.run_dir)
    written = {Path(p) for p in evaluation.measurement_files}
    for kind in MEASUREMENTS:
        path = folder.measurement_file(kind, evaluation.external)
        if path not in written and path.is_file():
            path.unlink()


def spacing_record(spacing):
    """evaluation.json's spacing entries: the micrometres used and where they came from."""
    if spacing is None:
        return {"spacing_axial_um": None, "spacing_lateral_um": None,
                "spacing_bscan_um": None, "spacing_source": "none (pixels only)"}
    return spacing.record()


def record_measurements(evaluation):
    """Add the names of the measurement files written to the run's evaluation.json entry."""
    folder = RunFolder(evaluation.run_dir)
    entry = folder.read_evaluation_record().get(evaluation.dataset, {})
    entry["measurement_files"] = [Path(p).name for p in evaluation.measurement_files]
    folder.record_evaluation(evaluation.dataset, entry)
