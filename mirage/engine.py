"""The training story: data -> model -> optimiser -> epochs (train, validate, checkpoint)
-> test with the best checkpoint; plus ``--test`` and ``--infer_only --test``.

``main(config)`` reads top to bottom; the steps it calls are the small functions below it.
"""
import contextlib
import dataclasses
import json
import math
import random
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from fm_seg_config import build_backbone, find_model
from mirage import checkpoint as ckpt
from mirage import distributed
from mirage import predictions
from mirage.config import check_config, domains_of, per_domain, yaml_text
from mirage.data import SegmentationDataset, check_split, find_split, open_dataset
from mirage.errors import UserError
from mirage.feature_cache import open_feature_cache
from mirage.fileio import atomic_folder, write_png, write_text
from mirage.identity import (check_identity, file_sha256, nearest_runs, run_directory,
                             run_identity, run_lock, write_identity)
from mirage.losses import build_loss
from mirage.tensorboard_log import write_tensorboard
from mirage.metrics import confusion_matrix, selection_key, validation_scores
from mirage.model import SegmentationModel
from mirage.optim import apply_schedule, cosine_schedule, param_groups
from mirage.decoders import build_decoder
from mirage.protocols import apply_speed_options, make_optimizer, training_views
from mirage.transforms import SegmentationTransform


# ============================================================================ main
def main(config):
    """Train (default), test (``--test``) or predict (``--infer_only --test``) one run."""
    check_config(config)
    dist_info = distributed.init_from_env(distributed.device_type(config["device"]))
    device = resolve_device(config["device"], dist_info)
    log = _logger(dist_info)
    if not config["show_user_warnings"]:
        warnings.filterwarnings("ignore", category=UserWarning)
    seed_everything(config["seed"] + dist_info.rank)

    # --- what to run on
    fm = find_model(config["weights"], fm=config["fm"])
    dataset = open_dataset(config["data_path"], config["mapping_fn"])
    classes = dataset.class_table
    ignore_index = resolve_ignore_index(config["ignore_index"], classes)
    domain = domains_of(config)[0]
    input_size = per_domain(config["input_size"], [domain])[domain]
    patch_size = (per_domain(config["patch_size"], [domain])[domain]
                  if config["patch_size"] is not None else None)  # None: the model's own
    norm = "minmax" if config["minmax"] else fm.norm
    identity = run_identity(config, dataset)
    run_dir = run_directory(config, dataset, identity)
    log(f">> run directory: {run_dir}")
    log(f">> classes: {dict(zip(classes.labels, classes.values))}; ignore index: "
        f"{ignore_index}")

    if config["test"]:
        best = run_dir / ckpt.BEST
        if not best.is_file():
            raise UserError(f"no trained checkpoint: {best} not found; train this run first "
                            f"(the same command without --test/--infer_only)"
                            f"{nearest_runs(run_dir, identity)}")
        with run_lock_on_main(run_dir, dist_info):
            check_identity(run_dir, identity)
            return test_or_infer(config, fm, dataset, run_dir, device, dist_info,
                                 input_size, patch_size, norm, ignore_index, log)
    if classes.num_classes < 2:
        raise UserError(f"{classes.source}: only {classes.num_classes} class; a segmentation "
                        "model needs at least two (e.g. background and one layer)")
    with run_lock_on_main(run_dir, dist_info):
        check_identity(run_dir, identity)
        return train(config, fm, dataset, run_dir, identity, device, dist_info, input_size,
                     patch_size, norm, ignore_index, log)


