"""``convnext`` (the default; the paper's decoder): MultiMAE's ConvNeXt adapter, as the
original MIRAGE code builds and initialises it.

The last block's tokens -> Linear D -> 16 * 384 -> each token becomes a 4x4 patch of
384-channel features -> four ConvNeXt blocks (7x7 depthwise conv, LayerNorm, 4x MLP with
GELU, residual; no layer scale) -> 1x1 conv to the classes -> resized to the image.
Initialisation: Linear layers Xavier-uniform with zero biases, LayerNorms 1/0, the
convolutions PyTorch's default (non-zero biases). MIRAGE-Base (D = 768), 9 classes:
9,534,345 parameters.
"""
import torch
from timm.layers import DropPath
from torch import nn

from mirage.models.decoders._base import Decoder, original_init

HIDDEN_DIM = 384      # channels of the refined map
PREDS_PER_SIDE = 4    # each token becomes a 4x4 patch of the map
DEPTH = 4             # ConvNeXt blocks


class ConvNeXtBlock(nn.Module):
    """7x7 depthwise conv -> LayerNorm -> MLP (4x) -> [layer scale] -> drop path + residual.

    (B, C, h, w) -> (B, C, h, w). ``layer_scale_init`` > 0 multiplies the MLP output by a
    learnt per-channel gamma starting at that value; 0 (the original) has no gamma.
    """

    def __init__(self, dim, drop_path=0.0, layer_scale_init=0.0):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * dim, dim)
        self.gamma = (nn.Parameter(torch.full((dim,), float(layer_scale_init)))
                      if layer_scale_init > 0 else None)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)  # channels last: LayerNorm/Linear act on C
        y = self.fc2(self.act(self.fc1(self.norm(y))))
        if self.gamma is not None:
            y = y * self.gamma
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class ConvNeXtDecoder(Decoder):
    """(B, N, D) tokens of the last block -> (B, K, H, W) logits.

    The Linear's output feature ``p * hidden + c`` (p = 4 i + j) becomes channel c at
    sub-position (i, j) of its token's 4x4 patch, the original's layout; patch (r, q) of
    the grid fills rows 4r..4r+3, columns 4q..4q+3 of the (B, hidden, 4 gh, 4 gw) map.
    """

    def __init__(self, spec, layer_scale_init=0.0, hidden_dim=HIDDEN_DIM,
                 preds_per_side=PREDS_PER_SIDE, depth=DEPTH):
        super().__init__(spec, layer_indices=(spec.encoder_depth - 1,))
        self.hidden_dim = hidden_dim
        self.preds_per_side = preds_per_side
        self.proj_dec = nn.Linear(spec.embed_dim, hidden_dim * preds_per_side ** 2)
        # Stochastic depth grows linearly with block depth, as in ConvNeXt.
        rates = torch.linspace(0, spec.drop_path or 0.0, depth).tolist()
        self.blocks = nn.Sequential(*[ConvNeXtBlock(hidden_dim, r, layer_scale_init)
                                      for r in rates])
        self.final_layer = nn.Conv2d(hidden_dim, spec.num_classes, kernel_size=1)

    def forward(self, features):
        self._check(features)
        x = self.proj_dec(features[0])                     # (B, N, s*s*C)
        b, (gh, gw), s, c = x.shape[0], self.grid_size, self.preds_per_side, self.hidden_dim
        x = x.reshape(b, gh, gw, s, s, c).permute(0, 5, 1, 3, 2, 4)  # (B, C, gh, s, gw, s)
        x = x.reshape(b, c, gh * s, gw * s)
        x = self.final_layer(self.blocks(x))               # (B, K, s*gh, s*gw)
        return self._resize(x)


def build(spec):
    decoder = ConvNeXtDecoder(spec)
    original_init(decoder)
    return decoder

