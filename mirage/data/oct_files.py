"""OCT volume files read with eyepy, turned into B-scan images and label masks.

    find_sources(inputs) -> [Source]            which reader opens each file or folder
    read_volume(source) -> eyepy.EyeVolume      one volume (or one line: the reader's reason)
    bscan_images(volume) -> (uint8/uint16 array, how the intensities were stored)
    layer_order(volume, names) -> names          anatomical order, top to bottom
    label_map(heights, rows, ...) -> class index per pixel (the mask rule below)
    spacing_um(volume), patient_of(volume)

eyepy (``pip install .[oct]``) is imported when a file is read, never before, so that the
package works without it; its absence is one line saying how to install it.

**Which B-scan a layer row belongs to.** eyepy keeps a layer as a height map of shape
(n_bscans, width) whose first index is the bottom-most B-scan, as is the first B-scan of
``volume.data``; B-scan ``i``'s heights are read through eyepy's own B-scan view,
``volume[i].layers[name].data``, so its image and its heights are always one B-scan's,
whatever order a version of eyepy keeps. Slice ``<stem>_<i>`` is eyepy's B-scan ``i``.

**The mask rule** (``label_map``), per A-scan column, with the chosen boundaries in their
anatomical order (top to bottom: :func:`layer_order`):

- a boundary at height ``h`` (rows from the top, as eyepy stores it) starts the layer
  beneath it at row ``round(h)`` (halves up); a pixel's class is the number of boundaries
  at or above its row: 0 above the first boundary, 1 between the first and the second,
  ..., K below the last; a boundary outside the image simply lies above or below every row;
- a column where any chosen boundary's height is unknown (NaN), or where two boundaries
  are out of order (a lower one above an upper one once rounded: they cross), becomes the
  ``Invalid`` class from top to bottom: no boundary is ever guessed or reordered. Equal
  rounded heights are in order (a layer of zero thickness);
- pixel annotations (fluids) are extra classes painted over the layers and over Invalid,
  in the order given (a later one wins where two overlap).
"""
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mirage.errors import UserError
from mirage.fileio import IMAGE_SUFFIXES

EYEPY_PIN = "eyepy>=0.21,<0.22"
INSTALL_HINT = f"reading OCT files needs eyepy: pip install .[oct] (or pip install '{EYEPY_PIN}')"

# Suffix -> the eyepy reader of the file (its name in messages).
SUFFIX_READERS = {
    ".eye": "eyepy.EyeVolume.load",
    ".vol": "eyepy.import_heyex_vol",
    ".xml": "eyepy.import_heyex_xml",
    ".e2e": "eyepy.import_heyex_e2e",
    ".mat": "eyepy.import_duke_mat",
    ".fda": "eyepy.import_topcon_fda",
}
RETOUCH_READER = "eyepy.import_retouch"  # a folder holding oct.mhd
FOLDER_READER = "eyepy.import_bscan_folder"  # a folder of B-scan images
# eyepy's scale_unit -> micrometres per unit; other units (e.g. 'pixel') give no spacing.
UNIT_UM = {"mm": 1000.0, "millimeter": 1000.0, "millimetre": 1000.0,
           "um": 1.0, "µm": 1.0, "micrometer": 1.0, "micrometre": 1.0}


def import_eyepy():
    """The eyepy module, or UserError with the one line saying how to install it."""
    try:
        import eyepy
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return eyepy


# ----------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class Source:
    """One volume to read: its file or folder, the reader, and the volume ID (file stem)."""

    path: Path
    reader: str

    @property
    def stem(self):
        return self.path.name if self.path.is_dir() else self.path.stem


def _folder_sources(folder):
    if (folder / "oct.mhd").is_file():
        return [Source(folder, RETOUCH_READER)]
    files = sorted(p for p in folder.iterdir() if p.is_file())
    volumes = [Source(p, SUFFIX_READERS[p.suffix.lower()]) for p in files
               if p.suffix.lower() in SUFFIX_READERS]
    if volumes:
        return volumes
    if any(p.suffix.lower() in IMAGE_SUFFIXES for p in files):
        return [Source(folder, FOLDER_READER)]
    raise UserError(f"{folder}: no OCT volume found (files ending in "
                    f"{', '.join(SUFFIX_READERS)}, a RETOUCH folder with oct.mhd, or a "
                    "folder of B-scan images)")


