"""Layer boundaries, thicknesses, lesion areas and volumes (mirage.evaluate.layers and
.measurements, written by run_seg_eval.py) against numbers computed by hand.

Boundary k < n is the first row, from the top, holding layer k or a layer below it; the
last boundary is one past the last row of the last layer; other classes are transparent
(docs/segmentation_tuning.md, "Layer boundaries and thickness"). Every expected value
below is worked out in the comments from the masks drawn here, not by the code.
"""
import json
import math

import cv2
import numpy as np
import pandas as pd
import pytest

from mirage.data.classes import ClassTable
from mirage.evaluate.class_plan import plan_classes
from mirage.evaluate.layers import boundary_rows, layer_sums
from mirage.evaluate.outputs import evaluate_run

from conftest import seal_predictions

NAN = math.nan
BG, L1, L2, FLUID = 0, 1, 2, 3  # class indices; mask values 0, 40, 80, 120
INFO = {"0": {"value": 0, "label": "Background"}, "1": {"value": 40, "label": "ILM-IPL"},
        "2": {"value": 80, "label": "IPL-RPE"}, "3": {"value": 120, "label": "Fluid"}}
VALUES = np.array([0, 40, 80, 120], np.uint8)


def column_map(height, columns):
    """(height, len(columns)) class map; ``columns``: per column [(first row, last row,
    class), ...] painted in order over background."""
    labels = np.zeros((height, len(columns)), np.uint8)
    for j, runs in enumerate(columns):
        for first, last, label in runs:
            labels[first:last + 1, j] = label
    return labels


def assert_rows(got, want):
    np.testing.assert_array_equal(np.isnan(got), np.isnan(np.asarray(want, float)))
    np.testing.assert_array_equal(np.nan_to_num(got, nan=-1), np.nan_to_num(want, nan=-1))


# ----------------------------------------------------------------------------- boundary_rows
def test_boundary_rows_by_hand():
    """One column per case; layers L1 then L2, H = 10."""
    labels = column_map(10, [
        [(2, 4, L1), (5, 7, L2)],               # plain: tops 2, 5; bottom of L2 8
        [(2, 4, L1), (5, 7, L2), (6, 6, FLUID)],  # fluid inside L2: nothing moves
        [(2, 4, L1), (5, 7, L2), (4, 5, FLUID)],  # fluid at the interface: L2 starts at 6
        [(3, 6, L2)],                           # L1 absent (foveal pit): its top = L2's, 3
        [(2, 6, L1)],                           # no L2: its top and bottom absent
        [],                                     # no retina: all absent
        [(0, 0, L2), (3, 4, L1), (5, 6, L2)],   # stray L2 pixel on top: L1 and L2 tops 0
        [(2, 3, L1), (4, 5, FLUID), (6, 9, L2)],  # L2 down to the image bottom: bottom 10
    ])
    want = [[2, 2, 2, 3, 2, NAN, 0, 2],
            [5, 5, 6, 3, NAN, NAN, 0, 6],
            [8, 8, 8, 7, NAN, NAN, 7, 10]]
    assert_rows(boundary_rows(labels, [L1, L2]), want)
    # any integer type, and the layers named by their class indices in any numbering
    assert_rows(boundary_rows(labels.astype(np.int64), [L1, L2]), want)
    relabelled = np.array([7, 9, 4, 2], np.uint8)[labels]  # L1 -> 9, L2 -> 4
    assert_rows(boundary_rows(relabelled, [9, 4]), want)
    # one layer: its top and its bottom (L2 is then transparent, as any other class)
    assert_rows(boundary_rows(labels, [L1]), [[2, 2, 2, NAN, 2, NAN, 3, 2],
                                              [5, 5, 4, NAN, 7, NAN, 5, 4]])


def test_boundary_rows_of_shifted_bands_move_by_the_shift():
    """Random wavy bands of 3 layers: the boundaries are where they were drawn, and rows
    pushed down by 2 move every boundary by 2."""
    rng = np.random.default_rng(0)
    height, width = 40, 30
    tops = 3 + np.cumsum(rng.integers(1, 8, size=(4, width)), axis=0)  # 4 boundaries
    rows = np.arange(height)[:, None]
    depth = (rows[None] >= tops[:, None, :]).sum(axis=0)  # 0 above, 1..3 layers, 4 below
    labels = np.where(depth > 3, 0, depth).astype(np.uint8)
    assert_rows(boundary_rows(labels, [1, 2, 3]), tops)
    shifted = np.roll(labels, 2, axis=0)  # the bottom rows were background
    assert_rows(boundary_rows(shifted, [1, 2, 3]), tops + 2)


