"""Distances in micrometres and the spacing they come from (run_seg_eval.py --spacing, the
INFO.json "spacing" entry), and the results files without a spacing, byte for byte.

HD95_um and ASSD_um are checked against MONAI's compute_hausdorff_distance(percentile=95,
spacing=...) and compute_average_surface_distance(symmetric=True, spacing=...) with the
same anisotropic spacing (a test-only dependency), wrapped in the evaluation's rules for
empty masks. The byte-exact results were written by run_seg_eval.py before micrometres
existed, on the fixed case below.
"""
import json
import math
import warnings

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from mirage.data.classes import read_class_table, read_spacing
from mirage.errors import UserError
from mirage.evaluate.metrics import surface_distances
from mirage.evaluate.outputs import evaluate_run
from test_evaluation import run_cli  # run_seg_eval.py -> (code, out, err)

from conftest import seal_predictions

monai_metrics = pytest.importorskip("monai.metrics", reason="MONAI is the distance reference")

INFO = {"0": {"value": 0, "label": "Background"}, "1": {"value": 40, "label": "ILM-IPL"},
        "2": {"value": 80, "label": "IPL-RPE"}, "3": {"value": 120, "label": "Fluid"}}
SPACING = (3.87, 11.5)  # axial, lateral: anisotropic, as OCT


