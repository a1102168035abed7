"""Multi-process training with torchrun: process-group setup, samplers and reductions.

``torchrun --nproc_per_node=N run_seg_tuning.py ...`` sets RANK / WORLD_SIZE /
LOCAL_RANK; without them everything runs in one process and these helpers are no-ops.
Only rank 0 writes logs, checkpoints and predictions.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def init_from_env(device_type):
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return info


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(info):
    if info.enabled:
        dist.barrier()


def all_reduce_sum(tensor, info):
    """Sum ``tensor`` over all processes (in place) and return it."""
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


class ShardSampler(Sampler):
    """Evaluation sampler: process r takes items r, r + W, r + 2W, ... (no padding, so
    every item is counted exactly once when metrics are summed over processes)."""

    def __init__(self, dataset_size, info):
        self.indices = list(range(info.rank, dataset_size, info.world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def device_type(requested):
    """"cuda" or "cpu" for ``--device`` ("auto" = CUDA if available)."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if str(requested).startswith("cuda") else "cpu"


def device_for(requested, info):
    """The torch.device for ``--device`` and this process (its GPU under torchrun)."""
    device = torch.device(device_type(requested) if requested == "auto" else requested)
    if device.type == "cuda" and info.enabled and device.index is None:
        device = torch.device("cuda", info.local_rank)
    return device
