"""Validation metrics and checkpoint selection, against hand-computed values.

The original MIRAGE code selects checkpoint-best.pth by mmseg-style mean IoU over all
classes (no ignore index; a class absent from both prediction and truth is NaN and
skipped), x100 rounded to 2 decimals, strictly greater than the best so far.
"""
import math

import numpy as np
import pytest
import torch

from mirage.train.checkpointing import TrainingState
from mirage.train.loop import epoch_line
from mirage.train.validation_metrics import (confusion_matrix, scores_from_confusion, selection_key,
                            validation_scores)

# 2 x 3 image, 4 classes; class 3 appears in neither prediction nor truth.
TARGET = torch.tensor([[0, 1, 2], [2, 0, 0]])
PRED = torch.tensor([[0, 1, 1], [2, 2, 0]])
# (truth, pred) pairs: (0,0) (1,1) (2,1) (2,2) (0,2) (0,0)
CONFUSION = [[2, 0, 1, 0],
             [0, 1, 0, 0],
             [0, 1, 1, 0],
             [0, 0, 0, 0]]


def test_confusion_matrix_rows_are_truth():
    cm = confusion_matrix(PRED, TARGET, 4)
    assert cm.dtype == torch.int64
    assert cm.tolist() == CONFUSION


def test_scores_without_ignore_index_are_the_originals():
    # IoU: class 0: 2 / (3 + 2 - 2) = 2/3; class 1: 1 / (1 + 2 - 1) = 1/2;
    # class 2: 1 / (2 + 2 - 1) = 1/3; class 3: 0/0 -> NaN, skipped.
    s = scores_from_confusion(torch.tensor(CONFUSION))
    assert s["IoU"][:3] == pytest.approx([2 / 3, 1 / 2, 1 / 3]) and math.isnan(s["IoU"][3])
    assert s["mIoU"] == pytest.approx(0.5)
    assert s["aAcc"] == pytest.approx(4 / 6)
    assert s["mAcc"] == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)   # recalls; class 3 NaN


def test_scores_with_ignored_class():
    # Class 0 left out: mean of 1/2 and 1/3; accuracies over the 3 pixels whose truth is
    # 1 or 2 (2 right); the other classes keep their IoU (FP on class-0 pixels count).
    s = scores_from_confusion(np.array(CONFUSION), ignore_index=0)
    assert math.isnan(s["IoU"][0]) and s["IoU"][1:3] == pytest.approx([1 / 2, 1 / 3])
    assert s["mIoU"] == pytest.approx(5 / 12)
    assert s["aAcc"] == pytest.approx(2 / 3)
    assert s["mAcc"] == pytest.approx((1 + 1 / 2) / 2)


def test_class_predicted_but_absent_from_truth_counts_as_zero():
    cm = np.array(CONFUSION)
    cm[0, 0] -= 1
    cm[0, 3] += 1  # one class-0 pixel predicted as class 3
    s = scores_from_confusion(cm)
    # class 0: 1 / (3 + 1 - 1); class 3: 0 / 1 -> 0, averaged (not skipped)
    assert s["IoU"] == pytest.approx([1 / 3, 1 / 2, 1 / 3, 0.0])
    assert s["mIoU"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 3 + 0) / 4)
    assert s["mAcc"] == pytest.approx((1 / 3 + 1 + 1 / 2) / 3)  # class 3 has no truth


def test_validation_scores_log_both_rules_and_per_class_iou():
    v = validation_scores(torch.tensor(CONFUSION), 0, ["Background", "A", "B", "C"])
    assert v["mIoU_all"] == pytest.approx(0.5) and v["mIoU_fg"] == pytest.approx(5 / 12)
    assert v["mIoU"] == v["mIoU_all"]                       # the paper's rule by default
    assert v["aAcc"] == pytest.approx(4 / 6)                # over all classes
    assert v["IoU"] == pytest.approx({"Background": 2 / 3, "A": 1 / 2, "B": 1 / 3, "C": None})
    fg = validation_scores(torch.tensor(CONFUSION), 0, select_metric="mIoU_fg")
    assert fg["mIoU"] == pytest.approx(5 / 12) and list(fg["IoU"]) == ["0", "1", "2", "3"]
    assert validation_scores(torch.tensor(CONFUSION), None)["mIoU_fg"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="select_metric"):
        validation_scores(torch.tensor(CONFUSION), 0, select_metric="mIoU")


def test_selection_key_is_percent_rounded_half_to_even():
    assert selection_key(5 / 12) == 41.67
    assert selection_key(0.511049) == 51.10 and selection_key(0.51096) == 51.10
    assert selection_key(0.125) == 12.5
    assert selection_key(0.000125) == 0.01     # half to even: 1.25 -> 1, 3.75 -> 4
    assert selection_key(0.000375) == 0.04
    # numpy's arithmetic, not Python's round(): 0.51105 * 100 = 51.105000000000004,
    # which round(., 2) takes to 51.11 but np.round (x 100, rint, / 100) to 51.10.
    assert selection_key(0.51105) == 51.10 and round(0.51105 * 100, 2) == 51.11
    assert math.isnan(selection_key(float("nan")))


def test_training_state_selects_as_the_original():
    state = TrainingState()
    assert state.improves(0.2)                       # the first evaluation always counts
    state.best_miou = 0.51104
    assert not state.improves(0.51096)               # both 51.10: a tie keeps the earlier
    assert not state.improves(0.511049)
    assert not state.improves(0.51105)               # np.round: 51.10 too
    assert state.improves(0.51106)                   # 51.11 > 51.10
    assert not state.improves(float("nan"))
    state.best_miou = float("nan")
    assert state.improves(0.1)


def test_epoch_line_names_the_selecting_metric_and_percent():
    stats = {"epoch": 4, "train/loss": 0.5, "train/lr": 1e-4, "val/loss": 0.25,
             "val/mIoU": 0.5, "val/mIoU_all": 0.5, "val/mIoU_fg": 5 / 12, "val/aAcc": 0.75,
             "val/mAcc": 0.8, "time": 3.0}
    state = TrainingState(best_miou=5 / 12, best_epoch=4, metric="mIoU_fg")
    line = epoch_line(stats, state, 10)
    assert "mIoU_all 50.00%" in line and "mIoU_fg 41.67%" in line and "aAcc 75.00%" in line
    assert "best mIoU_fg 41.67% (epoch 4)" in line  # epochs count from 0