# ----------------------------------------------------------------------------- a volume
# B-scan 0 (H = 12, W = 6): boundaries (top of ILM-IPL, ILM-IPL | IPL-RPE, bottom of
# IPL-RPE) per column, worked out from the runs drawn:
#   truth: c0 (2, 5, 8); c1 (2, 5, 8) fluid inside IPL-RPE; c2 (2, 6, 8) fluid at the
#          interface (rows 4-5); c3, c4 (2, 5, 8); c5 no retina (absent)
#   pred:  c0 (3, 4, 9); c1, c2, c3 (3, 5, 9) (fluid inside IPL-RPE in c1, c2); c4 (3,
#          absent, absent) no IPL-RPE; c5 (2, 5, 8)
# B-scan 1: truth = prediction = (2, 5, 8) in all 6 columns, fluid inside IPL-RPE in the
# prediction only (row 6, columns 0-1).
TRUTH_0 = column_map(12, [
    [(2, 4, L1), (5, 7, L2)], [(2, 4, L1), (5, 7, L2), (6, 6, FLUID)],
    [(2, 4, L1), (5, 7, L2), (4, 5, FLUID)], [(2, 4, L1), (5, 7, L2)],
    [(2, 4, L1), (5, 7, L2)], []])
PRED_0 = column_map(12, [
    [(3, 3, L1), (4, 8, L2)], [(3, 4, L1), (5, 8, L2), (6, 6, FLUID)],
    [(3, 4, L1), (5, 8, L2), (6, 6, FLUID)], [(3, 4, L1), (5, 8, L2)],
    [(3, 7, L1)], [(2, 4, L1), (5, 7, L2)]])
PLAIN = column_map(12, [[(2, 4, L1), (5, 7, L2)]] * 6)
PRED_1 = PLAIN.copy()
PRED_1[6, 0:2] = FLUID


def test_layer_sums_of_one_bscan_by_hand():
    sums = layer_sums(TRUTH_0, PRED_0, [L1, L2])
    # columns: both, sum |p - t|, sum (p - t), sum t, sum p, only truth, only pred
    # boundary 0: c0-c4 both, +1 each; c5 only pred
    np.testing.assert_array_equal(sums[0], [5, 5, 5, 10, 15, 0, 1])
    # boundary 1: c0-c3 both, errors -1, 0, -1, 0 (t 5, 5, 6, 5; p 4, 5, 5, 5); c4 only
    # truth, c5 only pred
    np.testing.assert_array_equal(sums[1], [4, 2, -2, 21, 19, 1, 1])
    # boundary 2: c0-c3 both, +1 each
    np.testing.assert_array_equal(sums[2], [4, 4, 4, 32, 36, 1, 1])
    # ILM-IPL thickness: t 3, 3, 4, 3 (c4: 3 but the prediction has none); p 1, 2, 2, 2
    np.testing.assert_array_equal(sums[3], [4, 6, -6, 13, 7, 1, 1])
    # IPL-RPE thickness: t 3, 3, 2, 3; p 5, 4, 4, 4
    np.testing.assert_array_equal(sums[4], [4, 6, 6, 11, 17, 1, 1])


def write_case(root, spacing=None):
    data = root / "datasets" / "Tiny_DME"
    (data / "test" / "semseg").mkdir(parents=True)
    info = dict(INFO, **({"spacing": spacing} if spacing else {}))
    (data / "INFO.json").write_text(json.dumps(info))
    run = root / "runs" / "Tiny_DME" / "run_a"
    (run / "preds").mkdir(parents=True)
    for name, truth, pred in (("vol_0", TRUTH_0, PRED_0), ("vol_1", PLAIN, PRED_1)):
        cv2.imwrite(str(data / "test" / "semseg" / f"{name}.png"), VALUES[truth])
        cv2.imwrite(str(run / "preds" / f"{name}.png"), VALUES[pred])
    seal_predictions(run / "preds")
    return root / "datasets", run


