"""The training loop: data -> model -> optimiser -> epochs (train, validate, checkpoint),
then a test of the best checkpoint.

    train(spec, runtime, on_epoch_end=None) -> the run directory

``train`` reads top to bottom; the steps it calls are the small functions below it. The
run folder is locked and its identity checked by the caller (mirage.train.job).
"""
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from mirage.config import yaml_text
from mirage.options import ALL
from mirage.data.dataset import SegmentationDataset
from mirage.data.check import check_training_data
from mirage.data.transforms import SegmentationTransform
from mirage.errors import UserError
from mirage.progress import progress
from mirage.train import distributed
from mirage.train.build import make_loader, model_for, test_transform
from mirage.train.checkpointing import (CheckpointRecord, ResumePoint, TrainingState,
                                        checkpoint_meta, find_resume_checkpoint, resume,
                                        save_checkpoint)
from mirage.train.context import TrainingContext
from mirage.train.feature_cache import open_feature_cache, open_split_cache
from mirage.train.inference import score_best_checkpoint
from mirage.train.losses import build_loss
from mirage.train.optim import apply_schedule, cosine_schedule, param_groups, warmup_steps
from mirage.train.precision import Precision
from mirage.train.protocols import make_optimizer, training_views
from mirage.train.runtime import random_state, restore_random_state
from mirage.train.validation import Panels, SplitScoring, iou_line, validate
from mirage.units import format_duration


# ============================================================================ train
def train(spec, runtime, on_epoch_end=None):
    """Train one run into ``spec.folder`` (locked, identity checked), then test its best
    checkpoint on the test split if that has masks.

    ``on_epoch_end(folder)``, if given, is called on the main process after each epoch's
    log line is written (the command line writes TensorBoard curves there).
    """
    loop, folder, log = spec.loop, spec.folder, runtime.log
    if folder.training_finished(loop.epochs) and loop.auto_resume and not loop.resume:
        log(f">> {folder.path} already finished {loop.epochs} epochs: skipping training "
            "(delete the folder or change --version to train again)")
        return folder.path

    data = load_data(spec, runtime)
    model = model_for(spec, runtime)
    log(f">> {trainable_line(model, spec)}")
    criterion = build_loss(loop.loss, spec.data.ignore_index)
    precision = Precision(runtime.device, spec.precision, log)
    feature_cache = open_feature_cache(spec, model, data.train_set, precision, runtime)
    val_cache = open_split_cache(model, data.val_loader, feature_cache, log)  # frozen only
    optimizer, lr_schedule, wd_schedule = optimisation(model, spec, data.steps_per_epoch,
                                                       runtime.device)
    warmup, total = warmup_steps(spec.optim, data.steps_per_epoch), len(lr_schedule)
    if spec.optim.warmup_steps > 0 and warmup > total:  # --warmup_epochs: checked up front
        log(f">> note: --warmup_steps {warmup} is longer than the run ({total} steps of "
            f"{data.steps_per_epoch} per epoch): the warmup is cut to {total} steps, so the "
            "learning rate rises for the whole run and the cosine decay never starts")
    record = CheckpointRecord(model, spec.options, spec.classes,
                              checkpoint_meta(spec, spec.classes, model))
    state, resumed = resume_or_start(spec, runtime, record, ResumePoint(optimizer,
                                                                        precision.scaler))
    record_training_set(spec, runtime, data.subset, resumed)
    ctx = TrainingContext(
        spec, runtime, model, precision, criterion=criterion, optimizer=optimizer,
        lr_schedule=lr_schedule, wd_schedule=wd_schedule, data=data,
        feature_cache=feature_cache, val_cache=val_cache,
        ddp_model=DistributedDataParallel(model) if runtime.dist.enabled else model,
        record=record, state=state)
    # Last before the first epoch: everything above (model, cache) drew from the seeded
    # generators; a resumed run continues them where its checkpoint left them.
    restore_generators(state, runtime)

    log(f">> {plan_line(state.start_epoch, loop.epochs, resumed, runtime.device)}")
    clock = EpochClock()
    for epoch in range(state.start_epoch, loop.epochs):
        started = time.time()
        if isinstance(data.train_loader.sampler, DistributedSampler):
            data.train_loader.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(ctx, epoch)
        stats = {"epoch": epoch, **{f"train/{k}": v for k, v in train_stats.items()}}
        stats.update(validate_epoch(ctx, epoch))
        stats["time"] = round(time.time() - started, 2)
        clock.add(stats["time"])
        # The checkpoint holds a copy of the log line: a kill between the two writes leaves
        # a checkpoint whose line the resumed run puts back (never a finished-looking log
        # without the checkpoint it needs).
        save_epoch_checkpoint(ctx, epoch, stats)
        if runtime.dist.is_main:
            folder.append_log(stats)
            if on_epoch_end is not None:
                on_epoch_end(folder)
        log(epoch_line(stats, state, loop.epochs, clock.time_left(loop.epochs - 1 - epoch)))
        if "val/IoU" in stats:
            log(iou_line(stats["val/IoU"]))
    distributed.barrier(runtime.dist)

    if data.test_slices and folder.best_checkpoint.is_file():
        test_set = SegmentationDataset(data.test_slices, spec.classes,
                                       test_transform(spec.model))
        score_best_checkpoint(ctx, test_set, spec.data.dataset.root)
    distributed.shutdown()
    return folder.path


