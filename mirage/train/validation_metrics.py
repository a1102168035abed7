"""Validation metrics used while training: mIoU, aAcc and mAcc from a confusion matrix
accumulated over every pixel of a split, and the rule that selects the best epoch."""
import math

import numpy as np
import torch


def confusion_matrix(pred, target, num_classes):
    """(K, K) int64 counts, rows = truth, columns = prediction.

    pred, target: integer tensors of the same shape holding class indices in [0, K).
    """
    index = target.reshape(-1).long() * num_classes + pred.reshape(-1).long()
    counts = torch.bincount(index, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def scores_from_confusion(confusion, ignore_index=None):
    """mIoU, aAcc and mAcc from a (K, K) confusion matrix (rows = truth).

    Without ``ignore_index`` this is the original MIRAGE validation metric (mmseg's
    ``mean_iou`` without an ignore index): per class IoU = TP / (TP + FP + FN) and recall
    TP / (TP + FN) over all pixels; a class absent from both prediction and truth has IoU
    0/0 = NaN (recall NaN when absent from the truth) and is skipped by the NaN-ignoring
    means. aAcc = correct pixels / all pixels.

    With ``ignore_index`` (the foreground-only rule) that class's IoU and recall are left
    out of the means and the pixels whose truth is that class out of aAcc; the other
    classes' IoUs are unchanged (their FP still count pixels predicted on that class).

    Returns ``mIoU``, ``aAcc``, ``mAcc`` (fractions in [0, 1], NaN if nothing to average)
    and ``IoU`` (a list with one value per class, NaN where skipped).
    """
    cm = confusion.double().cpu().numpy() if torch.is_tensor(confusion) else \
        np.asarray(confusion, dtype=np.float64)
    num_classes = cm.shape[0]
    keep = np.ones(num_classes, dtype=bool)
    if ignore_index is not None and 0 <= ignore_index < num_classes:
        keep[ignore_index] = False
    tp = np.diag(cm)
    truth = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    union = truth + predicted - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        recall = np.where(truth > 0, tp / truth, np.nan)
    iou[~keep] = np.nan
    recall[~keep] = np.nan
    counted = truth[keep].sum()

    def nanmean(x):
        return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")

    return {
        "mIoU": nanmean(iou),
        "aAcc": float(tp[keep].sum() / counted) if counted > 0 else float("nan"),
        "mAcc": nanmean(recall),
        "IoU": [float(v) for v in iou],
    }


# How checkpoint-best.pth is chosen (--select_metric): the paper's rule is mIoU over all
# classes, background included ("mIoU_all"); "mIoU_fg" leaves the ignore index out.
SELECT_METRICS = ("mIoU_all", "mIoU_fg")


def validation_scores(confusion, ignore_index=None, labels=None, select_metric="mIoU_all"):
    """What a validation (or test) pass logs, as fractions in [0, 1].

    ``mIoU_all``: scores_from_confusion without an ignore index (the original's metric);
    ``mIoU_fg``: with ``ignore_index`` (equal to mIoU_all when it is None); ``mIoU``: the
    one named by ``select_metric``; ``aAcc``, ``mAcc``: over all classes (the original's);
    ``IoU``: {class label: IoU over all pixels, None for a class absent from both}.
    """
    if select_metric not in SELECT_METRICS:
        raise ValueError(f"select_metric must be one of {', '.join(SELECT_METRICS)}, "
                         f"not {select_metric!r}")
    every = scores_from_confusion(confusion)
    fg = scores_from_confusion(confusion, ignore_index)
    num_classes = len(every["IoU"])
    labels = [str(i) for i in range(num_classes)] if labels is None else list(labels)
    if len(set(labels)) != len(labels):  # keep every class when labels repeat
        labels = [f"{i} {label}" for i, label in enumerate(labels)]
    scores = {"mIoU_all": every["mIoU"], "mIoU_fg": fg["mIoU"]}
    return {"mIoU": scores[select_metric], **scores, "aAcc": every["aAcc"],
            "mAcc": every["mAcc"],
            "IoU": {label: None if math.isnan(v) else v
                    for label, v in zip(labels, every["IoU"])}}


def selection_key(value):
    """The value the original compares to pick the best epoch: 100 x the fraction, rounded
    to 2 decimals with numpy's round-half-to-even (``np.round(x * 100, 2)``).

    Epochs whose metrics round to the same key tie; the earlier one is kept.
    """
    return float(np.round(value * 100, 2))
