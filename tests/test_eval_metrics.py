"""Dice, IoU and HD95 (mirage.evaluate.metrics) against independent references.

HD95 is checked against MONAI's compute_hausdorff_distance(percentile=95) (a test-only
dependency) on hand-made and random masks; the project's conventions for empty masks
(both empty -> 0, one empty -> NaN or the diagonal) wrap MONAI's value.
"""
import math
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from mirage.evaluate.metrics import (dice_score, hd95, hd95_per_class, iou_score, mask_boundary,
                            percentile_float32)

monai_metrics = pytest.importorskip("monai.metrics", reason="MONAI is the HD95 reference")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """MONAI is ~10x slower on small images with torch's thread pool; restore afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def monai_hd95(pred, truth, one_empty=float("nan")):
    """Reference HD95 of two binary masks: MONAI, plus the evaluation's empty-mask rules."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if not pred.any() and not truth.any():
        return 0.0
    if not pred.any() or not truth.any():
        return one_empty
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = monai_metrics.compute_hausdorff_distance(
            torch.from_numpy(pred)[None, None], torch.from_numpy(truth)[None, None],
            include_background=True, percentile=95)
    return value.item()


def assert_same(got, want):
    if math.isnan(want):
        assert math.isnan(got)
    else:
        assert abs(got - want) <= 1e-6, (got, want)


def canvas(shape=(40, 50)):
    return np.zeros(shape, dtype=bool)


# ----------------------------------------------------------------------------- Dice, IoU
def test_dice_and_iou_from_counts():
    # |P| = 30, |G| = 50, |P∩G| = 20
    assert dice_score(20, 30, 50) == 40 / (80 + 1e-6)
    assert iou_score(20, 30, 50) == 20 / (60 + 1e-6)
    # absent from both: 0 (not 1, not NaN), as the original tool
    assert dice_score(0, 0, 0) == 0.0 and iou_score(0, 0, 0) == 0.0
    counts = np.array([[20, 30, 50], [0, 0, 0], [5, 5, 5]])
    np.testing.assert_array_equal(dice_score(*counts.T),
                                  [40 / 80.000001, 0.0, 10 / 10.000001])


def test_dice_and_iou_on_masks_match_pixel_sets():
    rng = np.random.default_rng(3)
    pred, truth = rng.random((2, 30, 40)) < 0.4
    inter, p, g = (pred & truth).sum(), pred.sum(), truth.sum()
    union = (pred | truth).sum()
    assert dice_score(inter, p, g) == pytest.approx(2 * inter / (p + g), rel=1e-6)
    assert iou_score(inter, p, g) == pytest.approx(inter / union, rel=1e-6)


# ----------------------------------------------------------------------------- boundary
def test_boundary_is_mask_minus_its_cross_erosion():
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = ndimage.gaussian_filter(rng.random((25, 31)), 1.5) > 0.5
        mask[0, :] |= rng.random(31) < 0.5  # touching the image border
        expected = mask ^ ndimage.binary_erosion(mask)  # cross element, border 0
        np.testing.assert_array_equal(mask_boundary(mask), expected)


def test_full_image_mask_boundary_is_the_image_border():
    boundary = mask_boundary(np.ones((5, 6), bool))
    expected = np.ones((5, 6), bool)
    expected[1:-1, 1:-1] = False
    np.testing.assert_array_equal(boundary, expected)


# ----------------------------------------------------------------------------- percentile
@pytest.mark.parametrize("n", [1, 2, 3, 20, 21, 101, 1000, 2999])
def test_percentile_matches_torch_quantile_bit_for_bit(n):
    rng = np.random.default_rng(n)
    for scale in (4, 50, 5000, 800_000):
        sq = rng.integers(0, scale, n)
        distances = torch.from_numpy(np.sqrt(sq.astype(np.float64)).astype(np.float32))
        assert percentile_float32(sq) == torch.quantile(distances, 0.95).item()


def test_percentile_matches_torch_quantile_on_many_small_sets():
    # Rounding of the interpolation differs from torch's only in rare cases: try many.
    rng = np.random.default_rng(0)
    for _ in range(5000):
        sq = rng.integers(0, rng.choice([100, 10_000, 800_000]), rng.integers(2, 60))
        distances = torch.from_numpy(np.sqrt(sq.astype(np.float64)).astype(np.float32))
        assert percentile_float32(sq) == torch.quantile(distances, 0.95).item()