TUNING_WORDS = {
    "frozen": "encoder blocks frozen; patch projector, global tokens and decoder train",
    "fully_frozen": "whole backbone frozen, run without a graph; the decoder trains",
    "linear_probe": "whole backbone frozen, run without a graph; a linear decoder trains",
    "lora": "encoder blocks frozen with LoRA adapters; adapters, patch projector, global "
            "tokens and decoder train",
    "full": "every encoder tensor trains (layer-wise LR decay), and the decoder",
}


def trainable_line(model, spec):
    """'tuning lora (...): 1.23 M trainable of 88.10 M parameters (backbone 0.91 M,
    decoder convnext 0.32 M)'; counts under 10,000 are written out."""
    def count(params):
        number = sum(p.numel() for p in params)
        return f"{number / 1e6:.2f} M" if number >= 10_000 else f"{number:,}"

    trained = [p for p in model.parameters() if p.requires_grad]
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    decoder = [p for p in model.decoder.parameters() if p.requires_grad]
    tuning = spec.protocol.name
    return (f"tuning {tuning} ({TUNING_WORDS[tuning]}): "
            f"{count(trained)} trainable of {count(model.parameters())} parameters "
            f"(backbone {count(backbone)}, decoder {spec.model.decoder} {count(decoder)})")


@dataclass
class TrainingData:
    """The loaders of one run; test_slices: the test split's files when it has masks."""

    train_set: object
    train_loader: object
    val_loader: object
    steps_per_epoch: int
    test_slices: list
    subset: object = None  # mirage.data.subsets.TrainingSubset: the volumes trained on


def load_data(spec, runtime):
    """Find and check every split before anything trains; the training and validation
    loaders."""
    loader, dataset, classes = spec.loader, spec.data.dataset, spec.classes
    # every problem of the three splits at once; test: [] without masks (nothing to score)
    splits = check_training_data(dataset, classes, workers=max(loader.num_workers, 2))
    subset = spec.data.train_subset.select(splits["train"])  # whole volumes; or all
    runtime.log(f">> {training_set_line(spec.data.train_subset, subset)}")
    train_slices, val_slices, test_slices = subset.slices, splits["val"], splits["test"]
    model = spec.model
    train_set = SegmentationDataset(train_slices, classes, SegmentationTransform(
        model.input_size, train=True, aug_name=spec.loop.aug_name, norm=model.norm,
        in_chans=model.in_chans))
    train_set = training_views(train_set, spec.loop.aug_name)  # --aug_name flip
    val_set = SegmentationDataset(val_slices, classes, test_transform(model))
    global_batch = loader.batch_size * runtime.dist.world_size
    steps_per_epoch = len(train_set) // global_batch
    if steps_per_epoch == 0:
        raise UserError(f"--batch_size {loader.batch_size}: the training split has only "
                        f"{len(train_set)} B-scans; use a smaller batch size")
    runtime.log(f">> {len(train_set)} training / {len(val_set)} validation B-scans, "
                f"{steps_per_epoch} steps per epoch of {global_batch}")
    return TrainingData(train_set=train_set,
                        train_loader=make_loader(train_set, loader, runtime.dist, train=True),
                        val_loader=make_loader(val_set, loader, runtime.dist, train=False),
                        steps_per_epoch=steps_per_epoch, test_slices=test_slices,
                        subset=subset)


