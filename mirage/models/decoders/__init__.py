"""Segmentation decoders ("output adapters"): encoder patch tokens -> class logits.

The registry is this folder: every module ``mirage/models/decoders/<name>.py`` whose name does
not start with an underscore is the decoder ``--output_adapter <name>``, and defines

    def build(spec: DecoderSpec) -> Decoder

Adding a decoder is adding one file (docs/segmentation_tuning.md, "Adding a decoder").
Names are found with ``pkgutil`` without importing the modules, so listing them (the
command line's choices, ``-h``) never imports torch; a module is imported when built.

Every decoder shares one contract (:class:`mirage.models.decoders._base.Decoder`):

- ``layer_indices``: 0-based indices of the encoder blocks whose outputs it consumes;
- ``forward(features)``: ``features[i]`` is (B, N, D), the patch tokens (global tokens
  removed, N = gh * gw in row-major order) of block ``layer_indices[i]``; returns logits
  (B, num_classes, H, W) at ``spec.image_size``;
- ``no_weight_decay()``: parameter names (relative to the decoder) that must not get
  weight decay, besides 1-D tensors and biases, which the optimiser exempts anyway.
"""
import importlib
import pkgutil
from dataclasses import dataclass

INTERPOLATE_MODES = ("bilinear", "nearest")
DEFAULT = "convnext"


def names():
    """The registered decoder names, sorted (module names in this package, no import)."""
    return tuple(sorted(info.name for info in pkgutil.iter_modules(__path__)
                        if not info.name.startswith("_")))


class Choices:
    """A live view of :func:`names` for option tables: iterable, ``in``, ``len``.

    Read at use, not at import, so a decoder file added later is a valid choice at once.
    """

    def __iter__(self):
        return iter(names())

    def __contains__(self, name):
        return name in names()

    def __len__(self):
        return len(names())

    def __repr__(self):
        return f"Choices{names()}"


@dataclass(frozen=True)
class DecoderSpec:
    """What a decoder is built for.

    grid_size, patch_size, image_size: (h, w); grid * patch = image. encoder_depth: the
    number of encoder blocks (decoders pick their blocks from it). drop_path: stochastic
    depth of the decoder's last residual block, None for the decoder's own default
    (``convnext``: 0, ``segmenter``: 0.1; decoders without residual blocks ignore it).
    interpolate_mode: the final resize of the logits to the image size.
    """

    embed_dim: int
    num_classes: int
    grid_size: tuple
    patch_size: tuple
    image_size: tuple
    encoder_depth: int
    interpolate_mode: str = "bilinear"
    drop_path: float = None


def _pair(value):
    return (value, value) if isinstance(value, int) else tuple(int(v) for v in value)


def build_decoder(name, *, embed_dim, num_classes, grid_size, patch_size, image_size,
                  encoder_depth, interpolate_mode="bilinear", drop_path=None):
    """Build the registered decoder ``name`` (an ``nn.Module``); see :class:`DecoderSpec`.

    Sizes may be ints (square) or (h, w). Raises ValueError naming the problem.
    """
    known = names()
    if name not in known:
        raise ValueError(f"unknown decoder {name!r}; choose one of: {', '.join(known)}")
    if interpolate_mode not in INTERPOLATE_MODES:
        raise ValueError(f"unknown interpolate_mode {interpolate_mode!r}; "
                         f"choose one of: {', '.join(INTERPOLATE_MODES)}")
    grid_size, patch_size, image_size = _pair(grid_size), _pair(patch_size), _pair(image_size)
    if any(g * p != s for g, p, s in zip(grid_size, patch_size, image_size)):
        raise ValueError(f"grid {grid_size} x patch {patch_size} does not give image size "
                         f"{image_size}")
    if encoder_depth < 1:
        raise ValueError(f"encoder_depth must be at least 1, got {encoder_depth}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    spec = DecoderSpec(embed_dim=embed_dim, num_classes=num_classes, grid_size=grid_size,
                       patch_size=patch_size, image_size=image_size,
                       encoder_depth=encoder_depth, interpolate_mode=interpolate_mode,
                       drop_path=drop_path)
    return importlib.import_module(f"{__name__}.{name}").build(spec)


def __getattr__(attr):
    # ``from mirage.models.decoders import Decoder`` imports torch only when asked for.
    if attr == "Decoder":
        return importlib.import_module(f"{__name__}._base").Decoder
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
