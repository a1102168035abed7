"""Segmentation decoders ("output adapters"): frozen-encoder patch tokens -> class logits.

Every decoder built by :func:`build_decoder` shares one contract:

- ``layer_indices``: 0-based indices of the encoder blocks whose outputs it consumes;
- ``forward(features)``: ``features[i]`` is (B, N, D), the patch tokens (global tokens
  already removed, N = gh * gw in row-major order) of block ``layer_indices[i]``;
  returns logits (B, num_classes, H, W) at ``image_size``;
- ``no_weight_decay()``: parameter names (relative to the decoder) that must not get
  weight decay, besides 1-D tensors and biases, which the optimiser exempts anyway.

The four decoders:

- ``convnext`` (default; MultiMAE's ConvNeXt adapter): a Linear turns each token into a
  4x4 patch of 384-channel predictions, four ConvNeXt blocks refine the (4*gh, 4*gw) map.
- ``linear``: a 1x1 convolution on the token grid (a linear probe).
- ``segmenter`` (Strudel et al. 2021): a mask transformer with one learnable embedding per
  class; logits are cosine similarities between patch and class embeddings.
- ``dpt`` (Ranftl et al. 2021): four blocks reassembled at 4x, 2x, 1x and 0.5x the grid,
  fused coarse to fine with RefineNet-style residual units.
"""
import math

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

DECODERS = ("convnext", "linear", "segmenter", "dpt")
INTERPOLATE_MODES = ("bilinear", "nearest")


