"""Training-step time (and peak GPU memory) per protocol; prints one JSON object.

Protocols, each on a freshly built model with random weights and the same batches (held in
memory, so that only the step is timed; benchmarks/bench_train.py times the data
pipeline):

* ``paper``: today's path, the first version's loop: float32 eager on the CPU (float16
  autocast + scaler on CUDA), plain AdamW, ``loss.item()`` three times a step.
* ``fast_paper``: mirage.train.loop.train_one_epoch with the default speed options (no host
  sync per step; on CUDA also fused AdamW, channels-last decoder, cuDNN autotuning);
  on CUDA per ``--amp_dtype`` and with ``--grad_checkpointing``.
* ``fully_frozen``: ``--freeze_patch_embed`` (whole backbone frozen, no graph).
* ``fully_frozen_cached_ram`` / ``_disk``: with a warm ``--feature_cache`` (every view
  computed in the warm-up epoch, then timed; stochastic depth 0, as the cache needs).
* ``linear_probe`` (and ``_cached_ram``), ``lora`` (rank 8 on qkv and proj), ``full``:
  the other ``--tuning`` protocols, through the same loop as ``fast_paper``.

Beside the times, ``sizes`` gives per protocol what it trains and saves at 1024x1024
with 9 classes: trainable parameters and checkpoint sizes (no step is run for those).

Each protocol: one warm-up epoch over the ``--steps`` batches, then ``--rounds`` timed
epochs over the same batches; seconds per step = median timed epoch / steps. On the CPU
the protocols' epochs are interleaved (round-robin), so that other load on the machine
slows all of them alike; on CUDA each protocol runs alone (its own peak memory).

    python benchmarks/bench_protocols.py              # CPU: ViT-B/32 (MIRAGE-Base) 512x512, batch 2
    python benchmarks/bench_protocols.py --cuda       # paper config: 1024x1024, batch 4,
                                                      # MIRAGE-Base, MIRAGE-Large, ViT-L/16
    python benchmarks/bench_protocols.py --quick      # smoke test: MIRAGE-Tiny 32x32
    python benchmarks/bench_protocols.py --check_compile   # + torch.compile (Inductor):
                                                      # compile time, step, equality

On the CPU each row also gives ``cpu_seconds_per_step``: this process's CPU time, which
other load on the machine barely changes; the CPU targets use its ratios.

Targets (issue 9): CPU fully_frozen <= 0.85x paper, cached <= 0.6x, fast_paper no slower
than paper; CUDA (ViT-L, 1024, batch 4): fast_paper bf16 + checkpointing < 22 GB peak,
fully_frozen <= 0.7x and cached <= 0.3x of the paper step.
"""
import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from fm_seg_config import MirageBase, MirageLarge, MirageTiny, RetFound  # noqa: E402
from mirage.train import distributed, protocols  # noqa: E402
from mirage.train import loop as engine  # noqa: E402
from mirage.train.precision import Precision  # noqa: E402
from mirage.data.layout import SliceFiles  # noqa: E402
from mirage.train.feature_cache import CacheSpec, FeatureCache, cache_identity  # noqa: E402
from mirage.train.losses import build_loss  # noqa: E402
from mirage.models.segmentation_model import SegmentationModel  # noqa: E402
from mirage.train.optim import apply_schedule, build_optimizer, param_groups  # noqa: E402
from mirage.models.decoders import build_decoder  # noqa: E402
from mirage.options import default_options  # noqa: E402
from mirage.protocol import Protocol as TuningProtocol  # noqa: E402
from mirage.run.spec import OptimSpec, PrecisionSpec, SpeedSpec  # noqa: E402
from mirage.train.build import apply_protocol  # noqa: E402
from mirage.train.checkpointing import TrainingState, trained_state_dict  # noqa: E402
from mirage.train.context import TrainingContext  # noqa: E402
from mirage.train.loop import TrainingData  # noqa: E402
from mirage.train.runtime import Runtime  # noqa: E402

MODELS = {  # name: (family, patch size)
    "mirage-tiny": (MirageTiny, 32),
    "mirage-base": (MirageBase, 32),     # ViT-B/32
    "mirage-large": (MirageLarge, 32),   # ViT-L/32
    "vit-l16": (RetFound, 16),           # ViT-L/16 (RETFound's architecture): 4096 tokens
}
CLASSES = 9
LR = 1e-4


def quiet(*_):
    pass


