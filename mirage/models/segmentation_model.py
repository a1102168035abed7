"""The MIRAGE encoder and the segmentation model built on top of it.

MIRAGE encoder (a MultiMAE-style ViT, B-scan input only)::

    B-scan (B, 1, H, W)
      -> input adapter: conv patchifier/projector + fixed sin-cos position embedding
      -> tokens (B, N, D), N = (H/32)*(W/32) patch tokens in row-major order
      -> append G learnable global tokens                       (B, N + G, D)
      -> L pre-norm transformer blocks (timm Block, fused attention)
      -> no final norm                                          (B, N + G, D)

Base: D = 768, L = 12, 12 heads. Large: D = 1024, L = 24, 16 heads.

Segmentation model: encoder -> the outputs of the blocks the decoder asks for, global
tokens dropped -> decoder -> logits (B, K, H, W).
"""
import contextlib
from collections import Counter
from functools import partial

import torch
import torch.utils.checkpoint
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from mirage.models.backbones import check_layer_indices
from mirage.models.input_adapters import PatchedInputAdapter


class MirageEncoder(nn.Module):
    """Images (B, C, H, W) normalised to [0, 1] -> tokens (B, N + G, D).

    Parameter names follow the checkpoint once ``input_adapters.bscan.`` is read as
    ``input_adapter.`` and ``encoder.`` as ``blocks.``.
    """

    def __init__(self, image_size=(1024, 1024), patch_size=(32, 32), in_chans=1,
                 embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, num_global_tokens=1,
                 drop_path_rate=0.0, learnable_pos_emb=False):
        super().__init__()
        self.input_adapter = PatchedInputAdapter(image_size, patch_size, embed_dim,
                                                 in_chans, learnable_pos_emb)
        self.global_tokens = nn.Parameter(torch.zeros(1, num_global_tokens, embed_dim))
        trunc_normal_(self.global_tokens, std=0.02)
        drop_rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=rate,
                  norm_layer=partial(nn.LayerNorm, eps=1e-6))
            for rate in drop_rates
        )
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.grad_checkpointing = False  # --grad_checkpointing: see set_grad_checkpointing

    # The attributes other modules (decoders, load_backbone users) rely on.
    @property
    def in_chans(self):
        return self.input_adapter.in_chans

    @property
    def grid_size(self):
        return self.input_adapter.grid_size

    @property
    def patch_size(self):
        return self.input_adapter.patch_size

    @property
    def num_global_tokens(self):
        return self.global_tokens.shape[1]

    @property
    def depth(self):
        return len(self.blocks)

    def forward_layers(self, x, indices):
        """Tokens (B, N + G, D) after each block in ``indices`` (0-based, ascending)."""
        indices = check_layer_indices(indices, self.depth)
        tokens = self.input_adapter(x)
        globals_ = self.global_tokens.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([tokens, globals_], dim=1)
        wanted, outputs = set(indices), []
        # Recomputing a block in the backward pass only pays when a graph runs through it.
        recompute = self.grad_checkpointing and tokens.requires_grad
        for i, block in enumerate(self.blocks[:max(indices) + 1]):
            if recompute:  # the RNG state is replayed: stochastic depth drops the same rows
                tokens = torch.utils.checkpoint.checkpoint(block, tokens, use_reentrant=False)
            else:
                tokens = block(tokens)
            if i in wanted:
                outputs.append(tokens)
        return outputs

    def forward(self, x):
        """(B, C, H, W) -> (B, N + G, D): patch tokens (row-major), then global tokens."""
        return self.forward_layers(x, [self.depth - 1])[0]

    def set_grad_checkpointing(self, enable=True):
        """Store only each block's input; recompute its activations in the backward pass."""
        self.grad_checkpointing = enable

    # Used to build optimiser parameter groups.
    def layer_id(self, name):
        """0 for the input adapter and global tokens, i + 1 for block i."""
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return 0

    def no_weight_decay(self):
        return {"input_adapter.pos_emb", "global_tokens"}

    def block_parameters(self):
        """The transformer blocks' parameters (what --freeze_encoder freezes)."""
        return self.blocks.parameters()


