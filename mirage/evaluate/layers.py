"""Layer boundaries and thicknesses of a label map, and their per-B-scan error sums.

    boundary_rows(index_map, layer_indices) -> (n + 1, W) boundary rows, NaN where absent
    layer_sums(truth, pred, layer_indices)   -> (2n + 1, SUMS) error sums of one B-scan

The definition (docs/segmentation_tuning.md, "Layer boundaries and thickness"): the layers
are ``layer_indices``, n class indices from the top of the retina down. In each A-scan
(image column), boundary k < n is the top of layer k: the first row, from the top, that
holds layer k *or any layer below it*; boundary n is the bottom of the last layer: one past
the last row that holds it. Rows are pixel edges (boundary row r lies between image rows
r - 1 and r), so the thickness of layer k, boundary k + 1 minus boundary k, counts rows.
Every other class (background, lesions, invalid) is transparent: fluid enclosed in a layer
adds to that layer's thickness, and fluid at an interface moves the interface to the first
tissue below it (it counts to the layer above). A boundary is absent (NaN) in a column
without any pixel of its layer or a layer below (for boundary n: of the last layer); a
layer missing from a column whose deeper layers are there has thickness 0, as the inner
layers at the foveal pit. One definition, for scoring here and for layer height maps.
"""
import cv2
import numpy as np

# The per-boundary (and per-layer) sums of layer_sums, in this order: columns where truth
# and prediction both have it, the sums there of |pred - truth|, of pred - truth, of truth
# and of pred, and the columns where only the truth / only the prediction has it.
SUMS = ("both", "abs_error", "signed_error", "truth", "pred", "only_truth", "only_pred")


def boundary_rows(index_map, layer_indices):
    """Rows of the layer boundaries in every column of a label map.

    index_map: (H, W) integer class indices (e.g. a mask through its INFO.json table).
    layer_indices: the n layer classes, top to bottom. Returns (n + 1, W) float64: row k < n
    is the first row holding layer k or a layer below it; row n one past the last row of
    layer n - 1; NaN where a column has none (module docstring). Whole-array numpy, no
    loop: the map is looked up once (class -> depth in the stack, 0 for other classes),
    its band of rows holding layers transposed so that columns are contiguous, and
    compared with every depth at once.
    """
    labels = np.asarray(index_map)
    height, width = labels.shape
    n = len(layer_indices)
    if n == 0:
        return np.empty((0, width))
    if n > 254:
        raise ValueError(f"at most 254 layers, not {n}")
    size = 256 if labels.dtype == np.uint8 else int(max(labels.max(), max(layer_indices))) + 1
    depth_of = np.zeros(size, np.uint8)  # 0: not a layer; layer k -> k + 1
    depth_of[list(layer_indices)] = np.arange(1, n + 1)
    # OpenCV's table look-up and transpose are ~4x and ~10x faster than numpy's here.
    depth = cv2.LUT(labels, depth_of) if labels.dtype == np.uint8 else depth_of[labels]
    # Only the band of rows holding any layer is searched (the retina, not the vitreous
    # or the choroid); rows are counted from the image top again below.
    layered = np.flatnonzero(depth.max(axis=1))
    if layered.size == 0:
        return np.full((n + 1, width), np.nan)
    top, end = int(layered[0]), int(layered[-1]) + 1
    columns = cv2.transpose(np.ascontiguousarray(depth[top:end]))  # (W, rows): A-scans
    # deeper[j, k, i]: row i of column j holds layer k or one below it; its first True
    # is the top of layer k (argmax gives 0 where there is none: checked after).
    deeper = columns[:, None, :] >= np.arange(1, n + 1, dtype=np.uint8)[None, :, None]
    first = np.argmax(deeper, axis=2)  # (W, n)
    found = np.take_along_axis(deeper, first[:, :, None], axis=2)[:, :, 0]
    rows = np.where(found, first + top, np.nan).T  # (n, W)
    # bottom of the last layer: one past its last row (present where its top is)
    bottom = end - np.argmax(columns[:, ::-1] == n, axis=1)
    return np.vstack([rows, np.where(found[:, -1], bottom, np.nan)[None]])


def thickness_rows(rows):
    """(n + 1, W) boundary rows -> (n, W) layer thicknesses in rows (NaN where either of its
    boundaries is absent)."""
    return np.diff(rows, axis=0)


def pair_sums(truth, pred):
    """(m, W) values of truth and prediction (NaN: absent) -> (m, len(SUMS)) float64 sums."""
    has_truth, has_pred = ~np.isnan(truth), ~np.isnan(pred)
    both = has_truth & has_pred
    error = np.where(both, pred - truth, 0.0)
    return np.stack([both.sum(axis=1), np.abs(error).sum(axis=1), error.sum(axis=1),
                     np.where(both, truth, 0.0).sum(axis=1),
                     np.where(both, pred, 0.0).sum(axis=1),
                     (has_truth & ~has_pred).sum(axis=1), (has_pred & ~has_truth).sum(axis=1)],
                    axis=1).astype(np.float64)


def layer_sums(truth, pred, layer_indices):
    """One B-scan's sums (SUMS) per boundary (rows 0..n) then per layer thickness (rows
    n + 1..2n), from its truth and prediction class-index maps; (2n + 1, len(SUMS))."""
    truth_rows = boundary_rows(truth, layer_indices)
    pred_rows = boundary_rows(pred, layer_indices)
    return np.vstack([pair_sums(truth_rows, pred_rows),
                      pair_sums(thickness_rows(truth_rows), thickness_rows(pred_rows))])


def boundary_names(labels, layer_indices):
    """'top of A', 'A | B', ..., 'bottom of Z' for the layers (labels of ``layer_indices``)."""
    names = [labels[c] for c in layer_indices]
    if not names:
        return []
    return ([f"top of {names[0]}"] + [f"{a} | {b}" for a, b in zip(names, names[1:])]
            + [f"bottom of {names[-1]}"])