def test_boundary_and_thickness_files_by_hand(tmp_path):
    """The volume pools its B-scans' columns: B-scan 1 adds 6 exact columns to each."""
    datasets, run = write_case(tmp_path, {"axial_um": 4.0, "lateral_um": 10.0,
                                          "bscan_um": 100.0})
    evaluation = evaluate_run(run, datasets, quiet=True)
    edges = pd.read_csv(run / "layer_boundaries.csv")
    assert list(edges.columns) == ["ID", "Boundary", "MAE_px", "bias_px", "MAE_um", "bias_um",
                                   "columns", "only_truth", "only_pred", "spacing_um",
                                   "spacing_from"]
    assert list(edges["Boundary"]) == ["top of ILM-IPL", "ILM-IPL | IPL-RPE",
                                       "bottom of IPL-RPE"]
    # boundary 0: 11 columns with both (5 + 6), |error| sum 5; 12 columns with either
    # boundary 1: 10 with both, |error| 2, signed -2; boundary 2: 10 with both, 4 and +4
    want = {"MAE_px": [5 / 11, 2 / 10, 4 / 10], "bias_px": [5 / 11, -2 / 10, 4 / 10],
            "columns": [12, 12, 12], "only_truth": [0, 1 / 12, 1 / 12],
            "only_pred": [1 / 12, 1 / 12, 1 / 12]}
    for column, values in want.items():
        np.testing.assert_allclose(edges[column], values, rtol=0, atol=1e-12)
    np.testing.assert_allclose(edges["MAE_um"], np.array(want["MAE_px"]) * 4.0, atol=1e-12)
    np.testing.assert_allclose(edges["bias_um"], np.array(want["bias_px"]) * 4.0, atol=1e-12)
    assert set(edges["spacing_um"]) == {"4 x 10 x 100"}
    assert set(edges["spacing_from"]) == {"INFO.json"}
    thick = pd.read_csv(run / "layer_thickness.csv")
    assert list(thick["Layer"]) == ["ILM-IPL", "IPL-RPE"]
    # ILM-IPL: truth (13 + 6 x 3) / 10, prediction (7 + 18) / 10, |diff| 6 / 10
    # IPL-RPE: truth (11 + 18) / 10, prediction (17 + 18) / 10, |diff| 6 / 10
    np.testing.assert_allclose(thick["truth_px"], [31 / 10, 29 / 10], atol=1e-12)
    np.testing.assert_allclose(thick["pred_px"], [25 / 10, 35 / 10], atol=1e-12)
    np.testing.assert_allclose(thick["MAE_px"], [0.6, 0.6], atol=1e-12)
    np.testing.assert_allclose(thick["MAE_um"], [2.4, 2.4], atol=1e-12)
    np.testing.assert_allclose(thick["truth_um"], [12.4, 11.6], atol=1e-12)
    np.testing.assert_allclose(thick["only_truth"], [1 / 12, 1 / 12], atol=1e-12)
    # the demo and run_seg_eval.py print the table
    assert [p.name for p in evaluation.measurement_files] == [
        "layer_boundaries.csv", "layer_thickness.csv", "lesion_areas.csv", "lesion_volumes.csv"]
    record = json.loads((run / "evaluation.json").read_text())["Tiny_DME"]
    assert record["measurement_files"] == [p.name for p in evaluation.measurement_files]
    assert record["spacing_axial_um"] == 4.0 and record["spacing_bscan_um"] == 100.0
    assert record["spacing_source"].endswith("INFO.json")


def test_lesion_areas_and_volumes_by_hand(tmp_path):
    """Fluid pixels: truth 3 (B-scan 0: c1 row 6, c2 rows 4-5) and 0; prediction 2 (c1, c2
    row 6) and 2. Pixel 4 x 10 um = 4e-5 mm^2; voxel x 100 um = 4e-6 mm^3 = 0.004 nL."""
    datasets, run = write_case(tmp_path, {"axial_um": 4.0, "lateral_um": 10.0,
                                          "bscan_um": 100.0})
    evaluate_run(run, datasets, quiet=True)
    areas = pd.read_csv(run / "lesion_areas.csv")
    assert list(areas[["ID", "slice", "Class"]].itertuples(index=False, name=None)) == [
        ("vol", 0, "Fluid"), ("vol", 1, "Fluid")]
    assert list(areas["truth_pixels"]) == [3, 0] and list(areas["pred_pixels"]) == [2, 2]
    np.testing.assert_allclose(areas["truth_mm2"], [1.2e-4, 0.0], rtol=1e-12)
    np.testing.assert_allclose(areas["pred_mm2"], [8e-5, 8e-5], rtol=1e-12)
    volumes = pd.read_csv(run / "lesion_volumes.csv")
    row = volumes.iloc[0]
    assert (row["ID"], row["Class"]) == ("vol", "Fluid")
    assert row["truth_mm3"] == pytest.approx(1.2e-5, rel=1e-12)
    assert row["pred_mm3"] == pytest.approx(1.6e-5, rel=1e-12)
    assert row["truth_nL"] == pytest.approx(0.012, rel=1e-12)
    assert row["pred_nL"] == pytest.approx(0.016, rel=1e-12)
    assert row["abs_diff_mm3"] == pytest.approx(4e-6, rel=1e-9)
    assert row["abs_diff_nL"] == pytest.approx(0.004, rel=1e-9)
    assert row["rel_diff"] == pytest.approx(1 / 3, rel=1e-9)  # (4 - 3) / 3, signed


