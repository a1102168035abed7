"""The other foundation-model encoders (RETFound, DINOv2, VisionFM, SAM/MedSAM) behind the
interface of :class:`mirage.models.segmentation_model.MirageEncoder`, and the loaders of
their published files.

Both wrappers turn images (B, 3, H, W), normalised the model's way, into tokens
(B, N + G, D): the N = gh * gw patch tokens in row-major order first, then the G global
tokens (class token, then register tokens) -- timm puts those first, we move them last so
that every decoder can take ``tokens[:, :N]``.

Loading (``load_vit_weights`` / ``load_sam_weights``) accepts a file exactly as published:
it unwraps ``'teacher'`` / ``'model'``, strips ``module.`` / ``backbone.`` / ``model.``,
sets aside what the family does not use (and reports it), resamples the position
embedding by the family's own rule (``POS_EMBED_RULES``; SAM's relative-position tables
linearly, as SAM does) and the patch projection to the tuning geometry, then loads
strictly: a missing, unknown or mis-shaped encoder tensor is a UserError naming its key.
"""
import operator
from collections import Counter
from functools import partial
from math import isqrt

import timm
import torch
import torch.nn.functional as F
from timm.layers import GluMlp, resample_patch_embed
from timm.models.vision_transformer_sam import \
    checkpoint_filter_fn as sam_checkpoint_filter_fn
from torch import nn

from mirage.errors import UserError
from mirage.models.input_adapters import POS_EMBED_RULES, resample_pos_embed

WRAPPERS = ("teacher", "model")              # DINO/iBOT teacher first, then torch.save dicts
PREFIXES = ("module.", "backbone.", "model.")  # DDP, DINO/iBOT backbone, Hugging Face copies


def check_layer_indices(indices, depth):
    """The block indices a ``forward_layers`` call asked for, as a list of ints; UserError
    unless they are strictly ascending integers in [0, depth - 1]."""
    try:
        indices = [operator.index(i) for i in indices]
    except TypeError:
        indices = list(indices)
        raise UserError(f"layer indices {indices}: block indices must be integers "
                        f"from 0 to {depth - 1}") from None
    if indices and 0 <= indices[0] and indices[-1] < depth \
            and all(a < b for a, b in zip(indices, indices[1:])):
        return indices
    raise UserError(f"layer indices {indices}: this encoder has {depth} blocks; give "
                    f"strictly ascending block indices from 0 to {depth - 1}")


def fused_attention_layers(module):
    """``(fused, total)``: the attention layers under ``module`` (timm's, which carry a
    ``fused_attn`` switch: MIRAGE, ViT, DINOv2, SAM windowed and global) and how many of
    them run F.scaled_dot_product_attention. timm turns it on wherever PyTorch has it
    unless TIMM_FUSED_ATTN=0 is set; SAM's relative positions go in as its attention mask."""
    layers = [m for m in module.modules() if hasattr(m, "fused_attn")]
    return sum(bool(m.fused_attn) for m in layers), len(layers)


def _check_input(x, in_chans, image_size):
    if x.shape[1] != in_chans or tuple(x.shape[-2:]) != tuple(image_size):
        raise ValueError(f"expected images of shape (B, {in_chans}, {image_size[0]}, "
                         f"{image_size[1]}), got {tuple(x.shape)}; build the model with this "
                         "input_size")


