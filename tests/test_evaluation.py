"""run_seg_eval.py / mirage.evaluate.scoring: files found, values right, CSVs written, errors.

Expected values come from an independent per-slice computation (numpy pixel counts for
Dice/IoU, MONAI for HD95) or, for eval_example, from the original tool's CSV rows.
"""
import json
import math
import shutil
import warnings
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

from mirage.errors import UserError
from mirage.evaluate.outputs import evaluate_run
from mirage.evaluate.scoring import resize_nearest
from run_seg_eval import main

from conftest import seal_predictions

monai_metrics = pytest.importorskip("monai.metrics", reason="MONAI is the HD95 reference")

EVAL_EXAMPLE = Path(__file__).resolve().parent / "data" / "eval_example"  # see data/README.md

# A Duke-DME-like table: background, two layers, one lesion class.
TINY_INFO = {"0": {"value": 0, "label": "Background"}, "1": {"value": 40, "label": "ILM-IPL"},
             "2": {"value": 80, "label": "IPL-RPE"}, "3": {"value": 120, "label": "Fluid"}}
AROI_INFO = {str(i): {"value": 23 * i, "label": label} for i, label in enumerate(
    ["Above ILM", "ILM-IPL/INL", "IPL/INL-RPE", "RPE-BM", "Under BM", "Cyst", "PED", "SRF"])}
IAMD_INFO = {str(i): {"value": 51 * i, "label": label} for i, label in enumerate(
    ["Invalid", "Above ILM", "ILM-Inner RPEDC", "Inner RPEDC-Outer BM", "Below BM"])}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- helpers
def layered(rng, shape, values, shift=0):
    """(H, W) mask of horizontal bands with wavy borders holding ``values`` top to bottom."""
    h, w = shape
    cols = np.arange(w)
    borders = [h * (i + 1) / (len(values)) + 2 * np.sin(cols / 5 + rng.uniform(0, 6)) + shift
               for i in range(len(values) - 1)]
    depth = sum((np.arange(h)[:, None] >= b[None, :]).astype(int) for b in borders)
    return np.asarray(values, np.uint8)[depth]


def tiny_masks(seed, shape=(24, 32)):
    """(truth, prediction) value images for the TINY_INFO classes."""
    rng = np.random.default_rng(seed)
    truth = layered(rng, shape, [0, 40, 80, 0])
    pred = layered(rng, shape, [0, 40, 80, 0], shift=rng.integers(-1, 2))
    if seed % 2:
        truth[8:12, 10:16] = 120
        pred[9:13, 11:18] = 120
    pred[rng.random(shape) < 0.02] = 80
    return truth, pred


def write_images(folder, images, suffix=""):
    folder.mkdir(parents=True, exist_ok=True)
    for slice_id, image in images.items():
        assert cv2.imwrite(str(folder / f"{slice_id}{suffix}.png"), image)
    if folder.name.startswith("preds"):
        seal_predictions(folder)


def make_run(root, dataset="Tiny_DME", info=TINY_INFO, truths=None, preds=None,
             run_name="run_a", pred_suffix=""):
    """datasets/<dataset>/{INFO.json,test/semseg} and runs/<dataset>/<run>/preds."""
    if truths is None:
        pairs = {f"{scan}_{s}": tiny_masks(10 * v + s) for v, scan in enumerate(["scanA", "scanB"])
                 for s in range(3)}
        truths = {k: t for k, (t, _) in pairs.items()}
        preds = {k: p for k, (_, p) in pairs.items()}
    data = root / "datasets" / dataset
    data.mkdir(parents=True, exist_ok=True)
    (data / "INFO.json").write_text(json.dumps(info))
    write_images(data / "test" / "semseg", truths)
    run_dir = root / "runs" / dataset / run_name
    write_images(run_dir / "preds", preds, pred_suffix)
    return root / "datasets", run_dir, truths, preds


def monai_hd95(pred, truth, one_empty=float("nan")):
    if not pred.any() and not truth.any():
        return 0.0
    if not pred.any() or not truth.any():
        return one_empty
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return monai_metrics.compute_hausdorff_distance(
            torch.from_numpy(pred)[None, None], torch.from_numpy(truth)[None, None],
            include_background=True, percentile=95).item()