def train(config, fm, dataset, run_dir, identity, device, dist_info, input_size, patch_size,
          norm, ignore_index, log):
    """Train one run into ``run_dir`` (locked, identity checked), then test its best
    checkpoint on the test split if that has masks."""
    classes = dataset.class_table
    if training_finished(run_dir, config["epochs"]) and config["auto_resume"] \
            and not config["resume"]:
        log(f">> {run_dir} already finished {config['epochs']} epochs: skipping training "
            "(delete the folder or change --version to train again)")
        return run_dir

    # --- data: checked before anything trains
    train_slices = find_split(dataset.split_dir("train"), need_masks=True)
    val_slices = find_split(dataset.split_dir("val"), need_masks=True)
    test_split = dataset.split_dir("test")  # tested after training if it has masks
    test_slices = (find_split(test_split, need_masks=True)
                   if (test_split / "semseg").is_dir() else [])
    check_split(train_slices + val_slices + test_slices, classes,
                workers=max(config["num_workers"], 2))
    train_set = SegmentationDataset(train_slices, classes, SegmentationTransform(
        input_size, train=True, aug_name=config["aug_name"], norm=norm, in_chans=fm.in_chans))
    train_set = training_views(train_set, config)  # --aug_name flip
    val_set = SegmentationDataset(val_slices, classes, SegmentationTransform(
        input_size, norm=norm, in_chans=fm.in_chans))
    global_batch = config["batch_size"] * dist_info.world_size
    steps_per_epoch = len(train_set) // global_batch
    if steps_per_epoch == 0:
        raise UserError(f"--batch_size {config['batch_size']}: the training split has only "
                        f"{len(train_set)} B-scans; use a smaller batch size")
    train_loader = make_loader(train_set, config, dist_info, train=True)
    val_loader = make_loader(val_set, config, dist_info, train=False)
    log(f">> {len(train_set)} training / {len(val_set)} validation B-scans, "
        f"{steps_per_epoch} steps per epoch of {global_batch}")

    # --- model
    model, report = build_model(config, fm, classes.num_classes, input_size, patch_size)
    log(f">> {fm.name}: {report}")
    model.to(device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f">> {trainable / 1e6:.2f} M trainable of "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters; decoder "
        f"{config['output_adapter']}; encoder blocks "
        f"{'frozen' if config['freeze_encoder'] else 'trained'}"
        f"{'; fully frozen backbone (no graph)' if config['freeze_patch_embed'] else ''}")
    apply_speed_options(model, config, device, log)
    criterion = build_loss(config["loss"], ignore_index)
    precision = Precision.from_config(device, config, log)
    feature_cache = open_feature_cache(config, fm, model, train_set, input_size, norm,
                                       precision, device, log)

    # --- optimisation
    groups = param_groups(model, config["weight_decay"], config["layer_decay"],
                          config["decoder_decay"],
                          [s for s in config["no_lr_scale_list"].split("-") if s])
    optimizer = make_optimizer(groups, config, device)  # fused Adam(W) on CUDA
    lr_schedule = cosine_schedule(config["lr"], config["min_lr"], config["epochs"],
                                  steps_per_epoch, config["warmup_epochs"],
                                  config["warmup_steps"], config["warmup_lr"])
    wd_end = config["weight_decay_end"]
    wd_schedule = cosine_schedule(config["weight_decay"],
                                  config["weight_decay"] if wd_end is None else wd_end,
                                  config["epochs"], steps_per_epoch)

    # --- resume an interrupted run (or the file given by --resume)
    state = TrainingState(start_epoch=config["start_epoch"])
    resume_from = resolve_resume(config, run_dir)
    if resume_from is not None:
        state = resume(resume_from, model, optimizer, precision.scaler,
                       checkpoint_meta(config, classes, model))
        log(f">> resumed from {resume_from}: continuing at epoch {state.start_epoch}")
        if dist_info.is_main:
            trim_log(run_dir / "log.txt", state.start_epoch)
    elif ckpt.epoch_checkpoints(run_dir):
        raise UserError(f"{run_dir} already holds checkpoints; use --auto_resume to "
                        "continue that run, or another --version to start a new one")
    if dist_info.is_main:
        write_identity(run_dir, identity)
        write_text(run_dir / "config.yaml", yaml_text(config))
    ddp_model = DistributedDataParallel(model) if dist_info.enabled else model

    # --- epochs
    log(f">> training for {config['epochs']} epochs on {device}")
    for epoch in range(state.start_epoch, config["epochs"]):
        started = time.time()
        if isinstance(train_loader.sampler, DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(
            ddp_model, train_loader, criterion, optimizer, precision, device, epoch,
            lr_schedule, wd_schedule, epoch * steps_per_epoch, config["clip_grad"],
            dist_info, config["epochs"], feature_cache=feature_cache)
        stats = {"epoch": epoch, **{f"train/{k}": v for k, v in train_stats.items()}}
        last = epoch == config["epochs"] - 1
        if epoch % config["eval_freq"] == 0 or last:
            image_dir = (run_dir / "images" if config["log_images"] and dist_info.is_main
                         and epoch % config["log_images_freq"] == 0 else None)
            val_stats = evaluate(model, val_loader, criterion, precision, device,
                                 classes.num_classes, ignore_index, dist_info,
                                 desc="val", image_dir=image_dir, epoch=epoch, classes=classes,
                                 select_metric=config["select_metric"])
            stats.update({f"val/{k}": v for k, v in val_stats.items()})
            state.metric = config["select_metric"]  # val/mIoU is its value; it picks the best
            if state.improves(val_stats["mIoU"]):
                state.best_miou, state.best_epoch = val_stats["mIoU"], epoch
                if config["save_ckpt"] and dist_info.is_main:
                    save_checkpoint(run_dir / ckpt.BEST, model, None, None, epoch, state,
                                    config, classes)
        if config["save_ckpt"] and dist_info.is_main and \
                ((epoch + 1) % config["save_ckpt_freq"] == 0 or last):
            save_checkpoint(run_dir / f"checkpoint-{epoch}.pth", model, optimizer,
                            precision.scaler, epoch, state, config, classes)
            ckpt.prune_epoch_checkpoints(run_dir, keep=config["keep_ckpts"])
        stats["time"] = round(time.time() - started, 2)
        if dist_info.is_main:
            append_log(run_dir / "log.txt", stats)
            write_tensorboard(run_dir)  # no-op unless tensorboard is installed
        log(epoch_line(stats, state, config["epochs"]))
    distributed.barrier(dist_info)

    # --- test with the best checkpoint
    if test_slices and (run_dir / ckpt.BEST).is_file():
        test_set = SegmentationDataset(test_slices, classes, SegmentationTransform(
            input_size, norm=norm, in_chans=fm.in_chans))
        score_best_checkpoint(model, test_set, run_dir, dataset.root, config, criterion,
                              precision, device, ignore_index, dist_info, log)
    distributed.shutdown()
    return run_dir


# ============================================================================ one epoch
FINITE_CHECK_STEPS = 50  # steps between the (host-syncing) loss checks and progress updates


def train_one_epoch(model, loader, criterion, optimizer, precision, device, epoch,
                    lr_schedule, wd_schedule, first_step, clip_grad, dist_info, epochs,
                    feature_cache=None):
    """One pass over the training loader with per-step LR/WD schedules.

    No step waits for the device: the loss is summed on it, and checked for NaN/Inf (a
    RuntimeError naming the first bad step) every ``FINITE_CHECK_STEPS`` steps and at the
    end. With ``feature_cache`` (fully-frozen protocol) the decoder reads cached tokens.
    Returns ``{"loss": mean over steps and processes, "lr": last peak LR}``.
    """
    model.train()
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    params = [p for p in model.parameters() if p.requires_grad]
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)  # (sum, count)
    first_bad = torch.full((), -1, dtype=torch.int64, device=device)  # first non-finite step
    shown = torch.zeros(2, dtype=torch.float64, device=device)  # loss_sum at the last check
    bar = tqdm(loader, desc=f"epoch {epoch}/{epochs - 1}", leave=False,
               disable=not dist_info.is_main, dynamic_ncols=True)
    for step, batch in enumerate(bar):
        apply_schedule(optimizer, lr_schedule[first_step + step],
                       wd_schedule[first_step + step])
        images = batch["image"].to(device, non_blocking=True)
        masks = batch["mask"].to(device, non_blocking=True).long()
        with precision.autocast():
            if feature_cache is None:
                logits = model(images)
            else:
                logits = model(features=feature_cache.features(inner, images, batch))
        loss = criterion(logits.float(), masks)
        optimizer.zero_grad(set_to_none=True)
        precision.backward(loss, optimizer, clip_grad, params)
        loss = loss.detach()
        first_bad.masked_fill_((first_bad < 0) & ~torch.isfinite(loss), step)
        loss_sum[0] += loss
        loss_sum[1] += 1.0
        if (step + 1) % FINITE_CHECK_STEPS == 0:
            _check_finite(first_bad, loss_sum, epoch, dist_info, precision)
            recent = loss_sum - shown
            shown = loss_sum.clone()
            bar.set_postfix(loss=f"{float(recent[0] / recent[1]):.4f}",
                            lr=f"{lr_schedule[first_step + step]:.2e}")
    _check_finite(first_bad, loss_sum, epoch, dist_info, precision)
    if feature_cache is not None and dist_info.is_main:
        feature_cache.end_epoch()
    distributed.all_reduce_sum(loss_sum, dist_info)
    max_lr = max(group["lr"] for group in optimizer.param_groups)
    return {"loss": float(loss_sum[0] / loss_sum[1]), "lr": max_lr}