# ============================================================================ encoders
class TimmViTEncoder(nn.Module):
    """A timm ``VisionTransformer``: (B, C, H, W) -> (B, N + G, D), patch tokens first.

    G = 1 class token (+ 4 registers for DINOv2 ``_reg``). The final norm (``vit.norm``)
    is applied to every returned block output, because the published models (MAE, DINOv2,
    iBOT) normalise the tokens they hand on as features; DINOv2's own segmentation and
    depth heads take normalised intermediate blocks the same way. A model fine-tuned with
    global pooling (``fc_norm`` only) never normalised its tokens: its ``vit.norm`` is an
    Identity (see ``load_vit_weights``).
    """

    def __init__(self, vit, learnable_pos_emb=False):
        super().__init__()
        self.vit = vit
        vit.pos_embed.requires_grad_(learnable_pos_emb)

    @property
    def in_chans(self):
        return self.vit.patch_embed.proj.in_channels

    @property
    def embed_dim(self):
        return self.vit.embed_dim

    @property
    def grid_size(self):
        return tuple(self.vit.patch_embed.grid_size)

    @property
    def patch_size(self):
        return tuple(self.vit.patch_embed.patch_size)

    @property
    def num_global_tokens(self):
        return self.vit.num_prefix_tokens

    @property
    def depth(self):
        return len(self.vit.blocks)

    def forward_layers(self, x, indices):
        """Normalised tokens (B, N + G, D) after each block in ``indices`` (0-based,
        ascending)."""
        indices = check_layer_indices(indices, self.depth)
        _check_input(x, self.in_chans, self.vit.patch_embed.img_size)
        outputs = self.vit.forward_intermediates(
            x, indices=indices, return_prefix_tokens=True, norm=True, stop_early=True,
            output_fmt="NLC", intermediates_only=True)
        if self.num_global_tokens:  # timm returns (patch tokens, prefix tokens) pairs
            return [torch.cat([patches, prefix], dim=1) for patches, prefix in outputs]
        return outputs

    def forward(self, x):
        """(B, C, H, W) -> (B, N + G, D): patch tokens (row-major), then global tokens."""
        return self.forward_layers(x, [self.depth - 1])[0]

    def layer_id(self, name):
        """0 for embeddings and tokens, i + 1 for block i; the final norm counts as the last
        block (it is frozen with the blocks, see ``block_parameters``)."""
        if name.startswith("vit.blocks."):
            return int(name.split(".")[2]) + 1
        if name.startswith("vit.norm."):
            return self.depth
        return 0

    def no_weight_decay(self):
        names = {"vit.pos_embed", "vit.cls_token", "vit.reg_token"}
        return {n for n, _ in self.named_parameters() if n in names}

    def block_parameters(self):
        """The transformer blocks and the final norm (the published feature extractor)."""
        return [*self.vit.blocks.parameters(), *self.vit.norm.parameters()]


class SamEncoder(nn.Module):
    """SAM's image encoder (timm ``VisionTransformerSAM``) without its neck:
    (B, 3, H, W) -> (B, N, D) block outputs, G = 0.

    The blocks work on NHWC maps (B, gh, gw, D) with windowed attention (global attention
    in a few blocks); each output is flattened to row-major tokens. The neck (convs to 256
    channels + LayerNorm2d) is dropped: it changes the width and only feeds SAM's mask
    decoder, so the features here are the raw block outputs (no final norm).
    """

    def __init__(self, sam, learnable_pos_emb=False):
        super().__init__()
        sam.prune_intermediate_layers(prune_norm=True, prune_head=True)  # neck + head off
        self.sam = sam
        sam.pos_embed.requires_grad_(learnable_pos_emb)

    @property
    def in_chans(self):
        return self.sam.patch_embed.proj.in_channels

    @property
    def embed_dim(self):
        return self.sam.embed_dim

    @property
    def grid_size(self):
        return tuple(self.sam.patch_embed.grid_size)

    @property
    def patch_size(self):
        return tuple(self.sam.patch_embed.patch_size)

    @property
    def num_global_tokens(self):
        return 0

    @property
    def depth(self):
        return len(self.sam.blocks)

    def forward_layers(self, x, indices):
        """Tokens (B, N, D) after each block in ``indices`` (0-based, ascending)."""
        indices = check_layer_indices(indices, self.depth)
        _check_input(x, self.in_chans, self.sam.patch_embed.img_size)
        maps = self.sam.forward_intermediates(x, indices=indices, norm=False,
                                              stop_early=True, intermediates_only=True)
        return [m.flatten(2).transpose(1, 2) for m in maps]  # (B, D, gh, gw) -> (B, N, D)

    def forward(self, x):
        return self.forward_layers(x, [self.depth - 1])[0]

    def layer_id(self, name):
        """0 for the patch embedding and position embedding, i + 1 for block i."""
        if name.startswith("sam.blocks."):
            return int(name.split(".")[2]) + 1
        return 0

    def no_weight_decay(self):
        return {"sam.pos_embed"}

    def block_parameters(self):
        """The blocks' parameters, relative position tables included."""
        return self.sam.blocks.parameters()


