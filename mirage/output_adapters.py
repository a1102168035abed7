"""Kept for imports written before the decoder registry: use :mod:`mirage.decoders`."""
from mirage.decoders import INTERPOLATE_MODES, build_decoder, names  # noqa: F401
from mirage.decoders.dpt import dpt_layer_indices  # noqa: F401

DECODERS = names()