def reference_rows(truths, preds, classes, one_empty=None):
    """{(volume, value): (Dice, IoU, HD95)}: per-slice counts and MONAI, volume by volume."""
    volumes = {}
    for slice_id in sorted(truths, key=lambda k: (k.rsplit("_", 1)[0], int(k.rsplit("_")[-1]))):
        volumes.setdefault(slice_id.rsplit("_", 1)[0], []).append(
            (truths[slice_id], preds[slice_id]))
    rows = {}
    for volume, slices in volumes.items():
        for value in classes:
            inter = sum(int(((t == value) & (p == value)).sum()) for t, p in slices)
            n_p = sum(int((p == value).sum()) for _, p in slices)
            n_t = sum(int((t == value).sum()) for t, _ in slices)
            hd = [monai_hd95(p == value, t == value,
                             math.hypot(*t.shape) if one_empty else float("nan"))
                  for t, p in slices]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rows[(volume, value)] = (2 * inter / (n_p + n_t + 1e-6),
                                         inter / (n_p + n_t - inter + 1e-6),
                                         float(np.nanmean(hd)))
    return rows


def assert_rows_match(frame, expected, labels):
    """frame: ID, Class, Dice, IoU, HD95 rows; expected from reference_rows."""
    assert len(frame) == len(expected)
    for row in frame.itertuples():
        want = expected[(row.ID, labels[row.Class])]
        for got, ref in zip((row.Dice, row.IoU, row.HD95), want):
            if math.isnan(ref):
                assert math.isnan(got)
            else:
                assert got == pytest.approx(ref, abs=1e-6)


def label_values(info):
    return {entry["label"]: entry["value"] for entry in info.values()}


