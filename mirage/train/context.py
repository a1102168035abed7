"""A run at work: what its steps share, built once by ``train()`` or ``test_or_infer()``.

    RunContext        the spec, where it runs, the model on that device, its precision
    TrainingContext   + the loss, optimiser, schedules, loaders, caches and state

The steps of the loop and of testing take the context (and the epoch) instead of a dozen
parameters each.
"""
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from mirage.run.spec import RunSpec
from mirage.train.checkpointing import CheckpointRecord, TrainingState
from mirage.train.forward import BatchStep
from mirage.train.precision import Precision
from mirage.train.runtime import Runtime


@dataclass
class RunContext:
    """The RunSpec, the Runtime (device, process, log), the SegmentationModel on that
    device and the mixed precision it runs in."""

    spec: RunSpec
    runtime: Runtime
    model: torch.nn.Module
    precision: Precision

    def batch_step(self, criterion, feature_cache=None, model=None):
        """The BatchStep of this model (or ``model``, e.g. its DDP wrapper)."""
        return BatchStep(model if model is not None else self.model, self.precision,
                         self.runtime.device, criterion, feature_cache)


@dataclass
class TrainingContext(RunContext):
    """Everything the epoch loop shares, built once in ``train()``.

    ddp_model: the model, wrapped for torchrun when it runs (else the model itself);
    data: the loaders (mirage.train.loop.TrainingData); lr_schedule, wd_schedule: one
    value per step of the run; feature_cache / val_cache: the training views' and the
    validation split's token stores, or None; record: what every checkpoint holds.
    """

    criterion: Callable
    optimizer: torch.optim.Optimizer
    lr_schedule: np.ndarray
    wd_schedule: np.ndarray
    data: object
    feature_cache: Optional[object]
    val_cache: Optional[object]
    ddp_model: torch.nn.Module
    record: CheckpointRecord
    state: TrainingState
