"""Synthetic OCT B-scan volumes in the benchmark layout, for the demo and the tests.

A synthetic B-scan looks like a macular OCT scan of a DME patient: dark vitreous above
the retina, seven retinal layers of alternating brightness (bright RNFL, darker nuclear
layers, bright ellipsoid zone and RPE), the choroid fading out below Bruch's membrane,
dark fluid pockets inside the retina in some slices, speckle and a little blur.

Classes follow Duke DME: 0 background (above the ILM and below BM), 1..7 the layers from
top to bottom, 8 Fluid (overrides the layer label).

    make_volume(rng, S, H, W)            -> bscans uint8 (S, H, W), masks uint8 (S, H, W)
    write_synthetic_dataset(root)        -> <root>/Synth_OCT in the benchmark layout
"""
import json
from pathlib import Path

import cv2
import numpy as np

from mirage.errors import UserError
from mirage.fileio import atomic_folder, write_png, write_text

LAYER_LABELS = ("ILM-NFL", "NFL-IPL", "IPL-OPL", "OPL-ONL", "ONL-ISM", "ISM-OS", "RPE-BM")
CLASS_LABELS = ("Background",) + LAYER_LABELS + ("Fluid",)

# Seven-layer anatomy, top to bottom. Thickness as a fraction of the whole retina and
# mean display intensity in [0, 1]; neighbours differ by >= 0.2 so the bands are visible
# through the speckle (a real scan's RNFL, EZ and RPE are bright, INL and ONL dark).
_LAYER_FRACTIONS = np.array([0.13, 0.18, 0.12, 0.11, 0.22, 0.10, 0.14])
_LAYER_INTENSITY = np.array([0.78, 0.48, 0.24, 0.52, 0.14, 0.62, 0.92])
# How much of each layer the foveal pit removes at its centre: the inner layers are
# pushed aside, the ONL thickens a little, the photoreceptors and RPE stay.
_PIT_THINNING = np.array([0.75, 0.75, 0.7, 0.6, -0.3, 0.0, 0.0])
_VITREOUS_INTENSITY = 0.04
_FLUID_INTENSITY = 0.05
_CHOROID_INTENSITY = 0.45


# ----------------------------------------------------------------------------- geometry
def _smooth_field(rng, num_slices, width, max_cycles_x=2.0, max_cycles_s=0.6, waves=4):
    """A smooth random field over (slice, column), shape (S, W), values in [-1, 1].

    A sum of a few low-frequency plane waves: smooth along each B-scan and changing only
    a little from one slice to the next, as neighbouring B-scans of a volume do.
    """
    s = (np.arange(num_slices) / max(num_slices, 1))[:, None]
    x = (np.arange(width) / width)[None, :]
    field = np.zeros((num_slices, width))
    for _ in range(waves):  # a handful of waves, each a whole-array operation
        fx = rng.uniform(0.2, max_cycles_x)
        fs = rng.uniform(-max_cycles_s, max_cycles_s)
        field += rng.uniform(0.3, 1.0) * np.sin(2 * np.pi * (fx * x + fs * s)
                                               + rng.uniform(0, 2 * np.pi))
    return field / max(np.abs(field).max(), 1e-6)


