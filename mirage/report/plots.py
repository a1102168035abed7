"""The reports' figures, drawn with matplotlib and returned as PNG bytes.

matplotlib: the standard, well-kept Python plotting library (wheels for every platform, no
browser or JavaScript needed, PNG output that any HTML viewer shows offline). Figures are
built with ``matplotlib.figure.Figure`` (no pyplot state, no display needed).

    training_curves(log)            losses, validation mIoU and learning rate per epoch
    class_iou_curves(log)           per-class validation IoU per epoch
    box_plots(rows)                 per-volume Dice and HD95 per class
    boundary_box_plots(values, t)   per-volume boundary errors per boundary (and model)
    heat_map(values, rows, cols)    e.g. mean Dice, model x dataset
    colour_limits(values, span)     a heat map's colour scale, never narrower than span
    class_colors(K)                 class colours (no red: red marks errors)
    legend_png(entries, title)      colour swatches with their labels, as a PNG

Every figure uses matplotlib's constrained layout and is sized from its labels, so long
labels stay inside the image (tight_layout gives up with a warning and cuts them).
"""
import colorsys
import io
import re

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

_DPI = 90
ERROR_RGB = (1.0, 0.1, 0.1)  # wrong pixels in the overlays; no class colour is red-like
HEAT_MAP_COLUMN_CHARS = 14  # longer dataset names are wrapped onto lines this long
HEAT_MAP_COLUMN_LINES = 3  # ... and abbreviated (with a legend) beyond this many lines


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


def is_red_like(rgb):
    """True for colours a reader could take for the error red (hue within 20 degrees of
    red, saturated and not dark)."""
    hue, saturation, value = colorsys.rgb_to_hsv(*rgb[:3])
    return min(hue, 1 - hue) * 360 <= 20 and saturation >= 0.35 and value >= 0.35


def class_colors(num_classes):
    """(K, 3) float RGB, one distinct colour per class index, none of them red-like: red
    (ERROR_RGB) marks the wrong pixels of the overlays."""
    import matplotlib
    names = ("tab10",) if num_classes <= 8 else ("tab20", "tab20b")
    palette = [c[:3] for name in names for c in matplotlib.colormaps[name].colors
               if not is_red_like(c)]
    return np.array([palette[i % len(palette)] for i in range(num_classes)])


def legend_png(entries, title, notes=()):
    """PNG bytes of a colour legend: one row per entry [(label, (r, g, b) in 0..255)], a
    swatch of exactly that colour (no edge, no antialiasing) and the label; ``notes``:
    lines of text below. The labels and notes are also stored in the PNG's Description
    text, so a program (or a test) can read what it says."""
    from matplotlib.patches import Rectangle
    lines = [label for label, _ in entries] + list(notes)
    width = 0.9 + 0.075 * max([len(title)] + [len(line) for line in lines])
    fig = Figure(figsize=(width, 0.5 + 0.28 * (len(lines) + 1)))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    rows = len(lines) + 1
    ax.set_xlim(0, width)
    ax.set_ylim(rows + 0.5, -0.2)
    ax.text(0.15, 0.3, title, fontsize=9, fontweight="bold", va="center")
    for row, (label, rgb) in enumerate(entries, 1):
        ax.add_patch(Rectangle((0.15, row), 0.45, 0.6, facecolor=np.array(rgb) / 255,
                               edgecolor="none", antialiased=False))
        ax.text(0.75, row + 0.3, label, fontsize=8, va="center")
    for row, note in enumerate(notes, len(entries) + 1):
        ax.text(0.15, row + 0.3, note, fontsize=8, va="center", color="#444")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, facecolor="white",
                metadata={"Software": None, "Title": title,
                          "Description": "\n".join(
                              [f"{label}: rgb{tuple(rgb)}" for label, rgb in entries]
                              + list(notes))})
    return buffer.getvalue()


