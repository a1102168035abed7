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
    # False when this process already announced the run (the demo predicts right after
    # training it): the run folder, class and model lines are not printed again.
    announce: bool = True

    def setup_line(self, message):
        """Log a line that describes the run's setup (folder, classes, model), once."""
        if self.announce:
            self.log(message)

    def lock(self, run_dir):
        """The run directory's lock, held by the one process that writes (rank 0)."""
        return run_lock(run_dir) if self.dist.is_main else contextlib.nullcontext()


def start_runtime(spec, seed):
    """Join the torchrun processes (if any), pick the device, seed every generator with
    ``seed`` (plus the process's rank) and set the warning filter; ``spec``: the RunSpec's
    RuntimeSpec. Returns the Runtime."""
    dist_info = distributed.init_from_env(distributed.device_type(spec.device))
    device = resolve_device(spec.device, dist_info)
    if not spec.show_user_warnings:
        warnings.filterwarnings("ignore", category=UserWarning)
    seed_everything(seed + dist_info.rank)
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


def random_state(dist_info):
    """Every random generator of every process (Python, numpy, torch CPU and each CUDA
    device), one dict per process in rank order; a collective call under torchrun."""
    version, words, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "python": [version, list(words), gauss],
        "numpy": {"key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                  "pos": int(numpy_state["state"]["pos"]),
                  "has_gauss": int(numpy_state["has_gauss"]),
                  "gauss": float(numpy_state["gauss"])},
        "torch": torch.get_rng_state(),
        # Only where CUDA is in use: asking would start it (and take GPU memory) in a
        # CPU run on a machine with GPUs.
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available()
        and torch.cuda.is_initialized() else [],
    }
    if not dist_info.enabled:
        return [state]
    gathered = [None] * dist_info.world_size
    torch.distributed.all_gather_object(gathered, state)  # only rank 0 saves them
    return gathered


def restore_random_state(states, dist_info):
    """Set this process's generators to its entry of ``states`` (as ``random_state``
    returned them); returns None, or why they were left as seeded."""
    if len(states) != dist_info.world_size:
        return (f"it was saved by {len(states)} process(es), this run has "
                f"{dist_info.world_size}")
    state = states[dist_info.rank]
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    numpy_state = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": numpy_state["key"].numpy().astype(np.uint32),
                                   "pos": numpy_state["pos"]},
                         "has_gauss": numpy_state["has_gauss"],
                         "gauss": numpy_state["gauss"]})
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        # Devices beyond those saved (a resume on a larger machine) keep their seeds.
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)
    return None


def _logger(dist_info):
    def log(message):
        if dist_info.is_main:
            tqdm.write(message)
    return log

