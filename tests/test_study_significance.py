"""Paired Wilcoxon tests and Holm-Bonferroni, checked against hand-computed examples.

Every expected value below is worked out by hand from the definitions (ranks, the exact
null distribution by counting sign patterns, the normal approximation with the tie
correction, Holm's step-down rule), never taken from the code under test.
"""
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mirage.run.catalog import Run
from mirage.run.results import Evaluation
from mirage.report.significance import POOLED, holm, significance_table, wilcoxon_paired
from mirage.report.study import build_study

# Differences with distinct magnitudes 0.5, 1, ..., 4: ranks 1..8, only rank 2 negative.
# W- = 2, W+ = 34. Exact two-sided p = 2 P(W+ <= 2) under the 2^8 equally likely sign
# patterns; the sets of ranks summing to <= 2 are {}, {1}, {2}: p = 2 * 3 / 256.
HAND_DIFFS = np.array([0.5, -1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0])
HAND_P = 6 / 256
HAND_W = 2.0
HAND_MEDIAN = (2.0 + 2.5) / 2


def test_exact_p_value_of_a_hand_made_example():
    base = np.linspace(40, 60, 8)
    result = wilcoxon_paired(base + HAND_DIFFS, base)
    assert result["n_volumes"] == 8 and result["method"] == "exact"
    assert result["statistic"] == HAND_W
    assert result["p_value"] == pytest.approx(HAND_P, rel=1e-12)
    assert result["median_diff"] == pytest.approx(HAND_MEDIAN)


def test_exact_p_value_matches_counting_every_sign_pattern():
    # The rule again, for 7 pairs, by brute force over the 2^7 sign patterns.
    diffs = np.array([3.0, -1.0, 4.0, -1.5, 5.0, 9.0, 2.6])
    ranks = np.argsort(np.argsort(np.abs(diffs))) + 1
    observed = min(ranks[diffs > 0].sum(), ranks[diffs < 0].sum())
    sums = [sum(r for r, bit in zip(ranks, range(7)) if pattern >> bit & 1)
            for pattern in range(2 ** 7)]
    expected = min(1.0, 2 * sum(s <= observed for s in sums) / 2 ** 7)
    assert wilcoxon_paired(diffs, np.zeros(7))["p_value"] == pytest.approx(expected)


def test_ties_and_zeros_use_the_normal_approximation_with_tie_correction():
    # d = 1 1 2 -2 3 3 3 4 5 -6 0 7: the zero is dropped, n = 11. |d| ranks: 1.5 1.5
    # 3.5 3.5 6 6 6 8 9 10 11; negative ranks 3.5 + 10 = 13.5 = W. Mean n(n+1)/4 = 33;
    # variance n(n+1)(2n+1)/24 - sum(t^3 - t)/48 = 126.5 - (6 + 6 + 24)/48 = 125.75.
    diffs = np.array([1, 1, 2, -2, 3, 3, 3, 4, 5, -6, 0, 7], dtype=float)
    z = (13.5 - 33) / math.sqrt(125.75)
    result = wilcoxon_paired(diffs, np.zeros_like(diffs))
    assert result["statistic"] == 13.5
    assert result["method"] == "normal approximation"
    assert result["p_value"] == pytest.approx(math.erfc(abs(z) / math.sqrt(2)), rel=1e-9)
    assert "1 zero difference(s) dropped" in result["note"]


def test_fewer_than_six_pairs_give_a_note_and_no_p_value():
    result = wilcoxon_paired(np.arange(5.0) + 1, np.zeros(5))
    assert math.isnan(result["p_value"]) and result["n_volumes"] == 5
    assert "only 5 paired volume(s) (< 6)" in result["note"]


def test_holm_bonferroni_by_hand():
    # sorted: 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04 -> max(0.06, 0.04) = 0.06
    adjusted = holm([0.01, 0.04, 0.03, float("nan")])
    assert adjusted[:3] == pytest.approx([0.03, 0.06, 0.06])
    assert math.isnan(adjusted[3])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1, monotone


