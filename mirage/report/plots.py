"""The reports' figures, drawn with matplotlib and returned as PNG bytes.

matplotlib: the standard, well-kept Python plotting library (wheels for every platform, no
browser or JavaScript needed, PNG output that any HTML viewer shows offline). Figures are
built with ``matplotlib.figure.Figure`` (no pyplot state, no display needed).

    training_curves(log)            losses, validation mIoU and learning rate per epoch
    class_iou_curves(log)           per-class validation IoU per epoch
    box_plots(rows)                 per-volume Dice and HD95 per class
    heat_map(values, rows, cols)    e.g. mean Dice, model x dataset
"""
import io

import numpy as np
from matplotlib.figure import Figure

_DPI = 90


def to_png(fig, dpi=_DPI):
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return buffer.getvalue()


def rgb_png(rgb):
    """(H, W, 3) uint8 RGB image -> PNG bytes, pixel for pixel."""
    from matplotlib.image import imsave
    buffer = io.BytesIO()
    imsave(buffer, rgb, format="png", metadata={"Software": None})
    return buffer.getvalue()


def class_colors(num_classes):
    """(K, 3) float RGB, one distinct colour per class index."""
    import matplotlib
    cmap = matplotlib.colormaps["tab10" if num_classes <= 10 else "tab20"]
    return np.array([cmap(i % cmap.N)[:3] for i in range(num_classes)])


# ----------------------------------------------------------------------------- training
def _series(log, key):
    points = [(e["epoch"], e[key]) for e in log
              if isinstance(e.get("epoch"), int) and isinstance(e.get(key), (int, float))]
    if not points:
        return None
    epochs, values = zip(*sorted(points))
    return np.array(epochs), np.array(values, dtype=float)


def training_curves(log):
    """Figure with losses, validation mIoU (%) and learning rate over epochs, or None."""
    if not any(isinstance(e.get("epoch"), int) for e in log):
        return None
    fig = Figure(figsize=(12, 3.4))
    axes = fig.subplots(1, 3)
    for key, name in (("train/loss", "train"), ("val/loss", "validation")):
        series = _series(log, key)
        if series is not None:
            axes[0].plot(*series, marker="." if len(series[0]) < 30 else None, label=name)
    axes[0].set_title("loss")
    for key, name in (("val/mIoU", "mIoU"), ("val/mIoU_fg", "mIoU foreground"),
                      ("val/mIoU_all", "mIoU all classes")):
        series = _series(log, key)
        if series is not None:
            axes[1].plot(series[0], 100 * series[1], label=name)
    tests = [(e["test_epoch"], e["test/mIoU"]) for e in log
             if isinstance(e.get("test_epoch"), int)
             and isinstance(e.get("test/mIoU"), (int, float))]
    if tests:
        axes[1].scatter([t[0] for t in tests], [100 * t[1] for t in tests], color="black",
                        marker="*", s=80, zorder=3, label="test (best checkpoint)")
    axes[1].set_title("validation mIoU (%)")
    series = _series(log, "train/lr")
    if series is not None:
        axes[2].plot(*series, color="tab:purple")
    axes[2].set_title("learning rate")
    axes[2].ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def class_iou_curves(log):
    """Figure of each class's validation IoU (%) over epochs (log's ``val/IoU``), or None."""
    per_class = {}
    for entry in log:
        ious = entry.get("val/IoU")
        if isinstance(entry.get("epoch"), int) and isinstance(ious, dict):
            for label, value in ious.items():
                if isinstance(value, (int, float)):
                    per_class.setdefault(label, []).append((entry["epoch"], value))
    if not per_class:
        return None
    fig = Figure(figsize=(8, 3.4))
    ax = fig.subplots()
    colors = class_colors(len(per_class))
    for color, (label, points) in zip(colors, per_class.items()):
        epochs, values = zip(*sorted(points))
        ax.plot(epochs, 100 * np.array(values, dtype=float), label=label, color=color)
    ax.set_xlabel("epoch")
    ax.set_ylabel("IoU (%)")
    ax.set_title("validation IoU per class")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- test scores
def box_plots(rows):
    """Per-volume Dice (%) and HD95 (px) per class: rows has Class, Dice, HD95 columns."""
    classes = list(dict.fromkeys(rows["Class"]))
    fig = Figure(figsize=(min(14, max(6, 0.9 * len(classes) + 2)), 6.4))
    axes = fig.subplots(2, 1)
    for ax, metric, scale, unit in ((axes[0], "Dice", 100, "%"), (axes[1], "HD95", 1, "px")):
        data = []
        for label in classes:
            values = rows.loc[rows["Class"] == label, metric].to_numpy(dtype=float) * scale
            data.append(values[np.isfinite(values)])
        positions = [i + 1 for i, d in enumerate(data) if d.size]
        if positions:
            ax.boxplot([d for d in data if d.size], positions=positions, widths=0.6,
                       showmeans=True)
        ax.set_xticks(range(1, len(classes) + 1))
        ax.set_xticklabels(classes, rotation=30, ha="right", fontsize=8)
        ax.set_xlim(0.4, len(classes) + 0.6)
        ax.set_title(f"{metric} per volume ({unit})")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- studies
def heat_map(values, row_labels, column_labels, title, higher_is_better=True):
    """A model x dataset heat map with each value written in its cell; NaN cells blank."""
    values = np.asarray(values, dtype=float)
    fig = Figure(figsize=(1.6 * len(column_labels) + 3, 0.45 * len(row_labels) + 1.6))
    ax = fig.subplots()
    masked = np.ma.masked_invalid(values)
    image = ax.imshow(masked, cmap="viridis" if higher_is_better else "viridis_r",
                      aspect="auto")
    ax.set_xticks(range(len(column_labels)))
    ax.set_xticklabels(column_labels, rotation=20, ha="right", fontsize=8)
    ax.set_yticks(range(len(row_labels)))
    ax.set_yticklabels(row_labels, fontsize=8)
    finite = values[np.isfinite(values)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0
    for (i, j), value in np.ndenumerate(values):
        if np.isfinite(value):
            dark = (value < middle) == higher_is_better
            ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=8,
                    color="white" if dark else "black")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    return fig
