"""Per-volume evaluation metrics: Dice, IoU and HD95 as run_seg_eval.py reports them."""
import functools
import math

import numpy as np
from scipy.spatial import cKDTree


# Dice, IoU and HD95 as run_seg_eval.py reports them; docs/segmentation_tuning.md
# ("Evaluation") gives the definitions and conventions. HD95 is defined as MONAI's
# compute_hausdorff_distance(percentile=95): same boundary pixels, same float32 distances,
# same percentile arithmetic, so the numbers agree bit for bit (tests/test_eval_metrics.py).
EPSILON = 1e-6
HD_PERCENTILE = 95.0
NO_EDGE = 255  # marks "no boundary pixel here" in the padded boundary-label images below

# Nearest boundary pixels are first looked for among the offsets within this many pixels
# (vectorised, all classes at once); the few points farther away fall back to a KD-tree.
# Measured on 496x768 layer masks this is ~3.5x faster than a KD-tree for every point and
# ~8x faster than distance transforms over the bounding box (benchmarks/bench_eval.py).
_SEARCH_RADIUS = 6


def dice_score(intersection, pred_count, true_count):
    """Dice = 2|P∩G| / (|P| + |G| + 1e-6) from pixel counts (scalars or arrays)."""
    return 2 * intersection / (pred_count + true_count + EPSILON)


def iou_score(intersection, pred_count, true_count):
    """IoU = |P∩G| / (|P| + |G| - |P∩G| + 1e-6) from pixel counts (scalars or arrays)."""
    return intersection / (pred_count + true_count - intersection + EPSILON)


def label_boundaries(labels):
    """(H, W) labels -> (H, W) bool: pixels with a 4-neighbour of another label.

    Pixels on the image border count too, because outside the image is background. For
    every class c, ``(labels == c) & label_boundaries(labels)`` is exactly
    ``mask XOR binary_erosion(mask)`` of c's mask (scipy's default cross, border 0), so one
    pass gives the boundaries of all classes.
    """
    edges = np.ones(labels.shape, dtype=bool)
    centre = labels[1:-1, 1:-1]
    edges[1:-1, 1:-1] = ((centre != labels[:-2, 1:-1]) | (centre != labels[2:, 1:-1])
                         | (centre != labels[1:-1, :-2]) | (centre != labels[1:-1, 2:]))
    return edges


def mask_boundary(mask):
    """(H, W) bool mask -> (H, W) bool: the mask minus its 4-connected erosion."""
    mask = np.asarray(mask, dtype=bool)
    return mask & label_boundaries(mask)


def percentile_float32(sq_distances, percentile=HD_PERCENTILE):
    """Linearly interpolated percentile of float32 distances, as ``torch.quantile`` does it.

    sq_distances: non-empty 1-D integer array of squared pixel distances; the distances are
    float32(sqrt(.)) like MONAI's. Replicates torch's arithmetic so results are identical:
    rank = float32(q) * (n - 1) in double precision, the two neighbouring order statistics,
    and a float32 lerp computed as one fused multiply-add from the nearer end.
    """
    n = sq_distances.size
    rank = float(np.float32(percentile / 100)) * (n - 1)
    below_rank, above_rank = int(rank), math.ceil(rank)
    picked = np.partition(sq_distances, (below_rank, above_rank))[[below_rank, above_rank]]
    below, above = np.sqrt(picked.astype(np.float64)).astype(np.float32)
    weight = np.float32(rank - below_rank)
    if weight < 0.5:
        coeff, base = weight, below
    else:
        coeff, base = weight - np.float32(1), above
    # float32 * float32 is exact in double, so rounding the double sum to float32 gives the
    # fused multiply-add (barring a double-rounding tie, ~1e-9 likely per value).
    return float(np.float32(float(coeff) * float(above - below) + float(base)))


@functools.lru_cache(maxsize=16)
def _search_levels(padded_width, radius=_SEARCH_RADIUS):
    """Offsets within ``radius``, grouped by squared length: [(d², flat offsets), ...].

    Flat offsets index a row-major image ``padded_width`` pixels wide; levels ascend.
    """
    steps = np.arange(-radius, radius + 1)
    dy, dx = (a.ravel() for a in np.meshgrid(steps, steps, indexing="ij"))
    sq = dy * dy + dx * dx
    inside = sq <= radius * radius
    dy, dx, sq = dy[inside], dx[inside], sq[inside]
    return [(int(s), (dy[sq == s] * padded_width + dx[sq == s]).astype(np.int64))
            for s in np.unique(sq)]


