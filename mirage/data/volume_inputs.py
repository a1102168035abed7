"""Whole OCT volumes as inputs of a prediction, and the eyepy file of their predictions.

    is_volume_file(path)            a file run_seg_predict.py reads as a volume
    check_volume_file(path)         cheap checks before a model loads (one line each)
    read_bscans(path) -> BscanVolume   one volume's B-scans (uint8/uint16) and scale
    write_annotated_eye(...)        the volume with predicted layers and lesions, as .eye

Files eyepy opens are read by ``mirage.data.oct_files`` (its reader per suffix, the lazy
eyepy import with its one install line, the intensities as ``run_seg_prepare_data.py``
writes them); ``.npy`` files hold a B-scan stack (N, H, W) of uint8 or uint16 and need no
eyepy. B-scan ``i`` is eyepy's B-scan ``i`` (``volume.data[i]``; the first is the
bottom-most), the index of a layer height map's first axis.
"""
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mirage.data.oct_files import (SUFFIX_READERS, Source, bscan_images, import_eyepy,
                                   read_volume, spacing_um)
from mirage.errors import UserError

NPY_SUFFIX = ".npy"
NPY_READER = "numpy.load"
VOLUME_SUFFIXES = tuple(SUFFIX_READERS) + (NPY_SUFFIX,)


def is_volume_file(path):
    """A file with a volume suffix (eyepy's readers' or .npy)."""
    return Path(path).suffix.lower() in VOLUME_SUFFIXES


@dataclass
class BscanVolume:
    """One volume: ``images`` (n, H, W) uint8/uint16 as predicted, ``spacing`` (µm:
    axial_um, lateral_um, bscan_um, those known), the EyeVolume it came from (None for
    .npy) and how the intensities were stored."""

    path: Path
    images: np.ndarray
    eye: object = None
    spacing: dict = field(default_factory=dict)
    how: str = ""


def _load_npy(path, mmap_mode=None):
    try:
        stack = np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except Exception as err:  # noqa: BLE001: any failure to read it is the file's
        reason = " ".join(str(err).split()) or type(err).__name__
        raise UserError(f"{path}: {NPY_READER} could not read it: {type(err).__name__}: "
                        f"{reason[:300]}") from None
    if not isinstance(stack, np.ndarray) or stack.ndim != 3 or 0 in stack.shape \
            or stack.dtype not in (np.uint8, np.uint16):
        what = (f"shape {stack.shape}, {stack.dtype}" if isinstance(stack, np.ndarray)
                else type(stack).__name__)
        raise UserError(f"{path}: holds {what}; a .npy volume is a B-scan stack (N, H, W) "
                        "of uint8 or uint16")
    return stack


def check_volume_file(path):
    """Before the model loads: a .npy's header and shape; for eyepy's files, that eyepy
    is installed (else the one install line). A file's content is read when predicted."""
    path = Path(path)
    if path.suffix.lower() == NPY_SUFFIX:
        _load_npy(path, mmap_mode="r")
    else:
        import_eyepy()


def read_bscans(path):
    """The :class:`BscanVolume` of a volume file; UserError (one line naming the file
    and the reader's reason) when it cannot be read."""
    path = Path(path)
    if path.suffix.lower() == NPY_SUFFIX:
        return BscanVolume(path, np.ascontiguousarray(_load_npy(path)),
                           how="as stored (.npy)")
    volume = read_volume(Source(path, SUFFIX_READERS[path.suffix.lower()]))
    try:
        images, how = bscan_images(volume)
    except UserError as err:
        raise UserError(f"{path}: {err}") from None
    return BscanVolume(path, images, volume, spacing_um(volume), how)


def write_annotated_eye(target, volume, layers, lesions):
    """Save ``volume`` (a BscanVolume) as an eyepy ``.eye`` file at ``target`` holding only
    the predictions: ``layers`` {name: (n_bscans, W) heights in rows, NaN where absent} as
    layer annotations and ``lesions`` {name: (n_bscans, H, W) bool} as pixel annotations.
    The file's own annotations (if any) are left out, so that nothing in it is mistaken for
    a prediction; its B-scans, scale, localizer and other metadata are kept. A .npy stack
    becomes a volume of eyepy's default metadata (scale in pixels)."""
    eyepy = import_eyepy()
    eye = volume.eye if volume.eye is not None else eyepy.EyeVolume(volume.images)
    for name in list(eye.layers):
        eye.remove_layer_annotation(name)
    for name in list(eye.volume_maps):
        eye.remove_pixel_annotation(name)
    for name in list(eye.slabs):
        eye.remove_slab_annotation(name)
    for name, heights in layers.items():
        eye.add_layer_annotation(np.asarray(heights, dtype=np.float64), name=name)
    for name, mask in lesions.items():
        eye.add_pixel_annotation(np.asarray(mask, dtype=bool), name=name)
    eye.save(target)