def training_set_line(train_subset, subset):
    """'training set: all 10 volumes of the training split (110 B-scans)', or for a
    subset 'training set: 2 of 10 volumes (subset seed 0): vol03, vol07 (22 B-scans)'."""
    total = len(subset.split_volumes)
    if train_subset.whole:
        return (f"training set: all {total} volume{'s' if total != 1 else ''} of the "
                f"training split ({len(subset.slices)} B-scans)")
    return (f"training set: {len(subset.volumes)} of {total} volumes (subset seed "
            f"{train_subset.seed}): {', '.join(subset.volumes)} ({len(subset.slices)} "
            "B-scans)")


def record_training_set(spec, runtime, subset, resumed):
    """Write the volumes the run trains on into its folder (train_volumes.json); a resumed
    subset run must train on the volumes it started with (the training split has not
    changed under it), else a UserError naming both."""
    folder, train_subset = spec.folder, spec.data.train_subset
    stored = folder.read_train_volumes() if resumed and not train_subset.whole else None
    if stored is not None and stored["volumes"] != subset.volumes:
        raise UserError(f"{folder.train_volumes_file}: the run started on the volumes "
                        f"{', '.join(map(str, stored['volumes']))}, but the training split "
                        f"now gives {', '.join(subset.volumes)} (it changed since); restore "
                        "the split or train the run again in another --version")
    if runtime.dist.is_main:
        folder.write_train_volumes({
            "split": "train", "volumes": subset.volumes,
            "split_volumes": len(subset.split_volumes), "bscans": len(subset.slices),
            "train_volumes": train_subset.volumes if train_subset.volumes is not None
            else ALL, "train_fraction": train_subset.fraction
            if train_subset.fraction is not None else ALL,
            "subset_seed": None if train_subset.whole else train_subset.seed})


def optimisation(model, spec, steps_per_epoch, device):
    """(optimizer, per-step LR schedule, per-step weight-decay schedule) of the RunSpec's
    OptimSpec over its epochs."""
    optim, total = spec.optim, spec.loop.epochs * steps_per_epoch
    groups = param_groups(model, optim.weight_decay, optim.layer_decay, optim.decoder_decay,
                          optim.no_lr_scale)
    optimizer = make_optimizer(groups, optim, device)  # fused Adam(W) on CUDA
    lr_schedule = cosine_schedule(optim.lr, optim.min_lr, total,
                                  warmup_steps(optim, steps_per_epoch), optim.warmup_lr)
    wd_end = optim.weight_decay if optim.weight_decay_end is None else optim.weight_decay_end
    wd_schedule = cosine_schedule(optim.weight_decay, wd_end, total)
    return optimizer, lr_schedule, wd_schedule


def resume_or_start(spec, runtime, record, resume_point):
    """Resume an interrupted run (or the file given by --resume) into ``record.model`` and
    the ResumePoint's optimiser and scaler, or start a new one; the run's identity.json
    and config.yaml are written either way. Returns (the TrainingState, whether it was
    resumed from a checkpoint)."""
    loop, folder, is_main = spec.loop, spec.folder, runtime.dist.is_main
    state = TrainingState(start_epoch=loop.start_epoch)
    found = find_resume_checkpoint(loop, folder, runtime.log)
    if found is not None:
        path = found.path
        state = resume(found, record.model, resume_point.optimizer, resume_point.scaler,
                       record.meta)
        runtime.log(f">> resumed from {path}: continuing at epoch {state.start_epoch}")
        if state.random_state is None:
            runtime.log(f">> note: {path.name} holds no random state (an older version "
                        "saved it): the resumed epochs draw other random numbers than an "
                        "uninterrupted run would")
        if is_main:
            # Its own copy of its epoch's log line, if log.txt lost it (a torn write);
            # not for a checkpoint of another run directory (--resume).
            own = Path(path).resolve().parent == folder.path.resolve()
            notes = []
            folder.trim_log(state.start_epoch, state.log_entry if own else None, notes)
            for note in notes:
                runtime.log(f">> note: {note} (torn by an interrupted write)")
    elif folder.epoch_checkpoints():
        raise UserError(f"{folder.path} already holds checkpoints; use --auto_resume to "
                        "continue that run, or another --version to start a new one")
    elif is_main:
        folder.trim_log(state.start_epoch)  # lines of an earlier start that had no checkpoint
    if is_main:
        folder.write_identity(spec.identity)
        folder.write_config(yaml_text(spec.options))
    return state, found is not None


def restore_generators(state, runtime):
    """Set every random generator to the state a resumed checkpoint saved, so that the
    next epochs draw what an uninterrupted run would (no-op for a new run or an older
    checkpoint)."""
    if state.random_state is None:
        return
    reason = restore_random_state(state.random_state, runtime.dist)
    if reason is not None:
        runtime.log(f">> note: the checkpoint's random state is not restored ({reason}): "
                    "the resumed epochs draw other random numbers than an uninterrupted "
                    "run would")


