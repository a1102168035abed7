"""``linear``: a linear probe, a 1x1 convolution D -> K on the last block's token grid,
then resized to the image. PyTorch's default initialisation, as in the original."""
from torch import nn

from mirage.models.decoders._base import Decoder


class LinearDecoder(Decoder):
    """(B, N, D) -> (B, K, H, W)."""

    def __init__(self, spec):
        super().__init__(spec, layer_indices=(spec.encoder_depth - 1,))
        self.head = nn.Conv2d(spec.embed_dim, spec.num_classes, kernel_size=1)

    def forward(self, features):
        self._check(features)
        return self._resize(self.head(self._to_grid(features[0])))


def build(spec):
    return LinearDecoder(spec)