def dpt_layer_indices(encoder_depth):
    """0-based encoder blocks DPT taps: quarter-spaced, ending at the last block.

    depth 12 -> (2, 5, 8, 11) (blocks 3/6/9/12 as in the DPT paper), 24 -> (5, 11, 17, 23).
    Depths under 4 cannot give four distinct blocks; there the quarters are rounded up so
    every block is used and the shallow and deep halves stay balanced:
    1 -> (0, 0, 0, 0), 2 -> (0, 0, 1, 1), 3 -> (0, 1, 2, 2).
    """
    d = encoder_depth
    if d >= 4:
        return (d // 4 - 1, d // 2 - 1, 3 * d // 4 - 1, d - 1)
    return tuple(math.ceil(q * d / 4) - 1 for q in range(1, 5))


def _init_linear_like(module):
    """Transformer-style init (truncated normal, std 0.02; zero bias) for Linear/Conv."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class _Decoder(nn.Module):
    """Shared plumbing: input checks, tokens -> grid, final resize to the image size."""

    def __init__(self, *, embed_dim, num_classes, grid_size, image_size, layer_indices,
                 interpolate_mode):
        super().__init__()
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.grid_size = tuple(grid_size)
        self.image_size = tuple(image_size)
        self.layer_indices = tuple(layer_indices)
        self.interpolate_mode = interpolate_mode

    def no_weight_decay(self):
        return set()

    def _check(self, features):
        """Fail early with shapes in the message: a wrong hook or grid is a wiring bug."""
        gh, gw = self.grid_size
        if len(features) != len(self.layer_indices):
            raise ValueError(f"{type(self).__name__} expects {len(self.layer_indices)} "
                             f"feature tensors (blocks {self.layer_indices}), got {len(features)}")
        for f in features:
            if f.dim() != 3 or f.shape[1] != gh * gw or f.shape[2] != self.embed_dim:
                raise ValueError(f"{type(self).__name__} expects tokens (B, {gh * gw}, "
                                 f"{self.embed_dim}) for grid {gh}x{gw}, got {tuple(f.shape)}")

    def _to_grid(self, tokens):
        """(B, N, C) row-major tokens -> (B, C, gh, gw) feature map."""
        b, _, c = tokens.shape
        return tokens.transpose(1, 2).reshape(b, c, *self.grid_size)

    def _resize(self, logits):
        """(B, K, h, w) -> (B, K, H, W) at the image size with the configured mode."""
        if tuple(logits.shape[-2:]) == self.image_size:
            return logits
        align = False if self.interpolate_mode == "bilinear" else None
        return F.interpolate(logits, size=self.image_size, mode=self.interpolate_mode,
                             align_corners=align)


# --------------------------------------------------------------------------- ConvNeXt
class ConvNeXtBlock(nn.Module):
    """7x7 depthwise conv -> LayerNorm -> MLP (4x) -> layer scale -> drop path + residual.

    (B, C, h, w) -> (B, C, h, w). Layer scale starts at 1e-6 so every block begins close to
    the identity and the freshly initialised decoder trains stably.
    """

    def __init__(self, dim, drop_path=0.0, layer_scale_init=1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale_init))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)  # channels last: LayerNorm/Linear act on C
        y = self.fc2(self.act(self.fc1(self.norm(y)))) * self.gamma
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class ConvNeXtDecoder(_Decoder):
    """MultiMAE's ConvNeXt adapter. (B, N, D) -> (B, K, H, W).

    A Linear maps each token to ``hidden_dim * preds_per_side**2`` values, laid out as
    (hidden_dim, preds_per_side, preds_per_side) exactly as ``F.pixel_shuffle`` reads them:
    output feature ``c * s*s + i * s + j`` becomes channel ``c`` at sub-position (i, j) of
    its patch, so patch (r, c) fills rows s*r..s*r+s-1, cols s*c..s*c+s-1 of the
    (B, hidden_dim, s*gh, s*gw) map. That gives the ConvNeXt blocks a 4x finer map than the
    token grid at the cost of one Linear.
    """

    def __init__(self, *, embed_dim, num_classes, grid_size, image_size, layer_indices,
                 interpolate_mode="bilinear", drop_path=0.0, hidden_dim=384,
                 preds_per_side=4, depth=4):
        super().__init__(embed_dim=embed_dim, num_classes=num_classes, grid_size=grid_size,
                         image_size=image_size, layer_indices=layer_indices,
                         interpolate_mode=interpolate_mode)
        self.preds_per_side = preds_per_side
        self.proj_dec = nn.Linear(embed_dim, hidden_dim * preds_per_side ** 2)
        # Stochastic depth grows linearly with block depth, as in ConvNeXt.
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.Sequential(*[ConvNeXtBlock(hidden_dim, r) for r in rates])
        self.final_layer = nn.Conv2d(hidden_dim, num_classes, kernel_size=1)
        self.apply(_init_linear_like)

    def forward(self, features):
        self._check(features)
        x = self._to_grid(self.proj_dec(features[0]))      # (B, C*s*s, gh, gw)
        x = F.pixel_shuffle(x, self.preds_per_side)        # (B, C, s*gh, s*gw)
        x = self.final_layer(self.blocks(x))               # (B, K, s*gh, s*gw)
        return self._resize(x)


# --------------------------------------------------------------------------- linear
class LinearDecoder(_Decoder):
    """A linear probe: 1x1 conv D -> K on the token grid, then resize. (B, N, D) -> (B, K, H, W)."""

    def __init__(self, *, embed_dim, num_classes, grid_size, image_size, layer_indices,
                 interpolate_mode="bilinear"):
        super().__init__(embed_dim=embed_dim, num_classes=num_classes, grid_size=grid_size,
                         image_size=image_size, layer_indices=layer_indices,
                         interpolate_mode=interpolate_mode)
        self.head = nn.Conv2d(embed_dim, num_classes, kernel_size=1)
        self.apply(_init_linear_like)

    def forward(self, features):
        self._check(features)
        return self._resize(self.head(self._to_grid(features[0])))


# --------------------------------------------------------------------------- Segmenter
def _num_heads(dim):
    """dim // 64 heads (64-dim heads as in ViT), reduced until it divides dim; at least 1."""
    heads = max(1, dim // 64)
    while dim % heads:
        heads -= 1
    return heads


class SegmenterDecoder(_Decoder):
    """Segmenter's mask transformer. (B, N, D) -> (B, K, H, W).

    K learnable class embeddings join the patch tokens in two transformer blocks; each
    logit is the cosine similarity between a patch and a class embedding (after their own
    projections), normalised over the classes by a LayerNorm.
    """

    def __init__(self, *, embed_dim, num_classes, grid_size, image_size, layer_indices,
                 interpolate_mode="bilinear", drop_path=0.0, d_model=None, depth=2):
        super().__init__(embed_dim=embed_dim, num_classes=num_classes, grid_size=grid_size,
                         image_size=image_size, layer_indices=layer_indices,
                         interpolate_mode=interpolate_mode)
        d = d_model or embed_dim
        self.proj_dec = nn.Linear(embed_dim, d)
        self.cls_emb = nn.Parameter(torch.zeros(1, num_classes, d))
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList([
            Block(d, num_heads=_num_heads(d), mlp_ratio=4.0, qkv_bias=True, drop_path=r)
            for r in rates])
        self.decoder_norm = nn.LayerNorm(d)
        self.proj_patch = nn.Parameter(torch.randn(d, d) * d ** -0.5)
        self.proj_classes = nn.Parameter(torch.randn(d, d) * d ** -0.5)
        self.mask_norm = nn.LayerNorm(num_classes)
        self.apply(_init_linear_like)
        trunc_normal_(self.cls_emb, std=0.02)

    def no_weight_decay(self):
        # Decaying the class embeddings would pull every class towards the same vector.
        return {"cls_emb"}

    def forward(self, features):
        self._check(features)
        n = features[0].shape[1]
        x = self.proj_dec(features[0])                                     # (B, N, d)
        x = torch.cat([x, self.cls_emb.expand(x.shape[0], -1, -1)], dim=1)  # (B, N+K, d)
        for block in self.blocks:
            x = block(x)
        x = self.decoder_norm(x)
        patches = F.normalize(x[:, :n] @ self.proj_patch, dim=-1)          # (B, N, d)
        classes = F.normalize(x[:, n:] @ self.proj_classes, dim=-1)        # (B, K, d)
        masks = patches @ classes.transpose(1, 2)   # (B, N, K) cosine similarities in [-1, 1]
        masks = self.mask_norm(masks)               # rescale: a softmax over [-1, 1] is too flat
        return self._resize(self._to_grid(masks))


# --------------------------------------------------------------------------- DPT
class _ResidualConvUnit(nn.Module):
    """ReLU -> 3x3 conv -> ReLU -> 3x3 conv, plus the input. (B, C, h, w) -> same."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class _FusionBlock(nn.Module):
    """RefineNet-style fusion: add the refined skip, refine, upsample, 1x1 conv.

    The coarsest block has no skip (``has_skip=False``) so it owns no unused weights.
    Upsampling goes to an explicit size, not a fixed 2x, because an odd grid halved by the
    stride-2 reassemble conv does not double back to the same size.
    """

    def __init__(self, channels, has_skip=True):
        super().__init__()
        self.skip_unit = _ResidualConvUnit(channels) if has_skip else None
        self.out_unit = _ResidualConvUnit(channels)
        self.out_conv = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x, skip, size):
        if self.skip_unit is not None:
            x = x + self.skip_unit(skip)
        x = F.interpolate(self.out_unit(x), size=size, mode="bilinear", align_corners=False)
        return self.out_conv(x)


class DPTDecoder(_Decoder):
    """DPT decoder. Four (B, N, D) token sets -> (B, K, H, W).

    Reassemble block l's tokens to a map: 1x1 conv D -> layer_dims[l], resample to 4x, 2x,
    1x, 0.5x the grid (early blocks keep fine detail, late ones context), 3x3 conv to
    ``feature_dim``. Fuse from the coarsest map up, each fusion doubling the resolution;
    the head (3x3 conv, 2x upsample, 3x3 conv, ReLU, 1x1 conv) ends at 16x the grid, then
    the logits are resized to the image.
    """

    def __init__(self, *, embed_dim, num_classes, grid_size, image_size, layer_indices,
                 interpolate_mode="bilinear", feature_dim=256,
                 layer_dims=(96, 192, 384, 768)):
        super().__init__(embed_dim=embed_dim, num_classes=num_classes, grid_size=grid_size,
                         image_size=image_size, layer_indices=layer_indices,
                         interpolate_mode=interpolate_mode)
        d1, d2, d3, d4 = layer_dims
        resamplers = [nn.ConvTranspose2d(d1, d1, kernel_size=4, stride=4),   # 4x
                      nn.ConvTranspose2d(d2, d2, kernel_size=2, stride=2),   # 2x
                      nn.Identity(),                                         # 1x
                      nn.Conv2d(d4, d4, kernel_size=3, stride=2, padding=1)]  # 0.5x
        self.reassemble = nn.ModuleList([
            nn.Sequential(nn.Conv2d(embed_dim, dim, kernel_size=1), resample,
                          nn.Conv2d(dim, feature_dim, kernel_size=3, padding=1, bias=False))
            for dim, resample in zip(layer_dims, resamplers)])
        # fusion[l] handles level l (0 = finest); fusion[3] starts the path with no skip.
        self.fusion = nn.ModuleList([_FusionBlock(feature_dim, has_skip=l < 3)
                                     for l in range(4)])
        self.head = nn.Sequential(
            nn.Conv2d(feature_dim, feature_dim // 2, kernel_size=3, padding=1),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Conv2d(feature_dim // 2, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, num_classes, kernel_size=1))

    def forward(self, features):
        self._check(features)
        maps = [r(self._to_grid(f)) for r, f in zip(self.reassemble, features)]
        # maps: (B, F, 4gh, 4gw), (B, F, 2gh, 2gw), (B, F, gh, gw), (B, F, ceil(gh/2), ceil(gw/2))
        h, w = maps[0].shape[-2:]
        sizes = [(2 * h, 2 * w)] + [m.shape[-2:] for m in maps[:3]]  # fusion l's output size
        x = self.fusion[3](maps[3], None, sizes[3])
        for level in (2, 1, 0):
            x = self.fusion[level](x, maps[level], sizes[level])
        return self._resize(self.head(x))                           # head: (B, K, 16gh, 16gw)


# --------------------------------------------------------------------------- factory
def _pair(value):
    return (value, value) if isinstance(value, int) else tuple(value)


def build_decoder(name, *, embed_dim, num_classes, grid_size, patch_size, image_size,
                  encoder_depth, interpolate_mode="bilinear", drop_path=0.0):
    """Build the decoder ``name`` (one of :data:`DECODERS`).

    grid_size, patch_size, image_size: (h, w) (an int means square); the grid must be the
    image size divided by the patch size. ``drop_path`` is the stochastic-depth rate of
    the last block of ``convnext`` and ``segmenter``; ``linear`` and ``dpt`` have no
    residual blocks to drop and ignore it. ``interpolate_mode`` ("bilinear" or "nearest")
    is the final resize of the logits to the image size, for every decoder.
    """
    if name not in DECODERS:
        raise ValueError(f"unknown decoder {name!r}; choose one of: {', '.join(DECODERS)}")
    if interpolate_mode not in INTERPOLATE_MODES:
        raise ValueError(f"unknown interpolate_mode {interpolate_mode!r}; "
                         f"choose one of: {', '.join(INTERPOLATE_MODES)}")
    grid_size, patch_size, image_size = _pair(grid_size), _pair(patch_size), _pair(image_size)
    if any(g * p != s for g, p, s in zip(grid_size, patch_size, image_size)):
        raise ValueError(f"grid {grid_size} x patch {patch_size} does not give image size "
                         f"{image_size}")
    if encoder_depth < 1:
        raise ValueError(f"encoder_depth must be at least 1, got {encoder_depth}")
    # A LayerNorm over a single class would make Segmenter's output constant.
    min_classes = 2 if name == "segmenter" else 1
    if num_classes < min_classes:
        raise ValueError(f"decoder {name!r} needs at least {min_classes} classes, "
                         f"got {num_classes}")

    common = dict(embed_dim=embed_dim, num_classes=num_classes, grid_size=grid_size,
                  image_size=image_size, interpolate_mode=interpolate_mode)
    last_block = (encoder_depth - 1,)
    if name == "convnext":
        return ConvNeXtDecoder(**common, layer_indices=last_block, drop_path=drop_path)
    if name == "linear":
        return LinearDecoder(**common, layer_indices=last_block)
    if name == "segmenter":
        return SegmenterDecoder(**common, layer_indices=last_block, drop_path=drop_path)
    return DPTDecoder(**common, layer_indices=dpt_layer_indices(encoder_depth))
