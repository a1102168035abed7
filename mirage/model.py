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
from functools import partial

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from mirage.input_adapters import PatchedInputAdapter


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
        tokens = self.input_adapter(x)
        globals_ = self.global_tokens.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([tokens, globals_], dim=1)
        wanted, outputs = set(indices), []
        for i, block in enumerate(self.blocks[:max(indices) + 1]):
            tokens = block(tokens)
            if i in wanted:
                outputs.append(tokens)
        return outputs

    def forward(self, x):
        """(B, C, H, W) -> (B, N + G, D): patch tokens (row-major), then global tokens."""
        return self.forward_layers(x, [self.depth - 1])[0]

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


class SegmentationModel(nn.Module):
    """Backbone + decoder: images (B, C, H, W) -> class logits (B, K, H, W)."""

    def __init__(self, backbone, decoder):
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder

    def forward(self, images):
        layers = self.backbone.forward_layers(images, sorted(set(self.decoder.layer_indices)))
        by_index = dict(zip(sorted(set(self.decoder.layer_indices)), layers))
        num_patches = self.backbone.grid_size[0] * self.backbone.grid_size[1]
        features = [by_index[i][:, :num_patches] for i in self.decoder.layer_indices]
        return self.decoder(features)

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