def build_vit_encoder(timm_name, input_size, patch_size, drop_path_rate=0.0,
                      learnable_pos_emb=False, **timm_kwargs):
    """A randomly initialised timm ViT for fixed ``input_size`` = (h, w)."""
    vit = timm.create_model(timm_name, pretrained=False, img_size=tuple(input_size),
                            patch_size=tuple(patch_size), num_classes=0, global_pool="",
                            dynamic_img_size=False, drop_path_rate=drop_path_rate,
                            **timm_kwargs)
    return TimmViTEncoder(vit, learnable_pos_emb)


def build_sam_encoder(timm_name, input_size, patch_size, drop_path_rate=0.0,
                      learnable_pos_emb=False, **timm_kwargs):
    """A randomly initialised SAM image encoder for fixed ``input_size`` = (h, w)."""
    # SAM's own encoder uses LayerNorm eps 1e-6; timm's samvit default is 1e-5.
    timm_kwargs = {"norm_layer": partial(nn.LayerNorm, eps=1e-6), **timm_kwargs}
    sam = timm.create_model(timm_name, pretrained=False, img_size=tuple(input_size),
                            patch_size=tuple(patch_size), num_classes=0,
                            drop_path_rate=drop_path_rate, **timm_kwargs)
    return SamEncoder(sam, learnable_pos_emb)


# ============================================================================ checkpoints
def unwrap_checkpoint(checkpoint):
    """The published weights: ``(state, prefix, outside)``.

    ``state``: tensors under 'teacher' or 'model' (else the top level) with the
    ``module.`` / ``backbone.`` / ``model.`` prefixes removed; ``prefix``: what was removed
    (for messages); ``outside``: keys left out (prefix removed so far), i.e. not under the
    next prefix (DINO/iBOT heads) or not tensors.
    """
    state = checkpoint
    for wrapper in WRAPPERS:
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    outside = [k for k, v in state.items() if not torch.is_tensor(v)]
    state = {k: v for k, v in state.items() if torch.is_tensor(v)}
    removed, changed = "", True
    while changed:  # prefixes can be stacked: module.backbone.blocks...
        changed = False
        for prefix in PREFIXES:
            if any(k.startswith(prefix) for k in state):
                outside += [k for k in state if not k.startswith(prefix)]
                state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
                removed, changed = removed + prefix, True
    return state, removed, outside


def split_off(state, prefixes):
    """``(kept, set_aside_keys)``: keys starting with any of ``prefixes`` are set aside."""
    kept = {k: v for k, v in state.items() if not k.startswith(tuple(prefixes))}
    return kept, [k for k in state if k not in kept]


def from_dinov2_layout(state):
    """DINOv2 names -> timm names (tensors of the encoder only).

    With registers, timm adds the position embedding to the patch tokens only, so the
    class token's position embedding (``pos_embed[:, 0]``, which DINOv2 adds to the class
    token) is folded into ``cls_token``. SwiGLU (ViT-g): ``mlp.w12`` / ``mlp.w3`` are
    timm's packed ``mlp.fc1`` / ``mlp.fc2``.
    """
    state = dict(state)
    if "register_tokens" in state and "pos_embed" in state and "cls_token" in state:
        pos = state.pop("pos_embed")
        state["cls_token"] = state["cls_token"] + pos[:, :1]
        state["pos_embed"] = pos[:, 1:]
        state["reg_token"] = state.pop("register_tokens")
    return {k.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2."): v
            for k, v in state.items()}


def to_dinov2_name(name, swiglu):
    """The DINOv2 checkpoint name of timm parameter ``name`` (for messages)."""
    if name == "reg_token":
        return "register_tokens"
    if swiglu:
        return name.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.")
    return name


def _fit_patch_embed(state, target, notes):
    """Resample the patch projection when the tuning patch size differs."""
    weight = state.get("patch_embed.proj.weight")
    if weight is not None and weight.ndim == 4 and weight.shape[:2] == target.shape[:2] \
            and weight.shape[-2:] != target.shape[-2:]:
        state["patch_embed.proj.weight"] = resample_patch_embed(weight,
                                                                list(target.shape[-2:]))
        notes.append(f"patch projection resampled {_size(weight.shape[-2:])} -> "
                     f"{_size(target.shape[-2:])}")


