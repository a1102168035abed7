"""MIRAGE segmentation tuning: train decoders on frozen retinal-OCT foundation models."""

__version__ = "0.1.0"