def _check_finite(first_bad, loss_sum, epoch, dist_info, precision):
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


@torch.no_grad()
def evaluate(model, loader, criterion, precision, device, num_classes, ignore_index,
             dist_info, desc="val", image_dir=None, epoch=0, classes=None,
             select_metric="mIoU_all"):
    """Loss and the metrics of mirage.metrics.validation_scores over every pixel of a
    split (summed over processes): mIoU (= ``select_metric``), mIoU_all, mIoU_fg, aAcc,
    mAcc as fractions, IoU as {class label: IoU}.

    With ``image_dir``, saves input | truth | prediction panels of the first batch.
    """
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)
    for i, batch in enumerate(tqdm(loader, desc=desc, leave=False,
                                   disable=not dist_info.is_main, dynamic_ncols=True)):
        images = batch["image"].to(device, non_blocking=True)
        masks = batch["mask"].to(device, non_blocking=True).long()
        with precision.autocast():
            logits = model(images)
        loss = criterion(logits.float(), masks)
        loss_sum += torch.tensor([loss.item() * len(images), len(images)],
                                 dtype=torch.float64, device=device)
        pred = logits.argmax(dim=1)
        confusion += confusion_matrix(pred, masks, num_classes)
        if image_dir is not None and i == 0:
            save_panels(image_dir, batch, pred, loader.dataset, classes, f"{desc}_e{epoch}")
    distributed.all_reduce_sum(confusion, dist_info)
    distributed.all_reduce_sum(loss_sum, dist_info)
    table = classes if classes is not None else getattr(loader.dataset, "class_table", None)
    scores = validation_scores(confusion, ignore_index,
                               table.labels if table is not None else None, select_metric)
    return {"loss": float(loss_sum[0] / max(loss_sum[1], 1)), **scores}