def run_cli(argv, capsys):
    """main(argv) -> (exit code, stdout, stderr); 0 when main returns."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- values
def test_eval_example_reproduces_the_original_tool(tmp_path):
    shutil.copytree(EVAL_EXAMPLE, tmp_path / "ex")  # the run directory gets written into
    run_dir = next((tmp_path / "ex" / "run" / "Synth_DME").iterdir())
    # predictions of the original tool: no manifest of ours
    evaluation = evaluate_run(run_dir, tmp_path / "ex" / "datasets", quiet=True,
                              foreign_predictions=True)
    written = pd.concat([pd.read_csv(f) for f in evaluation.files])
    expected = pd.read_csv(EVAL_EXAMPLE / "expected_results.csv")
    assert [f.name for f in evaluation.files] == ["results_layers.csv", "results_lesions.csv"]
    merged = expected.merge(written, on=["ID", "Class"], suffixes=("_want", "_got"))
    assert len(merged) == len(expected) == len(written) == 8
    assert (merged["Dice_got"] == merged["Dice_want"]).all()
    assert (merged["IoU_got"] == merged["IoU_want"]).all()
    np.testing.assert_allclose(merged["HD95_got"], merged["HD95_want"], rtol=0, atol=1e-5)


def test_rows_match_per_slice_reference_and_csv_layout(tmp_path):
    datasets, run_dir, truths, preds = make_run(tmp_path)
    evaluation = evaluate_run(run_dir, datasets, quiet=True)
    values = label_values(TINY_INFO)
    assert_rows_match(evaluation.rows, reference_rows(truths, preds, [40, 80, 120]), values)
    layers = pd.read_csv(run_dir / "results_layers.csv")
    lesions = pd.read_csv(run_dir / "results_lesions.csv")
    # the original's five columns first; then the pixel counts that flag a missed class
    assert list(layers.columns) == ["ID", "Class", "Dice", "IoU", "HD95", "truth_pixels",
                                    "pred_pixels", "missed"]
    assert list(layers["Class"]) == ["ILM-IPL", "IPL-RPE"] * 2
    assert list(layers["ID"]) == ["scanA", "scanA", "scanB", "scanB"]
    assert list(lesions["Class"]) == ["Fluid"] * 2
    assert not (run_dir / "results.csv").exists()


def test_16_bit_masks_read_like_8_bit(tmp_path):
    datasets, run_dir, truths, preds = make_run(tmp_path)
    write_images(datasets / "Tiny_DME" / "test" / "semseg",
                 {k: t.astype(np.uint16) for k, t in truths.items()})
    assert cv2.imread(str(datasets / "Tiny_DME/test/semseg/scanA_0.png"),
                      cv2.IMREAD_UNCHANGED).dtype == np.uint16
    evaluation = evaluate_run(run_dir, datasets, quiet=True)
    assert_rows_match(evaluation.rows, reference_rows(truths, preds, [40, 80, 120]),
                      label_values(TINY_INFO))


def test_parallel_workers_give_identical_rows(tmp_path):
    datasets, run_dir, _, _ = make_run(tmp_path)
    one = evaluate_run(run_dir, datasets, workers=1, quiet=True).rows
    two = evaluate_run(run_dir, datasets, workers=2, quiet=True).rows
    pd.testing.assert_frame_equal(one, two, check_exact=True)


def test_cli_prints_tables_and_writes_results_csv_for_one_group(tmp_path, capsys):
    info = {k: v for k, v in TINY_INFO.items() if v["label"] != "Fluid"}
    pairs = {f"vol_{s}": tiny_masks(2 * s) for s in range(3)}  # even seeds: no fluid
    datasets, run_dir, truths, preds = make_run(
        tmp_path, info=info, truths={k: t for k, (t, _) in pairs.items()},
        preds={k: p for k, (_, p) in pairs.items()})
    code, out, err = run_cli(["-d", datasets, "-m", run_dir], capsys)
    assert code == 0, err
    frame = pd.read_csv(run_dir / "results.csv")
    assert_rows_match(frame, reference_rows(truths, preds, [40, 80]), label_values(info))
    lines = out.splitlines()
    for label in ("ILM-IPL", "IPL-RPE"):
        row = next(line for line in lines if line.startswith(label)).split()
        mean_dice = frame.loc[frame["Class"] == label, "Dice"].mean() * 100
        assert float(row[1]) == pytest.approx(mean_dice, abs=0.006)
    assert any(line.startswith("[all]") for line in lines)
    assert "results.csv" in out


def test_predictions_named_pred_and_of_another_size_are_resized(tmp_path):
    datasets, run_dir, truths, preds = make_run(tmp_path)
    big = {k: cv2.resize(p, None, fx=2, fy=3, interpolation=cv2.INTER_NEAREST)
           for k, p in preds.items()}  # exact 2x/3x copies: resizing back restores them
    shutil.rmtree(run_dir / "preds")
    write_images(run_dir / "preds", big, suffix="_pred")
    evaluation = evaluate_run(run_dir, datasets, quiet=True)
    assert_rows_match(evaluation.rows, reference_rows(truths, preds, [40, 80, 120]),
                      label_values(TINY_INFO))


def test_resize_nearest_is_pixel_centre_aligned_like_scikit_image():
    image = np.arange(4, dtype=np.uint8)[None, :]
    # 4 -> 2 takes the pixels whose centres are nearest: 1 and 3 (INTER_NEAREST gives 0, 2)
    np.testing.assert_array_equal(resize_nearest(image, (1, 2)), [[1, 3]])
    np.testing.assert_array_equal(resize_nearest(image, (1, 8)), [[0, 0, 1, 1, 2, 2, 3, 3]])
    rng = np.random.default_rng(0)
    sizes = [(496, 768), (512, 512), (224, 224), (37, 91), (3, 5), (1, 1)]
    for src in sizes:
        labels = rng.integers(0, 9, src).astype(np.uint8)
        for dst in sizes:
            # scikit-image's order-0 resize is this scipy call
            want = ndimage.zoom(labels, np.divide(dst, src), order=0, mode="nearest",
                                grid_mode=True)
            np.testing.assert_array_equal(resize_nearest(labels, dst), want)


# ----------------------------------------------------------------------------- conventions
def absent_class_run(tmp_path):
    """Fluid absent from scanB entirely; in scanA one slice has it only in the truth."""
    truths, preds = {}, {}
    for v, scan in enumerate(["scanA", "scanB"]):
        for s in range(2):
            t, p = tiny_masks(2 * (3 * v + s))  # even seeds: no fluid
            if scan == "scanA":
                t[5:9, 5:9] = 120
                if s == 0:
                    p[6:10, 5:9] = 120
            truths[f"{scan}_{s}"], preds[f"{scan}_{s}"] = t, p
    return make_run(tmp_path, truths=truths, preds=preds)


def test_empty_volume_zero_and_nan(tmp_path):
    datasets, run_dir, truths, preds = absent_class_run(tmp_path)
    zero = evaluate_run(run_dir, datasets, quiet=True).rows
    fluid_b = zero[(zero["ID"] == "scanB") & (zero["Class"] == "Fluid")]
    assert fluid_b[["Dice", "IoU", "HD95"]].values.tolist() == [[0.0, 0.0, 0.0]]
    nan = evaluate_run(run_dir, datasets, empty_volume="nan", quiet=True).rows
    fluid_b = nan[(nan["ID"] == "scanB") & (nan["Class"] == "Fluid")]
    assert fluid_b[["Dice", "IoU", "HD95"]].isna().all(axis=None)
    written = pd.read_csv(run_dir / "results_lesions.csv").set_index("ID")
    assert math.isnan(written.loc["scanB", "Dice"])
    others = (nan["ID"] != "scanB") | (nan["Class"] != "Fluid")
    pd.testing.assert_frame_equal(zero[others], nan[others])


def test_one_empty_slice_is_nan_or_the_diagonal(tmp_path, capsys):
    datasets, run_dir, truths, preds = absent_class_run(tmp_path)
    default = evaluate_run(run_dir, datasets, quiet=True).rows.set_index(["ID", "Class"])
    # scanA_1: fluid only in the truth -> NaN, left out of the volume's mean
    only_slice_0 = monai_hd95(preds["scanA_0"] == 120, truths["scanA_0"] == 120)
    assert default.loc[("scanA", "Fluid"), "HD95"] == pytest.approx(only_slice_0, abs=1e-6)
    code, _, err = run_cli(["-d", datasets, "-m", run_dir, "--no_empty_sets_nan"], capsys)
    assert code == 0, err
    rows = pd.read_csv(run_dir / "results_lesions.csv").set_index("ID")
    diagonal = math.sqrt(24 ** 2 + 32 ** 2)
    assert rows.loc["scanA", "HD95"] == pytest.approx((only_slice_0 + diagonal) / 2, abs=1e-6)


def test_no_ignore_bg_scores_background(tmp_path, capsys):
    datasets, run_dir, truths, preds = make_run(tmp_path)
    code, _, err = run_cli(["-d", datasets, "-m", run_dir, "--no_ignore_bg"], capsys)
    assert code == 0, err
    layers = pd.read_csv(run_dir / "results_layers.csv")
    assert list(layers["Class"][:3]) == ["Background", "ILM-IPL", "IPL-RPE"]
    expected = reference_rows(truths, preds, [0])
    for row in layers[layers["Class"] == "Background"].itertuples():
        assert row.Dice == pytest.approx(expected[(row.ID, 0)][0], abs=1e-12)
        assert row.HD95 == pytest.approx(expected[(row.ID, 0)][2], abs=1e-6)


def test_aroi_model_on_duke_iamd_translates_classes_and_skips_invalid(tmp_path, capsys):
    rng = np.random.default_rng(5)
    aroi_values = [23 * i for i in range(8)]
    # AROI value -> Duke iAMD value, as listed in docs/segmentation_benchmark.md
    translate = {0: 51, 23: 102, 46: 102, 69: 153, 92: 204, 115: 0, 138: 0, 161: 0}
    truths, raw_preds, preds, scored_truths = {}, {}, {}, {}
    for s in range(3):
        truth = layered(rng, (30, 40), [51, 102, 153, 204])
        truth[:, :4] = 0  # invalid columns
        pred = layered(rng, (30, 40), [0, 23, 46, 69, 92], shift=1)
        pred[12:15, 20:26] = rng.choice(aroi_values[5:])  # a lesion: becomes invalid
        truths[f"eye_{s}"], raw_preds[f"eye_{s}"] = truth, pred
        translated = np.vectorize(translate.get)(pred).astype(np.uint8)
        scored = truth.copy()
        scored[translated == 0] = 0  # where the prediction is invalid, the truth is too
        translated[scored == 0] = 0  # where the truth is invalid, the prediction is too
        preds[f"eye_{s}"], scored_truths[f"eye_{s}"] = translated, scored
    datasets = tmp_path / "datasets"
    (datasets / "AROI").mkdir(parents=True)
    (datasets / "AROI" / "INFO.json").write_text(json.dumps(AROI_INFO))
    (datasets / "Duke_iAMD").mkdir()
    (datasets / "Duke_iAMD" / "INFO.json").write_text(json.dumps(IAMD_INFO))
    write_images(datasets / "Duke_iAMD" / "semseg", truths)  # evaluation-only layout
    run_dir = tmp_path / "runs" / "AROI" / "run_x"
    write_images(run_dir / "preds_Duke_iAMD", raw_preds)
    code, out, err = run_cli(["-d", datasets, "-m", run_dir, "-e", "Duke_iAMD"], capsys)
    assert code == 0, err
    frame = pd.read_csv(run_dir / "results_Duke_iAMD.csv")
    assert list(frame["Class"]) == ["ILM-Inner RPEDC", "Inner RPEDC-Outer BM", "Below BM"]
    assert_rows_match(frame, reference_rows(scored_truths, preds, [102, 153, 204]),
                      label_values(IAMD_INFO))


def test_aroi_to_duke_iamd_hand_computed(tmp_path, capsys):
    """One 6 x 6 B-scan. Truth (Duke iAMD): column 0 Invalid; rows 0-1 Above ILM, 2-3
    ILM-Inner RPEDC, 4 Inner RPEDC-Outer BM, 5 Below BM. Prediction (AROI): the same
    layers (ILM-IPL/INL in rows 2-3, RPE-BM in row 4, Under BM in row 5), a Cyst at rows
    2-3, columns 3-4 over annotated ILM-Inner RPEDC, and Under BM at (4, 5).
    The original sets the truth Invalid under the predicted cyst, so those 4 pixels count
    for no class; column 0 (invalid truth) neither."""
    truth = np.full((6, 6), 51, np.uint8)
    truth[2:4], truth[4], truth[5] = 102, 153, 204
    truth[:, 0] = 0
    pred = np.zeros((6, 6), np.uint8)
    pred[2:4], pred[4], pred[5] = 23, 69, 92
    pred[2:4, 3:5] = 115  # Cyst
    pred[4, 5] = 92
    datasets = tmp_path / "datasets"
    (datasets / "AROI").mkdir(parents=True)
    (datasets / "AROI" / "INFO.json").write_text(json.dumps(AROI_INFO))
    (datasets / "Duke_iAMD").mkdir()
    (datasets / "Duke_iAMD" / "INFO.json").write_text(json.dumps(IAMD_INFO))
    write_images(datasets / "Duke_iAMD" / "semseg", {"eye_0": truth})
    run_dir = tmp_path / "runs" / "AROI" / "run_x"
    write_images(run_dir / "preds_Duke_iAMD", {"eye_0": pred})
    code, _, err = run_cli(["-d", datasets, "-m", run_dir, "-e", "Duke_iAMD"], capsys)
    assert code == 0, err
    rows = pd.read_csv(run_dir / "results_Duke_iAMD.csv").set_index("Class")
    # ILM-Inner RPEDC: truth and prediction both rows 2-3, columns 1, 2, 5 (6 px); the 4
    # cyst pixels are not misses (the project's earlier rule gave Dice 12 / 16 = 0.75).
    # HD95 0: identical masks.
    # Inner RPEDC-Outer BM: truth row 4 columns 1-5, prediction columns 1-4: |P∩G| = 4.
    # HD95: prediction -> truth all 0; truth -> prediction 0, 0, 0, 0, 1 -> P95 at rank
    # 0.95 x 4 = 3.8 -> 0.8. Below BM: truth row 5 columns 1-5, prediction those plus
    # (4, 5): |P∩G| = 5; prediction -> truth 0 x 5, 1 -> rank 4.75 -> 0.75.
    expected = {"ILM-Inner RPEDC": (12 / (12 + 1e-6), 6 / (6 + 1e-6), 0.0),
                "Inner RPEDC-Outer BM": (8 / (9 + 1e-6), 4 / (5 + 1e-6), 0.8),
                "Below BM": (10 / (11 + 1e-6), 5 / (6 + 1e-6), 0.75)}
    assert list(rows.index) == list(expected)
    for label, (dice, iou, hd) in expected.items():
        assert rows.loc[label, "Dice"] == pytest.approx(dice, abs=1e-12)
        assert rows.loc[label, "IoU"] == pytest.approx(iou, abs=1e-12)
        assert rows.loc[label, "HD95"] == pytest.approx(hd, abs=1e-6)


def test_summary_one_row_per_run_and_group(tmp_path, capsys):
    datasets, run_a, _, _ = make_run(tmp_path)
    _, run_b, _, _ = make_run(tmp_path, run_name="run_b")
    summary = tmp_path / "paper" / "table.csv"
    code, out, err = run_cli(["-d", datasets, "-m", run_a, run_b, "--summary", summary,
                              "--workers", "2"], capsys)
    assert code == 0, err
    table = pd.read_csv(summary)
    assert list(zip(table["run"], table["group"])) == [
        (r, g) for r in ("run_a", "run_b") for g in ("layers", "lesions", "all")]
    rows = pd.concat([pd.read_csv(run_a / "results_layers.csv"),
                      pd.read_csv(run_a / "results_lesions.csv")])
    layers = rows[rows["Class"] != "Fluid"]
    first = table.iloc[0]
    assert first["Dice_mean"] == pytest.approx(layers["Dice"].mean() * 100)
    per_volume = layers.groupby("ID")["Dice"].mean() * 100
    assert first["Dice_std"] == pytest.approx(per_volume.std(ddof=1))
    assert first["Dice"] == f"{first['Dice_mean']:.2f} ± {first['Dice_std']:.2f}"
    assert first["volumes"] == 2


# ----------------------------------------------------------------------------- bad input
def drop_preds(run_dir, names):
    for name in names:
        (run_dir / "preds" / f"{name}.png").unlink()


BAD_INPUTS = {
    "missing run directory": (
        lambda d, r: shutil.rmtree(r), "run directory"),
    "missing preds folder": (
        lambda d, r: shutil.rmtree(r / "preds"), "predictions folder"),
    "missing ground-truth folder": (
        lambda d, r: shutil.rmtree(d / "Tiny_DME" / "test" / "semseg"), "ground-truth folder"),
    "missing INFO.json": (
        lambda d, r: (d / "Tiny_DME" / "INFO.json").unlink(), "INFO.json not found"),
    "slice without prediction": (
        lambda d, r: drop_preds(r, ["scanA_0", "scanA_2", "scanB_1"]),
        "3 of 6 ground-truth slices have no prediction"),
    "prediction value not in INFO.json": (  # as inference wrote it: sealed
        lambda d, r: write_images(r / "preds", {"scanB_2": np.full((24, 32), 77, np.uint8)}),
        "scanB_2.png has pixel values 77 that are not in"),
    "mask value not in INFO.json": (
        lambda d, r: cv2.imwrite(str(d / "Tiny_DME" / "test" / "semseg" / "scanA_1.png"),
                                 np.full((24, 32), 13, np.uint8)),
        "scanA_1.png has pixel values 13"),
    "unreadable image": (  # sealed, as if written so
        lambda d, r: ((r / "preds" / "scanA_1.png").write_bytes(b"not a png"),
                      seal_predictions(r / "preds")),
        "scanA_1.png is not a readable image"),
    "slice name without _<integer>": (
        lambda d, r: [shutil.copy(d / "Tiny_DME" / "test" / "semseg" / "scanA_0.png",
                                  folder / "scanA-x.png")
                      for folder in (d / "Tiny_DME" / "test" / "semseg", r / "preds")],
        "scanA-x.png: file name must be <scan_id>_<slice number>.png"),
    "old and new prediction names": (
        lambda d, r: shutil.copy(r / "preds" / "scanA_0.png", r / "preds" / "scanA_0_pred.png"),
        "are both predictions for slice scanA_0"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_one_line_error(tmp_path, capsys, case):
    datasets, run_dir, _, _ = make_run(tmp_path)
    (run_dir / "results_layers.csv").write_text("previous results\n")
    breaker, message = BAD_INPUTS[case]
    breaker(datasets, run_dir)
    code, out, err = run_cli(["-d", datasets, "-m", run_dir], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], err
    assert "Traceback" not in err
    if run_dir.is_dir():  # nothing half-written, the previous results untouched
        assert (run_dir / "results_layers.csv").read_text() == "previous results\n"
        assert not (run_dir / "results_lesions.csv").exists()
        assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]


def test_bad_options_are_one_line_errors(tmp_path, capsys):
    datasets, run_dir, _, _ = make_run(tmp_path)
    code, _, err = run_cli(["-d", datasets, "-m", run_dir, "--workers", "0"], capsys)
    assert code == 2 and err.startswith("error: --workers must be at least 1")
    with pytest.raises(UserError, match="--empty_volume"):
        evaluate_run(run_dir, datasets, empty_volume="skip", quiet=True)


def test_missing_prediction_error_lists_the_first_names(tmp_path, capsys):
    datasets, run_dir, _, _ = make_run(tmp_path)
    drop_preds(run_dir, ["scanA_0", "scanB_1"])
    _, _, err = run_cli(["-d", datasets, "-m", run_dir], capsys)
    assert "scanA_0.png, scanB_1.png" in err


def test_external_errors(tmp_path, capsys):
    datasets, run_dir, truths, _ = make_run(tmp_path)
    (datasets / "Other").mkdir()
    code, _, err = run_cli(["-d", datasets, "-m", run_dir, "-e", "Other"], capsys)
    assert code == 2 and "ground-truth folder" in err
    write_images(datasets / "Other" / "semseg", truths)
    (datasets / "Other" / "INFO.json").write_text(json.dumps(IAMD_INFO))
    write_images(run_dir / "preds_Other", truths)
    code, _, err = run_cli(["-d", datasets, "-m", run_dir, "-e", "Other"], capsys)
    assert code == 2 and "no class labelled" in err and "'ilm-ipl'" in err  # no translation
    (datasets / "Tiny_DME" / "INFO.json").unlink()
    code, _, err = run_cli(["-d", datasets, "-m", run_dir, "-e", "Other"], capsys)
    assert code == 2 and "Tiny_DME/INFO.json not found" in err


# ----------------------------------------------------------------------------- manifests
def test_predictions_without_manifest_are_refused_unless_foreign(tmp_path, capsys):
    datasets, run_dir, _, _ = make_run(tmp_path)
    (run_dir / "preds" / "manifest.json").unlink()
    code, _, err = run_cli(["-d", str(datasets), "-m", str(run_dir)], capsys)
    assert code == 2 and "no manifest.json" in err and "--foreign_predictions" in err
    summary = tmp_path / "summary.csv"
    code, out, _ = run_cli(["-d", str(datasets), "-m", str(run_dir), "--foreign_predictions",
                            "--summary", str(summary), "--no_report"], capsys)
    assert code == 0 and "foreign predictions" in out
    assert pd.read_csv(summary)["note"].str.startswith("foreign predictions").all()


def test_predictions_of_an_earlier_best_checkpoint_are_refused(tmp_path, capsys):
    datasets, run_dir, _, _ = make_run(tmp_path)
    (run_dir / "checkpoint-best.pth").write_bytes(b"a newer best checkpoint")
    code, _, err = run_cli(["-d", str(datasets), "-m", str(run_dir)], capsys)
    assert code == 2 and "earlier checkpoint-best.pth" in err and "--infer_only --test" in err


def test_a_mix_of_predictions_is_refused(tmp_path, capsys):
    datasets, run_dir, truths, _ = make_run(tmp_path)
    # a half-finished older inference left a file the manifest does not list
    write_images(run_dir / "preds", {"scanC_0": next(iter(truths.values()))})
    (run_dir / "preds" / "manifest.json").write_text(
        (run_dir / "preds" / "manifest.json").read_text().replace('"scanB_2"', '"scanB_9"'))
    code, _, err = run_cli(["-d", str(datasets), "-m", str(run_dir)], capsys)
    assert code == 2 and "differ from its manifest.json" in err
