"""Layer heights and mean thicknesses of predicted volumes, by the evaluation's rule.

    VolumeLayers(layer_labels, width)        collects one volume's boundary rows B-scan by
        .add(index_map)                      B-scan, in the order given (eyepy's order)
        .heights()  -> (n + 1, n_bscans, W)  boundary rows, NaN where absent
        .thickness() -> (n, n_bscans, W)     layer thickness in rows, NaN where unknown
    thickness_rows_csv(volume, layers, thickness, axial_um) -> CSV rows (dicts)

Boundaries are :func:`mirage.evaluate.layers.boundary_rows` (one definition, the one the
evaluation scores; docs/segmentation_tuning.md, "Layer boundaries and thickness"): row k < n
is the first row holding layer k or a layer below it, row n one past the last row of the
last layer; thickness of layer k is boundary k + 1 minus boundary k, in a column where both
exist. A mean thickness is over the columns where both exist; ``columns`` counts them.
"""
import numpy as np

from mirage.evaluate.layers import boundary_names, boundary_rows, thickness_rows

THICKNESS_COLUMNS = ("volume", "bscan", "layer", "thickness", "unit", "columns")
ALL_BSCANS = "all"  # the ``bscan`` of a volume's row: every column of every B-scan


class VolumeLayers:
    """The boundary rows of one volume's predicted B-scans.

    labels: the class labels (index -> label) of the index maps; layer_stack: the layer
    class indices, top to bottom (mirage.evaluate.class_plan.ClassPlan.layer_stack).
    """

    def __init__(self, labels, layer_stack):
        self.layer_stack = tuple(layer_stack)
        self.layers = [labels[i] for i in self.layer_stack]
        self.boundaries = boundary_names(labels, self.layer_stack)
        self._rows = []

    def add(self, index_map):
        """The next B-scan's class-index map (H, W); returns its (n + 1, W) boundary rows."""
        rows = boundary_rows(index_map, self.layer_stack)
        self._rows.append(rows)
        return rows

    def heights(self):
        """(n + 1, n_bscans, W) float64 boundary rows, B-scans in the order added."""
        return np.stack(self._rows, axis=1)

    def thickness(self):
        """(n, n_bscans, W) layer thickness in rows (NaN where a boundary is absent)."""
        return np.stack([thickness_rows(rows) for rows in self._rows], axis=1)


def _mean(values):
    """(mean over the finite values or None, how many)."""
    known = np.isfinite(values)
    count = int(known.sum())
    return (float(values[known].mean()) if count else None), count


def thickness_rows_csv(volume, layers, thickness, axial_um=None):
    """CSV rows (THICKNESS_COLUMNS) of one volume: per layer, one row per B-scan (its
    index) then one for the volume (``bscan`` = "all": the mean over every column of every
    B-scan where both boundaries exist). ``thickness``: (n, n_bscans, W) in rows;
    ``axial_um``: micrometres per row, or None (then in pixels: unit "px")."""
    factor, unit = (float(axial_um), "um") if axial_um else (1.0, "px")
    out = []
    for layer, maps in zip(layers, thickness):
        for bscan, values in [*enumerate(maps), (ALL_BSCANS, maps)]:
            mean, count = _mean(np.asarray(values, dtype=float))
            out.append({"volume": volume, "bscan": bscan, "layer": layer,
                        "thickness": "" if mean is None else round(mean * factor, 4),
                        "unit": unit, "columns": count})
    return out