class InMemory(torch.utils.data.Dataset):
    """``n`` random B-scans and masks; ``slices`` name empty files (the cache's keys)."""

    def __init__(self, n, in_chans, size, folder):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, in_chans, *size, generator=generator)
        self.masks = torch.randint(0, CLASSES, (n, *size), generator=generator,
                                   dtype=torch.uint8)
        bscans = Path(folder) / "Bench" / "train" / "bscan"
        bscans.mkdir(parents=True, exist_ok=True)
        self.slices = []
        for i in range(n):
            (bscans / f"bench_{i}.png").touch()
            self.slices.append(SliceFiles(f"bench_{i}", bscans / f"bench_{i}.png"))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return {"image": self.images[index], "mask": self.masks[index], "index": index}


# benchmark protocol -> the --tuning it runs ("paper" is the first version's loop, and
# "fast_paper" today's, both of --tuning frozen)
TUNING = {"paper": "frozen", "fast_paper": "frozen", "fully_frozen": "fully_frozen",
          "linear_probe": "linear_probe", "lora": "lora", "full": "full"}


def build(model_name, size, protocol, drop_path):
    """(family, SegmentationModel) with random weights, set up as ``--tuning`` does for
    ``protocol`` (LoRA: the default rank 8, alpha 16 on qkv and proj)."""
    family, patch = MODELS[model_name]
    fm = family()
    torch.manual_seed(0)
    backbone = fm.build(size, (patch, patch), 1, drop_path_rate=drop_path)
    tuning = TUNING[protocol]
    decoder = build_decoder("linear" if tuning == "linear_probe" else "convnext",
                            embed_dim=backbone.embed_dim, num_classes=CLASSES,
                            grid_size=backbone.grid_size, patch_size=backbone.patch_size,
                            image_size=size, encoder_depth=backbone.depth)
    model = SegmentationModel(backbone, decoder)
    apply_protocol(model, TuningProtocol.from_options(default_options(tuning=tuning)))
    return fm, model


def protocol_sizes(model_name, size, protocols_):
    """What each protocol trains and saves at ``size``: trainable parameters (millions)
    and the checkpoint-best.pth size (MB: the trained tensors; a checkpoint-<epoch>.pth
    adds AdamW's two moments per trained tensor)."""
    rows = {}
    for protocol in protocols_:
        _, model = build(model_name, size, protocol, 0.0)
        trained = trained_state_dict(model)
        buffer = io.BytesIO()
        torch.save(trained, buffer)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows[TUNING[protocol]] = {
            "trainable": trainable, "trainable_M": round(trainable / 1e6, 2),
            "total_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "best_checkpoint_MB": round(buffer.tell() / 1e6, 3),
            "resume_checkpoint_MB": round((buffer.tell() + 8 * trainable) / 1e6, 3)}
        del model
    return rows


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def legacy_epoch(model, loader, criterion, optimizer, precision, device, first_step,
                 schedule):
    """The first version's train_one_epoch (host syncs per step), kept as the baseline."""
    model.train()
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    for step, batch in enumerate(loader):
        apply_schedule(optimizer, schedule[first_step + step], 0.05)
        images = batch["image"].to(device, non_blocking=True)
        masks = batch["mask"].to(device, non_blocking=True).long()
        with precision.autocast():
            logits = model(images)
        loss = criterion(logits.float(), masks)
        if not np.isfinite(loss.item()):
            raise RuntimeError("loss is not finite")
        optimizer.zero_grad(set_to_none=True)
        precision.backward(loss, optimizer, None, params)
        loss_sum += torch.tensor([loss.item(), 1.0], dtype=torch.float64, device=device)
        _ = f"{loss.item():.4f}"  # the progress bar's postfix
    return float(loss_sum[0] / loss_sum[1])


