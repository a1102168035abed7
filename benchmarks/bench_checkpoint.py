"""Checkpoint size and write time: full (the first version) vs slim; prints JSON.

The model is the paper configuration: MIRAGE-Base (ViT-B), 1024x1024, frozen blocks,
ConvNeXt decoder, 9 classes, AdamW state for the trainable tensors (as after one step).

* ``full``: what the first version wrote, the whole model (+ optimizer in epoch files).
* ``slim``: what training changed (decoder, patch projector, global tokens) + optimizer;
  the frozen backbone is rebuilt from the weights file, checked by its SHA-256.
* ``run_total``: the checkpoints one 200-epoch run leaves on disk with the paper's
  ``save_ckpt_freq: 20``: 10 epoch files + best (full, nothing deleted) against
  ``--keep_ckpts`` epoch files + best (slim). Target: slim at most 5 % of full.

    python benchmarks/bench_checkpoint.py [--quick] [--keep_ckpts 1]

``--quick`` uses MIRAGE-Tiny at 128x128 (a smoke test of the script).
"""
import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from fm_seg_config import MirageBase, MirageTiny  # noqa: E402
from mirage import checkpoint_io as ckpt  # noqa: E402
from mirage.train.checkpointing import trained_state_dict  # noqa: E402
from mirage.models.segmentation_model import SegmentationModel  # noqa: E402
from mirage.options import default_options  # noqa: E402
from mirage.run.spec import OptimSpec  # noqa: E402
from mirage.train.optim import build_optimizer, param_groups  # noqa: E402
from mirage.models.decoders import build_decoder  # noqa: E402


def paper_model(quick):
    fm = MirageTiny() if quick else MirageBase()
    size = (128, 128) if quick else (1024, 1024)
    backbone = fm.build(size, (32, 32), num_global_tokens=1)
    decoder = build_decoder("convnext", embed_dim=backbone.embed_dim, num_classes=9,
                            grid_size=backbone.grid_size, patch_size=backbone.patch_size,
                            image_size=size, encoder_depth=backbone.depth)
    model = SegmentationModel(backbone, decoder)
    model.freeze_blocks()
    optimizer = build_optimizer(param_groups(model, 0.05, 0.75), OptimSpec.from_options(
        default_options(opt="adamw", lr=1e-4, opt_eps=1e-8, opt_betas=[0.9, 0.999],
                        momentum=0.9)))
    for p in model.parameters():  # one step with zero gradients creates the AdamW state
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    return model, optimizer


def timed_save(path, payload):
    started = time.perf_counter()
    ckpt.save(path, payload)
    return time.perf_counter() - started, path.stat().st_size


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--keep_ckpts", type=int, default=1)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model, optimizer = paper_model(args.quick)
    full_model, slim_model = model.state_dict(), trained_state_dict(model)
    result = {"model": "MIRAGE-Tiny 128" if args.quick else "MIRAGE-Base 1024",
              "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
              "parameters_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
              "trained_parameters_M": round(sum(p.numel() for p in model.parameters()
                                                if p.requires_grad) / 1e6, 2)}
    with tempfile.TemporaryDirectory() as tmp:
        files = {
            "full_epoch": {"model": full_model, "optimizer": optimizer.state_dict()},
            "full_best": {"model": full_model},
            "slim_epoch": {"format": "slim-v2", "model": slim_model,
                           "optimizer": optimizer.state_dict()},
            "slim_best": {"format": "slim-v2", "model": slim_model},
        }
        for name, payload in files.items():
            seconds, size = timed_save(Path(tmp) / f"{name}.pth", payload)
            result[name] = {"MB": round(size / 1e6, 2), "write_s": round(seconds, 3)}
    full_total = 10 * result["full_epoch"]["MB"] + result["full_best"]["MB"]
    slim_total = args.keep_ckpts * result["slim_epoch"]["MB"] + result["slim_best"]["MB"]
    result["run_total"] = {"full_MB": round(full_total, 1), "slim_MB": round(slim_total, 1),
                           "keep_ckpts": args.keep_ckpts,
                           "slim_over_full": round(slim_total / full_total, 4)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
