"""One batch through the model: the forward step that training and validation share."""
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from mirage.train.precision import Precision


@dataclass
class BatchStep:
    """Run a loader's batch through ``model`` and score it with ``criterion``.

    model: the SegmentationModel, or its DistributedDataParallel wrapper while training.
    feature_cache: a store of the backbone's tokens (mirage/train/feature_cache.py) when
    the backbone is fully fixed, else None: with one, the decoder reads the tokens the
    cache holds (or computes and stores) instead of running the backbone.
    """

    model: torch.nn.Module
    precision: Precision
    device: torch.device
    criterion: Callable
    feature_cache: Optional[object] = None

    def __call__(self, batch):
        """``(logits (B, K, H, W) in the autocast dtype, masks (B, H, W) int64, loss)``."""
        images = batch["image"].to(self.device, non_blocking=True)
        masks = batch["mask"].to(self.device, non_blocking=True).long()
        with self.precision.autocast():
            if self.feature_cache is None:
                logits = self.model(images)
            else:
                inner = self.model.module if isinstance(
                    self.model, DistributedDataParallel) else self.model
                logits = self.model(features=self.feature_cache.features(inner, images,
                                                                         batch))
        return logits, masks, self.criterion(logits.float(), masks)