def find_sources(inputs):
    """The volumes of ``-i``: files by suffix; a folder holding volume files gives each of
    them (not its subfolders), a folder with ``oct.mhd`` is one RETOUCH volume, any other
    folder of images one volume of B-scans. UserError (one line) for a missing path, an
    unknown suffix, or two volumes with one stem (their slices would share names)."""
    sources = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            sources += _folder_sources(path)
        elif path.is_file():
            reader = SUFFIX_READERS.get(path.suffix.lower())
            if reader is None:
                raise UserError(f"{path}: no reader for '{path.suffix}' files; eyepy reads "
                                f"{', '.join(SUFFIX_READERS)} files and folders of B-scans")
            sources.append(Source(path, reader))
        else:
            raise UserError(f"-i {path}: no such file or folder")
    seen = {}
    for source in sources:
        key = source.stem
        if key in seen and seen[key].path.resolve() == source.path.resolve():
            raise UserError(f"{source.path} is given twice; give each volume once")
        if key in seen:
            raise UserError(f"{seen[key].path} and {source.path} share the name '{key}', "
                            "and slices are named after their file; rename one of them")
        seen[key] = source
    if not sources:
        raise UserError("-i: no OCT volume given")
    return sources


def read_volume(source):
    """The EyeVolume of ``source``; UserError (one line naming the file and its reader)
    when eyepy cannot read it."""
    eyepy = import_eyepy()
    try:
        if source.reader == "eyepy.EyeVolume.load":
            volume = eyepy.EyeVolume.load(source.path)
        elif source.reader == "eyepy.import_duke_mat":
            volume = _read_duke(eyepy, source.path)
        else:
            volume = getattr(eyepy, source.reader.split(".")[-1])(source.path)
        shape = np.shape(volume.data)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001: any failure of a reader is the file's
        reason = " ".join(str(err).split()) or type(err).__name__
        raise UserError(f"{source.path}: {source.reader} could not read it: "
                        f"{type(err).__name__}: {reason[:300]}") from None
    if len(shape) != 3 or 0 in shape:
        raise UserError(f"{source.path}: {source.reader} gave B-scans of shape {shape}, "
                        "not (n_bscans, height, width)")
    return volume


def _read_duke(eyepy, path):
    """Duke .mat: the RPEDC layout (``layerMaps``), else the Chiu 2014 DME layout."""
    import scipy.io
    keys = {name for name, *_ in scipy.io.whosmat(str(path))}
    if "layerMaps" not in keys and "manualLayers1" in keys:
        return eyepy.import_dukechiu2_mat(path)
    return eyepy.import_duke_mat(path)


# ----------------------------------------------------------------------------- images
def bscan_images(volume):
    """``(images, how)``: the volume's B-scans as uint8 or uint16 (n, height, width), and
    one line saying how the intensities were stored.

    Integers in 0..255 are kept as 8-bit, in 0..65535 as 16-bit, exactly as stored;
    floats holding whole numbers in those ranges likewise. Anything else (floats such as
    0..1 or dB values, negative numbers) is scaled min-max over the whole volume to
    0..255, one linear map for every B-scan, so nothing is clipped; NaN pixels become 0.
    """
    data = np.asarray(volume.data)
    finite = np.isfinite(data) if data.dtype.kind == "f" else np.ones(data.shape, bool)
    if not finite.any():
        raise UserError("holds no finite intensity")
    low, high = float(data[finite].min()), float(data[finite].max())
    whole = data.dtype.kind in "biu" or bool(np.all(data[finite] == np.round(data[finite])))
    nan_note = "" if finite.all() else f"; {int((~finite).sum())} NaN pixels written as 0"
    if whole and low >= 0 and high <= 65535:
        dtype, bits = (np.uint8, 8) if high <= 255 else (np.uint16, 16)
        out = np.where(finite, data, 0).astype(dtype)
        return out, f"as stored ({bits}-bit, {data.dtype} {low:g}..{high:g}){nan_note}"
    scale = 255.0 / (high - low) if high > low else 0.0
    out = np.round((np.where(finite, data, low) - low) * scale).astype(np.uint8)
    out[~finite] = 0
    return out, (f"min-max scaled per volume from {low:g}..{high:g} ({data.dtype}) to "
                 f"0..255 (8-bit){nan_note}")


