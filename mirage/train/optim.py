"""Optimiser parameter groups (layer-wise LR decay, no-decay sets) and cosine schedules.

Layer ids: 0 for the input adapter and global tokens, i + 1 for encoder block i, L + 1 for
the decoder. A parameter at layer id ``n`` learns at ``lr * layer_decay ** (L + 1 - n)``.
"""
import math

import numpy as np
import torch

from mirage.errors import UserError


def param_groups(model, weight_decay, layer_decay=1.0, decoder_decay=None,
                 no_lr_scale=()):
    """Group the trainable parameters of a SegmentationModel for the optimiser.

    Each group carries ``lr_scale`` (multiplies the scheduled LR) and ``wd_scale``
    (multiplies the scheduled weight decay; 0 for biases, 1-D tensors, position
    embeddings and global tokens; ``decoder_decay`` for decoder weights).
    """
    num_layers = model.backbone.depth
    skip = model.no_weight_decay()
    patterns = [p for p in no_lr_scale if p]
    unused = set(patterns)
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = model.layer_id(name)
        if param.ndim <= 1 or name.endswith(".bias") or name in skip:
            wd_scale = 0.0
        elif name.startswith("decoder.") and decoder_decay is not None:
            wd_scale = decoder_decay
        else:
            wd_scale = 1.0
        lr_scale = layer_decay ** (num_layers + 1 - layer)
        hits = [pattern for pattern in patterns if pattern in name]
        if hits:
            lr_scale = 1.0
            unused.difference_update(hits)
        key = (layer, wd_scale, lr_scale)
        group = groups.setdefault(key, {"params": [], "names": [], "layer_id": layer,
                                        "lr_scale": lr_scale, "wd_scale": wd_scale,
                                        "weight_decay": weight_decay * wd_scale})
        group["params"].append(param)
        group["names"].append(name)
    if unused:
        example = next((n for g in groups.values() for n in g["names"]), "decoder.head.weight")
        raise UserError(f"--no_lr_scale_list: {sorted(unused)[0]!r} is in no trainable "
                        f"parameter's name; give parts of names such as {example!r}")
    return list(groups.values())


def build_optimizer(groups, optim):
    """The OptimSpec's ``--opt``: adamw | adam | sgd (Nesterov momentum) | momentum (plain
    momentum)."""
    if optim.name == "adamw":
        return torch.optim.AdamW(groups, lr=optim.lr, eps=optim.eps, betas=tuple(optim.betas))
    if optim.name == "adam":
        return torch.optim.Adam(groups, lr=optim.lr, eps=optim.eps, betas=tuple(optim.betas))
    if optim.name in ("sgd", "momentum"):
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum,
                               nesterov=optim.name == "sgd")
    raise ValueError(f"unknown optimiser {optim.name!r}")


def warmup_steps(optim, steps_per_epoch):
    """The warmup's length in steps: ``--warmup_steps`` if > 0, else ``--warmup_epochs``
    epochs."""
    return optim.warmup_steps if optim.warmup_steps > 0 else \
        optim.warmup_epochs * steps_per_epoch


def cosine_schedule(base, final, total, warmup=0, warmup_start=0.0):
    """Per-step values as the original (MAE/BEiT/MultiMAE ``cosine_scheduler``) computes
    them; a float64 array of ``total`` steps.

    Warmup: W = ``warmup`` steps (at most the total), W values ``np.linspace(warmup_start,
    base, W)``, both ends included: step 0 is ``warmup_start`` (the original: always 0),
    step W - 1 is ``base``. Then the T remaining steps t = 0..T-1 follow
    ``final + 0.5 (base - final) (1 + cos(pi t / T))``, so step W is ``base`` again.
    """
    warmup = min(warmup, total)
    ramp = np.linspace(warmup_start, base, warmup) if warmup else np.empty(0)
    decay_steps = total - warmup
    # math.cos per step, as the original: np.cos may differ in the last bit.
    decay = np.array([final + 0.5 * (base - final) * (1 + math.cos(math.pi * t / decay_steps))
                      for t in range(decay_steps)], dtype=np.float64)
    return np.concatenate([ramp, decay])


def apply_schedule(optimizer, lr, weight_decay):
    """Set every group's LR and weight decay for the current step."""
    lr, weight_decay = float(lr), float(weight_decay)  # no numpy scalars in checkpoints
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
        group["weight_decay"] = weight_decay * group["wd_scale"]
