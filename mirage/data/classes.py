"""A dataset's classes: INFO.json read into a ClassTable, and what class labels mean.

INFO.json maps class indices to ``{"value": <mask pixel value>, "label": <name>}``
(docs/segmentation_benchmark.md). Labels are compared lower-cased and stripped.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mirage.data.problems import DatasetProblems
from mirage.errors import UserError

BACKGROUND_LABELS = ("background", "bg")  # the default --ignore_index class
UNKNOWN_CLASS = 255  # class index a mask value not in INFO.json maps to
LESION_LABELS = ("fluid", "cyst", "ped", "srf", "irf")  # scored apart from layers


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
