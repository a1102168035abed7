"""The HTML reports show run_seg_eval.py's layer boundary errors when a run folder holds
them: the run report a per-boundary table and box plot, the study report a model x
boundary table and box plot per dataset. The boundary files are written here by hand (the
columns run_seg_eval.py writes), so every expected number is worked out from them.
"""
import re

import numpy as np
import pandas as pd
import pytest

from mirage.report.boundaries import KIND, boundary_table, read_boundaries
from mirage.run.folder import RunFolder
from test_report import parse
from test_study import make_grid, summarise

BOUNDARIES = ("ILM", "NFL/GCL", "BM")


def boundary_file(run_dir, shift, micrometres=True, volumes=("v0", "v1", "v2")):
    """A layer_boundaries.csv as run_seg_eval.py writes it; MAE grows with ``shift``."""
    rng = np.random.default_rng(shift)
    records = []
    for volume in volumes:
        for k, boundary in enumerate(BOUNDARIES):
            mae = shift + 0.5 * k + rng.random()
            record = {"ID": volume, "Boundary": boundary, "MAE_px": mae,
                      "bias_px": mae / 2 - 0.3}
            if micrometres:
                record.update(MAE_um=3.87 * mae, bias_um=3.87 * (mae / 2 - 0.3))
            record.update(columns=64, only_truth=0.02 * k, only_pred=0.01)
            if micrometres:
                record.update(spacing_um="3.87 x n/a x n/a", spacing_from="INFO.json")
            records.append(record)
    frame = pd.DataFrame(records)
    path = RunFolder(run_dir).measurement_file(KIND)
    frame.to_csv(path, index=False, na_rep="NaN")
    return frame


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    return make_grid(tmp_path_factory.mktemp("boundaries"))


def test_the_run_report_shows_the_boundary_table_and_box_plot(grid):
    from mirage.report.run_report import write_run_report
    datasets, _, runs = grid
    run = runs[("MIRAGE-Tiny", 1)]
    frame = boundary_file(run, 1)
    page = parse(write_run_report(run, datasets, with_gallery=False, tensorboard=False))
    table = next(t for t in page.tables if t[0][0] == "boundary")
    assert table[0] == ["boundary", "volumes", "MAE_px (px)", "bias_px (px)", "MAE_um (µm)",
                        "bias_um (µm)", "only truth (%)", "only pred (%)"]
    rows = {row[0]: row for row in table[1:]}
    assert list(rows) == list(BOUNDARIES)
    for boundary in BOUNDARIES:
        of = frame[frame["Boundary"] == boundary]
        assert rows[boundary][1] == "3"
        assert rows[boundary][2] == f"{of['MAE_px'].mean():.2f}"
        assert rows[boundary][4] == f"{of['MAE_um'].mean():.2f}"
        assert rows[boundary][6] == f"{100 * of['only_truth'].mean():.2f}"
    text = (run / "report.html").read_text()
    assert "Per-volume MAE_um of each boundary" in text
    assert "Layer boundaries" in page.headings


def test_a_run_without_boundary_file_has_no_boundary_table(grid):
    from mirage.report.run_report import write_run_report
    datasets, _, runs = grid
    run = runs[("RETFound-Tiny", 2)]
    RunFolder(run).measurement_file(KIND).unlink(missing_ok=True)
    text = write_run_report(run, datasets, with_gallery=False, tensorboard=False).read_text()
    assert "Layer boundaries" not in text and "Per-volume MAE" not in text


def test_pixels_only_without_a_spacing_and_unreadable_files_are_notes(grid, tmp_path):
    _, _, runs = grid
    run = runs[("RETFound-Tiny", 1)]
    frame = boundary_file(run, 4, micrometres=False)
    table = boundary_table(read_boundaries(run))
    assert list(table.columns) == ["boundary", "volumes", "MAE_px (px)", "bias_px (px)",
                                   "only truth (%)", "only pred (%)"]
    assert table["MAE_px (px)"].to_list() == pytest.approx(
        frame.groupby("Boundary", sort=False)["MAE_px"].mean().to_list())
    path = RunFolder(run).measurement_file(KIND)
    path.write_text("not,a\nboundary,file\n")
    notes = []
    assert read_boundaries(run, notes=notes) is None
    assert notes and "no ID and Boundary rows" in notes[0]


def test_the_study_report_compares_models_per_boundary(grid, tmp_path):
    _, output, runs = grid
    frames = {key: boundary_file(run, 1 if key[0] == "MIRAGE-Tiny" else 4)
              for key, run in runs.items()}
    files = summarise([output], tmp_path / "study")
    page = parse(files["report.html"])
    assert "Layer boundaries" in page.headings
    table = next(t for t in page.tables if t[0][0] == "model" and "BM" in t[0])
    assert table[0] == ["model", *BOUNDARIES]
    rows = {row[0]: row for row in table[1:]}
    for model in ("MIRAGE-Tiny", "RETFound-Tiny"):
        for k, boundary in enumerate(BOUNDARIES, 1):
            per_seed = []
            for seed in (1, 2):
                frame = frames[(model, seed)]
                per_seed.append(frame.loc[frame["Boundary"] == boundary, "MAE_um"].mean())
            assert rows[model][k] == f"{np.mean(per_seed):.2f} ± {np.std(per_seed, ddof=1):.2f}"
    text = files["report.html"].read_text()
    assert re.search(r"Synth_OCT: boundary MAE_um \(µm\)", text)
    assert "Per-volume MAE_um of each boundary and model" in text


# ----------------------------------------------------------------------------- micrometres
def test_a_study_of_runs_scored_with_a_spacing_tabulates_hd95_um(tmp_path):
    """run_seg_eval.py with a spacing writes HD95_um and ASSD_um; the study reads them back
    and --metrics HD95_um gives their table, seeds averaged as for HD95."""
    from test_study import DATASET, make_run, write_synthetic_dataset
    datasets = tmp_path / "datasets"
    write_synthetic_dataset(datasets, name=DATASET, splits={"test": 6}, slices_per_volume=2,
                            size=(48, 64), seed=3, spacing={"axial_um": 3.87,
                                                            "lateral_um": 11.5})
    runs = {(model, seed): make_run(tmp_path / "output", datasets, model, seed, shift)
            for model, shift in (("MIRAGE-Tiny", 1), ("RETFound-Tiny", 4)) for seed in (1, 2)}
    files = summarise([tmp_path / "output"], tmp_path / "study", table_metrics=("HD95_um",),
                      metric="ASSD_um", ci=True)
    summary = pd.read_csv(files["summary.csv"])
    for model in ("MIRAGE-Tiny", "RETFound-Tiny"):
        per_seed = []
        for seed in (1, 2):
            rows = pd.concat([pd.read_csv(p) for p in sorted(runs[(model, seed)].glob(
                "results*.csv"))])
            per_seed.append(rows["HD95_um"].mean())
        row = summary[(summary["model"] == model) & (summary["class"] == "[all]")].iloc[0]
        assert row["HD95_um_mean"] == pytest.approx(np.mean(per_seed), rel=1e-12)
        assert row["HD95_um_ci_low"] < row["HD95_um_mean"] < row["HD95_um_ci_high"]
    md = files["summary.md"].read_text()
    assert "## HD95_um (µm), all scored classes" in md and "## Dice" not in md
    assert "Heat map of mean ASSD_um" in files["report.html"].read_text()
    tests = pd.read_csv(files["significance.csv"])
    assert {"HD95_um", "ASSD_um"} <= set(tests["metric"])
