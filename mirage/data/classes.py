"""A dataset's classes: INFO.json read into a ClassTable, and what class labels mean; the
optional physical pixel spacing INFO.json may give.

INFO.json maps class indices to ``{"value": <mask pixel value>, "label": <name>}``
(docs/segmentation_benchmark.md). Labels are compared lower-cased and stripped. An entry
``"spacing": {"axial_um": 3.87, "lateral_um": 11.5, "bscan_um": 120}`` (any of the three
may be missing) gives micrometres per pixel down an A-scan (rows), across a B-scan
(columns) and between B-scans; read by :func:`read_spacing`, never by the class table.
"""
import json
import math
from dataclasses import dataclass
from typing import Optional
from pathlib import Path

import numpy as np

from mirage.data.problems import DatasetProblems
from mirage.errors import UserError

BACKGROUND_LABELS = ("background", "bg")  # the default --ignore_index class
UNKNOWN_CLASS = 255  # class index a mask value not in INFO.json maps to
LESION_LABELS = ("fluid", "cyst", "ped", "srf", "irf")  # scored apart from layers
SPACING_KEY = "spacing"  # INFO.json's optional physical scale; not a class
SPACING_AXES = ("axial_um", "lateral_um", "bscan_um")
SPACING_OPTION = "--spacing"  # the source of a spacing given on the command line


@dataclass(frozen=True)
class ClassTable:
    """The classes of a dataset, read from its INFO.json.

    ``values[i]`` is the pixel intensity that marks class ``i`` in the masks and
    ``labels[i]`` its name.
    """

    values: tuple
    labels: tuple
    source: str = "INFO.json"

    @property
    def num_classes(self):
        return len(self.values)

    def entries(self):
        """``[[value, label], ...]``: the table as run files record it (identity.json,
        checkpoints, prediction manifests)."""
        return [[int(v), str(label)] for v, label in zip(self.values, self.labels)]

    @classmethod
    def from_entries(cls, entries, source):
        """The table that ``entries`` (as :meth:`entries` gives them) record in ``source``."""
        return cls(values=tuple(int(v) for v, _ in entries),
                   labels=tuple(str(label) for _, label in entries), source=str(source))

    def background_index(self):
        """Index of the first class whose label contains "background" or "bg"
        (case-insensitive), else None: the original tuning script's rule."""
        for index, label in enumerate(self.labels):
            if any(word in label.lower() for word in BACKGROUND_LABELS):
                return index
        return None

    @property
    def max_value(self):
        return max(self.values)

    def value_to_index(self):
        """Lookup table: ``lut[mask]`` turns mask values into class indices (uint8).

        Values absent from INFO.json map to ``UNKNOWN_CLASS`` (255). The table covers
        the whole 16-bit range so that 8- and 16-bit masks index it directly.
        """
        lut = np.full(1 << 16, UNKNOWN_CLASS, dtype=np.uint8)
        lut[list(self.values)] = np.arange(self.num_classes, dtype=np.uint8)
        return lut

    def index_to_value(self):
        """Lookup table: ``lut[class_index]`` gives the INFO.json value (uint8 or uint16)."""
        dtype = np.uint8 if self.max_value <= 255 else np.uint16
        return np.asarray(self.values, dtype=dtype)


def read_class_table(path):
    """Read an INFO.json file into a :class:`ClassTable`.

    Raises UserError naming the file when it is missing or not a JSON object, else
    :class:`~mirage.data.problems.DatasetProblems` listing every faulty entry at once
    (missing or malformed value or label, a blank label, index gaps, shared values or
    labels).
    """
    path = Path(path)
    if not path.is_file():
        if path.is_symlink():
            raise UserError(f"class table {path} is a symbolic link that leads nowhere (a "
                            "loop or a missing target); replace it with the file")
        raise UserError(f"class table {path} not found; every dataset needs an INFO.json "
                        "(see docs/segmentation_benchmark.md)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); fix the file") from None
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{path} must be a JSON object "
                        '{"0": {"value": 0, "label": "Background"}, ...}')
    raw = {key: entry for key, entry in raw.items() if key != SPACING_KEY}
    if not raw:
        raise UserError(f"{path} holds no class; it must map class indices to "
                        '{"value": ..., "label": ...} entries')
    problems, indices, entries = [], [], {}
    for key, entry in raw.items():
        if not (isinstance(key, str) and key.strip().lstrip("-").isdigit()):
            problems.append(f"{path}: key {key!r} is not a class index (0..N-1)")
            continue
        indices.append(int(key))
        if not isinstance(entry, dict) or "value" not in entry or "label" not in entry:
            problems.append(f'{path}: class {key} needs both "value" and "label"')
            continue
        value, label = entry["value"], entry["label"]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 16:
            problems.append(f"{path}: class {key} has value {value!r}; "
                            "expected an integer pixel value in 0..65535")
        elif not isinstance(label, str):
            problems.append(f"{path}: class {key} has label {label!r}; expected a string")
        elif not label.strip():
            # A blank name would head an unnamed column in every table and report, and
            # could not be told apart from another blank one.
            problems.append(f"{path}: class {key} (value {value}) has a blank label; give "
                            'it a name, e.g. "Background" or "RNFL"')
        else:
            entries[int(key)] = (value, label)
    if sorted(indices) != list(range(len(indices))):
        problems.append(f"{path}: class indices must be 0..{len(indices) - 1}, "
                        f"got {sorted(indices)}")
    values = tuple(entries[i][0] for i in sorted(entries))
    if len(set(values)) != len(values):
        problems.append(f"{path}: two classes share one pixel value {values}")
    if len(raw) > UNKNOWN_CLASS:
        problems.append(f"{path}: {len(raw)} classes; at most {UNKNOWN_CLASS} supported")
    seen = {}
    for index in sorted(entries):
        label = entries[index][1]
        key = label.strip().lower()  # labels are compared this way everywhere
        if key in seen:
            problems.append(f"{path}: classes {seen[key]} and {index} are both labelled "
                            f"{label!r}; every class needs its own label")
        seen[key] = index
    if problems:
        raise DatasetProblems(problems, path)
    labels = tuple(entries[i][1] for i in sorted(entries))
    return ClassTable(values=values, labels=labels, source=str(path))