class Protocol:
    """One protocol's model, optimiser and loader; ``epoch()`` trains one timed epoch."""

    def __init__(self, spec, data, device, steps, batch, folder):
        self.spec, self.device, self.steps, self.batch = spec, device, steps, batch
        size, amp, cached = spec["size"], spec.get("amp"), spec.get("cache")
        fm, self.model = build(spec["model"], size, spec["protocol"], 0.0 if cached else 0.1)
        self.model.to(device)
        speed = SpeedSpec(grad_checkpointing=spec.get("checkpointing", False),
                          compile=spec.get("compile", False))
        optim = OptimSpec.from_options(default_options(opt="adamw", lr=LR))
        self.precision = Precision(device, PrecisionSpec(amp is not None, amp or "fp16"),
                                   quiet)
        groups = param_groups(self.model, 0.05, 0.75)
        self.legacy = spec["protocol"] == "paper"
        if self.legacy:
            self.optimizer = build_optimizer(groups, optim)
        else:
            protocols.apply_speed_options(self.model, speed, device, quiet)
            self.optimizer = protocols.make_optimizer(groups, optim, device)
        self.cache = None
        if cached:
            model_spec = SimpleNamespace(fm=fm, input_size=size, norm="minmax")
            identity = cache_identity(model_spec, self.model, amp or "fp32", "0" * 64)
            self.cache = FeatureCache(CacheSpec(cached, identity, Path(folder) / "cache",
                                                device), data, 1, quiet)
        self.loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=False,
                                                  drop_last=True,
                                                  pin_memory=device.type == "cuda")
        self.criterion = build_loss("CEGDice")
        self.epochs = 0
        self.seconds, self.cpu_seconds = [], []

    def context(self, schedule):
        """The TrainingContext train_one_epoch reads: this model, loader and optimiser, one
        process on ``self.device``; the spec holds only the two values it reads."""
        spec = SimpleNamespace(optim=SimpleNamespace(clip_grad=None),
                               loop=SimpleNamespace(epochs=self.epochs + 1))
        data = TrainingData(train_set=self.loader.dataset, train_loader=self.loader,
                            val_loader=None, steps_per_epoch=self.steps, test_slices=[])
        return TrainingContext(
            spec, Runtime(self.device, distributed.DistInfo(), quiet), self.model,
            self.precision, criterion=self.criterion, optimizer=self.optimizer,
            lr_schedule=schedule, wd_schedule=np.full(len(schedule), 0.05), data=data,
            feature_cache=self.cache, val_cache=None, ddp_model=self.model, record=None,
            state=TrainingState())

    def epoch(self):
        """One epoch over the batches; returns its seconds."""
        # cuDNN autotuning is the fast protocol's (apply_speed_options); the first version
        # ran without it.
        torch.backends.cudnn.benchmark = not self.legacy
        schedule = np.full((self.epochs + 1) * self.steps, LR)
        sync(self.device)
        started, cpu_started = time.perf_counter(), time.process_time()
        if self.legacy:
            legacy_epoch(self.model, self.loader, self.criterion, self.optimizer,
                         self.precision, self.device, self.epochs * self.steps, schedule)
        else:
            engine.train_one_epoch(self.context(schedule), self.epochs)
        sync(self.device)
        self.epochs += 1
        self.seconds.append(time.perf_counter() - started)
        self.cpu_seconds.append(time.process_time() - cpu_started)
        return self.seconds[-1]

    def row(self):
        """The JSON row: the median timed epoch (every epoch after the warm-up one)."""
        spec, timed = self.spec, float(np.median(self.seconds[1:]))
        row = {"name": spec["name"], "model": spec["model"], "protocol": spec["protocol"],
               "precision": spec.get("amp") or "fp32",
               "seconds_per_step": round(timed / self.steps, 4),
               "samples_per_s": round(self.steps * self.batch / timed, 2),
               "warmup_seconds_per_step": round(self.seconds[0] / self.steps, 4),
               "timed_epochs": len(self.seconds) - 1}
        if self.device.type == "cpu":  # this process's CPU time: robust to other load
            row["cpu_seconds_per_step"] = round(
                float(np.median(self.cpu_seconds[1:])) / self.steps, 4)
        if spec.get("checkpointing"):
            row["grad_checkpointing"] = True
        if spec.get("cache"):
            row["cache"] = spec["cache"]
        return row