def test_without_a_spacing_pixels_only_and_no_volumes(tmp_path):
    datasets, run = write_case(tmp_path)
    evaluation = evaluate_run(run, datasets, quiet=True)
    edges = pd.read_csv(run / "layer_boundaries.csv")
    assert list(edges.columns) == ["ID", "Boundary", "MAE_px", "bias_px", "columns",
                                   "only_truth", "only_pred"]
    assert list(pd.read_csv(run / "lesion_areas.csv").columns) == [
        "ID", "slice", "Class", "truth_pixels", "pred_pixels"]
    assert not (run / "lesion_volumes.csv").exists()
    assert "HD95_um" not in evaluation.rows
    # no B-scan spacing: areas but no volumes; and a stale volumes file is removed
    (run / "lesion_volumes.csv").write_text("stale\n")
    evaluate_run(run, datasets, quiet=True, spacing=(4.0, 10.0))
    assert "truth_mm2" in pd.read_csv(run / "lesion_areas.csv")
    assert not (run / "lesion_volumes.csv").exists()
    # only an axial spacing: boundaries in um, nothing that needs the lateral one
    info = json.loads((datasets / "Tiny_DME" / "INFO.json").read_text())
    info["spacing"] = {"axial_um": 4.0}
    (datasets / "Tiny_DME" / "INFO.json").write_text(json.dumps(info))
    evaluation = evaluate_run(run, datasets, quiet=True)
    assert "MAE_um" in pd.read_csv(run / "layer_boundaries.csv")
    assert "truth_mm2" not in pd.read_csv(run / "lesion_areas.csv")
    assert "HD95_um" not in pd.read_csv(run / "results_layers.csv")


def test_the_boundary_table_is_printed(tmp_path, capsys):
    datasets, run = write_case(tmp_path, {"axial_um": 4.0, "lateral_um": 10.0})
    evaluate_run(run, datasets)
    out = capsys.readouterr().out
    assert "layer boundaries: mean absolute error (MAE)" in out
    line = next(line for line in out.splitlines() if line.startswith("ILM-IPL | IPL-RPE"))
    # MAE_um 0.8, bias_um -0.8, MAE_px 0.2, bias_px -0.2, only truth 1/12, only pred 1/12
    assert line.split()[3:] == ["0.80", "-0.80", "0.20", "-0.20", "8.3%", "8.3%"]


# ----------------------------------------------------------------------------- the stack
@pytest.mark.parametrize("labels, stack", [
    # Duke DME (and the synthetic demo): background above and below, fluid not a layer
    (["Background", "ILM-NFL", "NFL-IPL", "IPL-OPL", "Fluid"], ["ILM-NFL", "NFL-IPL", "IPL-OPL"]),
    # AROI: the regions above ILM and under BM are not layers; lesions neither
    (["Above ILM", "ILM-IPL/INL", "IPL/INL-RPE", "RPE-BM", "Under BM", "Cyst", "PED", "SRF"],
     ["ILM-IPL/INL", "IPL/INL-RPE", "RPE-BM"]),
    # Duke iAMD: invalid, above ILM, below BM left out
    (["Invalid", "Above ILM", "ILM-Inner RPEDC", "Inner RPEDC-Outer BM", "Below BM"],
     ["ILM-Inner RPEDC", "Inner RPEDC-Outer BM"]),
    # GOALS: "Elsewhere" surrounds the layers
    (["Elsewhere", "RNFL", "GCIPL", "Choroid"], ["RNFL", "GCIPL", "Choroid"]),
    # RETOUCH: fluids only, no layer
    (["Background", "IRF", "SRF", "PED"], []),
])
def test_the_layer_stack_of_the_benchmark_class_tables(labels, stack):
    table = ClassTable(values=tuple(range(len(labels))), labels=tuple(labels))
    for ignore_bg in (True, False):
        plan = plan_classes(table, ignore_bg=ignore_bg)
        assert [plan.labels[c] for c in plan.layer_stack] == stack


def test_worker_processes_give_the_same_measurements(tmp_path):
    datasets, run = write_case(tmp_path, {"axial_um": 4.0, "lateral_um": 10.0,
                                          "bscan_um": 100.0})
    one = evaluate_run(run, datasets, quiet=True, workers=1)
    two = evaluate_run(run, datasets, quiet=True, workers=2)
    assert list(one.measurements) == list(two.measurements) == [
        "layer_boundaries", "layer_thickness", "lesion_areas", "lesion_volumes"]
    for kind, frame in one.measurements.items():
        pd.testing.assert_frame_equal(frame, two.measurements[kind], check_exact=True)
    pd.testing.assert_frame_equal(one.rows, two.rows, check_exact=True)