def _layer_table(num_layers):
    """(thickness fractions, intensities, pit thinning) for ``num_layers`` layers."""
    if num_layers == len(_LAYER_FRACTIONS):
        return _LAYER_FRACTIONS, _LAYER_INTENSITY, _PIT_THINNING
    # Other layer counts (tests, experiments): equal layers alternating bright/dark, the
    # deepest one the brightest, like the RPE.
    fractions = np.full(num_layers, 1.0 / num_layers)
    intensity = np.where(np.arange(num_layers) % 2 == 0, 0.72, 0.28)
    intensity[-1] = 0.92
    thinning = np.where(np.arange(num_layers) < num_layers // 2, 0.6, 0.0)
    return fractions, intensity, thinning


def _boundaries(rng, num_slices, height, width, fractions, thinning):
    """Depth (row, float) of every layer boundary, shape (S, L + 1, W).

    Boundary 0 is the ILM, boundary L is Bruch's membrane. BM is a smooth curve (tilt,
    bowl or dome curvature, a gentle wave); the layers are stacked above it with
    thicknesses that vary smoothly and, on some volumes, thin out in a foveal pit.
    """
    num_layers = len(fractions)
    x = np.arange(width) / width - 0.5  # (W,) in [-0.5, 0.5)
    s_frac = (np.arange(num_slices) / max(num_slices, 1))[:, None]

    centre = height * rng.uniform(0.64, 0.72)
    tilt = height * rng.uniform(-0.08, 0.08) * x
    bowl = height * rng.uniform(-0.06, 0.06)
    x0 = rng.uniform(-0.15, 0.15)
    # Bowl/dome curvature that changes slowly across the volume.
    curvature = bowl * (1 + 0.3 * np.cos(2 * np.pi * s_frac)) * (1 - 4 * (x - x0) ** 2)
    wave = 0.02 * height * _smooth_field(rng, num_slices, width)
    bm = centre + tilt + curvature + wave  # (S, W)

    total = height * rng.uniform(0.34, 0.42)
    thickness = np.empty((num_slices, num_layers, width))
    for k in range(num_layers):  # seven layers, each a whole-array operation
        thickness[:, k] = total * fractions[k] * (
            1 + 0.15 * _smooth_field(rng, num_slices, width, max_cycles_x=3.0))
    # The RNFL thickens towards the optic disc (one side of the scan).
    thickness[:, 0] *= 1 + rng.choice([-1, 1]) * 0.6 * x

    if rng.random() < 0.6:  # foveal pit on most volumes
        px = rng.uniform(0.35, 0.65) * width
        ps = rng.uniform(0.3, 0.7) * num_slices
        sx = rng.uniform(0.06, 0.1) * width
        ss = max(rng.uniform(0.15, 0.3) * num_slices, 0.5)
        cols = np.arange(width)[None, :]
        rows = np.arange(num_slices)[:, None]
        pit = np.exp(-0.5 * (((cols - px) / sx) ** 2 + ((rows - ps) / ss) ** 2))  # (S, W)
        thickness *= 1 - thinning[None, :, None] * pit[:, None, :]
    thickness = np.maximum(thickness, 1.5)

    # Boundaries from BM upwards: boundary k sits above layers k+1..L.
    depth_above_bm = np.cumsum(thickness[:, ::-1], axis=1)[:, ::-1]  # (S, L, W)
    bounds = np.concatenate([bm[:, None] - depth_above_bm, bm[:, None]], axis=1)

    # Keep every slice inside the image: shift, never squash, so layers keep their shape.
    margin = 0.04 * height
    shift_down = np.maximum(margin - bounds[:, 0].min(axis=1), 0)
    shift_up = np.maximum(bounds[:, -1].max(axis=1) - (height - 1 - margin), 0)
    return bounds + (shift_down - shift_up)[:, None, None]


def _fluid_mask(rng, bounds, height, width, num_layers):
    """Boolean (H, W) mask of 1-3 elliptic fluid pockets in the inner/middle retina.

    ``bounds`` is one slice's boundaries, shape (L + 1, W).
    """
    rows = np.arange(height)[:, None]
    cols = np.arange(width)[None, :]
    top, bottom = 1, max(num_layers - 2, 2)  # below the RNFL, above the photoreceptors
    mask = np.zeros((height, width), dtype=bool)
    for _ in range(rng.integers(1, 4)):  # a few ellipses, each a whole-array operation
        cx = rng.uniform(0.15, 0.85) * width
        col = int(cx)
        hi, lo = bounds[top, col], bounds[bottom, col]
        span = max(lo - hi, 2.0)
        cy = hi + span * rng.uniform(0.3, 0.7)
        ry = max(span * rng.uniform(0.2, 0.45), 1.5)
        rx = min(ry * rng.uniform(1.3, 3.0), 0.12 * width)
        angle = rng.uniform(-0.3, 0.3)
        dx, dy = cols - cx, rows - cy
        u = (dx * np.cos(angle) + dy * np.sin(angle)) / rx
        v = (-dx * np.sin(angle) + dy * np.cos(angle)) / ry
        mask |= u ** 2 + v ** 2 <= 1.0
    return mask


# ----------------------------------------------------------------------------- rendering
def _render_volume(rng, num_slices, height, width, num_layers=7, fluid_prob=0.3):
    """Float images in [0, 1] and class masks, both (S, H, W); see :func:`make_volume`."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if num_slices < 1 or height < 32 or width < 32:
        raise ValueError(f"volume must be at least 1 x 32 x 32, got "
                         f"{num_slices} x {height} x {width}")
    fractions, intensity, thinning = _layer_table(num_layers)
    fluid_class = num_layers + 1
    bounds = _boundaries(rng, num_slices, height, width, fractions, thinning)

    # Count the boundaries above each pixel: 0 above the ILM, k inside layer k,
    # L + 1 below BM.
    rows = np.arange(height, dtype=np.float64)[None, None, :, None]
    depth_index = (rows >= bounds[:, :, None, :]).sum(axis=1)  # (S, H, W)
    masks = np.where(depth_index > num_layers, 0, depth_index).astype(np.uint8)

    # Per-volume brightness: real scans differ in contrast from one visit to another.
    layer_level = intensity * rng.uniform(0.9, 1.08) + rng.uniform(-0.03, 0.03,
                                                                   num_layers)
    levels = np.concatenate([[_VITREOUS_INTENSITY], layer_level, [0.0]])
    image = levels[depth_index]
    # Choroid: bright just below BM, fading with depth, with blotchy vessels.
    below = np.clip(rows[:, 0] - bounds[:, -1][:, None, :], 0, None)  # (S, H, W)
    vessels = cv2.GaussianBlur(rng.random((num_slices * height, width)), (0, 0), 2.5)
    vessels = (vessels - vessels.mean()) / (vessels.std() + 1e-6)
    choroid = _CHOROID_INTENSITY * np.exp(-below / (0.1 * height)) * (
        1 + 0.25 * vessels.reshape(num_slices, height, width)) + 0.03
    image = np.where(depth_index > num_layers, choroid, image)

    # Fluid pockets, only inside the retina.
    has_fluid = rng.random(num_slices) < fluid_prob
    for s in np.flatnonzero(has_fluid):  # a few slices; each is a whole-image operation
        pocket = _fluid_mask(rng, bounds[s], height, width, num_layers) & (masks[s] > 0)
        masks[s][pocket] = fluid_class
        image[s][pocket] = _FLUID_INTENSITY

    # Vessel shadows: retinal vessels dim every layer below them in a few columns.
    columns = np.ones((num_slices, width))
    for s in range(num_slices):
        for _ in range(rng.integers(0, 3)):
            c = rng.integers(0, width)
            columns[s, max(c - 2, 0):c + 2] = rng.uniform(0.7, 0.85)
    shadow = np.where(depth_index >= 2, columns[:, None, :], 1.0)
    image = image * shadow * (1 + 0.08 * _smooth_field(rng, num_slices, width))[:, None, :]

    # Optics: slight blur, then speckle (multiplicative, gamma distributed with mean 1,
    # grain a pixel or two wide) and a little additive detector noise.
    image = image.astype(np.float32)
    speckle = rng.gamma(4.0, 0.25, size=image.shape).astype(np.float32)
    for s in range(num_slices):  # OpenCV blurs one 2-D image at a time
        image[s] = cv2.GaussianBlur(image[s], (0, 0), 0.8)
        speckle[s] = cv2.GaussianBlur(speckle[s], (0, 0), 0.6)
    speckle /= speckle.mean()
    image = image * speckle + rng.normal(0, 0.025, image.shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0), masks


def make_volume(rng, num_slices, height, width, num_layers=7, fluid_prob=0.3):
    """One synthetic OCT volume.

    Args:
        rng: ``numpy.random.Generator``; the volume depends on nothing else.
        num_slices, height, width: volume size S, H, W (H, W >= 32).
        num_layers: retinal layers L (7 gives the Duke DME anatomy).
        fluid_prob: probability that a slice gets fluid pockets.

    Returns:
        bscans: uint8 (S, H, W) B-scans.
        masks: uint8 (S, H, W) class indices: 0 background, 1..L layers top to bottom,
            L + 1 fluid.
    """
    image, masks = _render_volume(rng, num_slices, height, width, num_layers, fluid_prob)
    return np.round(image * 255).astype(np.uint8), masks


# ----------------------------------------------------------------------------- dataset
def class_values(num_classes=len(CLASS_LABELS)):
    """Mask pixel value of each class: evenly spaced over 0..255 (0, 32, ..., 255)."""
    return [min(32 * i, 255) for i in range(num_classes)]


def _info_json(spacing=None):
    info = {str(i): {"value": value, "label": label}
            for i, (value, label) in enumerate(zip(class_values(), CLASS_LABELS))}
    if spacing:
        info["spacing"] = dict(spacing)
    return json.dumps(info, indent=4) + "\n"


def _quantise(image, bit_depth):
    """Float [0, 1] image -> uint8 or uint16 (the whole 16-bit range for 16 bits)."""
    if bit_depth == 8:
        return np.round(image * 255).astype(np.uint8)
    return np.round(image * 65535).astype(np.uint16)


def write_synthetic_dataset(root, name="Synth_OCT", splits=None, slices_per_volume=8,
                            size=(128, 192), bit_depth=8, seed=0, eval_only=False,
                            overwrite=False, spacing=None):
    """Write a small synthetic dataset in the benchmark layout; return its folder.

    Layout: ``<root>/<name>/INFO.json`` and ``<split>/{bscan,semseg}/<scan_id>_<slice>.png``
    for each split of ``splits`` (volumes per split, default train 6, val 2, test 2), or
    ``bscan/`` and ``semseg/`` at the top level with every volume when ``eval_only``.
    Scan ids (``synth000``, ``synth001``, ...) are unique across splits; masks hold the
    INFO.json values. ``size`` is (H, W); ``bit_depth`` 8 or 16 for the B-scans.
    ``spacing``: an INFO.json "spacing" entry ({"axial_um": ..., "lateral_um": ...,
    "bscan_um": ...}) to write; synthetic data has no real scale, so any given is made up.

    Volume ``i`` depends only on ``(seed, i)``, so the same seed gives identical files.
    The dataset is built in a temporary folder next to the target and renamed into place,
    so an interrupted call leaves no half-written dataset. An existing ``<root>/<name>``
    raises :class:`UserError` unless ``overwrite`` is true.
    """
    splits = {"train": 6, "val": 2, "test": 2} if splits is None else dict(splits)
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
    if any(not isinstance(n, int) or n < 0 for n in splits.values()):
        raise ValueError(f"splits must map split names to volume counts >= 0, got {splits}")
    height, width = size
    target = Path(root) / name
    if target.exists() and not overwrite:
        raise UserError(f"dataset folder {target} already exists; delete it or write the "
                        "synthetic dataset somewhere else")
    target.parent.mkdir(parents=True, exist_ok=True)

    values = np.asarray(class_values(), dtype=np.uint8)  # class index -> mask value
    with atomic_folder(target) as staging:
        write_text(staging / "INFO.json", _info_json(spacing))
        volume_index = 0
        for split, num_volumes in splits.items():
            folder = staging if eval_only else staging / split
            for _ in range(num_volumes):
                rng = np.random.default_rng([seed, volume_index])
                image, masks = _render_volume(rng, slices_per_volume, height, width)
                scan_id = f"synth{volume_index:03d}"
                for s in range(slices_per_volume):
                    write_png(folder / "bscan" / f"{scan_id}_{s}.png",
                              _quantise(image[s], bit_depth))
                    write_png(folder / "semseg" / f"{scan_id}_{s}.png", values[masks[s]])
                volume_index += 1
    return target
