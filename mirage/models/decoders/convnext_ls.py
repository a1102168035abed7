"""``convnext_ls``: the ConvNeXt decoder with layer scale (gamma starting at 1e-6) and
truncated-normal (std 0.02) weights with zero biases for every Linear and convolution.

This was the project's ``convnext`` before it followed the paper. Each block starts as
the identity, so early training moves only the projection and the final 1x1 conv; it
learns more slowly than ``convnext`` (docs/segmentation_tuning.md, "Differences from
the original implementation"). Same parameters as ``convnext`` plus 4 x 384 gammas.
"""
from timm.layers import trunc_normal_
from torch import nn

from mirage.models.decoders.convnext import ConvNeXtDecoder

LAYER_SCALE_INIT = 1e-6


def build(spec):
    decoder = ConvNeXtDecoder(spec, layer_scale_init=LAYER_SCALE_INIT)
    for m in decoder.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return decoder
