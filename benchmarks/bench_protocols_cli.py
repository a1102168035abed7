"""Whole-epoch time per protocol through the real command line; prints one JSON object.

bench_protocols.py times training steps on batches held in memory. This one runs
``run_seg_tuning.py`` itself, once per protocol, on the same synthetic dataset and random
MIRAGE-Base-layout weights, and reads each epoch's ``time`` from the run's log.txt: what a
user sees, with the data pipeline, validation and the feature cache's first epoch in it.

Every protocol gets the same options (so that only the protocol differs):
``--input_size 512 --batch_size 2 --epochs 3 --aug_name none --drop_path_encoder 0
--device cpu --no_save_ckpt`` and the default decoder (ConvNeXt), loss and
``--num_workers``. ``--aug_name none`` and ``--drop_path_encoder 0`` are what the feature
cache needs; the other protocols get them too. ``--no_save_ckpt``: writing
checkpoint-best.pth (the whole model, whenever validation improves, which is random here)
would otherwise land in some epochs' time and not in others.

Protocols (``--protocols``): ``paper`` (the default options, ``--freeze_encoder``),
``fully_frozen`` (``--freeze_patch_embed``), ``fully_frozen+ram`` / ``fully_frozen+disk``
(``--feature_cache ram``/``disk``), and any other name X is ``--tuning X`` (``lora``,
``full``, ``linear_probe``; ``X+ram`` adds ``--feature_cache ram``).

    python benchmarks/bench_protocols_cli.py                      # 16 train / 8 val B-scans
    python benchmarks/bench_protocols_cli.py --protocols paper fully_frozen linear_probe+ram
    python benchmarks/bench_protocols_cli.py --threads 1 --compare_uncached_validation
    python benchmarks/bench_protocols_cli.py --quick              # smoke test: MIRAGE-Tiny

Reported per protocol: the epoch times (wall clock, log.txt's ``time``), their mean over
all epochs and over the epochs after the first (the first fills the caches), and both as a
ratio to ``paper``. Next to them, the same for the training process's CPU time per epoch
(training + validation, all its threads; not the DataLoader workers'), which other load on
a shared machine barely changes: the command runs with ``loop.train_one_epoch`` and
``loop.validate_epoch`` wrapped to add up ``time.process_time()``, nothing else changed.
``--repeats N`` runs the protocols N times round-robin (each epoch's figure is then the
median over the repeats), so that a burst of other load slows all protocols alike.
``--compare_uncached_validation`` adds each protocol but paper with the validation tokens
recomputed at every validation (``feature_cache.CACHE_SPLITS`` off), as before issue 18.
``--threads 1`` (``OMP_NUM_THREADS``) keeps idle OpenMP threads from spinning on a loaded
machine, which would count as CPU time. Targets
(issue 18, per whole epoch): ``fully_frozen`` at most 0.80x paper, with the RAM cache at
most 0.65x.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
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

PROTOCOL_FLAGS = {
    "paper": [],
    "fully_frozen": ["--freeze_patch_embed"],
}
CACHE_SUFFIXES = ("ram", "disk")
TARGETS = (("fully_frozen", 0.80), ("fully_frozen+ram", 0.65))
# The command line, with each epoch's CPU time (training + validation) written to
# $BENCH_CPU_FILE at exit.
CLI_WITH_CPU_TIMES = """
import atexit, json, os, sys, time
sys.argv[0] = "run_seg_tuning.py"
from mirage.train import loop
epochs = []
def timed(function, starts_epoch):
    def wrapper(*args, **kwargs):
        if starts_epoch:
            epochs.append(0.0)
        start = time.process_time()
        try:
            return function(*args, **kwargs)
        finally:
            epochs[-1] += time.process_time() - start
    return wrapper
loop.train_one_epoch = timed(loop.train_one_epoch, True)
loop.validate_epoch = timed(loop.validate_epoch, False)
if os.environ.get("BENCH_NO_SPLIT_CACHE"):  # the validation before issue 18: no store
    from mirage.train import feature_cache
    feature_cache.CACHE_SPLITS = False
