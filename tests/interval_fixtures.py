"""A small study and two scored runs built in memory, for the interval tests.

Deterministic (a fixed PCG64 seed), with what the tables' notes are about: a class never
predicted in some volumes (†), NaN HD95 values, a seed whose every HD95 is NaN, a group
with one seed of two, two datasets (pooled tests). The files of tests/data/intervals/ are
this study's outputs as written before the intervals existed: without the new options the
outputs must stay byte for byte what they were.
"""
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from mirage.run.catalog import Run
from mirage.run.results import Evaluation

GOLDEN = Path(__file__).resolve().parent / "data" / "intervals"
VOLUMES = 8
CLASSES = (("L1", "layers"), ("L2", "layers"), ("Fluid", "lesions"))


def result_rows(quality, seed, dataset, missed_fluid=0, hd95_all_nan=False):
    """Results rows (as read back from results CSVs) of one run: VOLUMES volumes x
    CLASSES; ``missed_fluid``: Fluid never predicted in that many volumes."""
    rng = np.random.default_rng([ord(dataset[-1]), seed, int(100 * quality)])
    records = []
    for v in range(VOLUMES):
        for label, group in CLASSES:
            dice = float(np.clip(quality + 0.08 * rng.standard_normal(), 0, 1))
            hd95 = float(2 + 30 * (1 - dice) + rng.random())
            missed = label == "Fluid" and v < missed_fluid
            if missed:
                dice, hd95 = 0.0, 0.0
            if label == "L2" and v % 3 == 0:
                hd95 = float("nan")  # e.g. one mask empty in every B-scan
            if hd95_all_nan:
                hd95 = float("nan")
            records.append({"ID": f"scan{v}", "Class": label, "Group": group,
                            "Dice": round(dice, 6), "IoU": round(dice / (2 - dice), 6),
                            "HD95": round(hd95, 4), "truth_pixels": 400,
                            "pred_pixels": 0 if missed else 380, "missed": missed})
    return pd.DataFrame(records)


def make_run(model, seed, dataset, quality, **rows):
    weights = f"/w/{model}.pth"
    run = Run(path=Path(f"/s/v1/{dataset}/{model}_s{seed}"),
              config={"seed": seed, "weights": weights, "output_adapter": "convnext",
                      "loss": "CE"},
              identity={"seed": seed, "weights_name": f"{model}.pth",
                        "weights_sha256": hashlib.sha256(weights.encode()).hexdigest()},
              status="evaluated")
    run.evaluations = [Evaluation(dataset=dataset, external="",
                                  rows=result_rows(quality, seed, dataset, **rows), files=[],
                                  empty_volume="zero", options={"hd95_missing": "original"})]
    return run


def study_runs():
    """A, B (never predicts Fluid in 3 volumes) and C (one seed only, D1) on D1 and D2."""
    runs = []
    for dataset in ("D1", "D2"):
        for seed in (1, 2):
            runs.append(make_run("A", seed, dataset, 0.82,
                                 hd95_all_nan=dataset == "D2" and seed == 2))
            runs.append(make_run("B", seed, dataset, 0.74, missed_fluid=3))
    runs.append(make_run("C", 1, "D1", 0.78))
    return runs


def run_evaluations():
    """Two scored runs as run_seg_eval.py holds them (mirage.evaluate.scoring)."""
    from mirage.evaluate.scoring import RunEvaluation
    evaluations = []
    for name, quality, seed in (("A_s1", 0.82, 1), ("B_s1", 0.74, 2)):
        rows = result_rows(quality, seed, "D1", missed_fluid=3 if name[0] == "B" else 0)
        groups = {g: [c for c, k in CLASSES if k == g] for g in ("layers", "lesions")}
        evaluations.append(RunEvaluation(run_dir=Path(f"out/v1/D1/{name}"), dataset="D1",
                                         external="", rows=rows, groups=groups,
                                         num_slices=2 * VOLUMES))
    return evaluations