@torch.no_grad()
def predict(model, loader, out_dir, classes, precision, device):
    """Write ``<out_dir>/<slice_id>.png`` for every B-scan of the loader's dataset.

    Logits are resized bilinearly to the B-scan's original size before the argmax; the
    PNG holds INFO.json values (uint8, or uint16 if a value exceeds 255).
    """
    model.eval()
    dataset = loader.dataset
    values = torch.from_numpy(classes.index_to_value().astype(np.int32)).to(device)
    dtype = classes.index_to_value().dtype
    for batch in tqdm(loader, desc=f"predicting -> {out_dir.name}/", dynamic_ncols=True):
        with precision.autocast():
            logits = model(batch["image"].to(device, non_blocking=True))
        for logit, index in zip(logits.float(), batch["index"].tolist()):
            files = dataset.slices[index]
            height, width = dataset.original_size(index)
            logit = F.interpolate(logit[None], size=(height, width), mode="bilinear",
                                  align_corners=False)[0]
            pred = values[logit.argmax(dim=0)].cpu().numpy().astype(dtype)
            write_png(out_dir / f"{files.slice_id}.png", pred)


# ============================================================================ test / infer
def test_or_infer(config, fm, dataset, run_dir, device, dist_info, input_size, patch_size,
                  norm, ignore_index, log):
    """``--test``: metrics of the best checkpoint on the test split; with ``--infer_only``:
    write its predictions. ``--test_data_path`` points both at another dataset."""
    best = run_dir / ckpt.BEST
    if not best.is_file():
        raise UserError(f"no trained checkpoint: {best} not found; train this run first "
                        "(the same command without --test/--infer_only)")
    classes = dataset.class_table
    target = open_dataset(config["test_data_path"]) if config["test_data_path"] else dataset
    split_dir = target.split_dir("test")
    external = target.root.resolve() != dataset.root.resolve()
    # Masks of another dataset are scored only if they use the training classes.
    same_classes = (target.class_table.values == classes.values
                    and target.class_table.labels == classes.labels)
    score = not config["infer_only"] and (not external or same_classes)
    if not config["infer_only"] and not score:
        raise UserError(f"--test_data_path {target.root}: its INFO.json classes differ from "
                        f"{dataset.name}'s; use --infer_only --test and score the "
                        f"predictions with run_seg_eval.py --external {target.name}")
    slices = find_split(split_dir, need_masks=score)
    if not score:  # predictions only: never read (or require) masks
        slices = [dataclasses.replace(s, mask=None) for s in slices]
    sizes = check_split(slices, classes if score else target.class_table,
                        workers=max(config["num_workers"], 2))
    out_dir = run_dir / (f"preds_{target.name}" if external else "preds")
    slice_ids = [s.slice_id for s in slices]
    if config["infer_only"] and predictions.up_to_date(out_dir, best, slice_ids):
        log(f">> {out_dir} already holds the predictions of {best.name}: skipping")
        return run_dir

    model, report = build_model(config, fm, classes.num_classes, input_size, patch_size)
    log(f">> {fm.name}: {report}")
    model.to(device)
    apply_speed_options(model, config, device, log)
    precision = Precision.from_config(device, config, log)
    test_set = SegmentationDataset(slices, classes, SegmentationTransform(
        input_size, norm=norm, in_chans=fm.in_chans), original_sizes=sizes)
    if config["infer_only"]:
        if dist_info.is_main:
            epoch = load_model_weights(model, best, checkpoint_meta(config, classes, model))
            log(f">> {best.name} (epoch {epoch}) on {len(test_set)} B-scans of {split_dir}")
            # Written aside and swapped in whole: a killed inference never leaves a mix.
            with atomic_folder(out_dir) as staging:
                predict(model, make_loader(test_set, config, distributed.DistInfo(),
                                           train=False), staging, classes, precision, device)
                predictions.write_manifest(staging, best, epoch, classes, slice_ids)
            write_text(run_dir / f"config_infer_{target.name}.yaml", yaml_text(config))
            log(f">> wrote {len(test_set)} predictions to {out_dir}")
    else:
        score_best_checkpoint(model, test_set, run_dir, target.root, config,
                              build_loss(config["loss"], ignore_index), precision, device,
                              ignore_index, dist_info, log)
        if dist_info.is_main:
            write_text(run_dir / f"config_test_{target.name}.yaml", yaml_text(config))
    distributed.barrier(dist_info)
    distributed.shutdown()
    return run_dir