def monai_um(pred, truth, spacing, one_empty=math.nan):
    """(HD95_um, ASSD_um) of two binary masks: MONAI with ``spacing``, plus the rules for
    empty masks (both empty 0, one empty ``one_empty``)."""
    if not pred.any() and not truth.any():
        return 0.0, 0.0
    if not pred.any() or not truth.any():
        return one_empty, one_empty
    p, t = torch.from_numpy(pred)[None, None], torch.from_numpy(truth)[None, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd = monai_metrics.compute_hausdorff_distance(p, t, include_background=True,
                                                      percentile=95, spacing=list(spacing))
        assd = monai_metrics.compute_average_surface_distance(
            p, t, include_background=True, symmetric=True, spacing=list(spacing))
    return hd.item(), assd.item()


# ----------------------------------------------------------------------------- metrics
def random_labels(rng, shape, classes=3):
    labels = np.zeros(shape, np.uint8)
    for c in range(1, classes + 1):
        for _ in range(rng.integers(0, 3)):
            r, q = rng.integers(0, shape[0]), rng.integers(0, shape[1])
            labels[r:r + rng.integers(1, 12), q:q + rng.integers(1, 20)] = c
    return labels


@pytest.mark.parametrize("spacing", [SPACING, (11.5, 3.87), (2.0, 2.0), (1.0, 7.3)])
def test_micrometre_distances_equal_monai(spacing):
    rng = np.random.default_rng(int(spacing[0] * 100))
    for _ in range(15):
        shape = tuple(rng.integers(8, 48, size=2))
        pred, truth = random_labels(rng, shape), random_labels(rng, shape)
        got = surface_distances(pred, truth, [1, 2, 3], spacing=spacing)
        for i, c in enumerate([1, 2, 3]):
            want = monai_um(pred == c, truth == c, spacing)
            for value, ref in zip((got.hd95_um[i], got.assd_um[i]), want):
                if math.isnan(ref):
                    assert math.isnan(value)
                else:
                    assert abs(value - ref) <= 1e-4, (value, ref)


def test_the_worked_example_in_micrometres_by_hand():
    """docs/segmentation_tuning.md: the 6 x 7 example with a = 2, l = 5 um. d_PG sorted
    0, 0, 0, 0, 2, 5, 5, 5, sqrt(241); d_GP 0, 0, 0, 0, 2, 5, 5, 5."""
    truth = np.zeros((6, 7), np.uint8)
    truth[1:4, 1:4] = 1
    pred = np.zeros((6, 7), np.uint8)
    pred[1:4, 2:5] = 1
    pred[5, 6] = 1
    got = surface_distances(pred, truth, [1], spacing=(2.0, 5.0))
    assert got.hd95_um[0] == pytest.approx(5 + 0.6 * (math.sqrt(241) - 5), abs=1e-12)
    assert got.assd_um[0] == pytest.approx((34 + math.sqrt(241)) / 17, abs=1e-12)
    assert got.hd95[0] == np.float32(2.5633304)  # the pixel HD95 is untouched


def test_far_points_are_measured_in_micrometres_too():
    """Boundaries farther apart than the nearby search (6 rows x the finer spacing) go to
    the KD-tree, in micrometres; the nearest in pixels is not the nearest in um here."""
    truth = np.zeros((60, 40), bool)
    pred = np.zeros((60, 40), bool)
    truth[5:9, 5:30] = True
    pred[40:44, 2:8] = True
    pred[20:22, 33:36] = True
    got = surface_distances(pred.astype(np.uint8), truth.astype(np.uint8), [1],
                            spacing=SPACING)
    want = monai_um(pred, truth, SPACING)
    assert got.hd95_um[0] == pytest.approx(want[0], abs=1e-4)
    assert got.assd_um[0] == pytest.approx(want[1], abs=1e-4)


def test_empty_masks_follow_the_pixel_rules_in_micrometres():
    one = np.zeros((6, 8), np.uint8)
    one[2:4, 2:4] = 1
    empty = np.zeros_like(one)
    nan_rule = surface_distances(one, empty, [1, 2], spacing=SPACING)
    assert math.isnan(nan_rule.hd95_um[0]) and math.isnan(nan_rule.assd_um[0])
    assert nan_rule.hd95_um[1] == 0.0 and nan_rule.assd_um[1] == 0.0  # both empty
    diagonal = surface_distances(one, empty, [1], empty_sets_nan=False, spacing=SPACING)
    assert diagonal.hd95_um[0] == diagonal.assd_um[0] == math.hypot(6 * 3.87, 8 * 11.5)
    assert diagonal.hd95[0] == 10.0  # pixels: sqrt(6^2 + 8^2)
    assert surface_distances(one, empty, [1]).hd95_um is None  # no spacing, no um


# ----------------------------------------------------------------------------- a fixed case
def band(top, mid, bottom, shape=(12, 10)):
    rows = np.arange(shape[0])[:, None]
    mask = np.zeros(shape, np.uint8)
    mask[(rows >= top) & (rows < mid) & np.ones((1, shape[1]), bool)] = 40
    mask[(rows >= mid) & (rows < bottom) & np.ones((1, shape[1]), bool)] = 80
    return mask


def fixed_case():
    """({slice id: truth}, {slice id: prediction}) mask values: fluid found shifted, fluid
    missed in one B-scan, a stray pixel, fluid never predicted in a volume."""
    t0, p0 = band(2, 5, 9), band(3, 5, 10)
    t0[5:7, 2:5] = 120
    p0[6:8, 3:6] = 120
    t1, p1 = band(1, 4, 8), band(1, 5, 8)
    t1[5:6, 6:9] = 120
    t2, p2 = band(2, 6, 10), band(2, 6, 10)
    p2[0, 0] = 80
    t3, p3 = band(3, 6, 9), band(3, 7, 9)
    t3[4:6, 1:3] = 120
    return ({"volA_0": t0, "volA_1": t1, "volB_0": t2, "volB_1": t3},
            {"volA_0": p0, "volA_1": p1, "volB_0": p2, "volB_1": p3})


def write_fixed_case(root, info=INFO, dataset="Tiny_DME"):
    truths, preds = fixed_case()
    data = root / "datasets" / dataset
    (data / "test" / "semseg").mkdir(parents=True)
    (data / "INFO.json").write_text(json.dumps(info))
    run = root / "runs" / dataset / "run_a"
    (run / "preds").mkdir(parents=True)
    for name in truths:
        cv2.imwrite(str(data / "test" / "semseg" / f"{name}.png"), truths[name])
        cv2.imwrite(str(run / "preds" / f"{name}.png"), preds[name])
    seal_predictions(run / "preds")
    return root / "datasets", run


HEADER = "ID,Class,Dice,IoU,HD95,truth_pixels,pred_pixels,missed\n"
LAYERS_BEFORE = HEADER + (
    "volA,ILM-IPL,0.833333326388889,0.7142857040816328,1.0,60,60,False\n"
    "volA,IPL-RPE,0.7862068911296076,0.6477272653667356,1.0,71,74,False\n"
    "volB,ILM-IPL,0.9041095828485645,0.8249999896875001,0.6760407090187073,66,80,False\n"
    "volB,IPL-RPE,0.9160305273585456,0.8450704106328112,0.5,70,61,False\n")
# written by run_seg_eval.py (commit 9314bae) before micrometres existed
EXPECTED_BYTES = {
    "default": {
        "results_layers.csv": LAYERS_BEFORE,
        "results_lesions.csv": HEADER + (
            "volA,Fluid,0.2666666488888901,0.15384614201183525,1.3106601238250732,9,6,False\n"
            "volB,Fluid,0.0,0.0,0.0,4,0,True\n")},
    "diagonal": {
        "results_layers.csv": LAYERS_BEFORE,
        "results_lesions.csv": HEADER + (
            "volA,Fluid,0.2666666488888901,0.15384614201183525,8.46557973781919,9,6,False\n"
            "volB,Fluid,0.0,0.0,15.620499351813308,4,0,True\n")},
}
OPTIONS = {"default": {}, "diagonal": {"empty_sets_nan": False, "hd95_missing": "diagonal"}}


@pytest.mark.parametrize("case", list(EXPECTED_BYTES))
def test_without_a_spacing_the_results_files_are_byte_identical(tmp_path, case):
    datasets, run = write_fixed_case(tmp_path)
    evaluation = evaluate_run(run, datasets, quiet=True, **OPTIONS[case])
    written = {path.name: path.read_bytes() for path in evaluation.files}
    assert written == {name: text.encode() for name, text in EXPECTED_BYTES[case].items()}
    # and the same with the new measurements switched off
    off = evaluate_run(run, datasets, quiet=True, measure=False, **OPTIONS[case])
    assert {path.name: path.read_bytes() for path in off.files} == written
    assert not off.measurements and not (run / "layer_boundaries.csv").exists()


@pytest.mark.parametrize("case", list(EXPECTED_BYTES))
def test_with_a_spacing_the_columns_before_stay_and_um_follow_monai(tmp_path, case):
    info = dict(INFO, spacing={"axial_um": SPACING[0], "lateral_um": SPACING[1]})
    datasets, run = write_fixed_case(tmp_path, info)
    evaluation = evaluate_run(run, datasets, quiet=True, **OPTIONS[case])
    truths, preds = fixed_case()
    one_empty = math.nan if case == "default" else math.hypot(12 * 3.87, 10 * 11.5)
    for path in evaluation.files:
        text = path.read_text()
        frame = pd.read_csv(path)
        assert list(frame.columns) == HEADER.strip().split(",") + [
            "HD95_um", "ASSD_um", "spacing_um", "spacing_from"]
        # the original columns hold what they held without a spacing, byte for byte
        before = EXPECTED_BYTES[case][path.name].splitlines()
        assert [",".join(line.split(",")[:8]) for line in text.splitlines()][1:] == before[1:]
        assert set(frame["spacing_um"]) == {"3.87 x 11.5 x n/a"}
        assert set(frame["spacing_from"]) == {"INFO.json"}
        for row in frame.itertuples():
            value = {"ILM-IPL": 40, "IPL-RPE": 80, "Fluid": 120}[row.Class]
            slices = sorted(k for k in truths if k.startswith(row.ID))
            pairs = [monai_um(preds[k] == value, truths[k] == value, SPACING, one_empty)
                     for k in slices]
            present_together = any((preds[k] == value).any() and (truths[k] == value).any()
                                   for k in slices)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                want = [float(np.nanmean([p[i] for p in pairs])) for i in (0, 1)]
            if case == "diagonal" and not present_together:  # --hd95_missing diagonal
                want = [math.hypot(12 * 3.87, 10 * 11.5)] * 2
            for got, ref in zip((row.HD95_um, row.ASSD_um), want):
                assert (math.isnan(got) if math.isnan(ref) else abs(got - ref) <= 1e-4)
    # volB's fluid is never predicted: with --hd95_missing diagonal both um columns are
    # the diagonal in um; by default 0 (NaN in the B-scan holding it, 0 in the other)
    fluid = evaluation.rows.set_index(["ID", "Class"]).loc[("volB", "Fluid")]
    want = 0.0 if case == "default" else math.hypot(12 * 3.87, 10 * 11.5)
    assert fluid["HD95_um"] == pytest.approx(want) and fluid["ASSD_um"] == pytest.approx(want)


def test_empty_volume_nan_leaves_the_um_columns_out_too(tmp_path):
    info = {k: v for k, v in INFO.items()}
    info["4"] = {"value": 200, "label": "PED"}  # in no mask: absent from every volume
    datasets, run = write_fixed_case(tmp_path, info)
    evaluation = evaluate_run(run, datasets, quiet=True, empty_volume="nan",
                              spacing=SPACING)
    ped = evaluation.rows[evaluation.rows["Class"] == "PED"]
    assert ped[["Dice", "IoU", "HD95", "HD95_um", "ASSD_um"]].isna().all().all()


# ----------------------------------------------------------------------------- where from
def test_spacing_option_overrides_info_json_and_is_recorded(tmp_path, capsys):
    info = dict(INFO, spacing={"axial_um": 1.0, "lateral_um": 1.0, "bscan_um": 1.0})
    datasets, run = write_fixed_case(tmp_path, info)
    code, out, err = run_cli(["-d", datasets, "-m", run, "--spacing", "3.87", "11.5", "120",
                              "--no_report"], capsys)
    assert code == 0, err
    assert "axial 3.87, lateral 11.5, B-scan 120 um per pixel (from --spacing)" in out
    assert "layer boundaries: mean absolute error" in out
    frame = pd.read_csv(run / "results_layers.csv")
    assert set(frame["spacing_um"]) == {"3.87 x 11.5 x 120"}
    assert set(frame["spacing_from"]) == {"--spacing"}
    record = json.loads((run / "evaluation.json").read_text())["Tiny_DME"]
    assert (record["spacing_axial_um"], record["spacing_lateral_um"],
            record["spacing_bscan_um"], record["spacing_source"]) == (3.87, 11.5, 120.0,
                                                                      "--spacing")
    assert (run / "lesion_volumes.csv").is_file()


def test_no_spacing_is_recorded_as_none(tmp_path):
    datasets, run = write_fixed_case(tmp_path)
    evaluate_run(run, datasets, quiet=True)
    record = json.loads((run / "evaluation.json").read_text())["Tiny_DME"]
    assert record["spacing_source"] == "none (pixels only)"
    assert record["spacing_axial_um"] is None


@pytest.mark.parametrize("argv, message", [
    (["--spacing", "3.87"], "--spacing takes 2 or 3 numbers"),
    (["--spacing", "3.87", "0"], "lateral spacing 0.0 must be a positive number"),
    (["--spacing", "1", "2", "3", "4"], "--spacing takes 2 or 3 numbers"),
    (["--spacing", "1", "nan"], "must be a positive number"),
])
def test_bad_spacing_option_is_a_one_line_error(tmp_path, capsys, argv, message):
    datasets, run = write_fixed_case(tmp_path)
    code, _, err = run_cli(["-d", datasets, "-m", run, "--no_report", *argv], capsys)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (run / "results_layers.csv").exists()


@pytest.mark.parametrize("entry, message", [
    ([3.87, 11.5], '"spacing" must be an object'),
    ({"axial": 3.87}, "unknown key(s) axial"),
    ({"axial_um": -1}, "spacing axial_um is -1"),
    ({"axial_um": "3.87"}, "spacing axial_um is '3.87'"),
    ({"axial_um": True}, "spacing axial_um is True"),
])
def test_a_bad_info_json_spacing_names_the_file(tmp_path, entry, message):
    datasets, run = write_fixed_case(tmp_path, dict(INFO, spacing=entry))
    with pytest.raises(UserError, match="INFO.json") as caught:
        evaluate_run(run, datasets, quiet=True)
    assert message in str(caught.value)


def test_info_json_spacing_is_not_a_class(tmp_path):
    path = tmp_path / "INFO.json"
    path.write_text(json.dumps(dict(INFO, spacing={"axial_um": 3.87, "bscan_um": None})))
    assert read_class_table(path).labels == ("Background", "ILM-IPL", "IPL-RPE", "Fluid")
    spacing = read_spacing(path)
    assert (spacing.axial_um, spacing.lateral_um, spacing.bscan_um) == (3.87, None, None)
    assert not spacing.in_plane and spacing.source == str(path)
    path.write_text(json.dumps(INFO))
    assert read_spacing(path) is None


def test_one_spacing_for_two_datasets_is_refused(tmp_path, capsys):
    datasets, run = write_fixed_case(tmp_path)
    _, other = write_fixed_case(tmp_path, dataset="Other_DME")
    code, _, err = run_cli(["-d", datasets, "-m", other, "--no_report",
                            "--spacing", "3.87", "11.5"], capsys)
    assert code == 0, err  # one dataset: fine
    code, _, err = run_cli(["-d", datasets, "-m", run, other, "--no_report",
                            "--spacing", "3.87", "11.5"], capsys)
    assert code == 2 and "--spacing gives one spacing but the runs score 2 datasets " \
                         "(Other_DME, Tiny_DME)" in err, err
    assert not (run / "results_layers.csv").exists()


def test_the_demo_dataset_has_a_made_up_spacing(tmp_path):
    """The demo writes its synthetic dataset with DEMO_SPACING, and writes it again (the
    same B-scans) when an earlier demo left one without a spacing."""
    from mirage.demo import DEMO_SPACING, prepare_inputs
    from mirage.data.synthetic import write_synthetic_dataset
    plain = write_synthetic_dataset(tmp_path / "plain", splits={"test": 1}, slices_per_volume=1)
    assert read_spacing(plain / "INFO.json") is None  # no spacing unless one is given
    _, data = prepare_inputs(tmp_path / "demo")
    spacing = read_spacing(data / "INFO.json")
    assert (spacing.axial_um, spacing.lateral_um, spacing.bscan_um) == (6.0, 30.0, 120.0)
    assert DEMO_SPACING == {"axial_um": 6.0, "lateral_um": 30.0, "bscan_um": 120.0}
    bscan = data / "test" / "bscan" / "synth008_0.png"
    before = bscan.read_bytes()
    info = json.loads((data / "INFO.json").read_text())
    del info["spacing"]
    (data / "INFO.json").write_text(json.dumps(info))
    prepare_inputs(tmp_path / "demo")
    assert read_spacing(data / "INFO.json").axial_um == 6.0
    assert bscan.read_bytes() == before
