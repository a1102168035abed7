"""En-face maps of a predicted layer's thickness, as PNG bytes (matplotlib, as the
report figures: mirage/report/plots.py).

    thickness_map_png(thickness, title, unit, spacing) -> PNG bytes

Rows are the volume's B-scans in anatomical order: eyepy's B-scan 0 is the bottom-most
one, so it is drawn at the bottom (``origin="lower"``); columns are A-scans. With the
lateral and B-scan spacings known, each pixel is drawn as wide and as tall as it is on the
retina; otherwise the map fills the axes. Columns where the layer's thickness is unknown
(a boundary absent) are grey.
"""
import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from mirage.report.plots import to_png

UNKNOWN_GREY = "0.8"


def thickness_map_png(thickness, title, unit, spacing=None):
    """thickness: (n_bscans, W) (eyepy's B-scan order, NaN where unknown); unit: "um" or
    "px"; spacing: {"lateral_um", "bscan_um"} when the file has them."""
    values = np.asarray(thickness, dtype=float)
    spacing = spacing or {}
    lateral, across = spacing.get("lateral_um"), spacing.get("bscan_um")
    aspect = across / lateral if lateral and across else "auto"
    known = values[np.isfinite(values)]
    low, high = (float(known.min()), float(known.max())) if known.size else (0.0, 1.0)
    if high <= low:
        high = low + 1.0
    fig = Figure(figsize=(6.4, 4.8), layout="constrained")
    ax = fig.add_subplot()
    cmap = colormaps["viridis"].with_extremes(bad=UNKNOWN_GREY)
    image = ax.imshow(np.ma.masked_invalid(values), origin="lower", aspect=aspect,
                      cmap=cmap, vmin=low, vmax=high, interpolation="nearest")
    fig.colorbar(image, ax=ax, label=f"thickness ({'µm' if unit == 'um' else 'pixels'})")
    ax.set_xlabel("A-scan")
    ax.set_ylabel("B-scan (bottom-most first)")
    note = "" if known.size else " (no column with this layer)"
    ax.set_title(title + note)
    return to_png(fig)
