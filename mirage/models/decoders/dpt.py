"""``dpt``: the DPT decoder (Ranftl et al. 2021), the original MIRAGE code's semantic
segmentation variant, generalised to any encoder depth, patch size and grid.

Four blocks (quarter-spaced, :func:`dpt_layer_indices`) are reassembled to maps at 4x,
2x, 1x and 0.5x the token grid (1x1 conv D -> 96/192/384/768, transposed or strided
conv), each projected to 256 channels by a 3x3 conv; RefineNet-style fusion from the
coarsest map up, each step doubling the resolution (bilinear, align_corners=True); head:
3x3 conv, ReLU, dropout 0.1, 1x1 conv to the classes, 2x bilinear upsampling -> 16x the
grid, then resized to the image (the identity at patch 16). PyTorch's default init.
"""
import math

import torch.nn.functional as F
from torch import nn

from mirage.models.decoders._base import Decoder

FEATURE_DIM = 256
LAYER_DIMS = (96, 192, 384, 768)


def dpt_layer_indices(encoder_depth):
    """0-based encoder blocks DPT taps: quarter-spaced, ending at the last block.

    depth 12 -> (2, 5, 8, 11) (blocks 3/6/9/12, the original's hooks), 24 -> (5, 11, 17,
    23). Depths under 4 cannot give four distinct blocks; there the quarters are rounded
    up so every block is used and the shallow and deep halves stay balanced:
    1 -> (0, 0, 0, 0), 2 -> (0, 0, 1, 1), 3 -> (0, 1, 2, 2).
    """
    d = encoder_depth
    if d >= 4:
        return (d // 4 - 1, d // 2 - 1, 3 * d // 4 - 1, d - 1)
    return tuple(math.ceil(q * d / 4) - 1 for q in range(1, 5))


class _ResidualConvUnit(nn.Module):
    """ReLU -> 3x3 conv -> ReLU -> 3x3 conv, plus the input. (B, C, h, w) -> same."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class _FusionBlock(nn.Module):
    """Add the refined skip, refine, upsample (bilinear, align_corners=True), 1x1 conv.

    The coarsest block has no skip (``has_skip=False``) and so no unused weights.
    Upsampling goes to an explicit size: an odd grid halved by the stride-2 reassemble
    conv does not double back to the same size. (With align_corners=True a size of
    exactly 2x gives the same values as the original's scale_factor=2.)
    """

    def __init__(self, channels, has_skip=True):
        super().__init__()
        self.skip_unit = _ResidualConvUnit(channels) if has_skip else None
        self.out_unit = _ResidualConvUnit(channels)
        self.out_conv = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x, skip, size):
        if self.skip_unit is not None:
            x = x + self.skip_unit(skip)
        x = F.interpolate(self.out_unit(x), size=size, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class DPTDecoder(Decoder):
    """Four (B, N, D) token sets -> (B, K, H, W)."""

    def __init__(self, spec, feature_dim=FEATURE_DIM, layer_dims=LAYER_DIMS):
        super().__init__(spec, layer_indices=dpt_layer_indices(spec.encoder_depth))
        d1, d2, d3, d4 = layer_dims
        resamplers = [nn.ConvTranspose2d(d1, d1, kernel_size=4, stride=4),   # 4x
                      nn.ConvTranspose2d(d2, d2, kernel_size=2, stride=2),   # 2x
                      nn.Identity(),                                         # 1x
                      nn.Conv2d(d4, d4, kernel_size=3, stride=2, padding=1)]  # 0.5x
        self.reassemble = nn.ModuleList([
            nn.Sequential(nn.Conv2d(spec.embed_dim, dim, kernel_size=1), resample,
                          nn.Conv2d(dim, feature_dim, kernel_size=3, padding=1, bias=False))
            for dim, resample in zip(layer_dims, resamplers)])
        # fusion[l] handles level l (0 = finest); fusion[3] starts the path with no skip.
        self.fusion = nn.ModuleList([_FusionBlock(feature_dim, has_skip=l < 3)
                                     for l in range(4)])
        self.head = nn.Sequential(
            nn.Conv2d(feature_dim, feature_dim, kernel_size=3, padding=1, bias=False),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Conv2d(feature_dim, spec.num_classes, kernel_size=1))

    def forward(self, features):
        self._check(features)
        maps = [r(self._to_grid(f)) for r, f in zip(self.reassemble, features)]
        # maps: (B, F, 4gh, 4gw), (B, F, 2gh, 2gw), (B, F, gh, gw), (B, F, ceil(gh/2), ceil(gw/2))
        h, w = maps[0].shape[-2:]
        sizes = [(2 * h, 2 * w)] + [m.shape[-2:] for m in maps[:3]]  # fusion l's output size
        x = self.fusion[3](maps[3], None, sizes[3])
        for level in (2, 1, 0):
            x = self.fusion[level](x, maps[level], sizes[level])     # (B, F, 8gh, 8gw)
        x = F.interpolate(self.head(x), scale_factor=2, mode="bilinear", align_corners=True)
        return self._resize(x)                                       # head: (B, K, 16gh, 16gw)


def build(spec):
    return DPTDecoder(spec)