atexit.register(lambda: open(os.environ["BENCH_CPU_FILE"], "w").write(json.dumps(epochs)))
import run_seg_tuning
run_seg_tuning.main(sys.argv[1:])
"""


def protocol_flags(name, cache_dir):
    """The command-line options of protocol ``name``."""
    base, _, cache = name.partition("+")
    if cache and cache not in CACHE_SUFFIXES:
        raise SystemExit(f"--protocols {name}: the part after '+' is a --feature_cache mode "
                         f"({', '.join(CACHE_SUFFIXES)})")
    flags = list(PROTOCOL_FLAGS.get(base, ["--tuning", base]))
    if cache:
        flags += ["--feature_cache", cache]
        if cache == "disk":
            flags += ["--feature_cache_dir", str(cache_dir)]
    return flags


def write_inputs(root, quick):
    """(weights file, dataset folder): random weights in the published MIRAGE layout and a
    synthetic dataset (B-scans 496x768, like the clinical ones; no test split)."""
    fm = MirageTiny() if quick else MirageBase()
    torch.manual_seed(0)
    encoder = fm.build((512, 512), (32, 32), num_global_tokens=1)
    weights = root / f"{fm.name}.pth"
    ckpt.save(weights, {**fm.checkpoint_from(encoder), "epoch": 0})
    splits = {"train": 1, "val": 1} if quick else {"train": 2, "val": 1}
    dataset = write_synthetic_dataset(root / "datasets", name="Bench", splits=splits,
                                      slices_per_volume=4 if quick else 8, size=(496, 768))
    return weights, dataset


def common_options(args, weights, dataset):
    size = 64 if args.quick else args.size
    options = ["--weights", str(weights), "--data_path", str(dataset),
               "--input_size", str(size), "--batch_size", str(args.batch),
               "--epochs", str(args.epochs), "--aug_name", "none",
               "--drop_path_encoder", "0", "--device", "cpu", "--no_save_ckpt",
               "--no_auto_resume"]
    if args.num_workers is not None:
        options += ["--num_workers", str(args.num_workers)]
    if args.decoder:
        options += ["--output_adapter", args.decoder]
    return options


def run_protocol(name, options, out, env, split_cache=True):
    """Run the command line; returns (epoch times from log.txt, CPU seconds per epoch,
    wall seconds, the feature-cache lines it printed)."""
    command = [sys.executable, "-c", CLI_WITH_CPU_TIMES, *options,
               "--base_output_dir", str(out)]
    out.mkdir(parents=True, exist_ok=True)
    cpu_file = out / "cpu_seconds.json"
    env = {**env, "BENCH_CPU_FILE": str(cpu_file)}
    if not split_cache:
        env["BENCH_NO_SPLIT_CACHE"] = "1"
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=out)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{name}: run_seg_tuning.py failed:\n{result.stderr[-3000:]}")
    logs = list(out.glob("*/*/*/log.txt"))
    if len(logs) != 1:
        raise SystemExit(f"{name}: expected one log.txt under {out}, found {logs}")
    entries = [json.loads(line) for line in logs[0].read_text().splitlines()]
    times = [e["time"] for e in entries if "epoch" in e]
    notes = [line.strip() for line in result.stdout.splitlines()
             if "feature cache" in line]
    cpu = [round(v, 2) for v in json.loads(cpu_file.read_text())]
    return times, cpu, wall, notes


def mean(values):
    return sum(values) / len(values) if values else None


def medians(runs):
    """Per epoch, the median over the repeats."""
    return [round(statistics.median(values), 2) for values in zip(*runs)]


def summarise(rows):
    """Means, ratios to paper and targets, for the wall-clock epochs (``epoch_s``...) and
    the CPU-time ones (``cpu_epoch_s``...)."""
    paper = next((r for r in rows if r["name"] == "paper"), None)
    for row in rows:
        for key, prefix in (("epoch_seconds", ""), ("cpu_seconds", "cpu_")):
            times = row[key]
            row[f"{prefix}mean_epoch_s"] = round(mean(times), 2)
            row[f"{prefix}mean_epoch_after_first_s"] = round(mean(times[1:]), 2) \
                if len(times) > 1 else None
            if paper is None:
                continue
            row[f"{prefix}vs_paper"] = round(
                row[f"{prefix}mean_epoch_s"] / paper[f"{prefix}mean_epoch_s"], 3)
            if row[f"{prefix}mean_epoch_after_first_s"] is not None:
                row[f"{prefix}vs_paper_after_first"] = round(
                    row[f"{prefix}mean_epoch_after_first_s"]
                    / paper[f"{prefix}mean_epoch_after_first_s"], 3)
    targets = {}
    for name, limit in TARGETS:
        row = next((r for r in rows if r["name"] == name), None)
        for prefix, what in (("", "wall"), ("cpu_", "CPU time")):
            if row is None or f"{prefix}vs_paper" not in row:
                continue
            targets[f"{name} <= {limit:.2f}x paper ({what}, all epochs)"] = \
                row[f"{prefix}vs_paper"] <= limit
            if f"{prefix}vs_paper_after_first" in row:
                targets[f"{name} <= {limit:.2f}x paper ({what}, after the first epoch)"] = \
                    row[f"{prefix}vs_paper_after_first"] <= limit
    return targets


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocols", nargs="+",
                        default=["paper", "fully_frozen", "fully_frozen+ram"],
                        help="paper, fully_frozen, a --tuning value; '+ram'/'+disk' adds "
                             "--feature_cache")
    parser.add_argument("--size", type=int, default=512, help="--input_size")
    parser.add_argument("--batch", type=int, default=2, help="--batch_size")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--num_workers", type=int, help="default: the command's default")
    parser.add_argument("--decoder", help="--output_adapter (default: the command's default, "
                        "ConvNeXt; --quick: linear)")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the runs "
                        "(default: torch's own choice)")
    parser.add_argument("--compare_uncached_validation", action="store_true",
                        help="also run each protocol but paper with its validation tokens "
                             "recomputed at every validation, as before issue 18 (rows "
                             "'<name> (validation uncached)')")
    parser.add_argument("--repeats", type=int, default=1, help="run the protocols this "
                        "many times, round-robin; each epoch's figure is the median")
    parser.add_argument("--quick", action="store_true", help="smoke test: MIRAGE-Tiny 64x64, "
                        "4 train / 4 val B-scans, 2 epochs, linear decoder")
    parser.add_argument("--workdir", type=Path, help="keep the inputs and runs here "
                        "(default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs = min(args.epochs, 2)
        args.decoder = args.decoder or "linear"

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_protocols_cli_") as tmp:
        root = args.workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        weights, dataset = write_inputs(root, args.quick)
        options = common_options(args, weights, dataset)
        load_before = os.getloadavg()
        plan = [(name, name, True) for name in args.protocols]
        if args.compare_uncached_validation:
            plan += [(f"{name} (validation uncached)", name, False)
                     for name in args.protocols if name != "paper"]
        runs = {row: [] for row, _, _ in plan}
        for repeat in range(args.repeats):
            for row, name, split_cache in plan:
                flags = protocol_flags(name, root / "feature_cache")
                folder = name.replace("+", "_") + ("" if split_cache else "_valuncached")
                out = root / "runs" / f"{folder}_{repeat}"
                runs[row].append((flags, *run_protocol(row, options + flags, out, env,
                                                       split_cache)))
        rows = []
        for name, results in runs.items():
            flags, _, _, _, notes = results[0]
            rows.append({"name": name, "flags": " ".join(flags),
                         "epoch_seconds": medians([r[1] for r in results]),
                         "cpu_seconds": medians([r[2] for r in results]),
                         "wall_seconds": [round(r[3], 1) for r in results],
                         "feature_cache_lines": notes})
            if args.repeats > 1:
                rows[-1]["epoch_seconds_per_repeat"] = [r[1] for r in results]
                rows[-1]["cpu_seconds_per_repeat"] = [r[2] for r in results]
    targets = summarise(rows)
    report = {
        "config": {"model": "MIRAGE-Tiny" if args.quick else "MIRAGE-Base (random weights)",
                   "input_size": 64 if args.quick else args.size, "batch": args.batch,
                   "epochs": args.epochs, "repeats": args.repeats,
                   "train_bscans": 4 if args.quick else 16,
                   "val_bscans": 4 if args.quick else 8,
                   "common_options": " ".join(options[4:])},
        "protocols": rows,
        "targets_met": targets,
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor()
                    or platform.machine(), "torch": torch.__version__,
                    "omp_num_threads": env.get("OMP_NUM_THREADS"),
                    "load_average_before": [round(v, 2) for v in load_before],
                    "load_average_after": [round(v, 2) for v in os.getloadavg()]},
    }
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
