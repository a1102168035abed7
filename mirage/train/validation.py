"""Validation (and testing) of a model on a split: loss and confusion-matrix metrics, plus
optional input | truth | prediction panels."""
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from mirage.data.classes import ClassTable
from mirage.fileio import write_png
from mirage.progress import progress
from mirage.train import distributed
from mirage.train.validation_metrics import confusion_matrix, validation_scores


@dataclass(frozen=True)
class SplitScoring:
    """How a split is scored: its class table, the class left out of mIoU_fg (or None),
    the metric reported as ``mIoU`` (the one that selects the best checkpoint) and the
    progress bar's name."""

    classes: ClassTable
    ignore_index: Optional[int]
    select_metric: str = "mIoU_all"
    desc: str = "val"


@dataclass(frozen=True)
class Panels:
    """Validation panels to draw: input | truth | prediction of the first batch's first
    ``limit`` B-scans, as ``<folder>/<tag>_<slice id>.png``."""

    folder: Path
    tag: str
    limit: int = 4


@torch.no_grad()
def validate(step, loader, scoring, dist_info, panels=None):
    """Loss and the metrics of mirage.train.validation_metrics.validation_scores over every
    pixel of a split (summed over processes): mIoU (= ``scoring.select_metric``),
    mIoU_all, mIoU_fg, aAcc, mAcc as fractions, IoU as {class label: IoU}.

    ``step``: the BatchStep (mirage/train/forward.py) of the model in eval mode; with its
    ``feature_cache`` (the split's store, ``feature_cache.open_split_cache``: the backbone
    is fully fixed) the decoder reads the split's tokens from it, computed at the first
    validation only. ``panels``: draw the first batch (:class:`Panels`), or None.
    """
    step.model.eval()
    num_classes, device = scoring.classes.num_classes, step.device
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)
    for i, batch in enumerate(progress(loader, desc=scoring.desc, leave=False,
                                       disable=not dist_info.is_main, dynamic_ncols=True)):
        logits, masks, loss = step(batch)
        loss_sum += torch.tensor([loss.item() * len(masks), len(masks)],
                                 dtype=torch.float64, device=device)
        pred = logits.argmax(dim=1)
        confusion += confusion_matrix(pred, masks, num_classes)
        if panels is not None and i == 0:
            save_panels(panels, batch, pred, loader.dataset, scoring.classes)
    if step.feature_cache is not None and dist_info.is_main:
        step.feature_cache.end_epoch()
    distributed.all_reduce_sum(confusion, dist_info)
    distributed.all_reduce_sum(loss_sum, dist_info)
    scores = validation_scores(confusion, scoring.ignore_index, scoring.classes.labels,
                               scoring.select_metric)
    return {"loss": float(loss_sum[0] / max(loss_sum[1], 1)), **scores}


LABEL_WIDTH = 12  # longer class labels are cut on the console (log.txt keeps them whole)


def iou_line(ious):
    """The per-class IoU of a validation on one short console line, in %:
    '  val IoU %: Background 95.1 | ILM-NFL 80.2 | Fluid -' ('-': a class absent from both
    the truth and the predictions)."""
    def short(label):
        label = str(label)
        return label if len(label) <= LABEL_WIDTH else label[:LABEL_WIDTH - 1] + "."

    cells = [f"{short(label)} {'-' if value is None else f'{100 * value:.1f}'}"
             for label, value in ious.items()]
    return "  val IoU %: " + " | ".join(cells)


def save_panels(panels, batch, pred, dataset, classes):
    """input | truth | prediction as one grey PNG per B-scan (masks shown by value)."""
    values = classes.index_to_value().astype(np.float32)
    scale = 255.0 / max(float(values.max()), 1.0)
    for k in range(min(panels.limit, len(pred))):
        image = batch["image"][k, 0].numpy()
        span = float(image.max() - image.min()) or 1.0
        image = (image - image.min()) / span * 255.0
        truth = values[batch["mask"][k].numpy()] * scale
        guess = values[pred[k].cpu().numpy()] * scale
        panel = np.concatenate([image, truth, guess], axis=1).round().astype(np.uint8)
        slice_id = dataset.slices[int(batch["index"][k])].slice_id
        write_png(Path(panels.folder) / f"{panels.tag}_{slice_id}.png", panel)