def score_best_checkpoint(model, test_set, run_dir, data_root, config, criterion, precision,
                          device, ignore_index, dist_info, log):
    """Load ``checkpoint-best.pth`` from disk, score ``test_set`` and log the test line
    (replacing an earlier line of the same checkpoint and data)."""
    epoch = load_model_weights(model, run_dir / ckpt.BEST,
                               checkpoint_meta(config, test_set.class_table, model))
    num_classes = test_set.class_table.num_classes
    stats = evaluate(model, make_loader(test_set, config, dist_info, train=False), criterion,
                     precision, device, num_classes, ignore_index, dist_info, desc="test")
    if dist_info.is_main:
        entry = {"test_epoch": epoch, "test_data": str(data_root),
                 **{f"test/{k}": v for k, v in stats.items()}}
        earlier = [e for e in read_log(run_dir / "log.txt")
                   if not (e.get("test_epoch") == epoch and e.get("test_data") == str(data_root))]
        write_text(run_dir / "log.txt", "".join(json.dumps(e) + "\n" for e in earlier + [entry]))
    log(f">> test of the best checkpoint (epoch {epoch}) on {len(test_set)} B-scans of "
        f"{data_root}: mIoU {100 * stats['mIoU']:.2f}  aAcc {100 * stats['aAcc']:.2f}  "
        f"mAcc {100 * stats['mAcc']:.2f}  loss {stats['loss']:.4f}")
    return stats


# ============================================================================ helpers
def build_model(config, fm, num_classes, input_size, patch_size):
    """Backbone (pretrained, blocks frozen if asked) + decoder; returns (model, report)."""
    backbone, fm, report = build_backbone(
        config["weights"], input_size, patch_size, config["num_global_tokens"],
        config["drop_path_encoder"], config["learnable_pos_emb"], fm=fm)
    decoder = build_decoder(config["output_adapter"], embed_dim=backbone.embed_dim,
                            num_classes=num_classes, grid_size=backbone.grid_size,
                            patch_size=backbone.patch_size, image_size=input_size,
                            encoder_depth=backbone.depth,
                            interpolate_mode=config["decoder_interpolate_mode"])
    bad = next((name for name, tensor in backbone.state_dict().items()
                if tensor.is_floating_point() and not torch.isfinite(tensor).all()), None)
    if bad is not None:
        raise UserError(f"--weights {config['weights']}: tensor {bad} holds NaN or Inf "
                        "values; the file is damaged, download it again")
    model = SegmentationModel(backbone, decoder)
    model.family = fm.name
    if config["freeze_encoder"]:
        model.freeze_blocks()
    if config["freeze_patch_embed"]:  # the fully-frozen protocol
        model.freeze_backbone()
    return model, report