def validate_epoch(ctx, epoch):
    """Validate when due (every --eval_freq epochs and at the end) and save
    checkpoint-best.pth when the selecting metric improves; returns the validation stats
    (``val/...``), or {} when not validated this epoch. ``ctx``: the TrainingContext (its
    ``val_cache``: the validation tokens' store when the backbone is fully fixed)."""
    loop, folder, state = ctx.spec.loop, ctx.spec.folder, ctx.state
    is_main = ctx.runtime.dist.is_main
    if epoch % loop.eval_freq != 0 and epoch != loop.epochs - 1:
        return {}
    panels = (Panels(folder.images_dir, f"val_e{epoch}") if loop.log_images and is_main
              and epoch % loop.log_images_freq == 0 else None)
    scoring = SplitScoring(ctx.spec.classes, ctx.spec.data.ignore_index, loop.select_metric)
    val_stats = validate(ctx.batch_step(ctx.criterion, ctx.val_cache), ctx.data.val_loader,
                         scoring, ctx.runtime.dist, panels)
    state.metric = loop.select_metric  # val/mIoU is its value; it picks the best
    if state.improves(val_stats["mIoU"]):
        state.best_miou, state.best_epoch = val_stats["mIoU"], epoch
        if loop.save_ckpt and is_main:
            save_checkpoint(folder.best_checkpoint, ctx.record, epoch, state)
    return {f"val/{k}": v for k, v in val_stats.items()}


def save_epoch_checkpoint(ctx, epoch, log_entry):
    """checkpoint-<epoch>.pth when due (every --save_ckpt_freq epochs and the last), then
    prune the older ones. It holds every process's random generators (saved at the end of
    the epoch, after validation) and the epoch's log line, so that a resume continues
    exactly where this run is now."""
    loop, folder = ctx.spec.loop, ctx.spec.folder
    due = (epoch + 1) % loop.save_ckpt_freq == 0 or epoch == loop.epochs - 1
    if not (loop.save_ckpt and due):
        return
    generators = random_state(ctx.runtime.dist)  # collective: every process takes part
    if ctx.runtime.dist.is_main:
        save_checkpoint(folder.epoch_checkpoint(epoch), ctx.record, epoch, ctx.state,
                        ResumePoint(ctx.optimizer, ctx.precision.scaler, generators,
                                    log_entry))
        folder.prune_epoch_checkpoints(keep=loop.keep_ckpts)


# ============================================================================ one epoch
FINITE_CHECK_STEPS = 50  # steps between the (host-syncing) loss checks and progress updates


def train_one_epoch(ctx, epoch):
    """One pass over the training loader with per-step LR/WD schedules (``ctx``: the
    TrainingContext).

    No step waits for the device: the loss is summed on it, and checked for NaN/Inf (a
    RuntimeError naming the first bad step) every ``FINITE_CHECK_STEPS`` steps and at the
    end. With a feature cache (fully-frozen protocol) the decoder reads cached tokens.
    Returns ``{"loss": mean over steps and processes, "lr": last peak LR}``.
    """
    model, optimizer, device = ctx.ddp_model, ctx.optimizer, ctx.runtime.device
    dist_info, first_step = ctx.runtime.dist, epoch * ctx.data.steps_per_epoch
    step_batch = ctx.batch_step(ctx.criterion, ctx.feature_cache, model)
    clip_grad = ctx.spec.optim.clip_grad
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)  # (sum, count)
    first_bad = torch.full((), -1, dtype=torch.int64, device=device)  # first non-finite step
    shown = torch.zeros(2, dtype=torch.float64, device=device)  # loss_sum at the last check
    bar = progress(ctx.data.train_loader, desc=epoch_label(epoch, ctx.spec.loop.epochs),
                   leave=False, disable=not dist_info.is_main, dynamic_ncols=True)
    for step, batch in enumerate(bar):
        apply_schedule(optimizer, ctx.lr_schedule[first_step + step],
                       ctx.wd_schedule[first_step + step])
        _, _, loss = step_batch(batch)
        optimizer.zero_grad(set_to_none=True)
        ctx.precision.backward(loss, optimizer, clip_grad, params)
        loss = loss.detach()
        first_bad.masked_fill_((first_bad < 0) & ~torch.isfinite(loss), step)
        loss_sum[0] += loss
        loss_sum[1] += 1.0
        if (step + 1) % FINITE_CHECK_STEPS == 0:
            _check_finite(first_bad, epoch, dist_info, ctx.precision)
            recent = loss_sum - shown
            shown = loss_sum.clone()
            bar.set_postfix(loss=f"{float(recent[0] / recent[1]):.4f}",
                            lr=f"{ctx.lr_schedule[first_step + step]:.2e}")
    _check_finite(first_bad, epoch, dist_info, ctx.precision)
    if ctx.feature_cache is not None and dist_info.is_main:
        ctx.feature_cache.end_epoch()
    distributed.all_reduce_sum(loss_sum, dist_info)
    max_lr = max(group["lr"] for group in optimizer.param_groups)
    return {"loss": float(loss_sum[0] / loss_sum[1]), "lr": max_lr}