# ----------------------------------------------------------------------------- the table
def _run(dataset, model, seed, scores, classes=("Layer",)):
    """A Run evaluated on ``dataset``: ``scores`` {volume: Dice fraction} for each class."""
    rows = pd.DataFrame([(v, c, "layers", s, s / (2 - s), 1.0) for v, s in scores.items()
                         for c in classes], columns=["ID", "Class", "Group", "Dice", "IoU",
                                                     "HD95"])
    config = {"seed": seed, "weights": f"/w/{model}.pth", "output_adapter": "linear",
              "loss": "CE"}
    run = Run(path=Path(f"/study/v1/{dataset}/{model}_s{seed}"), config=config,
              identity={"seed": seed, "lr": 0.001}, status="evaluated")
    run.evaluations = [Evaluation(dataset=dataset, external="", rows=rows, files=[],
                                  empty_volume="zero")]
    return run


def _hand_grid(volumes, dataset="D1", offset=0):
    """Model A's two seeds average to B + HAND_DIFFS (in %) on ``volumes``."""
    base = {v: 0.40 + 0.02 * i for i, v in enumerate(volumes)}
    diffs = dict(zip(volumes, HAND_DIFFS[offset:offset + len(volumes)] / 100))
    spread = 0.003  # +- around the seed mean: cancels in the average over seeds
    return [_run(dataset, "A", 1, {v: base[v] + diffs[v] + spread for v in volumes}),
            _run(dataset, "A", 2, {v: base[v] + diffs[v] - spread for v in volumes}),
            _run(dataset, "B", 1, base), _run(dataset, "B", 2, base)]


def _dice_rows(table, dataset):
    return table[(table["metric"] == "Dice") & (table["dataset"] == dataset)
                 & (table["class_group"] == "all")]


def test_volumes_are_paired_after_averaging_seeds():
    volumes = [f"vol{i}" for i in range(8)]
    table = significance_table(build_study(_hand_grid(volumes)))
    row = _dice_rows(table, "D1").iloc[0]
    assert (row["model_a"], row["model_b"], row["n_volumes"]) == ("A", "B", 8)
    assert row["p_value"] == pytest.approx(HAND_P, rel=1e-9)
    assert row["p_holm"] == pytest.approx(HAND_P, rel=1e-9)  # one pair: nothing to correct
    assert row["median_diff"] == pytest.approx(HAND_MEDIAN, abs=1e-9)
    assert row["significant"] == "yes" and row["better"] == "A"


def test_a_model_pair_without_common_volumes_gets_a_note():
    runs = _hand_grid([f"vol{i}" for i in range(8)])
    runs[2:] = [_run("D1", "B", s, {f"other{i}": 0.5 for i in range(8)}) for s in (1, 2)]
    row = _dice_rows(significance_table(build_study(runs)), "D1").iloc[0]
    assert math.isnan(row["p_value"]) and "no common volumes" in row["note"]


def test_pooled_over_datasets_pairs_the_volumes_of_all_of_them():
    # 4 volumes on each dataset: no test per dataset; pooled, the 8 hand differences.
    runs = _hand_grid([f"v{i}" for i in range(4)], "D1") + \
        _hand_grid([f"v{i}" for i in range(4)], "D2", offset=4)
    table = significance_table(build_study(runs))
    for dataset in ("D1", "D2"):
        row = _dice_rows(table, dataset).iloc[0]
        assert math.isnan(row["p_value"]) and "only 4 paired volume(s)" in row["note"]
    pooled = _dice_rows(table, POOLED).iloc[0]
    assert pooled["n_volumes"] == 8
    assert pooled["p_value"] == pytest.approx(HAND_P, rel=1e-9)
    assert "over D1, D2" in pooled["note"]


def test_holm_is_applied_across_the_pairs_of_a_family():
    volumes = [f"vol{i}" for i in range(8)]
    runs = _hand_grid(volumes)
    # C equals B everywhere: A-C has p = 6/256 like A-B; B-C has no difference (p = 1).
    runs += [_run("D1", "C", s, {v: r for v, r in zip(volumes, np.linspace(0.40, 0.54, 8))})
             for s in (1, 2)]
    rows = _dice_rows(significance_table(build_study(runs)), "D1").set_index(
        ["model_a", "model_b"])
    assert rows.loc[("B", "C"), "p_value"] == 1.0
    # sorted p: 6/256, 6/256, 1 -> x3, x2 (monotone: max with the first), x1
    assert rows.loc[("A", "B"), "p_holm"] == pytest.approx(3 * HAND_P)
    assert rows.loc[("A", "C"), "p_holm"] == pytest.approx(3 * HAND_P)
    assert rows.loc[("B", "C"), "p_holm"] == 1.0
    assert (rows["family_size"] == 3).all()
