"""Data-pipeline throughput and training-step time on the CPU; prints JSON.

* ``data``: training samples per second per worker, at 1024x1024 from 496x768 8-bit PNGs
  (decode B-scan and mask, lookup-table label mapping, flip, resize to 1.1x, random crop,
  min-max scaling to float32): measured in the main process (one worker's job) and through
  a DataLoader with 2 worker processes and batch 4 (divided by 2). Target: >= 100/s/worker.
* ``train_step``: seconds per optimisation step (forward, backward, AdamW) of reduced
  configurations with a frozen encoder and the ConvNeXt decoder.

    python benchmarks/bench_train.py [--samples 200] [--quick]
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from fm_seg_config import MirageBase, MirageTiny  # noqa: E402
from mirage.data.dataset import SegmentationDataset  # noqa: E402
from mirage.data.layout import find_split, open_dataset  # noqa: E402
from mirage.train.distributed import DistInfo  # noqa: E402
from mirage.train.build import make_loader  # noqa: E402
from mirage.train.losses import build_loss  # noqa: E402
from mirage.models.segmentation_model import SegmentationModel  # noqa: E402
from mirage.options import default_options  # noqa: E402
from mirage.run.spec import LoaderSpec, OptimSpec  # noqa: E402
from mirage.train.optim import build_optimizer, param_groups  # noqa: E402
from mirage.models.decoders import build_decoder  # noqa: E402
from mirage.data.synthetic import write_synthetic_dataset  # noqa: E402
from mirage.data.transforms import SegmentationTransform  # noqa: E402


def data_throughput(root, samples, slices_per_volume=16):
    folder = write_synthetic_dataset(root, name="Bench", splits={"train": 4},
                                     slices_per_volume=slices_per_volume, size=(496, 768))
    info = open_dataset(folder)
    dataset = SegmentationDataset(find_split(folder / "train", True), info.class_table,
                                  SegmentationTransform((1024, 1024), train=True))
    for i in range(5):  # warm up OpenCV
        dataset[i]
    start = time.perf_counter()
    for i in range(samples):
        item = dataset[i % len(dataset)]
    in_process = samples / (time.perf_counter() - start)
    assert item["image"].shape == (1, 1024, 1024) and item["mask"].shape == (1024, 1024)

    # The training loader exactly as a run builds it (persistent workers, prefetch).
    loader = make_loader(dataset, LoaderSpec(batch_size=4, num_workers=2, pin_mem=False,
                                             seed=0), DistInfo(), train=True)
    iterator = iter(loader)
    next(iterator)  # workers started and warm
    start, seen = time.perf_counter(), 0
    while seen < samples:
        # Only a finished iterator is replaced: replacing a running one would make the
        # workers finish (and this loop wait for) the batches already prefetched.
        for batch in iterator:
            seen += len(batch["image"])
            if seen >= samples:
                break
        else:
            iterator = iter(loader)
    loader_rate = seen / (time.perf_counter() - start)
    return {"samples_per_s_per_worker": round(in_process, 1),
            "dataloader_2_workers_samples_per_s_per_worker": round(loader_rate / 2, 1),
            "input": "496x768 uint8 PNG", "output": "1024x1024 float32 + uint8 mask"}


def step_time(fm, input_size, patch, batch, steps=3):
    torch.manual_seed(0)
    backbone = fm.build(input_size, (patch, patch), 1, drop_path_rate=0.1)
    decoder = build_decoder("convnext", embed_dim=backbone.embed_dim, num_classes=9,
                            grid_size=backbone.grid_size, patch_size=(patch, patch),
                            image_size=input_size, encoder_depth=backbone.depth)
    model = SegmentationModel(backbone, decoder)
    model.freeze_blocks()
    model.train()
    optimizer = build_optimizer(param_groups(model, 0.05, 0.75),
                                OptimSpec.from_options(default_options(opt="adamw", lr=1e-4)))
    criterion = build_loss("CEGDice")
    images = torch.rand(batch, 1, *input_size)
    masks = torch.randint(0, 9, (batch, *input_size))
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = criterion(model(images), masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return {"model": fm.name, "input": f"{input_size[0]}x{input_size[1]}", "patch": patch,
            "batch": batch, "decoder": "convnext", "seconds_per_step":
            round(float(np.median(times[1:])), 3)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 16 B-scans, the demo's training step only")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = data_throughput(Path(tmp), 16 if args.quick else args.samples,
                               4 if args.quick else 16)
    steps = [step_time(MirageTiny(), (128, 192), 32, 8, steps=1 if args.quick else 3)]
    if not args.quick:
        steps.append(step_time(MirageBase(), (256, 256), 32, 2))
    report = {
        "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "data": data, "data_target_met": data["samples_per_s_per_worker"] >= 100,
        "train_step": steps,  # the demo's setting, then a reduced MIRAGE-Base
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