def _check_finite(first_bad, epoch, dist_info, precision):
    """RuntimeError (on every process alike) if a step of this epoch had a NaN/Inf loss."""
    bad = (first_bad >= 0).to(torch.float64).reshape(1)
    distributed.all_reduce_sum(bad, dist_info)
    if bad.item() == 0:
        return
    step = int(first_bad)
    where = f"at epoch {epoch}, step {step}" if step >= 0 else \
        f"at epoch {epoch} on another process"
    fp16 = " (float16 is in use)" if precision.dtype == torch.float16 else ""
    raise RuntimeError(
        f"the training loss became NaN/Inf {where}; likely causes: a learning rate too high "
        f"(try a lower --lr), a float16 overflow{fp16} (try --amp_dtype bf16 or --no_fp16), "
        "or NaN/Inf values in the input images or the weights (check the dataset's B-scans "
        "and the --weights file)")


# ============================================================================ console
def epoch_label(epoch, epochs):
    """'epoch 3/4 (4 of 5)': the number from 0 as log.txt and the checkpoint names count
    (3 of 0..4), then the count a reader expects (the 4th of 5 epochs)."""
    return f"epoch {epoch}/{epochs - 1} ({epoch + 1} of {epochs})"


def plan_line(start_epoch, epochs, resumed, device):
    """What this process will train, e.g. 'training epochs 0..4 (5 epochs, numbered from
    0) on cpu' or, after a resume, 'training epochs 1..4 of 0..4 (resumed at epoch 1) on
    cpu'."""
    last = epochs - 1
    if start_epoch == 0:
        return f"training epochs 0..{last} ({epochs} epochs, numbered from 0) on {device}"
    if start_epoch > last:
        return f"epochs 0..{last} are all trained: nothing left to train"
    why = f"resumed at epoch {start_epoch}" if resumed else f"--start_epoch {start_epoch}"
    return f"training epochs {start_epoch}..{last} of 0..{last} ({why}) on {device}"


class EpochClock:
    """The durations of the epochs this process trained, for the time-left estimate."""

    def __init__(self):
        self.seconds = []

    def add(self, seconds):
        self.seconds.append(seconds)

    def time_left(self, epochs_left):
        """``epochs_left`` x the mean epoch time, or None when nothing is left. The first
        epoch pays one-time costs (starting the workers, compiling, filling the feature
        cache): it is left out of the mean once a later epoch is measured."""
        if epochs_left <= 0 or not self.seconds:
            return None
        measured = self.seconds[1:] or self.seconds
        return epochs_left * sum(measured) / len(measured)


def epoch_line(stats, state, epochs, time_left=None):
    """One console line per epoch; validation metrics in %, "best <metric>" names the
    metric that selects checkpoint-best.pth; ``time_left`` (seconds), the estimated time
    of the epochs still to train."""
    parts = [epoch_label(stats["epoch"], epochs),
             f"train_loss {stats['train/loss']:.4f}", f"lr {stats['train/lr']:.2e}"]
    if "val/mIoU" in stats:
        parts.append(f"val_loss {stats['val/loss']:.4f}")
        parts += [f"{name} {100 * stats[f'val/{name}']:.2f}%"
                  for name in ("mIoU_all", "mIoU_fg", "aAcc", "mAcc") if f"val/{name}" in stats]
    if state.best_miou is not None:
        parts.append(f"best {state.metric} {100 * state.best_miou:.2f}% "
                     f"(epoch {state.best_epoch})")
    parts.append(f"{stats['time']:.1f}s")
    if time_left is not None:
        parts.append(f"est. {format_duration(time_left)} left")
    return "  ".join(parts)
