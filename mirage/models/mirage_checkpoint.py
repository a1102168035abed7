"""The published MIRAGE checkpoint layout and how it is read into a MirageEncoder.

A MIRAGE file is a dict {checkpoint key: tensor}, under ``'model'`` (``torch.save``, next to
``args``, ``epoch``, ...) or at the top level (safetensors), every key optionally prefixed
with ``model.`` or ``module.``. Keys under ``input_adapters.bscan.``, ``encoder.`` and
``global_tokens`` are the encoder's (:data:`KEY_MAP`); the rest (SLO and layer-map adapters,
pretraining decoders) is set aside and reported. Which MIRAGE size a file must hold is the
registry's job (``fm_seg_config.MirageFamily``).
"""
from collections import Counter

import torch
from timm.layers import resample_patch_embed

from mirage.errors import UserError
from mirage.models.input_adapters import resample_pos_embed

# checkpoint key prefix -> parameter prefix in MirageEncoder
KEY_MAP = (("input_adapters.bscan.", "input_adapter."), ("encoder.", "blocks."),
           ("global_tokens", "global_tokens"))


def unwrap_state_dict(checkpoint):
    """{checkpoint key: tensor} of a loaded MIRAGE file, without the 'model' wrapper or a
    'model.' / 'module.' prefix shared by every key; {} if 'model' is not a dict."""
    state = checkpoint.get("model", checkpoint)
    if not isinstance(state, dict):
        return {}
    for prefix in ("model.", "module."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def to_checkpoint_key(name):
    """The checkpoint key of MirageEncoder parameter ``name`` (``blocks.0.norm1.weight`` ->
    ``encoder.0.norm1.weight``); other names unchanged."""
    for ckpt_prefix, param_prefix in KEY_MAP:
        if name.startswith(param_prefix):
            return ckpt_prefix + name[len(param_prefix):]
    return name


def from_checkpoint_key(key):
    """The MirageEncoder parameter name of checkpoint ``key``, or None for a key that is not
    the encoder's (e.g. ``output_adapters.bscan.*``)."""
    for ckpt_prefix, param_prefix in KEY_MAP:
        if key.startswith(ckpt_prefix):
            return param_prefix + key[len(ckpt_prefix):]
    return None


def split_checkpoint(checkpoint):
    """``(mapped, ignored)`` of a loaded MIRAGE file: {MirageEncoder parameter name: tensor}
    of the encoder's tensors, and [checkpoint key] of everything else."""
    mapped, ignored = {}, []
    for key, tensor in unwrap_state_dict(checkpoint).items():
        name = from_checkpoint_key(key)
        if name is None or not torch.is_tensor(tensor):
            ignored.append(key)
        else:
            mapped[name] = tensor
    return mapped, ignored


def _fit(name, tensor, shape, rule):
    """Resample the position embedding (MIRAGE's rule: bicubic to the new size,
    ``align_corners=False``) / patch projection to the tuning geometry."""
    if name == "input_adapter.pos_emb" and tensor.ndim == 4 \
            and tensor.shape[:2] == shape[:2]:
        return resample_pos_embed(tensor, shape[-2:], rule)
    if name == "input_adapter.proj.weight" and tensor.ndim == 4 \
            and tensor.shape[:2] == shape[:2] and tensor.shape[-2:] != shape[-2:]:
        return resample_patch_embed(tensor, list(shape[-2:]))
    return tensor


def load_mirage_weights(backbone, mapped, ignored, source, name, depth, embed_dim, rule):
    """Load ``mapped`` (from :func:`split_checkpoint`) strictly into ``backbone``, the
    position embedding and patch projection resampled by ``rule``; return the one-line load
    report. A tensor the encoder lacks, misses or cannot fit is a UserError naming its
    checkpoint key and the model (``name``, ``depth`` blocks, width ``embed_dim``)."""
    expected = backbone.state_dict()
    extra = sorted(set(mapped) - set(expected))
    if extra:
        raise UserError(f"{source}: tensor {to_checkpoint_key(extra[0])} does not "
                        f"exist in {name} ({depth} blocks, width "
                        f"{embed_dim}); does the file name match the model?")
    loaded = {}
    for param, target in expected.items():
        key = to_checkpoint_key(param)
        if param not in mapped:
            raise UserError(f"{source}: encoder tensor {key} is missing; is this a "
                            f"{name} checkpoint?")
        tensor = _fit(param, mapped[param], target.shape, rule)
        if tuple(tensor.shape) != tuple(target.shape):
            # Only another number of tokens of the right width is fixed by the option.
            hint = (" (set --num_global_tokens to match)" if param == "global_tokens"
                    and tensor.shape[-1] == target.shape[-1] else "")
            raise UserError(f"{source}: tensor {key} has shape {tuple(mapped[param].shape)}"
                            f" but {name} needs {tuple(target.shape)}{hint}")
        loaded[param] = tensor.to(target.dtype)
    backbone.load_state_dict(loaded, strict=True)
    groups = Counter(".".join(k.split(".")[:2]) for k in ignored)
    summary = ", ".join(f"{g} ({n})" for g, n in sorted(groups.items()))
    return (f"loaded {len(loaded)} encoder tensors from {source}; ignored "
            f"{len(ignored)} not used for B-scan segmentation"
            + (f": {summary}" if summary else ""))