def make_loader(dataset, config, dist_info, train):
    """Training: shuffled (seeded per epoch), drop_last. Evaluation: each process a shard."""
    if train:
        sampler = DistributedSampler(dataset, num_replicas=dist_info.world_size,
                                     rank=dist_info.rank, shuffle=True, seed=config["seed"],
                                     drop_last=True)
    else:
        sampler = distributed.ShardSampler(len(dataset), dist_info)
    workers = config["num_workers"]
    # Workers stay alive between epochs (no restart and re-import per epoch) and keep
    # PREFETCH_BATCHES batches each ready; pinned memory makes the .to(device,
    # non_blocking=True) copies asynchronous.
    extra = {"prefetch_factor": PREFETCH_BATCHES, "persistent_workers": True} \
        if workers > 0 else {}
    return DataLoader(dataset, batch_size=config["batch_size"], sampler=sampler,
                      num_workers=workers, drop_last=train,
                      pin_memory=config["pin_mem"] and torch.cuda.is_available(), **extra)


PREFETCH_BATCHES = 4


class Precision:
    """Autocast + gradient scaling on CUDA: float16 with a gradient scaler, or bfloat16
    (float32's range, so no scaler); float32 on the CPU and with ``--no_fp16``.

    ``fp16``: mixed precision on; ``amp_dtype``: 'fp16' or 'bf16'; ``bf16``: the old
    switch for bfloat16 (wins, as it always did).
    """

    def __init__(self, device, fp16, bf16, log, amp_dtype="fp16"):
        cuda = device.type == "cuda"
        wanted = torch.bfloat16 if bf16 or amp_dtype == "bf16" else torch.float16
        self.dtype = wanted if cuda and (fp16 or bf16) else None
        if self.dtype == torch.bfloat16 and not _bf16_supported(device):
            raise UserError(f"--amp_dtype bf16: {torch.cuda.get_device_name(device)} has no "
                            "bfloat16 support; use --amp_dtype fp16")
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)
        if not cuda and (fp16 or bf16):
            log(">> note: mixed precision is CUDA-only; running in float32 on the CPU")

    @classmethod
    def from_config(cls, device, config, log):
        return cls(device, config["fp16"], config["bf16"], log, config["amp_dtype"])

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss, optimizer, clip_grad, params):
        self.scaler.scale(loss).backward()
        if clip_grad is not None:
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, clip_grad)
        self.scaler.step(optimizer)
        self.scaler.update()


def _bf16_supported(device):
    try:  # emulated bfloat16 (pre-Ampere) would be slower than float16
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # older PyTorch: no emulation argument
        return torch.cuda.is_bf16_supported()


class TrainingState:
    """Where training stands: the next epoch and the best value so far of the selecting
    validation metric (``metric``, a fraction)."""

    def __init__(self, start_epoch=0, best_miou=None, best_epoch=None, metric="mIoU_all"):
        self.start_epoch = start_epoch
        self.best_miou = best_miou
        self.best_epoch = best_epoch
        self.metric = metric

    def improves(self, miou):
        """True if ``miou`` beats the best so far as the original compares: both x100
        rounded to 2 decimals, strictly greater (a tie keeps the earlier epoch). The first
        evaluation always counts, so every run gets a checkpoint-best.pth; NaN never
        improves."""
        if self.best_miou is None:
            return True
        if math.isnan(miou):
            return False
        return math.isnan(self.best_miou) or selection_key(miou) > selection_key(self.best_miou)


def trained_state_dict(model):
    """The tensors training changes: trainable parameters and the decoder's buffers.

    The frozen backbone is left out: loading rebuilds it from the pretrained weights file,
    whose SHA-256 the checkpoint records (``checkpoint_meta``).
    """
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return {name: tensor for name, tensor in model.state_dict().items()
            if name in trainable or name.startswith("decoder.")}


