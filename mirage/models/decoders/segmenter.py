"""``segmenter``: Segmenter's mask transformer (Strudel et al. 2021) as the original
MIRAGE code builds it, for every encoder width.

The last block's tokens -> Linear D -> 768; one learnt embedding per class joins them in
two transformer blocks (12 heads, MLP 4x, LayerNorm eps 1e-6, stochastic depth 0 and 0.1);
after a LayerNorm, patch and class embeddings go through their own bias-free Linear and
are L2-normalised; logit (k, patch) = their cosine similarity, normalised over the
classes by a LayerNorm, then resized to the image. Initialisation as the original's
(Xavier-uniform Linear layers, class embeddings truncated normal std 0.02).
"""
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from mirage.models.decoders._base import Decoder, original_init

D_MODEL = 768
NUM_HEADS = 12
DEPTH = 2
DROP_PATH = 0.1   # of the last block; the original's default


class SegmenterDecoder(Decoder):
    """(B, N, D) -> (B, K, H, W)."""

    def __init__(self, spec, d_model=D_MODEL, num_heads=NUM_HEADS, depth=DEPTH):
        super().__init__(spec, layer_indices=(spec.encoder_depth - 1,))
        norm = partial(nn.LayerNorm, eps=1e-6)
        drop_path = DROP_PATH if spec.drop_path is None else spec.drop_path
        self.proj_dec = nn.Linear(spec.embed_dim, d_model)
        self.cls_emb = nn.Parameter(torch.zeros(1, spec.num_classes, d_model))
        self.blocks = nn.ModuleList([
            Block(d_model, num_heads=num_heads, mlp_ratio=4.0, qkv_bias=True, drop_path=r,
                  norm_layer=norm)
            for r in torch.linspace(0, drop_path, depth).tolist()])
        self.decoder_norm = norm(d_model)
        self.patch_proj = nn.Linear(d_model, d_model, bias=False)
        self.classes_proj = nn.Linear(d_model, d_model, bias=False)
        self.mask_norm = norm(spec.num_classes)
        original_init(self)
        trunc_normal_(self.cls_emb, std=0.02)

    def forward(self, features):
        self._check(features)
        n, k = features[0].shape[1], self.num_classes
        x = self.proj_dec(features[0])                                     # (B, N, d)
        x = torch.cat([x, self.cls_emb.expand(x.shape[0], -1, -1)], dim=1)  # (B, N+K, d)
        for block in self.blocks:
            x = block(x)
        x = self.decoder_norm(x)
        patches = F.normalize(self.patch_proj(x[:, :n]), dim=-1)           # (B, N, d)
        classes = F.normalize(self.classes_proj(x[:, n:n + k]), dim=-1)    # (B, K, d)
        masks = patches @ classes.transpose(1, 2)   # (B, N, K) cosine similarities in [-1, 1]
        masks = self.mask_norm(masks)               # rescale: a softmax over [-1, 1] is too flat
        return self._resize(self._to_grid(masks))


def build(spec):
    # A LayerNorm over a single class would make the output constant.
    if spec.num_classes < 2:
        raise ValueError(f"decoder 'segmenter' needs at least 2 classes, got {spec.num_classes}")
    return SegmenterDecoder(spec)
