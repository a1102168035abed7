"""Where a run executes: the device, the processes (torchrun), seeding and the console log."""
import contextlib
import random
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from mirage.errors import UserError
from mirage.run.lock import run_lock
from mirage.train import distributed


@dataclass(frozen=True)
class Runtime:
    """Where a run executes: its device, its place among the processes, and its log (a
    function printing one line, on the main process only)."""

    device: torch.device
    dist: distributed.DistInfo
    log: Callable[[str], None]

    def lock(self, run_dir):
        """The run directory's lock, held by the one process that writes (rank 0)."""
        return run_lock(run_dir) if self.dist.is_main else contextlib.nullcontext()


def start_runtime(config):
    """Join the torchrun processes (if any), pick the device, seed every generator and set
    the warning filter; returns the Runtime."""
    dist_info = distributed.init_from_env(distributed.device_type(config["device"]))
    device = resolve_device(config["device"], dist_info)
    if not config["show_user_warnings"]:
        warnings.filterwarnings("ignore", category=UserWarning)
    seed_everything(config["seed"] + dist_info.rank)
    return Runtime(device=device, dist=dist_info, log=_logger(dist_info))


def resolve_device(requested, dist_info):
    try:
        device = distributed.device_for(requested, dist_info)
    except RuntimeError:
        raise UserError(f"--device {requested}: not a device; use auto, cpu, cuda or "
                        "cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {requested}: CUDA is not available on this machine; use "
                        "--device cpu (or auto)")
    if device.type == "cuda":
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {requested}: only {torch.cuda.device_count()} CUDA "
                            "device(s) present")
        torch.cuda.set_device(device)
    return device


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _logger(dist_info):
    def log(message):
        if dist_info.is_main:
            tqdm.write(message)
    return log

