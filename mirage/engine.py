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
from mirage.config import check_config, domains_of, per_domain, yaml_text
from mirage.data import SegmentationDataset, check_split, find_split, open_dataset
from mirage.errors import UserError
from mirage.fileio import write_png, write_text
from mirage.losses import build_loss
from mirage.metrics import confusion_matrix, scores_from_confusion
from mirage.model import SegmentationModel
from mirage.optim import apply_schedule, build_optimizer, cosine_schedule, param_groups
from mirage.output_adapters import build_decoder
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
    fm = find_model(config["weights"])
    dataset = open_dataset(config["data_path"], config["mapping_fn"])
    classes = dataset.class_table
    ignore_index = resolve_ignore_index(config["ignore_index"], classes)
    domain = domains_of(config)[0]
    input_size = per_domain(config["input_size"], [domain])[domain]
    patch_size = (per_domain(config["patch_size"], [domain])[domain]
                  if config["patch_size"] is not None else None)  # None: the model's own
    norm = "minmax" if config["minmax"] else fm.norm
    run_dir = run_directory(config, dataset.name)
    log(f">> run directory: {run_dir}")
    log(f">> classes: {dict(zip(classes.labels, classes.values))}; ignore index: "
        f"{ignore_index}")

    if config["test"]:
        return test_or_infer(config, fm, dataset, run_dir, device, dist_info, input_size,
                             patch_size, norm, ignore_index, log)
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
        f"{'frozen' if config['freeze_encoder'] else 'trained'}")
    criterion = build_loss(config["loss"], ignore_index)
    precision = Precision(device, config["fp16"], config["bf16"], log)

    # --- optimisation
    groups = param_groups(model, config["weight_decay"], config["layer_decay"],
                          config["decoder_decay"],
                          [s for s in config["no_lr_scale_list"].split("-") if s])
    optimizer = build_optimizer(groups, config["opt"], config["lr"], config["opt_eps"],
                                config["opt_betas"], config["momentum"])
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
        state = resume(resume_from, model, optimizer, precision.scaler)
        log(f">> resumed from {resume_from}: continuing at epoch {state.start_epoch}")
        if dist_info.is_main:
            trim_log(run_dir / "log.txt", state.start_epoch)
    elif ckpt.epoch_checkpoints(run_dir):
        raise UserError(f"{run_dir} already holds checkpoints; use --auto_resume to "
                        "continue that run, or another --version to start a new one")
    if dist_info.is_main:
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
            dist_info, config["epochs"])
        stats = {"epoch": epoch, **{f"train/{k}": v for k, v in train_stats.items()}}
        last = epoch == config["epochs"] - 1
        if epoch % config["eval_freq"] == 0 or last:
            image_dir = (run_dir / "images" if config["log_images"] and dist_info.is_main
                         and epoch % config["log_images_freq"] == 0 else None)
            val_stats = evaluate(model, val_loader, criterion, precision, device,
                                 classes.num_classes, ignore_index, dist_info,
                                 desc="val", image_dir=image_dir, epoch=epoch, classes=classes)
            stats.update({f"val/{k}": v for k, v in val_stats.items()})
            if state.improves(val_stats["mIoU"]):
                state.best_miou, state.best_epoch = val_stats["mIoU"], epoch
                if config["save_ckpt"] and dist_info.is_main:
                    save_checkpoint(run_dir / ckpt.BEST, model, None, None, epoch, state,
                                    config, classes)
        if config["save_ckpt"] and dist_info.is_main and \
                ((epoch + 1) % config["save_ckpt_freq"] == 0 or last):
            save_checkpoint(run_dir / f"checkpoint-{epoch}.pth", model, optimizer,
                            precision.scaler, epoch, state, config, classes)
        stats["time"] = round(time.time() - started, 2)
        if dist_info.is_main:
            append_log(run_dir / "log.txt", stats)
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
def train_one_epoch(model, loader, criterion, optimizer, precision, device, epoch,
                    lr_schedule, wd_schedule, first_step, clip_grad, dist_info, epochs):
    """One pass over the training loader with per-step LR/WD schedules.

    Returns ``{"loss": mean over steps and processes, "lr": last peak LR}``.
    """
    model.train()
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)  # (sum, count)
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False,
               disable=not dist_info.is_main, dynamic_ncols=True)
    for step, batch in enumerate(bar):
        apply_schedule(optimizer, lr_schedule[first_step + step],
                       wd_schedule[first_step + step])
        images = batch["image"].to(device, non_blocking=True)
        masks = batch["mask"].to(device, non_blocking=True).long()
        with precision.autocast():
            logits = model(images)
        loss = criterion(logits.float(), masks)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"loss is {loss.item()} at epoch {epoch}, step {step}; try a "
                               "lower --lr or --no_fp16")
        optimizer.zero_grad(set_to_none=True)
        precision.backward(loss, optimizer, clip_grad,
                           [p for p in model.parameters() if p.requires_grad])
        loss_sum += torch.tensor([loss.item(), 1.0], dtype=torch.float64, device=device)
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr_schedule[first_step + step]:.2e}")
    distributed.all_reduce_sum(loss_sum, dist_info)
    max_lr = max(group["lr"] for group in optimizer.param_groups)
    return {"loss": float(loss_sum[0] / loss_sum[1]), "lr": max_lr}