class _Boundaries:
    """Boundary pixels of every class of one label image, padded for offset look-ups.

    image: (H + 2R, W + 2R) uint8, the class index at boundary pixels, NO_EDGE elsewhere.
    flat:  (N,) int64 flat indices into ``image`` of the boundary pixels, grouped by class;
           class c's are ``flat[starts[c]:starts[c + 1]]``.
    """

    def __init__(self, labels, num_classes, pad=_SEARCH_RADIUS):
        height, width = labels.shape
        self.width = width + 2 * pad
        self.pad = pad
        self.image = np.full((height + 2 * pad, self.width), NO_EDGE, dtype=np.uint8)
        self.image[pad:pad + height, pad:pad + width] = np.where(
            label_boundaries(labels), labels, NO_EDGE)
        flat = np.flatnonzero(self.image != NO_EDGE)
        classes = self.image.ravel()[flat]
        order = np.argsort(classes, kind="stable")
        self.flat = flat[order]
        self.starts = np.searchsorted(classes[order], np.arange(num_classes + 1))

    def of_class(self, c):
        return self.flat[self.starts[c]:self.starts[c + 1]]

    def counts(self):
        return np.diff(self.starts)

    def coords(self, flat):
        """(N,) flat indices -> (N, 2) int64 (row, column) in the padded image."""
        return np.stack(np.divmod(flat, self.width), axis=1)


def _directed_sq_distances(src, dst, classes):
    """Squared distance from each boundary pixel of ``src`` to the nearest one of ``dst``.

    Only classes in ``classes`` (present in both images) are measured. Returns
    {class: (N_c,) int64}, N_c = number of class-c boundary pixels of ``src``.
    """
    points = np.concatenate([src.of_class(c) for c in classes])
    point_class = src.image.ravel()[points]
    sq = np.full(points.size, -1, dtype=np.int64)
    dst_flat = dst.image.ravel()
    todo = np.arange(points.size)
    for level_sq, offsets in _search_levels(src.width):
        if todo.size == 0:
            break
        neighbours = dst_flat[points[todo, None] + offsets[None, :]]
        found = (neighbours == point_class[todo, None]).any(axis=1)
        sq[todo[found]] = level_sq
        todo = todo[~found]
    if todo.size:  # farther than the search radius: exact nearest neighbour by KD-tree
        for c in np.unique(point_class[todo]):
            far = todo[point_class[todo] == c]
            targets = dst.coords(dst.of_class(c))
            queries = src.coords(points[far])
            nearest = cKDTree(targets).query(queries)[1]
            diff = targets[nearest] - queries
            sq[far] = (diff * diff).sum(axis=1)
    bounds = np.cumsum([0] + [src.starts[c + 1] - src.starts[c] for c in classes])
    return {c: sq[bounds[i]:bounds[i + 1]] for i, c in enumerate(classes)}


def hd95_per_class(pred, truth, classes, one_empty_value=float("nan")):
    """Symmetric 95th-percentile Hausdorff distance (pixels) per class of one B-scan.

    pred, truth: (H, W) integer class-index images (values < 255).
    classes: class indices to score. Returns (len(classes),) float64:
    both masks empty -> 0; exactly one empty -> ``one_empty_value``; otherwise
    max(P95 pred->truth, P95 truth->pred) over the boundary pixels (see mask_boundary).
    """
    pred = np.asarray(pred)
    truth = np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"shapes differ: prediction {pred.shape}, truth {truth.shape}")
    num_classes = int(max(pred.max(), truth.max(), max(classes, default=0))) + 1
    if num_classes > NO_EDGE:
        raise ValueError(f"class indices must be < {NO_EDGE}")
    pred_b = _Boundaries(pred.astype(np.uint8, copy=False), num_classes)
    truth_b = _Boundaries(truth.astype(np.uint8, copy=False), num_classes)
    in_pred, in_truth = pred_b.counts() > 0, truth_b.counts() > 0
    both = [c for c in classes if in_pred[c] and in_truth[c]]
    result = np.array([0.0 if not (in_pred[c] or in_truth[c]) else one_empty_value
                       for c in classes], dtype=np.float64)
    if both:
        forward = _directed_sq_distances(pred_b, truth_b, both)
        backward = _directed_sq_distances(truth_b, pred_b, both)
        for i, c in enumerate(classes):
            if c in forward:
                result[i] = max(percentile_float32(forward[c]), percentile_float32(backward[c]))
    return result


def hd95(pred_mask, true_mask, one_empty_value=float("nan")):
    """HD95 (pixels) between two (H, W) binary masks; conventions as in hd95_per_class."""
    pred = np.asarray(pred_mask, dtype=bool).astype(np.uint8)
    truth = np.asarray(true_mask, dtype=bool).astype(np.uint8)
    return float(hd95_per_class(pred, truth, [1], one_empty_value)[0])