def checkpoint_meta(config, classes, model):
    """What a checkpoint was trained with; every load compares it with the current run."""
    weights = Path(config["weights"])
    return {
        "classes": [[int(v), str(label)] for v, label in zip(classes.values, classes.labels)],
        "input_size": list(model.decoder.image_size),
        "patch_size": list(model.backbone.patch_size),
        "decoder": config["output_adapter"],
        "family": getattr(model, "family", None),
        "weights": {"path": str(weights), "size": weights.stat().st_size,
                    "sha256": file_sha256(weights)},
    }


def check_checkpoint_meta(path, stored, expected):
    """UserError naming both values when a checkpoint does not fit the current options."""
    names = {"classes": "class table (value, label)", "input_size": "--input_size",
             "patch_size": "--patch_size", "decoder": "--output_adapter",
             "family": "model family"}
    for key, what in names.items():
        if stored.get(key) is not None and stored[key] != expected[key]:
            raise UserError(f"checkpoint {path} was trained with {what} {stored[key]}, this "
                            f"run has {expected[key]}; use the options it was trained with")
    old, new = stored.get("weights") or {}, expected["weights"]
    if old.get("sha256") and old["sha256"] != new["sha256"]:
        raise UserError(f"checkpoint {path} was trained on the weights file {old.get('path')} "
                        f"(SHA-256 {old['sha256'][:12]}...), but --weights {new['path']} has "
                        f"SHA-256 {new['sha256'][:12]}...; pass the file it was trained on")


def _legacy_meta(payload):
    """What a checkpoint of the first version (full model, no 'meta') says about itself."""
    config = payload.get("config") or {}
    meta = {"decoder": config.get("output_adapter")}
    if "class_values" in payload and "class_labels" in payload:
        meta["classes"] = [[int(v), str(label)] for v, label in
                           zip(payload["class_values"], payload["class_labels"])]
    with contextlib.suppress(Exception):  # an odd stored size only skips this comparison
        meta["input_size"] = list(per_domain(config["input_size"], ["bscan"])["bscan"])
    return meta


def save_checkpoint(path, model, optimizer, scaler, epoch, state, config, classes):
    """What training changed (slim), plus what is needed to resume (optimizer and scaler)
    and to check a later load; written atomically."""
    payload = {
        "format": "slim-v2",
        "model": trained_state_dict(model),
        "meta": checkpoint_meta(config, classes, model),
        "epoch": epoch,
        "best_miou": state.best_miou,
        "best_epoch": state.best_epoch,
        "config": dict(config),
        "class_values": list(classes.values),
        "class_labels": list(classes.labels),
    }
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
        payload["scaler"] = scaler.state_dict()
    ckpt.save(path, payload)


def load_model_weights(model, path, expected, payload=None):
    """Load a checkpoint of this tool (or its already-read ``payload``) into ``model``
    after comparing what it was trained with against ``expected`` (``checkpoint_meta``);
    returns its epoch.

    Slim checkpoints must hold exactly the model's trained tensors (the backbone comes from
    the weights file); full checkpoints of the first version must fit the whole model.
    """
    payload = ckpt.load_file(path, what="checkpoint") if payload is None else payload
    state_dict = payload.get("model")
    if not isinstance(state_dict, dict):
        raise UserError(f"checkpoint {path}: no 'model' weights in it")
    slim = payload.get("format") == "slim-v2"
    check_checkpoint_meta(path, payload["meta"] if slim else _legacy_meta(payload), expected)
    model_state = model.state_dict()
    wanted = set(trained_state_dict(model)) if slim else set(model_state)
    missing = sorted(wanted - set(state_dict))
    unexpected = sorted(set(state_dict) - set(model_state))
    if missing or unexpected:
        name, what = (missing[0], "missing") if missing else (unexpected[0], "unexpected")
        raise UserError(f"checkpoint {path} does not fit the model ({name} {what}); was it "
                        "trained with other options (decoder, model, --learnable_pos_emb, "
                        "--freeze_encoder)?")
    for name, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(model_state[name].shape):
            raise UserError(f"checkpoint {path} does not fit the model: {name} has shape "
                            f"{tuple(tensor.shape)} there, {tuple(model_state[name].shape)} "
                            "here; use the options it was trained with")
    model.load_state_dict(state_dict, strict=False)
    return payload.get("epoch")