# ----------------------------------------------------------------------------- HD95
def hand_made_cases():
    """(name, pred, truth) binary mask pairs covering the edge cases of HD95."""
    cases = []
    p, t = canvas(), canvas()
    p[10, 10] = t[10, 10] = True
    cases.append(("same single pixel", p, t))
    p, t = canvas(), canvas()
    p[3, 4], t[30, 41] = True, True
    cases.append(("two single pixels far apart", p, t))
    p, t = canvas(), canvas()
    p[0, :], t[-1, :] = True, True
    cases.append(("lines on opposite borders", p, t))
    p, t = canvas(), canvas()
    p[:, 0], t[:, 0:3] = True, True
    cases.append(("touching the left border", p, t))
    cases.append(("whole image vs half", np.ones((40, 50), bool),
                  np.arange(40)[:, None] < np.full((40, 50), 20)))
    cases.append(("whole image vs whole image", np.ones((40, 50), bool),
                  np.ones((40, 50), bool)))
    p, t = canvas(), canvas()
    p[20, 5:45], t[22, 5:45] = True, True
    cases.append(("thin horizontal lines", p, t))
    p, t = canvas(), canvas()
    np.fill_diagonal(p, True)
    t[np.arange(38), np.arange(38) + 2] = True
    cases.append(("thin diagonal lines", p, t))
    p, t = canvas(), canvas()
    p[2:8, 2:8] = p[30:36, 40:46] = p[15, 25] = True
    t[3:9, 2:9] = t[31:37, 38:45] = True
    cases.append(("several components, one stray pixel", p, t))
    p, t = canvas((300, 400)), canvas((300, 400))
    p[10:20, 10:20] = True
    p[280:290, 380:390] = True  # far outside the nearby-offset search
    t[12:22, 11:21] = True
    cases.append(("distant component (KD-tree fallback)", p, t))
    p, t = canvas((600, 900)), canvas((600, 900))
    p[5:40, 5:60] = True
    t[520:595, 700:890] = True  # large distances: float32 rounding matters
    cases.append(("large distances", p, t))
    p, t = canvas(), canvas()
    p[5:35, 5:45] = True
    t[5:35, 5:45] = True
    t[15:25, 15:35] = False
    cases.append(("ring vs filled", p, t))
    return cases


@pytest.mark.parametrize("name,pred,truth", hand_made_cases(),
                         ids=[c[0] for c in hand_made_cases()])
def test_hd95_matches_monai_on_hand_made_masks(name, pred, truth):
    assert_same(hd95(pred, truth), monai_hd95(pred, truth))
    assert_same(hd95(truth, pred), monai_hd95(truth, pred))  # symmetric


def test_hd95_empty_mask_conventions():
    some = canvas()
    some[5:9, 5:9] = True
    assert hd95(canvas(), canvas()) == 0.0  # both empty
    assert math.isnan(hd95(some, canvas())) and math.isnan(hd95(canvas(), some))
    diagonal = math.sqrt(40 ** 2 + 50 ** 2)
    assert hd95(some, canvas(), one_empty_value=diagonal) == diagonal
    assert hd95(canvas(), canvas(), one_empty_value=diagonal) == 0.0


def test_hd95_matches_monai_on_random_masks():
    rng = np.random.default_rng(7)
    for trial in range(120):
        h, w = rng.integers(2, 70, 2)
        if trial % 3 == 0:  # pixel noise: many tiny components
            pred, truth = rng.random((2, h, w)) < rng.uniform(0.02, 0.6)
        else:  # smooth blobs, the prediction shifted and speckled
            truth = ndimage.gaussian_filter(rng.random((h, w)), 2) > 0.5
            pred = np.roll(truth, tuple(rng.integers(-4, 5, 2)), axis=(0, 1))
            pred ^= rng.random((h, w)) < 0.01
        assert_same(hd95(pred, truth), monai_hd95(pred, truth))


def test_hd95_per_class_equals_binary_hd95_of_each_class():
    rng = np.random.default_rng(11)
    truth = np.digitize(ndimage.gaussian_filter(rng.random((60, 80)), 3), [0.45, 0.5, 0.55])
    pred = np.roll(truth, 2, axis=0)
    pred[rng.random(pred.shape) < 0.02] = 2
    pred[pred == 3] = 0  # class 3 predicted nowhere: one empty
    classes = [1, 2, 3, 4]  # class 4 in neither: both empty
    got = hd95_per_class(pred.astype(np.uint8), truth.astype(np.uint8), classes)
    for value, c in zip(got, classes):
        assert_same(value, monai_hd95(pred == c, truth == c))
    assert math.isnan(got[2]) and got[3] == 0.0