def _rule_note(rule):
    return f"({POS_EMBED_RULES[rule]})"


def fit_vit_geometry(state, vit, rule="bicubic"):
    """Resample ``pos_embed`` (and the patch projection) to ``vit``'s grid; returns notes.

    ``rule`` is the family's own resampling (a key of
    :data:`mirage.models.input_adapters.POS_EMBED_RULES`); the position embeddings of the class
    token (when it has one) are kept. Resampling once at load time for the fixed tuning
    size gives what the authors' code computes at run time at that size. The stored grid
    is square (every published model was pretrained on square images). (timm's
    ``checkpoint_filter_fn`` is not used: it infers the stored grid from the token count
    and leaves a square 16x16 embedding as it is for an 8x32 tuning grid.)
    """
    notes = []
    pos, target = state.get("pos_embed"), vit.pos_embed
    prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    grid = tuple(vit.patch_embed.grid_size)
    if pos is not None and pos.ndim == 3 and pos.shape[-1] == target.shape[-1] \
            and pos.shape[1] > prefix:
        side = isqrt(pos.shape[1] - prefix)
        if side * side == pos.shape[1] - prefix and (side, side) != grid:
            patches = pos[:, prefix:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
            patches = resample_pos_embed(patches, grid, rule)
            state["pos_embed"] = torch.cat([pos[:, :prefix],
                                            patches.flatten(2).transpose(1, 2)], dim=1)
            notes.append(f"position embedding resampled {side}x{side} -> {_size(grid)} "
                         + _rule_note(rule))
    _fit_patch_embed(state, vit.patch_embed.proj.weight, notes)
    return notes


def resample_rel_pos(table, length):
    """A (L, C) relative-position table resampled linearly (``align_corners=False``) to
    (length, C): SAM's own ``get_rel_pos`` rule when the attention grid differs from the
    one it was trained on."""
    resized = F.interpolate(table.float().T[None], size=length, mode="linear")
    return resized[0].T.to(table.dtype)


def fit_sam_geometry(state, sam, rule="bicubic_antialias"):
    """Resample SAM's NHWC ``pos_embed`` by ``rule`` and the global-attention
    relative-position tables (SAM's linear rule) to ``sam``'s grid; returns notes."""
    notes, expected = [], sam.state_dict()
    pos, target = state.get("pos_embed"), expected["pos_embed"]
    if pos is not None and pos.ndim == 4 and pos.shape[-1] == target.shape[-1] \
            and pos.shape[1:3] != target.shape[1:3]:
        nchw = resample_pos_embed(pos.permute(0, 3, 1, 2), tuple(target.shape[1:3]), rule)
        state["pos_embed"] = nchw.permute(0, 2, 3, 1)
        notes.append(f"position embedding resampled {_size(pos.shape[1:3])} -> "
                     f"{_size(target.shape[1:3])} " + _rule_note(rule))
    resampled = 0
    for name, table in list(state.items()):
        want = expected.get(name)
        if name.endswith(("attn.rel_pos_h", "attn.rel_pos_w")) and want is not None \
                and table.ndim == 2 and table.shape[1] == want.shape[1] \
                and table.shape[0] != want.shape[0]:
            state[name] = resample_rel_pos(table, want.shape[0])
            resampled += 1
    if resampled:
        notes.append(f"{resampled} relative-position tables resampled (linear, as SAM)")
    _fit_patch_embed(state, expected["patch_embed.proj.weight"], notes)
    return notes


def load_strict(module, tensors, source, model_name, key_of):
    """Load ``tensors`` (named as ``module.state_dict()``) into ``module``; returns the count.

    UserError naming the checkpoint key (``key_of(name)``) for an unknown, missing or
    mis-shaped tensor: the encoder is never left partly at random initialisation.
    """
    expected = module.state_dict()
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise UserError(f"{source}: tensor {key_of(extra[0])} does not exist in "
                        f"{model_name}; does the file name match the model?")
    for name, target in expected.items():
        if name not in tensors:
            raise UserError(f"{source}: encoder tensor {key_of(name)} is missing; is this a "
                            f"{model_name} checkpoint?")
        if tuple(tensors[name].shape) != tuple(target.shape):
            raise UserError(f"{source}: tensor {key_of(name)} has shape "
                            f"{tuple(tensors[name].shape)} but {model_name} needs "
                            f"{tuple(target.shape)}; does the file name match the model?")
    module.load_state_dict({n: tensors[n].to(t.dtype) for n, t in expected.items()},
                           strict=True)
    return len(expected)


def load_report(count, source, ignored, notes, num_global_tokens, model_name):
    """The one-line summary of a load."""
    # Group by top-level module; SAM's neck sits inside image_encoder, so name it fully.
    groups = Counter(".".join(k.split(".")[:2]) if k.startswith("image_encoder.")
                     else k.split(".")[0] for k in ignored)
    summary = ", ".join(f"{g} ({n})" for g, n in sorted(groups.items()))
    parts = [f"loaded {count} encoder tensors from {source}",
             f"ignored {len(ignored)} not used by the encoder" + (f": {summary}" if summary
                                                                  else "")]
    parts += notes
    parts.append(f"global tokens: {num_global_tokens}, fixed by {model_name} "
                 "(--num_global_tokens does not apply)")
    return "; ".join(parts)


def load_vit_weights(encoder, checkpoint, source, model_name, drop=(), dinov2=False,
                     rule="bicubic"):
    """Load a RETFound / DINOv2 / VisionFM file into a :class:`TimmViTEncoder`.

    ``drop``: key prefixes (after unwrapping) that are not part of the encoder, e.g. MAE's
    ``decoder_*``; ``dinov2``: the file uses DINOv2 names (:func:`from_dinov2_layout`);
    ``rule``: the family's position-embedding resampling (:func:`fit_vit_geometry`).
    """
    state, prefix, ignored = unwrap_checkpoint(checkpoint)
    if "norm.weight" not in state and "fc_norm.weight" in state:
        # Fine-tuned with global pooling: fc_norm normalised the pooled vector, never the
        # tokens, so the tokens go out un-normalised.
        encoder.vit.norm = nn.Identity()
    state, dropped = split_off(state, tuple(drop) + ("fc_norm.",))
    ignored += dropped
    if dinov2:
        state = from_dinov2_layout(state)
    notes = fit_vit_geometry(state, encoder.vit, rule)
    if isinstance(encoder.vit.norm, nn.Identity):
        notes.append("no final norm (the file has fc_norm only: pooled features)")
    swiglu = isinstance(encoder.vit.blocks[0].mlp, GluMlp)  # timm's SwiGLUPacked

    def key_of(name):
        return prefix + (to_dinov2_name(name, swiglu) if dinov2 else name)

    count = load_strict(encoder.vit, state, source, model_name, key_of)
    return load_report(count, source, ignored, notes, encoder.num_global_tokens, model_name)


def load_sam_weights(encoder, checkpoint, source, model_name, rule="bicubic_antialias"):
    """Load a SAM / MedSAM file into a :class:`SamEncoder`: ``image_encoder.*`` without
    ``neck.*``; ``prompt_encoder.*`` and ``mask_decoder.*`` are ignored."""
    state, prefix, ignored = unwrap_checkpoint(checkpoint)
    wanted = {k: v for k, v in state.items()
              if k.startswith("image_encoder.") and not k.startswith("image_encoder.neck.")}
    ignored += [k for k in state if k not in wanted]
    tensors = sam_checkpoint_filter_fn(wanted, encoder.sam)  # strips image_encoder., lin->fc
    notes = fit_sam_geometry(tensors, encoder.sam, rule)

    def key_of(name):
        return f"{prefix}image_encoder.{name.replace('.mlp.fc', '.mlp.lin')}"

    count = load_strict(encoder.sam, tensors, source, model_name, key_of)
    return load_report(count, source, ignored, notes, 0, model_name)


def _size(hw):
    return f"{hw[0]}x{hw[1]}"