def width_and_depth(tensors):
    """(embedding width, number of blocks) of the tensors of a MirageEncoder (named as
    its parameters), e.g. to tell a checkpoint of another model size. The width is the one
    most of the tensors that carry it agree on (None if none does): one damaged tensor
    does not decide it."""
    widths = Counter()
    for name, tensor in tensors.items():
        if name.endswith(("norm1.weight", "norm2.weight")) and tensor.ndim == 1:
            widths[tensor.shape[0]] += 1
        elif name == "input_adapter.proj.weight" and tensor.ndim == 4:
            widths[tensor.shape[0]] += 1
        elif name == "global_tokens" and tensor.ndim == 3:
            widths[tensor.shape[-1]] += 1
    depth = len({name.split(".")[1] for name in tensors if name.startswith("blocks.")})
    return (widths.most_common(1)[0][0] if widths else None), depth


class SegmentationModel(nn.Module):
    """Backbone + decoder: images (B, C, H, W) -> class logits (B, K, H, W)."""

    def __init__(self, backbone, decoder):
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder
        self.backbone_frozen = False  # fully-frozen protocol (freeze_backbone)
        # --compile: compiled stand-ins for "features" and "decoder" (compile_parts). A
        # plain dict, so that they are not registered as submodules (state_dict unchanged).
        self._compiled = {}

    def forward(self, images=None, features=None):
        """Images (B, C, H, W) -> logits (B, K, H, W); or, with ``features`` (what
        :meth:`features` returns, e.g. from a feature cache), the decoder alone."""
        if features is None:
            features = self.features(images)
        return self._compiled.get("decoder", self.decoder)(features)

    def features(self, images):
        """The decoder's inputs: one (B, N, D) patch-token tensor per entry of
        ``decoder.layer_indices``. Under the fully-frozen protocol no graph is recorded."""
        compute = self._compiled.get("features", self.backbone_features)
        with torch.no_grad() if self.backbone_frozen else contextlib.nullcontext():
            return compute(images)

    def backbone_features(self, images):
        """:meth:`features` without the protocol's no-graph context (what gets compiled)."""
        wanted = sorted(set(self.decoder.layer_indices))
        by_index = dict(zip(wanted, self.backbone.forward_layers(images, wanted)))
        num_patches = self.backbone.grid_size[0] * self.backbone.grid_size[1]
        return [by_index[i][:, :num_patches] for i in self.decoder.layer_indices]

    def freeze_backbone(self):
        """The fully-frozen protocol: every backbone tensor (patch projector, position
        embedding, global tokens, blocks, norms) frozen, and its forward run without a
        graph, so the backward pass stops at the decoder."""
        for param in self.backbone.parameters():
            param.requires_grad = False
        self.backbone_frozen = True

    def set_grad_checkpointing(self, enable=True):
        """Recompute the encoder blocks in the backward pass (the backbone's own switch, or
        that of the timm model it wraps); False if the backbone has none."""
        for module in self.backbone.modules():  # the backbone first, then what it wraps
            if hasattr(module, "set_grad_checkpointing"):
                module.set_grad_checkpointing(enable)
                return True
        return False

    def compile_parts(self, wrap):
        """Route the backbone features and the decoder through ``wrap(function, name)``
        (torch.compile with a fallback, see mirage.train.protocols); weights stay shared."""
        self._compiled = {"features": wrap(self.backbone_features, "encoder"),
                          "decoder": wrap(self.decoder, "decoder")}

    def layer_id(self, name):
        """Layer index for layer-wise LR decay: backbone ids, then the decoder last."""
        if name.startswith("backbone."):
            return self.backbone.layer_id(name[len("backbone."):])
        return self.backbone.depth + 1

    def no_weight_decay(self):
        names = {f"backbone.{n}" for n in self.backbone.no_weight_decay()}
        return names | {f"decoder.{n}" for n in self.decoder.no_weight_decay()}

    def freeze_blocks(self):
        """Freeze the transformer blocks; stochastic depth still acts in train mode."""
        for param in self.backbone.block_parameters():
            param.requires_grad = False
