"""Which classes are scored, and how mask and prediction pixel values map to them.

Labels are compared lower-cased and stripped. Background-like classes are left out unless
``--no_ignore_bg``; "invalid" truth pixels are never scored; lesion classes are reported
apart from layers. The layer stack (the layers whose boundaries and thicknesses are
measured, top to bottom) is the layer classes in INFO.json order, less the regions around
the layers (background-like, "Elsewhere", "Under BM", "Below BM"). A model tested on a
dataset with another class table is scored through a known label translation
(docs/segmentation_benchmark.md).
"""
from dataclasses import dataclass

import numpy as np

from mirage.data.classes import LESION_LABELS, UNKNOWN_CLASS
from mirage.errors import UserError

BACKGROUND_LIKE = ("bg", "background", "above ilm")  # not scored unless --no_ignore_bg
INVALID_LABEL = "invalid"  # truth pixels of this class are never scored
# Regions around the retinal layers (above the first, below the last, or between two), not
# layers: they have no boundary of their own (docs/segmentation_tuning.md, "Layer
# boundaries"). AROI's "Under BM" and Duke iAMD's "Below BM" reach the image bottom.
AROUND_LAYERS = BACKGROUND_LIKE + ("elsewhere", "under bm", "below bm")

# Models tested on a dataset with another class table: training label -> evaluated label
# (docs/segmentation_benchmark.md). A table applies when it covers every training label.
CLASS_TRANSLATIONS = {
    "AROI -> Duke iAMD": {
        "above ilm": "above ilm",
        "ilm-ipl/inl": "ilm-inner rpedc",
        "ipl/inl-rpe": "ilm-inner rpedc",
        "rpe-bm": "inner rpedc-outer bm",
        "under bm": "below bm",
        "cyst": "invalid",
        "ped": "invalid",
        "srf": "invalid",
    },
}


def _norm(label):
    return label.strip().lower()


@dataclass(frozen=True)
class ClassPlan:
    """How mask and prediction pixel values become the classes that are scored.

    gt_lut, pred_lut: (65536,) uint8 lookup tables, pixel value -> class index of the
    evaluated dataset's INFO.json (UNKNOWN_CLASS for values not in the table).
    invalid: (K,) bool, classes labelled "invalid". scored: class indices to score.
    groups: {"all": scored} or {"layers": ..., "lesions": ...} when both kinds exist.
    layer_stack: the layer classes whose boundaries are measured, top to bottom (INFO.json
    order). lesion_classes: the scored lesion classes (areas and volumes).
    """

    labels: tuple
    gt_lut: np.ndarray
    pred_lut: np.ndarray
    invalid: np.ndarray
    scored: tuple
    groups: dict
    gt_source: str
    pred_source: str
    translation: str = ""
    layer_stack: tuple = ()
    lesion_classes: tuple = ()

    @property
    def num_classes(self):
        return len(self.labels)


def _label_translation(train_table, gt_table):
    """(name, {training label -> evaluated label}) mapping every training class by label.

    Uses a known translation (CLASS_TRANSLATIONS) when one covers all training labels,
    else the identity on labels; raises UserError when a label has no counterpart.
    """
    train_labels = [_norm(label) for label in train_table.labels]
    gt_labels = {_norm(label) for label in gt_table.labels}
    for name, table in CLASS_TRANSLATIONS.items():
        if all(label in table for label in train_labels) and \
                all(table[label] in gt_labels for label in train_labels):
            return name, {label: table[label] for label in train_labels}
    missing = [label for label in train_labels if label not in gt_labels]
    if missing:
        raise UserError(
            f"cannot score predictions in the classes of {train_table.source} against "
            f"{gt_table.source}: no class labelled {', '.join(map(repr, missing))} there and "
            f"no known translation (known: {', '.join(CLASS_TRANSLATIONS)}); evaluate on a "
            "dataset with the same class labels")
    return "", {label: label for label in train_labels}


def plan_classes(gt_table, train_table=None, ignore_bg=True):
    """The ClassPlan for masks in ``gt_table``'s classes and predictions in ``train_table``'s.

    train_table: the class table of the dataset the model was trained on (external
    evaluation); None when predictions use ``gt_table``'s values.
    """
    labels = tuple(gt_table.labels)
    norm = [_norm(label) for label in labels]
    gt_lut = gt_table.value_to_index()
    translation = ""
    if train_table is None:
        pred_lut, pred_source = gt_lut, gt_table.source
    else:
        translation, mapping = _label_translation(train_table, gt_table)
        gt_index = {label: norm.index(label) for label in set(norm)}
        pred_lut = np.full(1 << 16, UNKNOWN_CLASS, dtype=np.uint8)
        for value, label in zip(train_table.values, train_table.labels):
            pred_lut[value] = gt_index[mapping[_norm(label)]]
        pred_source = train_table.source
    invalid = np.array([label == INVALID_LABEL for label in norm], dtype=bool)
    scored = tuple(i for i, label in enumerate(norm) if label != INVALID_LABEL
                   and not (ignore_bg and label in BACKGROUND_LIKE))
    if not scored:
        raise UserError(f"{gt_table.source} has no class to score (all are background or "
                        "invalid); pass --no_ignore_bg to score background classes")
    lesions = tuple(i for i in scored if norm[i] in LESION_LABELS)
    layers = tuple(i for i in scored if norm[i] not in LESION_LABELS)
    groups = {"layers": layers, "lesions": lesions} if lesions and layers else {"all": scored}
    stack = tuple(i for i in layers if norm[i] not in AROUND_LAYERS)
    return ClassPlan(labels=labels, gt_lut=gt_lut, pred_lut=pred_lut, invalid=invalid,
                     scored=scored, groups=groups, gt_source=gt_table.source,
                     pred_source=pred_source, translation=translation, layer_stack=stack,
                     lesion_classes=lesions)
