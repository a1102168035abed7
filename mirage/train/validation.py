"""Validation (and testing) of a model on a split: loss and confusion-matrix metrics, plus
optional input | truth | prediction panels."""
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mirage.fileio import write_png
from mirage.train import distributed
from mirage.train.validation_metrics import confusion_matrix, validation_scores


@torch.no_grad()
def validate(model, loader, criterion, precision, device, num_classes, ignore_index,
             dist_info, desc="val", image_dir=None, epoch=0, classes=None,
             select_metric="mIoU_all", feature_cache=None):
    """Loss and the metrics of mirage.train.validation_metrics.validation_scores over every
    pixel of a split (summed over processes): mIoU (= ``select_metric``), mIoU_all, mIoU_fg, aAcc,
    mAcc as fractions, IoU as {class label: IoU}.

    With ``image_dir``, saves input | truth | prediction panels of the first batch. With
    ``feature_cache`` (the split's store, ``feature_cache.open_split_cache``: the backbone
    is fully fixed) the decoder reads the split's tokens from it, computed at the first
    validation only.
    """
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)
    for i, batch in enumerate(tqdm(loader, desc=desc, leave=False,
                                   disable=not dist_info.is_main, dynamic_ncols=True)):
        images = batch["image"].to(device, non_blocking=True)
        masks = batch["mask"].to(device, non_blocking=True).long()
        with precision.autocast():
            if feature_cache is None:
                logits = model(images)
            else:
                logits = model(features=feature_cache.features(model, images, batch))
        loss = criterion(logits.float(), masks)
        loss_sum += torch.tensor([loss.item() * len(images), len(images)],
                                 dtype=torch.float64, device=device)
        pred = logits.argmax(dim=1)
        confusion += confusion_matrix(pred, masks, num_classes)
        if image_dir is not None and i == 0:
            save_panels(image_dir, batch, pred, loader.dataset, classes, f"{desc}_e{epoch}")
    if feature_cache is not None and dist_info.is_main:
        feature_cache.end_epoch()
    distributed.all_reduce_sum(confusion, dist_info)
    distributed.all_reduce_sum(loss_sum, dist_info)
    table = classes if classes is not None else getattr(loader.dataset, "class_table", None)
    scores = validation_scores(confusion, ignore_index,
                               table.labels if table is not None else None, select_metric)
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


def save_panels(image_dir, batch, pred, dataset, classes, tag, limit=4):
    """input | truth | prediction as one grey PNG per B-scan (masks shown by value)."""
    values = classes.index_to_value().astype(np.float32)
    scale = 255.0 / max(float(values.max()), 1.0)
    for k in range(min(limit, len(pred))):
        image = batch["image"][k, 0].numpy()
        span = float(image.max() - image.min()) or 1.0
        image = (image - image.min()) / span * 255.0
        truth = values[batch["mask"][k].numpy()] * scale
        guess = values[pred[k].cpu().numpy()] * scale
        panel = np.concatenate([image, truth, guess], axis=1).round().astype(np.uint8)
        slice_id = dataset.slices[int(batch["index"][k])].slice_id
        write_png(Path(image_dir) / f"{tag}_{slice_id}.png", panel)

