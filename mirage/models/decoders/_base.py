"""What every decoder shares: input checks, tokens -> grid, the final resize, and the
original MIRAGE initialisation. Not a decoder itself (the leading underscore)."""
import math

import torch.nn.functional as F
from torch import nn


class Decoder(nn.Module):
    """Base class. Subclasses set their layers and implement ``forward(features)``.

    spec: a :class:`mirage.models.decoders.DecoderSpec`; layer_indices: the encoder blocks whose
    patch tokens ``forward`` receives, in that order.
    """

    def __init__(self, spec, layer_indices):
        super().__init__()
        self.spec = spec
        self.embed_dim = spec.embed_dim
        self.num_classes = spec.num_classes
        self.grid_size = tuple(spec.grid_size)
        self.image_size = tuple(spec.image_size)
        self.interpolate_mode = spec.interpolate_mode
        self.layer_indices = tuple(layer_indices)

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
        """(B, K, h, w) -> (B, K, H, W) at the image size with the configured mode.

        A resize to the same size is the identity for both modes, so it is skipped.
        """
        if tuple(logits.shape[-2:]) == self.image_size:
            return logits
        align = False if self.interpolate_mode == "bilinear" else None
        return F.interpolate(logits, size=self.image_size, mode=self.interpolate_mode,
                             align_corners=align)


def original_init(module):
    """Re-initialise ``module`` as the original MIRAGE model does to its output adapters.

    The original builds the decoder inside the MultiMAE-style model, whose constructor
    re-initialises every submodule: Linear weights Xavier-uniform (a fused qkv Linear as
    three separate D x D matrices: bound sqrt(6 / (out/3 + in))), Linear biases 0,
    LayerNorm weight 1 and bias 0. Convolutions keep PyTorch's default initialisation
    (Kaiming-uniform weights, non-zero uniform biases), parameters such as class
    embeddings their own.
    """
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            if name.split(".")[-1] == "qkv":
                bound = math.sqrt(6.0 / (m.weight.shape[0] // 3 + m.weight.shape[1]))
                nn.init.uniform_(m.weight, -bound, bound)
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
