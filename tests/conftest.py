"""Shared fixtures: tiny datasets in the benchmark layout and tiny MIRAGE-layout weights."""
import argparse
import json
import os
import sys
import time
import zlib
from pathlib import Path

# One thread per test process. The tests compute on tiny tensors, where more threads only
# cost: torch's default (one per core) in pytest, in every run a test starts and in each
# loader worker oversubscribes a small machine, and an idle OpenMP thread spins on a core
# that another process needs (7x slower beside a CPU-bound process on 2 cores). Set
# before torch loads, whatever the caller's environment says, so that the processes the
# tests start inherit it too; a test that wants more sets its own (``env=``,
# monkeypatch.setenv, or the ``threads`` fixture below).
TEST_THREADS = 1
for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_variable] = str(TEST_THREADS)

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(TEST_THREADS)  # also where torch was loaded before this file
try:
    torch.set_num_interop_threads(TEST_THREADS)
except RuntimeError:  # inter-op work already started (torch loaded earlier): keep its pool
    pass

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
sys.path.insert(0, str(REPO))

from mirage import checkpoint_io as ckpt  # noqa: E402

VALUES = (0, 100, 200)
LABELS = ("Background", "Layer", "Fluid")


def write_info(root, values=VALUES, labels=LABELS):
    info = {str(i): {"value": v, "label": l} for i, (v, l) in enumerate(zip(values, labels))}
    (root / "INFO.json").write_text(json.dumps(info))


def band_pair(rng, size, values=VALUES):
    """A B-scan whose intensity follows its mask: horizontal bands plus noise."""
    h, w = size
    rows = np.arange(h)[:, None]
    top = h // 3 + rng.integers(-3, 4)
    bottom = 2 * h // 3 + rng.integers(-3, 4)
    index = np.zeros((h, w), np.uint8)
    index[(rows >= top) & (rows < bottom) & np.ones((1, w), bool)] = 1
    cy, cx = (top + bottom) // 2, rng.integers(w // 4, 3 * w // 4)
    yy, xx = np.mgrid[:h, :w]
    if rng.random() < 0.7:
        index[((yy - cy) / 4.0) ** 2 + ((xx - cx) / 8.0) ** 2 < 1] = 2
    brightness = np.array([30, 180, 90], np.float32)[index]
    image = np.clip(brightness + rng.normal(0, 10, (h, w)), 0, 255).astype(np.uint8)
    mask = np.asarray(values, np.uint16 if max(values) > 255 else np.uint8)[index]
    return image, mask


def make_dataset(root, name="Tiny", splits=None, size=(64, 96), seed=0, values=VALUES,
                 labels=LABELS):
    """Write a small dataset in the benchmark layout; returns its folder."""
    splits = splits or {"train": 8, "val": 2, "test": 3}
    rng = np.random.default_rng(seed)
    folder = Path(root) / name
    folder.mkdir(parents=True)
    write_info(folder, values, labels)
    for split, count in splits.items():
        for sub in ("bscan", "semseg"):
            (folder / split / sub).mkdir(parents=True)
        for i in range(count):
            image, mask = band_pair(rng, size, values)
            stem = f"{split}vol{i // 4}_{i % 4}"
            cv2.imwrite(str(folder / split / "bscan" / f"{stem}.png"), image)
            cv2.imwrite(str(folder / split / "semseg" / f"{stem}.png"), mask)
    return folder


def write_mirage_checkpoint(path, fm, seed=0, input_size=512, extra=None):
    """A random encoder of registry family ``fm`` saved in the MIRAGE layout."""
    torch.manual_seed(seed)
    encoder = fm.build((input_size, input_size), (32, 32), num_global_tokens=1)
    payload = fm.checkpoint_from(encoder)
    payload["model"].update(extra or {})
    payload["epoch"] = 0
    ckpt.save(path, payload)
    return path


def reference_tensor(name, shape):
    """The deterministic MIRAGE-Base tensor the reference tokens were computed with."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    if name.endswith(("norm1.weight", "norm2.weight")):
        values = 1.0 + 0.1 * rng.standard_normal(shape)
    elif name.endswith("pos_emb"):
        values = rng.uniform(-1.0, 1.0, size=shape)
    else:
        values = 0.02 * rng.standard_normal(shape)
    return torch.from_numpy(np.asarray(values, dtype=np.float32))


@pytest.fixture
def threads(request):
    """Run the test with ``torch.set_num_threads(n)``, n from an indirect parametrize
    (``@pytest.mark.parametrize("threads", [1, 2], indirect=True)``). For results
    that must not depend on the thread count: on the CPU a matrix product's order of
    summation follows the thread count and the matrix's size (so a batch's composition),
    which one thread never shows."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.fixture