# ----------------------------------------------------------------------------- masks
def layer_order(volume, names):
    """``names`` in their anatomical order, top to bottom: by the median height of each
    over the volume (a smaller row is higher); ties keep the order given. UserError for a
    layer the volume lacks or that has no known height."""
    missing = [name for name in names if name not in volume.layers]
    if missing:
        raise UserError(f"has no layer {', '.join(missing)} (it has: "
                        f"{', '.join(volume.layers) or 'none'}); pick layers with --layers")
    medians = []
    for name in names:
        heights = np.asarray(volume.layers[name].data, dtype=float)
        if not np.isfinite(heights).any():
            raise UserError(f"layer {name} has no known height; leave it out with --layers")
        medians.append(float(np.nanmedian(heights)))
    return [name for _, _, name in sorted(zip(medians, range(len(names)), names))]


def label_map(heights, rows, fluids=(), invalid=None):
    """Class indices (rows, width) of one B-scan by the module's mask rule.

    heights: (K, width) boundary heights in anatomical order (NaN where unknown); rows: the
    B-scan's height; fluids: boolean (rows, width) maps, classes K+1, K+2, ...; invalid:
    the class index of columns with a missing or crossing boundary (default K+1+len(fluids)).
    Returns ``(labels (uint8), missing columns, crossing columns)``.
    """
    heights = np.asarray(heights, dtype=float).reshape(-1, np.shape(heights)[-1])
    count, width = heights.shape
    invalid = count + 1 + len(fluids) if invalid is None else invalid
    known = np.isfinite(heights).all(axis=0)
    starts = np.floor(np.where(np.isfinite(heights), heights, 0.0) + 0.5)
    ordered = np.all(np.diff(starts, axis=0) >= 0, axis=0) if count > 1 else np.ones(width, bool)
    crossing = known & ~ordered
    row = np.arange(rows, dtype=float)[:, None]
    labels = np.zeros((rows, width), dtype=np.uint8)
    for start in starts:  # one boundary at a time: memory of one B-scan
        labels += row >= start[None, :]
    labels[:, ~(known & ordered)] = invalid
    for index, fluid in enumerate(fluids):
        labels[np.asarray(fluid, dtype=bool)] = count + 1 + index
    return labels, int((~known).sum()), int(crossing.sum())


def class_labels(layers, fluids):
    """The class names of the masks: above the first boundary, between each two, below
    the last (``Background`` without layers), then one per fluid."""
    if not layers:
        return ["Background"] + list(fluids)
    between = [f"{upper}-{lower}" for upper, lower in zip(layers, layers[1:])]
    return [f"Above {layers[0]}"] + between + [f"Below {layers[-1]}"] + list(fluids)


# ----------------------------------------------------------------------------- metadata
def spacing_um(volume):
    """{"axial_um", "lateral_um", "bscan_um"} from eyepy's scale_y, scale_x, scale_z in
    micrometres, only those the file gives (a positive number in a known length unit);
    ``{}`` for a scale in pixels or an unknown unit."""
    meta = volume.meta
    unit = str(meta.get("scale_unit", "") if hasattr(meta, "get") else "").strip().lower()
    factor = UNIT_UM.get(unit)
    if factor is None:
        return {}
    spacing = {}
    for key, scale in (("axial_um", "scale_y"), ("lateral_um", "scale_x"),
                       ("bscan_um", "scale_z")):
        value = meta.get(scale)
        try:
            value = float(value) * factor
        except (TypeError, ValueError):
            continue
        if math.isfinite(value) and value > 0:
            spacing[key] = round(value, 6)
    return spacing


def patient_of(volume):
    """The file's patient ID as text (``meta["patient_id"]``, or HEYEX's
    ``meta["patient"]["patient_id"]``), or None where the file has none."""
    meta = volume.meta
    found = meta.get("patient_id") if hasattr(meta, "get") else None
    patient = meta.get("patient") if hasattr(meta, "get") else None
    if found in (None, "") and isinstance(patient, dict):
        found = patient.get("patient_id")
    found = None if found is None else str(found).strip()
    return found or None
