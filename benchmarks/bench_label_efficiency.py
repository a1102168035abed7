"""What a label-efficiency grid costs with and without the shared disk feature cache;
prints one JSON object.

The grid (docs/segmentation_tuning.md, "Label efficiency"): one model x 3 training-set
sizes (``--train_volumes 1 2 4`` of a 4-volume training split) x 2 seeds, fully frozen
(``--tuning fully_frozen``), so every run of the model computes the same tokens of the same
B-scans. It is trained three times through ``run_seg_tuning.py``'s own entry point, once
per ``--feature_cache`` mode:

- ``off``: every epoch of every run runs the encoder on its training views (the validation
  tokens are kept in the run's memory after its first validation, as always when fully
  frozen);
- ``ram``: each run computes its training views once, in its first epoch;
- ``disk`` (shared ``--feature_cache_dir``): the first run computes the tokens of its
  B-scans, and every later run reads them; the sizes are nested subsets (the same subset
  seed), so the grid computes each B-scan's tokens once per model.

Reported per mode: the CPU seconds of each run (``time.process_time()`` of this process,
all its threads; ``--num_workers 0``, so the data pipeline is in it too) and their sum over
the grid, the wall seconds, and how many B-scans went through the encoder (counted at the
encoder's forward, training and validation apart); then the ratios of the grid's CPU
seconds, ``disk`` to ``off`` and to ``ram``. Runs go in-process one after another (the
cost of starting a Python process per job, the same for every mode, is left out).

    python benchmarks/bench_label_efficiency.py                 # MIRAGE-Base layout, 256x256
    python benchmarks/bench_label_efficiency.py --threads 1 --epochs 5
    python benchmarks/bench_label_efficiency.py --quick         # smoke test: MIRAGE-Tiny, 64
"""
import argparse
import contextlib
import io
import json
import os
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
from mirage.data.synthetic import write_synthetic_dataset  # noqa: E402
from mirage.models.segmentation_model import MirageEncoder  # noqa: E402

MODES = ("off", "ram", "disk")
SIZES = ("1", "2", "4")
SEEDS = ("0", "1")
TRAIN_VOLUMES, VAL_VOLUMES = 4, 1


def write_inputs(root, quick):
    """(weights, dataset): random weights in the published MIRAGE layout and a synthetic
    dataset of 4 training volumes and 1 validation volume (no test split)."""
    fm = MirageTiny() if quick else MirageBase()
    torch.manual_seed(0)
    encoder = fm.build((512, 512), (32, 32), num_global_tokens=1)
    weights = root / f"{fm.name}.pth"
    ckpt.save(weights, {**fm.checkpoint_from(encoder), "epoch": 0})
    dataset = write_synthetic_dataset(root / "datasets", name="Bench",
                                      splits={"train": TRAIN_VOLUMES, "val": VAL_VOLUMES},
                                      slices_per_volume=2 if quick else 4,
                                      size=(128, 192) if quick else (496, 768))
    return weights, dataset


@contextlib.contextmanager
def counted_encoder():
    """{'training': B-scans, 'validation': B-scans} through the encoder while inside."""
    counts = {"training": 0, "validation": 0}
    real = MirageEncoder.forward_layers

    def counting(self, x, indices):
        counts["training" if self.training else "validation"] += int(x.shape[0])
        return real(self, x, indices)
    MirageEncoder.forward_layers = counting
    try:
        yield counts
    finally:
        MirageEncoder.forward_layers = real


def run_grid(options, out):
    """Train every size x seed in-process; per run (CPU s, wall s), the encoder counts and
    the feature-cache lines the runs printed."""
    import run_seg_tuning
    runs, lines = [], []
    with counted_encoder() as counts:
        for size in SIZES:
            for seed in SEEDS:
                printed = io.StringIO()
                cpu, wall = time.process_time(), time.perf_counter()
                with contextlib.redirect_stdout(printed):
                    run_seg_tuning.main([*options, "--train_volumes", size, "--seed", seed,
                                         "--base_output_dir", str(out)])
                runs.append({"train_volumes": int(size), "seed": int(seed),
                             "cpu_s": round(time.process_time() - cpu, 2),
                             "wall_s": round(time.perf_counter() - wall, 2)})
                lines += [line.strip() for line in printed.getvalue().splitlines()
                          if "feature cache" in line and ("computed" in line or
                                                          "cached" in line)]
    return runs, dict(counts), lines


def options_of(args, weights, dataset, mode, cache_dir):
    options = ["--weights", str(weights), "--data_path", str(dataset),
               "--input_size", str(args.size), "--batch_size", str(args.batch),
               "--epochs", str(args.epochs), "--tuning", "fully_frozen",
               "--output_adapter", args.decoder, "--aug_name", "none",
               "--drop_path_encoder", "0", "--device", "cpu", "--num_workers", "0",
               "--no_save_ckpt", "--feature_cache", mode]
    if mode == "disk":
        options += ["--feature_cache_dir", str(cache_dir)]
    return options


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="--input_size")
    parser.add_argument("--batch", type=int, default=2, help="--batch_size")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--decoder", default="convnext", help="--output_adapter")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="smoke test: MIRAGE-Tiny, "
                        "64x64, 2 B-scans per volume, 1 epoch, linear decoder")
    parser.add_argument("--workdir", type=Path, help="keep the inputs and runs here")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.epochs, args.decoder = 64, 1, "linear"
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_label_efficiency_") as tmp:
        root = args.workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        weights, dataset = write_inputs(root, args.quick)
        modes = []
        for mode in args.modes:
            options = options_of(args, weights, dataset, mode, root / "feature_cache")
            runs, counts, lines = run_grid(options, root / "runs" / mode)
            modes.append({"mode": mode, "flags": " ".join(options[-2:] if mode != "disk"
                                                          else options[-4:]),
                          "runs": runs,
                          "cpu_seconds": round(sum(r["cpu_s"] for r in runs), 2),
                          "wall_seconds": round(sum(r["wall_s"] for r in runs), 2),
                          "encoder_bscans": counts, "feature_cache_lines": lines})
    by_mode = {m["mode"]: m["cpu_seconds"] for m in modes}
    ratios = {f"{a}_vs_{b}": round(by_mode[a] / by_mode[b], 3)
              for a, b in (("disk", "off"), ("disk", "ram"), ("ram", "off"))
              if a in by_mode and b in by_mode}
    slices = 2 if args.quick else 4
    report = {
        "config": {"model": "MIRAGE-Tiny" if args.quick else "MIRAGE-Base (random weights)",
                   "input_size": args.size, "batch": args.batch, "epochs": args.epochs,
                   "decoder": args.decoder, "tuning": "fully_frozen",
                   "train_volumes": [int(s) for s in SIZES], "seeds": [int(s) for s in SEEDS],
                   "split": {"train_volumes": TRAIN_VOLUMES, "val_volumes": VAL_VOLUMES,
                             "bscans_per_volume": slices},
                   "runs_per_mode": len(SIZES) * len(SEEDS)},
        "modes": modes,
        "cpu_ratios": ratios,
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor()
                    or platform.machine(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(),
                    "load_average_before": [round(v, 2) for v in load_before],
                    "load_average_after": [round(v, 2) for v in os.getloadavg()]},
    }
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