def run_protocol(spec, data, device, steps, batch, folder, rounds=1):
    """One protocol alone (CUDA: its own peak memory): warm-up epoch, timed epochs."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    protocol = Protocol(spec, data, device, steps, batch, folder)
    for _ in range(1 + rounds):
        protocol.epoch()
    row = protocol.row()
    if device.type == "cuda":
        row["peak_gpu_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    del protocol
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def run_interleaved(specs, data, device, steps, batch, folder, rounds):
    """CPU: every protocol's warm-up, then ``rounds`` rounds that time one epoch of each in
    turn, so that a busy machine slows every protocol alike."""
    runs = [Protocol(spec, data, device, steps, batch, folder) for spec in specs]
    for run in runs:
        run.epoch()
    for _ in range(rounds):
        for run in runs:
            run.epoch()
    return [run.row() for run in runs]


def check_compile(model_name, size, device, batch, steps, folder):
    """--compile with Inductor: compile time, step time, and equality with eager."""
    results = {}
    images = torch.rand(batch, MODELS[model_name][0].in_chans, *size,
                        generator=torch.Generator().manual_seed(1)).to(device)
    grads = {}
    for compiled in (False, True):
        _, model = build(model_name, size, "paper", 0.0)  # no drop path: same RNG use
        model.to(device).train()
        if compiled:
            protocols.apply_speed_options(model, SpeedSpec(compile=True), device,
                                          lambda line: print(line, file=sys.stderr))
        started = time.perf_counter()
        logits = model(images)
        (logits.float().square().mean()).backward()
        sync(device)
        results["first_step_s" if compiled else "eager_first_step_s"] = round(
            time.perf_counter() - started, 2)
        grads[compiled] = (logits.detach().float(),
                           {n: p.grad.float() for n, p in model.named_parameters()
                            if p.grad is not None})
    (eager_logits, eager_grads), (comp_logits, comp_grads) = grads[False], grads[True]
    results["max_abs_logit_diff"] = float((comp_logits - eager_logits).abs().max())
    results["max_rel_grad_diff"] = max(
        float((comp_grads[n] - g).norm() / g.norm().clamp_min(1e-12))
        for n, g in eager_grads.items())
    data = InMemory(steps * batch, MODELS[model_name][0].in_chans, size, folder)
    results["step"] = run_protocol({"name": "fast_paper_compiled", "model": model_name,
                                    "size": size, "protocol": "fast_paper",
                                    "compile": True}, data, device, steps, batch, folder)
    results["step_eager"] = run_protocol({"name": "fast_paper", "model": model_name,
                                          "size": size, "protocol": "fast_paper"}, data,
                                         device, steps, batch, folder)
    return results


def cpu_name():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def plan(args, device):
    """The protocols to time, per model (``args.plan``: the CPU's or the CUDA list)."""
    if (getattr(args, "plan", None) or device.type) == "cpu":
        specs = [{"name": "paper", "protocol": "paper"},
                 {"name": "fast_paper", "protocol": "fast_paper"},
                 {"name": "fully_frozen", "protocol": "fully_frozen"},
                 {"name": "fully_frozen_cached_ram", "protocol": "fully_frozen",
                  "cache": "ram"},
                 {"name": "fully_frozen_cached_disk", "protocol": "fully_frozen",
                  "cache": "disk"},
                 {"name": "linear_probe", "protocol": "linear_probe"},
                 {"name": "linear_probe_cached_ram", "protocol": "linear_probe",
                  "cache": "ram"},
                 {"name": "lora", "protocol": "lora"},
                 {"name": "full", "protocol": "full"}]
    else:
        specs = [{"name": "paper_fp16", "protocol": "paper", "amp": "fp16"},
                 {"name": "fast_paper_fp16", "protocol": "fast_paper", "amp": "fp16"},
                 {"name": "fast_paper_bf16", "protocol": "fast_paper", "amp": "bf16"},
                 {"name": "fast_paper_bf16_checkpointing", "protocol": "fast_paper",
                  "amp": "bf16", "checkpointing": True},
                 {"name": "fully_frozen_bf16", "protocol": "fully_frozen", "amp": "bf16"},
                 {"name": "fully_frozen_cached_ram_bf16", "protocol": "fully_frozen",
                  "amp": "bf16", "cache": "ram"},
                 {"name": "fully_frozen_cached_disk_bf16", "protocol": "fully_frozen",
                  "amp": "bf16", "cache": "disk"},
                 {"name": "linear_probe_bf16", "protocol": "linear_probe", "amp": "bf16"},
                 {"name": "lora_bf16", "protocol": "lora", "amp": "bf16"},
                 {"name": "lora_bf16_checkpointing", "protocol": "lora", "amp": "bf16",
                  "checkpointing": True},
                 {"name": "full_bf16", "protocol": "full", "amp": "bf16"},
                 {"name": "full_bf16_checkpointing", "protocol": "full", "amp": "bf16",
                  "checkpointing": True}]
    return [{**spec, "model": model, "size": args.size} for model in args.models
            for spec in specs]


def ratios(rows):
    """Each row's step time (and CPU time) over its model's paper step."""
    for key, out in (("seconds_per_step", "relative_to_paper"),
                     ("cpu_seconds_per_step", "cpu_relative_to_paper")):
        paper = {r["model"]: r[key] for r in rows if r.get("protocol") == "paper" and key in r}
        for row in rows:
            if row["model"] in paper and key in row:
                row[out] = round(row[key] / paper[row["model"]], 3)


def targets(rows, plan_name):
    """Issue 9's targets, met or not. On the CPU the ratios of CPU time are used (a busy
    machine inflates wall time unevenly); the wall-time ratios are in the rows too."""
    def rel(model, name):
        row = next((r for r in rows if r["model"] == model and r["name"] == name), None)
        return row and row.get("cpu_relative_to_paper", row.get("relative_to_paper"))

    if plan_name == "cpu":
        model = rows[0]["model"]
        checks = {"fully_frozen <= 0.85x paper": (rel(model, "fully_frozen"), 0.85),
                  "fully_frozen_cached_ram <= 0.6x paper":
                      (rel(model, "fully_frozen_cached_ram"), 0.6),
                  "fast_paper <= 1.0x paper (no slower)": (rel(model, "fast_paper"), 1.0)}
        return {k: (v is not None and v <= limit) for k, (v, limit) in checks.items()}
    out = {}
    for model in {r["model"] for r in rows}:
        ckpt = next((r for r in rows if r["model"] == model
                     and r["name"] == "fast_paper_bf16_checkpointing"), None)
        if ckpt is not None and "peak_gpu_GiB" in ckpt:
            out[f"{model}: fast_paper bf16 + checkpointing peak < 22 GB"] = \
                ckpt["peak_gpu_GiB"] * 2**30 / 1e9 < 22
        frozen = rel(model, "fully_frozen_bf16")
        cached = rel(model, "fully_frozen_cached_ram_bf16")
        out[f"{model}: fully_frozen <= 0.7x paper"] = frozen is not None and frozen <= 0.7
        out[f"{model}: cached <= 0.3x paper"] = cached is not None and cached <= 0.3
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuda", action="store_true", help="the paper configuration on "
                        "CUDA: 1024x1024, batch 4, MIRAGE-Base, MIRAGE-Large and ViT-L/16")
    parser.add_argument("--quick", action="store_true", help="smoke test: MIRAGE-Tiny 32x32")
    parser.add_argument("--check_compile", action="store_true",
                        help="also time --compile (Inductor) and compare it with eager")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS))
    parser.add_argument("--size", type=int, nargs=2)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--rounds", type=int, help="timed epochs per protocol (median)")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--plan", choices=("cpu", "cuda"),
                        help="which protocol list (default: the device's); '--quick --plan "
                             "cuda' dry-runs the CUDA list on the CPU")
    args = parser.parse_args(argv)
    if args.cuda and not torch.cuda.is_available():
        parser.error("--cuda: CUDA is not available on this machine")
    device = torch.device("cuda" if args.cuda else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        defaults = (["mirage-tiny"], [32, 32], 2, 1, 1)
    elif args.cuda:
        defaults = (["mirage-base", "mirage-large", "vit-l16"], [1024, 1024], 4, 8, 1)
    else:
        defaults = (["mirage-base"], [512, 512], 2, 3, 4)
    args.models = args.models or defaults[0]
    args.size = tuple(args.size or defaults[1])
    args.batch = args.batch or defaults[2]
    args.steps = args.steps or defaults[3]
    args.rounds = args.rounds or defaults[4]
    machine = {"cpu": cpu_name(), "cpu_count": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "load_average_1min": round(os.getloadavg()[0], 2)}
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
        machine["gpu_GiB"] = round(torch.cuda.get_device_properties(device).total_memory
                                   / 2**30, 1)
    report = {"machine": machine, "device": device.type,
              "config": {"input": f"{args.size[0]}x{args.size[1]}", "batch": args.batch,
                         "steps_timed": args.steps, "decoder": "convnext",
                         "loss": "CEGDice", "optimizer": "adamw"},
              "protocols": []}
    with tempfile.TemporaryDirectory() as folder:
        datasets = {}
        for model in args.models:
            in_chans = MODELS[model][0].in_chans
            if in_chans not in datasets:
                datasets[in_chans] = InMemory(args.steps * args.batch, in_chans, args.size,
                                              folder)
            specs = [spec for spec in plan(args, device) if spec["model"] == model]
            if device.type == "cpu":
                rows = run_interleaved(specs, datasets[in_chans], device, args.steps,
                                       args.batch, folder, args.rounds)
            else:
                rows = []
                for spec in specs:
                    try:
                        rows.append(run_protocol(spec, datasets[in_chans], device,
                                                 args.steps, args.batch, folder, args.rounds))
                    except torch.cuda.OutOfMemoryError:
                        rows.append({"name": spec["name"], "model": model,
                                     "error": "out of memory"})
                        torch.cuda.empty_cache()
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # progress
            report["protocols"] += rows
        ratios(report["protocols"])
        # what each protocol trains and saves, at the paper's input size (no step is run)
        report["sizes"] = {
            model: {"input": "1024x1024", "classes": CLASSES,
                    "protocols": protocol_sizes(model, (1024, 1024), TUNING)}
            for model in args.models}
        report["targets_met"] = targets(report["protocols"], args.plan or device.type)
        if args.check_compile:
            report["compile"] = check_compile(args.models[0], args.size, device, args.batch,
                                              args.steps, folder)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
