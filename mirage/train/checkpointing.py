"""Training checkpoints: what they hold, how they are saved, and every check on loading one.

A checkpoint of this tool is slim: the tensors training changed (the frozen backbone is
rebuilt from the weights file, whose SHA-256 it records), the optimiser and scaler state
to resume (with every random generator's state and the epoch's log line, so that a resume
is exact), and ``meta``: what it was trained with. Every load compares ``meta`` with the
current run and refuses a mismatch naming both values. Checkpoints of the first version
(the full model, no ``meta``) still load.
"""
import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, NamedTuple, Optional

import torch

from mirage import checkpoint_io
from mirage.config import per_domain
from mirage.data.classes import ClassTable
from mirage.errors import UserError
from mirage.fileio import file_sha256
from mirage.models.lora import merge_lora
from mirage.train.validation_metrics import selection_key


@dataclass
class TrainingState:
    """Where training stands: the next epoch and the best value so far of the selecting
    validation metric (``metric``, a fraction). A resumed state also holds what its
    checkpoint saved for an exact continuation: ``random_state`` (every process's random
    generators, mirage.train.runtime.random_state) and ``log_entry`` (its epoch's line of
    log.txt); both None for checkpoints that predate them."""

    start_epoch: int = 0
    best_miou: Optional[float] = None
    best_epoch: Optional[int] = None
    metric: str = "mIoU_all"
    random_state: Optional[list] = None
    log_entry: Optional[dict] = None

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


@dataclass(frozen=True)
class CheckpointRecord:
    """What every checkpoint of a run holds besides its epoch: the model (its trained
    tensors are saved), the options (the run's config.yaml, a copy for the record), the
    class table, and ``meta`` (:func:`checkpoint_meta`: what every load compares)."""

    model: torch.nn.Module
    options: Mapping
    classes: ClassTable
    meta: dict


@dataclass(frozen=True)
class ResumePoint:
    """What an epoch checkpoint adds for resuming: the optimiser and gradient scaler, and
    for an exact resume every process's random generators and the epoch's log line."""

    optimizer: torch.optim.Optimizer
    scaler: object
    random_state: Optional[list] = None
    log_entry: Optional[dict] = None


class FoundCheckpoint(NamedTuple):
    """A checkpoint to resume from: its path, its payload (already read) and how it was
    named ('--resume' or 'checkpoint', for messages)."""

    path: Path
    payload: dict
    what: str


def trained_state_dict(model):
    """The tensors training changes: trainable parameters and the decoder's buffers.

    The frozen backbone is left out: loading rebuilds it from the pretrained weights file,
    whose SHA-256 the checkpoint records (``checkpoint_meta``).
    """
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return {name: tensor for name, tensor in model.state_dict().items()
            if name in trainable or name.startswith("decoder.")}


def checkpoint_meta(spec, classes, model):
    """What a checkpoint was trained with (``spec``: the RunSpec; ``classes``: the class
    table it trains); every load compares it with the current run."""
    weights, lora = spec.model.weights, spec.protocol.lora
    return {
        "classes": classes.entries(),
        "input_size": list(model.decoder.image_size),
        "patch_size": list(model.backbone.patch_size),
        "decoder": spec.model.decoder,
        # options that change the forward pass without changing a tensor's shape
        "norm": spec.model.norm,
        "interpolate_mode": spec.model.interpolate_mode,
        "tuning": spec.protocol.name,
        "lora": lora.options() if lora is not None else None,
        "family": getattr(model, "family", None),
        "weights": {"path": str(weights), "size": weights.stat().st_size,
                    "sha256": file_sha256(weights)},
    }


def check_checkpoint_meta(path, stored, expected):
    """UserError naming both values when a checkpoint does not fit the current options."""
    names = {"classes": "class table (value, label)", "input_size": "--input_size",
             "patch_size": "--patch_size", "decoder": "--output_adapter",
             "norm": "input normalisation (--minmax or the model's own)",
             "interpolate_mode": "--decoder_interpolate_mode",
             "tuning": "--tuning", "lora": "LoRA options", "family": "model family"}
    for key, what in names.items():
        # (checkpoints of earlier versions lack the newer entries: not compared)
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