def resume(path, model, optimizer, scaler, expected):
    """Restore model, optimiser, scaler and position from a checkpoint of this tool."""
    payload = ckpt.load_file(path, what="--resume")
    epoch = load_model_weights(model, path, expected, payload)
    if "optimizer" not in payload or epoch is None:
        raise UserError(f"--resume {path}: not a training checkpoint (no optimizer state); "
                        "use a checkpoint-<epoch>.pth file")
    try:
        optimizer.load_state_dict(payload["optimizer"])
    except (ValueError, KeyError) as err:
        raise UserError(f"--resume {path}: its optimizer state does not fit this run "
                        f"({err})") from None
    scaler.load_state_dict(payload.get("scaler") or {})
    return TrainingState(epoch + 1, payload.get("best_miou"), payload.get("best_epoch"))


def resolve_resume(config, run_dir):
    if config["resume"]:
        return Path(config["resume"])
    if config["auto_resume"]:
        return ckpt.latest_checkpoint(run_dir)
    return None


def training_finished(run_dir, epochs):
    """True when the run's log records its last epoch."""
    return any(entry.get("epoch") == epochs - 1 for entry in read_log(run_dir / "log.txt"))


def read_log(path):
    if not Path(path).is_file():
        return []
    entries = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            entries.append(json.loads(line))
    return entries


def append_log(path, entry):
    """Add one JSON line to log.txt (rewritten atomically, so a kill never truncates it)."""
    lines = [json.dumps(e) for e in read_log(path)] + [json.dumps(entry)]
    write_text(path, "\n".join(lines) + "\n")


def trim_log(path, start_epoch):
    """Drop log entries of epochs a resumed run will redo."""
    kept = [e for e in read_log(path) if e.get("epoch", -1) < start_epoch
            and "test_epoch" not in e]
    if Path(path).is_file():
        write_text(path, "".join(json.dumps(e) + "\n" for e in kept))


def epoch_line(stats, state, epochs):
    """One console line per epoch; validation metrics in %, "best <metric>" names the
    metric that selects checkpoint-best.pth."""
    parts = [f"epoch {stats['epoch']}/{epochs - 1}",  # from 0, as log.txt and checkpoints
             f"train_loss {stats['train/loss']:.4f}", f"lr {stats['train/lr']:.2e}"]
    if "val/mIoU" in stats:
        parts.append(f"val_loss {stats['val/loss']:.4f}")
        parts += [f"{name} {100 * stats[f'val/{name}']:.2f}%"
                  for name in ("mIoU_all", "mIoU_fg", "aAcc", "mAcc") if f"val/{name}" in stats]
    if state.best_miou is not None:
        parts.append(f"best {state.metric} {100 * state.best_miou:.2f}% "
                     f"(epoch {state.best_epoch})")
    parts.append(f"{stats['time']:.1f}s")
    return "  ".join(parts)


def save_panels(image_dir, batch, pred, dataset, classes, tag, limit=4):
    """input | truth | prediction as one grey PNG per B-scan (masks shown by value)."""
    values = classes.index_to_value().astype(np.float32)
    scale = 255.0 / max(float(values.max()), 1.0)
    for k in range(min(limit, len(pred))):
        image = batch["image"][k, 0].numpy()
        span = float(image.max() - image.min()) or 1.0
        image = (image - image.min()) / span * 255.0
        truth = values[batch["mask"][k].numpy()] * scale
        guess = values[pred[k].cpu().numpy()] * scale
        panel = np.concatenate([image, truth, guess], axis=1).round().astype(np.uint8)
        slice_id = dataset.slices[int(batch["index"][k])].slice_id
        write_png(Path(image_dir) / f"{tag}_{slice_id}.png", panel)


def run_lock_on_main(run_dir, dist_info):
    """The run directory's lock, held by the one process that writes (rank 0)."""
    return run_lock(run_dir) if dist_info.is_main else contextlib.nullcontext()


def resolve_ignore_index(ignore_index, classes):
    """``None`` -> the background class (or None); ``-1`` -> None; else checked."""
    if ignore_index is None:
        return classes.background_index()
    if ignore_index == -1:
        return None
    if not 0 <= ignore_index < classes.num_classes:
        raise UserError(f"--ignore_index {ignore_index}: must be -1 or a class index in "
                        f"0..{classes.num_classes - 1} ({classes.source})")
    return ignore_index


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