def tiny_dataset(tmp_path):
    return make_dataset(tmp_path / "datasets")


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    from fm_seg_config import MirageTiny
    path = tmp_path_factory.mktemp("weights") / "MIRAGE-Tiny.pth"
    return write_mirage_checkpoint(path, MirageTiny(), extra={
        "output_adapters.bscan.out_proj.weight": torch.zeros(4, 4),
        "input_adapters.slo.proj.bias": torch.zeros(MirageTiny.embed_dim)})


@pytest.fixture(scope="session")
def base_layout_checkpoint(tmp_path_factory):
    """A checkpoint with every key and shape of the published MIRAGE-Base file."""
    spec = json.loads((DATA / "mirage_base_keys.json").read_text())
    path = tmp_path_factory.mktemp("base") / "MIRAGE-Base.pth"
    model = {k: reference_tensor(k, tuple(s)) for k, s in spec["model"].items()}
    ckpt.save(path, {"model": model, "epoch": 1599, "optimizer": {}, "scaler": {},
                     "args": argparse.Namespace(model="miragepre", input_size=512,
                                                patch_size=32)})
    return path



def seal_predictions(folder, epoch=0):
    """Give a hand-made predictions folder what ``--infer_only --test`` leaves with it: a
    manifest tied to the run's checkpoint-best.pth (a stand-in file if there is none)."""
    from mirage.data.classes import ClassTable
    from mirage.run.predictions import write_manifest

    folder = Path(folder)
    best = folder.parent / "checkpoint-best.pth"
    if not best.exists():
        best.write_bytes(b"stand-in for a checkpoint")
    stems = [p.stem for p in folder.iterdir() if p.suffix.lower() == ".png"]
    write_manifest(folder, best, epoch, ClassTable(values=(), labels=()), stems)


def process_gone(pid, wait_s=10.0):
    """Whether process ``pid`` has ended (a zombie counts as ended), waiting up to wait_s."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            os.kill(pid, 0)
            stat = Path(f"/proc/{pid}/stat").read_text()
        except (ProcessLookupError, FileNotFoundError):
            return True
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def build_from_options(config, num_classes=3, **model_changes):
    """``mirage.train.build.build_model`` of the options' ModelSpec (its fields changed by
    ``model_changes``, e.g. ``fm=``, ``input_size=(h, w)``, ``patch_size=(h, w)``) and
    Protocol: a model built as a run builds it, at a test's own size."""
    import dataclasses

    from mirage.protocol import Protocol
    from mirage.run.spec import resolve_model
    from mirage.train.build import build_model
    spec = dataclasses.replace(resolve_model(config), **model_changes)
    return build_model(spec, Protocol.from_options(config), num_classes)


def epoch_context(model, loader, optimizer, precision, schedules, **parts):
    """A TrainingContext for calling ``mirage.train.loop.train_one_epoch`` on a model and a
    loader a test made itself (CPU, one process). ``schedules``: (per-step LR, per-step
    weight decay); ``parts``: criterion (default CEGDice), feature_cache, clip_grad, epochs
    (default 1)."""
    from types import SimpleNamespace

    from mirage.train import distributed
    from mirage.train.checkpointing import TrainingState
    from mirage.train.context import TrainingContext
    from mirage.train.losses import build_loss
    from mirage.train.loop import TrainingData
    from mirage.train.runtime import Runtime
    # train_one_epoch reads these two values of the spec and nothing else
    spec = SimpleNamespace(optim=SimpleNamespace(clip_grad=parts.get("clip_grad")),
                           loop=SimpleNamespace(epochs=parts.get("epochs", 1)))
    data = TrainingData(train_set=loader.dataset, train_loader=loader, val_loader=None,
                        steps_per_epoch=len(loader), test_slices=[])
    return TrainingContext(
        spec, Runtime(torch.device("cpu"), distributed.DistInfo(), print), model, precision,
        criterion=parts.get("criterion") or build_loss("CEGDice"), optimizer=optimizer,
        lr_schedule=schedules[0], wd_schedule=schedules[1], data=data,
        feature_cache=parts.get("feature_cache"), val_cache=None, ddp_model=model,
        record=None, state=TrainingState())


def optim_spec(**changes):
    """The OptimSpec of the default options with ``changes`` (option=value, e.g.
    ``opt="sgd"``, ``lr=1e-3``)."""
    from mirage.options import default_options
    from mirage.run.spec import OptimSpec
    return OptimSpec.from_options(default_options(**changes))