def save_checkpoint(path, record, epoch, state, resume_point=None):
    """What training changed (slim), the run's record (``record``: a CheckpointRecord) and
    where training stands; an epoch checkpoint adds its ``resume_point`` (a ResumePoint).
    Written atomically."""
    classes = record.classes
    payload = {
        "format": "slim-v2",
        "model": trained_state_dict(record.model),
        "meta": record.meta,
        "epoch": epoch,
        "best_miou": state.best_miou,
        "best_epoch": state.best_epoch,
        "config": dict(record.options),
        "class_values": list(classes.values),
        "class_labels": list(classes.labels),
    }
    if resume_point is not None:
        payload["optimizer"] = resume_point.optimizer.state_dict()
        payload["scaler"] = resume_point.scaler.state_dict()
        if resume_point.random_state is not None:
            payload["random_state"] = resume_point.random_state
        if resume_point.log_entry is not None:
            payload["log_entry"] = dict(resume_point.log_entry)
    checkpoint_io.save(path, payload)


def load_model_weights(model, path, expected, payload=None):
    """Load a checkpoint of this tool (or its already-read ``payload``) into ``model``
    after comparing what it was trained with against ``expected`` (``checkpoint_meta``);
    returns its epoch.

    Slim checkpoints must hold exactly the model's trained tensors (the backbone comes from
    the weights file); full checkpoints of the first version must fit the whole model.
    """
    payload = checkpoint_io.load_file(path, what="checkpoint") if payload is None else payload
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
                        "--tuning, --lora_*)?")
    for name, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(model_state[name].shape):
            raise UserError(f"checkpoint {path} does not fit the model: {name} has shape "
                            f"{tuple(tensor.shape)} there, {tuple(model_state[name].shape)} "
                            "here; use the options it was trained with")
    model.load_state_dict(state_dict, strict=False)
    return payload.get("epoch")


def load_for_inference(model, path, expected, payload=None):
    """:func:`load_model_weights`, then LoRA adapters (if any) folded into their frozen
    weights: testing, predicting and the predictor all run the merged model, so a test
    score and the predictions written come from the same arithmetic. Returns the epoch."""
    epoch = load_model_weights(model, path, expected, payload)
    merge_lora(model)
    return epoch


def resume(found, model, optimizer, scaler, expected):
    """Restore model, optimiser, scaler and position from a checkpoint of this tool
    (``found``: a FoundCheckpoint); the TrainingState carries its saved random state and
    log line (restored by the caller, mirage.train.loop)."""
    path, payload, what = found
    epoch = load_model_weights(model, path, expected, payload)
    if "optimizer" not in payload or epoch is None:
        raise UserError(f"{what} {path}: not a training checkpoint (no optimizer state); "
                        "use a checkpoint-<epoch>.pth file")
    try:
        optimizer.load_state_dict(payload["optimizer"])
    except (ValueError, KeyError) as err:
        raise UserError(f"{what} {path}: its optimizer state does not fit this run "
                        f"({err})") from None
    scaler.load_state_dict(payload.get("scaler") or {})
    return TrainingState(epoch + 1, payload.get("best_miou"), payload.get("best_epoch"),
                         random_state=payload.get("random_state"),
                         log_entry=payload.get("log_entry"))


def find_resume_checkpoint(loop, folder, log):
    """The FoundCheckpoint to resume from, or None; ``loop``: the run's LoopSpec,
    ``folder``: its RunFolder.

    ``--resume PATH`` is read as given. Auto-resume reads the run's newest
    ``checkpoint-<epoch>.pth``; if that file is damaged (a truncated copy, a disk that
    failed), it falls back to the newest intact one with a notice, and raises a UserError
    naming the damaged file when there is none.
    """
    if loop.resume:
        path = Path(loop.resume)
        return FoundCheckpoint(path, checkpoint_io.load_file(path, what="--resume"),
                               "--resume")
    if not loop.auto_resume:
        return None
    found = folder.epoch_checkpoints()
    damaged = []
    for epoch in sorted(found, reverse=True):
        try:
            payload = checkpoint_io.load_file(found[epoch], what="checkpoint")
        except UserError as err:
            damaged.append((found[epoch], str(err)))
            continue
        if damaged:
            log(f">> note: {_names(damaged)} {'is' if len(damaged) == 1 else 'are'} "
                "damaged (truncated or unreadable); resuming from the previous intact "
                f"{found[epoch].name} instead (the epochs after it are trained again)")
        return FoundCheckpoint(found[epoch], payload, "checkpoint")
    if not damaged:
        return None
    newest, reason = damaged[0]
    detail = reason.split(f"{newest}: ", 1)[-1]
    raise UserError(f"checkpoint {newest} is damaged (truncated or unreadable: {detail}) "
                    "and no earlier intact checkpoint-<epoch>.pth is left to resume from; "
                    f"delete {_names(damaged)} to train the run again from its first epoch")


def _names(damaged):
    return ", ".join(path.name for path, _ in damaged)