@torch.no_grad()
def evaluate(model, loader, criterion, precision, device, num_classes, ignore_index,
             dist_info, desc="val", image_dir=None, epoch=0, classes=None):
    """Loss and mIoU / aAcc / mAcc over every pixel of a split (summed over processes).

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
    scores = scores_from_confusion(confusion, ignore_index)
    return {"loss": float(loss_sum[0] / max(loss_sum[1], 1)), "mIoU": scores["mIoU"],
            "aAcc": scores["aAcc"], "mAcc": scores["mAcc"]}


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
    if config["infer_only"] and predictions_up_to_date(out_dir, slices, best):
        log(f">> {out_dir} already holds the predictions of {best.name}: skipping")
        return run_dir

    model, report = build_model(config, fm, classes.num_classes, input_size, patch_size)
    log(f">> {fm.name}: {report}")
    model.to(device)
    precision = Precision(device, config["fp16"], config["bf16"], log)
    test_set = SegmentationDataset(slices, classes, SegmentationTransform(
        input_size, norm=norm, in_chans=fm.in_chans), original_sizes=sizes)
    if config["infer_only"]:
        if dist_info.is_main:
            epoch = load_model_weights(model, best)
            log(f">> {best.name} (epoch {epoch}) on {len(test_set)} B-scans of {split_dir}")
            predict(model, make_loader(test_set, config, distributed.DistInfo(), train=False),
                    out_dir, classes, precision, device)
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
    """Load ``checkpoint-best.pth`` from disk, score ``test_set`` and log the test line."""
    epoch = load_model_weights(model, run_dir / ckpt.BEST)
    num_classes = test_set.class_table.num_classes
    stats = evaluate(model, make_loader(test_set, config, dist_info, train=False), criterion,
                     precision, device, num_classes, ignore_index, dist_info, desc="test")
    if dist_info.is_main:
        append_log(run_dir / "log.txt", {"test_epoch": epoch, "test_data": str(data_root),
                                         **{f"test/{k}": v for k, v in stats.items()}})
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
    model = SegmentationModel(backbone, decoder)
    if config["freeze_encoder"]:
        model.freeze_blocks()
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
    return DataLoader(dataset, batch_size=config["batch_size"], sampler=sampler,
                      num_workers=workers, drop_last=train,
                      pin_memory=config["pin_mem"] and torch.cuda.is_available(),
                      persistent_workers=train and workers > 0)


class Precision:
    """Autocast + gradient scaling: fp16 with a scaler or bf16 on CUDA, fp32 on CPU."""

    def __init__(self, device, fp16, bf16, log):
        cuda = device.type == "cuda"
        self.dtype = (torch.bfloat16 if bf16 else torch.float16) if cuda and (fp16 or bf16) \
            else None
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)
        if not cuda and (fp16 or bf16):
            log(">> note: mixed precision is CUDA-only; running in float32 on the CPU")

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


class TrainingState:
    """Where training stands: the next epoch and the best validation mIoU so far."""

    def __init__(self, start_epoch=0, best_miou=None, best_epoch=None):
        self.start_epoch = start_epoch
        self.best_miou = best_miou
        self.best_epoch = best_epoch

    def improves(self, miou):
        if self.best_miou is None:
            return True
        return not math.isnan(miou) and (math.isnan(self.best_miou) or miou > self.best_miou)


def save_checkpoint(path, model, optimizer, scaler, epoch, state, config, classes):
    """Everything needed to resume (optimizer and scaler) or to predict, atomically."""
    payload = {
        "model": model.state_dict(),
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


def load_model_weights(model, path, payload=None):
    """Load a checkpoint of this tool (or its already-read ``payload``) into ``model``,
    strictly; returns its epoch."""
    payload = ckpt.load_file(path, what="checkpoint") if payload is None else payload
    state_dict = payload.get("model")
    if not isinstance(state_dict, dict):
        raise UserError(f"checkpoint {path}: no 'model' weights in it")
    result = model.load_state_dict(state_dict, strict=False)
    problems = list(result.missing_keys) + list(result.unexpected_keys)
    if problems:
        raise UserError(f"checkpoint {path} does not fit the model ({problems[0]} "
                        f"{'missing' if result.missing_keys else 'unexpected'}); was it "
                        "trained with other options (decoder, model, classes)?")
    return payload.get("epoch")


def resume(path, model, optimizer, scaler):
    """Restore model, optimiser, scaler and position from a checkpoint of this tool."""
    payload = ckpt.load_file(path, what="--resume")
    epoch = load_model_weights(model, path, payload)
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


def predictions_up_to_date(out_dir, slices, best):
    """Every prediction exists and is newer than the checkpoint that made it."""
    if not out_dir.is_dir():
        return False
    newest_ckpt = best.stat().st_mtime
    paths = [out_dir / f"{s.slice_id}.png" for s in slices]
    return all(p.is_file() and p.stat().st_mtime >= newest_ckpt for p in paths)


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
    parts = [f"epoch {stats['epoch'] + 1}/{epochs}",
             f"train_loss {stats['train/loss']:.4f}", f"lr {stats['train/lr']:.2e}"]
    if "val/mIoU" in stats:
        parts += [f"val_loss {stats['val/loss']:.4f}", f"mIoU {100 * stats['val/mIoU']:.2f}",
                  f"aAcc {100 * stats['val/aAcc']:.2f}", f"mAcc {100 * stats['val/mAcc']:.2f}"]
    if state.best_miou is not None:
        parts.append(f"best {100 * state.best_miou:.2f} (epoch {state.best_epoch + 1})")
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


def run_directory(config, dataset_name):
    """``<base_output_dir>/<version>/<dataset>/<weights stem>[_frozen]_<decoder>_<loss>[_minmax]``."""
    name = Path(config["weights"]).stem
    name += "_frozen" if config["freeze_encoder"] else ""
    name += f"_{config['output_adapter']}_{config['loss']}"
    name += "_minmax" if config["minmax"] else ""
    return Path(config["base_output_dir"]) / config["version"] / dataset_name / name


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