# ----------------------------------------------------------------------------- spacing
@dataclass(frozen=True)
class Spacing:
    """Micrometres per pixel: ``axial_um`` down an A-scan (image rows), ``lateral_um``
    across a B-scan (columns), ``bscan_um`` between neighbouring B-scans of a volume; None
    where unknown. ``source`` says where the numbers come from (an INFO.json path, or
    ``--spacing``)."""

    axial_um: Optional[float] = None
    lateral_um: Optional[float] = None
    bscan_um: Optional[float] = None
    source: str = ""

    @property
    def in_plane(self):
        """True when both axial and lateral spacing are known (areas, 2-D distances)."""
        return self.axial_um is not None and self.lateral_um is not None

    @property
    def voxel(self):
        """True when all three are known (volumes)."""
        return self.in_plane and self.bscan_um is not None

    def describe(self):
        """'axial 3.87, lateral 11.5, B-scan 120 um/pixel (from INFO.json ...)'."""
        parts = [f"{name} {_number(value)}" for name, value in
                 (("axial", self.axial_um), ("lateral", self.lateral_um),
                  ("B-scan", self.bscan_um)) if value is not None]
        return f"{', '.join(parts)} um per pixel (from {self.source})"

    @property
    def origin(self):
        """Where the numbers come from, briefly: "--spacing" or "INFO.json"."""
        return self.source if self.source == SPACING_OPTION else "INFO.json"

    def record(self):
        """{spacing_axial_um, spacing_lateral_um, spacing_bscan_um, spacing_source}: the
        spacing as an evaluation record keeps it (None where unknown)."""
        return {"spacing_axial_um": self.axial_um, "spacing_lateral_um": self.lateral_um,
                "spacing_bscan_um": self.bscan_um, "spacing_source": self.source}

    def columns(self):
        """{"spacing_um": "3.87 x 11.5 x 120", "spacing_from": "INFO.json"}: the text
        columns of a CSV row measured with it (axial x lateral x B-scan, n/a where
        unknown); text, so that tables never take them for a score."""
        values = " x ".join("n/a" if v is None else _number(v)
                            for v in (self.axial_um, self.lateral_um, self.bscan_um))
        return {"spacing_um": values, "spacing_from": self.origin}


def _number(value):
    return f"{value:g}"


def spacing_from_values(values, source=SPACING_OPTION):
    """A Spacing from ``(axial, lateral[, bscan])`` micrometres (``--spacing``); UserError
    unless 2 or 3 positive finite numbers."""
    values = list(values)
    if len(values) not in (2, 3):
        raise UserError(f"{source} takes 2 or 3 numbers, AXIAL LATERAL [BSCAN] in "
                        f"micrometres per pixel, not {len(values)}")
    for name, value in zip(SPACING_AXES, values):
        if not _is_spacing(value):
            raise UserError(f"{source}: {name[:-3]} spacing {value!r} must be a positive "
                            "number of micrometres per pixel")
    return Spacing(*(float(v) for v in values), source=source)


def _is_spacing(value):
    return (not isinstance(value, bool) and isinstance(value, (int, float))
            and math.isfinite(value) and value > 0)


def read_spacing(path):
    """The ``"spacing"`` entry of an INFO.json file as a :class:`Spacing`, or None when the
    file has none. UserError naming the file when the entry is not an object of positive
    numbers under the keys axial_um, lateral_um, bscan_um (each may be missing or null)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: unreadable ({err}); fix the file") from None
    if not isinstance(raw, dict) or raw.get(SPACING_KEY) is None:
        return None
    entry = raw[SPACING_KEY]
    example = '"spacing": {"axial_um": 3.87, "lateral_um": 11.5, "bscan_um": 120}'
    if not isinstance(entry, dict):
        raise UserError(f"{path}: \"spacing\" must be an object such as {example}")
    unknown = sorted(set(entry) - set(SPACING_AXES))
    if unknown:
        raise UserError(f"{path}: \"spacing\" has unknown key(s) {', '.join(unknown)}; "
                        f"expected {', '.join(SPACING_AXES)} (micrometres per pixel), e.g. "
                        f"{example}")
    for name in SPACING_AXES:
        value = entry.get(name)
        if value is not None and not _is_spacing(value):
            raise UserError(f"{path}: spacing {name} is {value!r}; expected a positive "
                            "number of micrometres per pixel (or leave it out)")
    values = [None if entry.get(name) is None else float(entry[name]) for name in SPACING_AXES]
    if all(v is None for v in values):
        return None
    return Spacing(*values, source=str(path))