def _integer_epochs(ax):
    """Epochs are whole numbers: no 0.5-epoch ticks on short runs."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


# ----------------------------------------------------------------------------- training
def _series(log, key):
    points = [(e["epoch"], e[key]) for e in log
              if isinstance(e.get("epoch"), int) and isinstance(e.get(key), (int, float))]
    if not points:
        return None
    epochs, values = zip(*sorted(points))
    return np.array(epochs), np.array(values, dtype=float)


# Validation mIoU series: the first of identical series is drawn (val/mIoU is the same
# numbers as val/mIoU_all in current logs, and would hide under it).
_MIOU_SERIES = (("val/mIoU_all", "validation, all classes"),
                ("val/mIoU_fg", "validation, foreground"), ("val/mIoU", "validation mIoU"))


def training_curves(log):
    """Figure with losses, mIoU (%) and learning rate over epochs, or None.

    The mIoU panel draws each distinct validation series once, and the test score of the
    best checkpoint (log.txt's test line) as its own dashed line and marker.
    """
    if not any(isinstance(e.get("epoch"), int) for e in log):
        return None
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    axes = fig.subplots(1, 3)
    for key, name in (("train/loss", "train"), ("val/loss", "validation")):
        series = _series(log, key)
        if series is not None:
            axes[0].plot(*series, marker="." if len(series[0]) < 30 else None, label=name)
    axes[0].set_title("loss")
    drawn = []
    for key, name in _MIOU_SERIES:
        series = _series(log, key)
        if series is None or any(_same_series(series, other) for other in drawn):
            continue
        drawn.append(series)
        axes[1].plot(series[0], 100 * series[1], label=name)
    _draw_test_score(axes[1], log)
    axes[1].set_title("mIoU (%)")
    series = _series(log, "train/lr")
    if series is not None:
        axes[2].plot(*series, color="tab:purple")
    axes[2].set_title("learning rate")
    axes[2].ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for ax in axes:
        ax.set_xlabel("epoch")
        _integer_epochs(ax)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return fig


def _same_series(a, b):
    return a[0].shape == b[0].shape and np.array_equal(a[0], b[0]) and \
        np.allclose(a[1], b[1], equal_nan=True)


def _draw_test_score(ax, log):
    """The last test line's mIoU: a dashed level across the panel and a marker at the
    epoch of the checkpoint tested, one legend entry that says it is the test score."""
    tests = [e for e in log if isinstance(e.get("test_epoch"), int)
             and isinstance(e.get("test/mIoU"), (int, float))]
    if not tests:
        return
    epoch, value = tests[-1]["test_epoch"], 100 * tests[-1]["test/mIoU"]
    ax.axhline(value, color="black", linestyle="--", linewidth=1, zorder=2)
    # One point drawn with the level's line style: its legend entry shows both.
    ax.plot([epoch], [value], color="black", marker="D", markersize=5, linestyle="--",
            linewidth=1, zorder=3, label=f"test (best checkpoint, epoch {epoch}): "
                                         f"{value:.1f}")


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
    fig = Figure(figsize=(8, 3.4), layout="constrained")
    ax = fig.subplots()
    colors = class_colors(len(per_class))
    for color, (label, points) in zip(colors, per_class.items()):
        epochs, values = zip(*sorted(points))
        ax.plot(epochs, 100 * np.array(values, dtype=float), label=label, color=color)
    ax.set_xlabel("epoch")
    ax.set_ylabel("IoU (%)")
    ax.set_title("validation IoU per class")
    _integer_epochs(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    return fig


# ----------------------------------------------------------------------------- test scores
def box_plots(rows):
    """Per-volume Dice (%) and HD95 (px) per class: rows has Class, Dice, HD95 columns."""
    classes = list(dict.fromkeys(rows["Class"]))
    fig = Figure(figsize=(min(14, max(6, 0.9 * len(classes) + 2)), 6.4), layout="constrained")
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
    return fig


def boundary_box_plots(values, title):
    """Per-volume values per layer boundary: {boundary: {model label: values}}, one box
    per model side by side at each boundary (one model: the label ""), NaN left out."""
    boundaries = list(values)
    labels = list(dict.fromkeys(label for by_label in values.values() for label in by_label))
    width = 0.8 / max(1, len(labels))
    fig = Figure(figsize=(min(14, max(6, (0.5 + 0.35 * len(labels)) * len(boundaries) + 2)),
                          3.6 + 0.25 * (len(labels) > 1) * len(labels)), layout="constrained")
    ax = fig.subplots()
    colors = class_colors(max(1, len(labels)))
    for k, label in enumerate(labels):
        data, positions = [], []
        for i, boundary in enumerate(boundaries):
            found = np.asarray(values[boundary].get(label, []), dtype=float)
            found = found[np.isfinite(found)]
            if found.size:
                data.append(found)
                positions.append(i + 1 + (k - (len(labels) - 1) / 2) * width)
        if data:
            parts = ax.boxplot(data, positions=positions, widths=0.9 * width, showmeans=True,
                               patch_artist=len(labels) > 1)
            for box in parts["boxes"] if len(labels) > 1 else []:
                box.set_facecolor((*colors[k], 0.45))
            if len(labels) > 1:
                parts["boxes"][0].set_label(label)
    ax.set_xticks(range(1, len(boundaries) + 1))
    ax.set_xticklabels(boundaries, rotation=30, ha="right", fontsize=8)
    ax.set_xlim(0.4, len(boundaries) + 0.6)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    if len(labels) > 1:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


# ----------------------------------------------------------------------------- studies
def wrap_label(text, width=HEAT_MAP_COLUMN_CHARS):
    """``text`` on lines of at most ``width`` characters, broken after '_', '-' or ' '
    (and inside a longer word only where it must be); nothing is cut."""
    lines, line = [], ""
    for token in re.split(r"(?<=[_\- ])", str(text)):
        while len(token) > width:  # one word longer than a line: split it
            if line:
                lines.append(line)
                line = ""
            lines.append(token[:width])
            token = token[width:]
        if len(line) + len(token.rstrip()) > width and line:
            lines.append(line)
            line = ""
        line += token
    lines.append(line)
    return "\n".join(part.rstrip() for part in lines if part.strip())


def short_labels(names, width=HEAT_MAP_COLUMN_CHARS, max_lines=HEAT_MAP_COLUMN_LINES):
    """(labels to show, legend [(short, name)]): each name wrapped (wrap_label), or "D1",
    "D2", ... for all of them when one would need more than ``max_lines`` lines."""
    wrapped = [wrap_label(name, width) for name in names]
    if all(text.count("\n") < max_lines for text in wrapped):
        return wrapped, []
    shorts = [f"D{i}" for i in range(1, len(names) + 1)]
    return shorts, list(zip(shorts, names))


def colour_limits(values, min_span, natural=(-np.inf, np.inf)):
    """(low, high) of a heat map's colour scale: the range of the finite ``values``,
    widened about its centre to at least ``min_span`` (never wider than ``natural``, the
    metric's own range, e.g. (0, 100) for Dice in %), then moved inside ``natural``
    whole. A colour scale spanning only the data would paint 33.75 and 33.90 as far apart
    as 10 and 90: differences below the span keep similar colours.
    """
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    if not finite.size:
        return 0.0, 1.0
    low, high = float(finite.min()), float(finite.max())
    span = max(high - low, float(min_span))
    if np.isfinite(natural[0]) and np.isfinite(natural[1]):
        span = min(span, natural[1] - natural[0])
    centre = (low + high) / 2
    low, high = centre - span / 2, centre + span / 2
    if low < natural[0]:
        low, high = natural[0], natural[0] + span
    if high > natural[1]:
        low, high = natural[1] - span, natural[1]
    if high <= low:  # one value and no span asked for: any scale shows it
        high = low + 1.0
    return low, high


def heat_map(values, row_labels, column_labels, title, higher_is_better=True, marks=None,
             min_span=0.0, natural=(-np.inf, np.inf), unit=""):
    """A model x dataset heat map with each value written in its cell; NaN cells blank.

    Column labels may hold line breaks (short_labels); marks: (rows, columns) texts added
    after the values (e.g. "†"). The colour scale is colour_limits(values, min_span,
    natural); the figure states it under the plot ("colour scale 28.8 to 38.8 %, at
    least 10 wide") when min_span is given. The figure is sized from its labels, so
    nothing is cut.
    """
    values = np.asarray(values, dtype=float)
    label_chars = max([len(str(label)) for label in row_labels] + [1])
    lines = max([str(label).count("\n") + 1 for label in column_labels] + [1])
    column_chars = max([len(part) for label in column_labels
                        for part in str(label).split("\n")] + [1])
    column_width = max(0.9, 0.085 * column_chars + 0.2)
    width = 0.075 * label_chars + column_width * len(column_labels) + 1.8
    height = 0.42 * len(row_labels) + 0.2 * lines + 1.2
    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.subplots()
    masked = np.ma.masked_invalid(values)
    low, high = colour_limits(values, min_span, natural)
    image = ax.imshow(masked, cmap="viridis" if higher_is_better else "viridis_r",
                      aspect="auto", vmin=low, vmax=high)
    ax.set_xticks(range(len(column_labels)))
    ax.set_xticklabels(column_labels, fontsize=8)
    ax.set_yticks(range(len(row_labels)))
    ax.set_yticklabels(row_labels, fontsize=8)
    middle = (low + high) / 2  # the colour map is dark below it (above: viridis_r)
    for (i, j), value in np.ndenumerate(values):
        if np.isfinite(value):
            dark = (value < middle) == higher_is_better
            mark = f" {marks[i, j]}" if marks is not None and marks[i, j] else ""
            ax.text(j, i, f"{value:.1f}{mark}", ha="center", va="center", fontsize=8,
                    color="white" if dark else "black")
    ax.set_title(title, fontsize=10)
    if min_span:
        ax.set_xlabel(scale_text(low, high, min_span, unit), fontsize=7)
    fig.colorbar(image, ax=ax, fraction=0.04)
    return fig


def scale_text(low, high, min_span, unit=""):
    """The colour scale in words: 'colour scale 28.8 to 38.8 %, at least 10 wide'."""
    unit = f" {unit}" if unit else ""
    return f"colour scale {low:.1f} to {high:.1f}{unit}, at least {min_span:g} wide"
