"""A dataset in the benchmark layout built from OCT volume files: ``run_seg_prepare_data.py``.

    build_dataset(sources, target, ...) -> Prepared (records, summary, notes)
    assign_splits(patients, split, seed) -> {patient: split name}

One volume is read at a time (:mod:`mirage.data.oct_files`): its B-scans and masks are
written to a pool inside a temporary folder beside ``target``; once every volume is in,
volumes go to ``train/``, ``val/`` and ``test/`` by patient, ``INFO.json`` and
``prepare_record.json`` are written, the dataset check training runs
(:func:`mirage.data.check.check_dataset`) passes, and only then is the folder renamed into
place (:func:`mirage.fileio.atomic_folder`). A file that cannot be read is one line naming
it and the reader's reason, and nothing is written (``skip_bad``: left out instead).

The class table: the chosen layers' classes (:func:`~mirage.data.oct_files.class_labels`),
then the fluids, with values spread evenly over 0..254; ``Invalid`` (value 255, last) is
added when some column has a missing or crossing boundary. The classes come from the
first volume read (or ``layers``/``fluids``); every other volume must have them all.
"""
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np

from mirage.data.check import check_dataset
from mirage.data.classes import SPACING_AXES, SPACING_KEY
from mirage.data.oct_files import (bscan_images, class_labels, import_eyepy, label_map,
                                   layer_order, patient_of, read_volume, spacing_um)
from mirage.data.problems import DatasetProblems
from mirage.errors import UserError
from mirage.fileio import atomic_folder, write_png, write_text

RECORD = "prepare_record.json"  # what run_seg_prepare_data.py wrote, and from what
SPLITS = ("train", "val", "test")
INVALID_LABEL, INVALID_VALUE = "Invalid", 255
POOL = ".volumes"  # the volumes inside the staging folder, before they are split


@dataclass
class VolumeRecord:
    """One volume written: its source, patient, split and what became of its B-scans."""

    file: str
    reader: str
    volume: str
    patient: Optional[str]
    bscans: int
    left_out: int  # B-scans without any labelled column
    intensity: str
    spacing_um: dict
    missing_columns: int
    crossing_columns: int
    split: str = ""


@dataclass
class Plan:
    """The class table, fixed by the first volume read."""

    layers: list
    fluids: list
    labels: list

    def values(self):
        steps = max(1, len(self.labels) - 1)
        return [int(round(i * 254 / steps)) for i in range(len(self.labels))]


@dataclass
class Prepared:
    records: list
    summary: object
    notes: list = field(default_factory=list)


# ----------------------------------------------------------------------------- splits
def split_counts(split, patients):
    """Patients per split from ``split`` (3 numbers): fractions summing to 1, or whole
    counts summing to the number of patients. Train and val need one patient each, and
    test one if its share is not 0."""
    split = [float(x) for x in split]
    if len(split) != 3 or any(not math.isfinite(x) or x < 0 for x in split):
        raise UserError(f"--split takes 3 numbers >= 0 (train val test), not {split}")
    if all(x == int(x) for x in split) and sum(split) > 1:
        counts = [int(x) for x in split]
        if sum(counts) != patients:
            raise UserError(f"--split {' '.join(map(str, counts))}: the counts of patients "
                            f"must add up to {patients}, the number of patients found")
    else:
        if abs(sum(split) - 1) > 1e-6:
            raise UserError(f"--split {' '.join(f'{x:g}' for x in split)}: shares must add up "
                            "to 1 (or give counts of patients)")
        exact = [x * patients for x in split]
        counts = [int(math.floor(x)) for x in exact]
        for i in sorted(range(3), key=lambda i: counts[i] - exact[i])[:patients - sum(counts)]:
            counts[i] += 1
        for i in range(3):  # a split asked for gets a patient, from the largest one
            if split[i] > 0 and counts[i] == 0 and max(counts) > 1:
                counts[counts.index(max(counts))] -= 1
                counts[i] += 1
    needed = [name for name, share, count in zip(SPLITS, split, counts)
              if count == 0 and (share > 0 or name != "test")]
    if needed:
        raise UserError(f"{patients} patient(s) cannot fill the splits {', '.join(needed)} "
                        f"(--split {' '.join(f'{x:g}' for x in split)}); training needs "
                        "patients in train and val: give more volumes or other --split")
    return counts


def assign_splits(patients, split, seed):
    """{patient: split name}: the patients (sorted) shuffled with ``seed``, then the first
    ``counts[0]`` to train, the next to val, the rest to test. A patient is in one split."""
    patients = sorted(set(patients))
    counts = split_counts(split, len(patients))
    order = np.random.default_rng(seed).permutation(len(patients))
    names = [name for name, count in zip(SPLITS, counts) for _ in range(count)]
    return {patients[i]: name for i, name in zip(order, names)}


# ----------------------------------------------------------------------------- one volume
def _plan(volume, layers, fluids):
    layers = list(volume.layers) if layers is None else list(layers)
    fluids = list(volume.volume_maps) if fluids is None else list(fluids)
    layers = layer_order(volume, layers)
    labels = class_labels(layers, fluids)
    if len(labels) < 2:
        raise UserError("has no layer or pixel annotation to make masks of (eyepy found "
                        "none); the dataset needs masks")
    if len(labels) + 1 > 255:
        raise UserError(f"{len(labels)} classes do not fit 8-bit masks")
    return Plan(layers=layers, fluids=fluids, labels=labels)


def _write_volume(volume, plan, pool, stem):
    """Write one volume's B-scans and masks into ``pool/<stem>/``; its counts."""
    missing = [name for name in plan.fluids if name not in volume.volume_maps]
    if missing:
        raise UserError(f"has no pixel annotation {', '.join(missing)} (it has: "
                        f"{', '.join(volume.volume_maps) or 'none'}); choose them with "
                        "--pixel_classes")
    layer_order(volume, plan.layers)  # every layer there, each with a known height
    images, how = bscan_images(volume)
    values = np.array(plan.values() + [INVALID_VALUE], dtype=np.uint8)
    invalid = len(plan.labels)
    written = left_out = missing_columns = crossing_columns = 0
    for i in range(images.shape[0]):
        bscan = volume[i]  # eyepy's view of B-scan i: its heights and pixel maps
        heights = np.stack([np.asarray(bscan.layers[name].data, dtype=float)
                            for name in plan.layers]) if plan.layers \
            else np.zeros((0, images.shape[2]))
        if heights.shape[-1] != images.shape[2]:
            raise UserError(f"layer heights of B-scan {i} have {heights.shape[-1]} columns "
                            f"for {images.shape[2]} image columns")
        fluids = [np.asarray(bscan.area_maps[name]) for name in plan.fluids]
        labels, no_height, crossing = label_map(heights, images.shape[1], fluids, invalid)
        if np.all(labels == invalid):
            left_out += 1
            continue
        missing_columns += no_height
        crossing_columns += crossing
        write_png(pool / stem / "bscan" / f"{stem}_{i}.png", images[i])
        write_png(pool / stem / "semseg" / f"{stem}_{i}.png", values[labels])
        written += 1
    if not written:
        raise UserError(f"none of its {images.shape[0]} B-scans has a labelled column "
                        f"(layers {', '.join(plan.layers) or 'none'})")
    return written, left_out, how, missing_columns, crossing_columns


# ----------------------------------------------------------------------------- dataset
def _check_target(target, overwrite):
    if target.exists() and not target.is_dir():
        raise UserError(f"-o {target} is a file; give a folder for the dataset")
    if target.is_dir() and any(target.iterdir()):
        if not (target / RECORD).is_file():
            raise UserError(f"-o {target} exists and is not a dataset written by "
                            "run_seg_prepare_data.py; give a new or empty folder")
        if not overwrite:
            raise UserError(f"-o {target} holds a dataset already; add --overwrite to "
                            "replace it, or give another folder")


def _agreed_spacing(records):
    """The spacing entry: each axis every volume gives alike; notes for the rest."""
    spacing, notes = {}, []
    for axis in SPACING_AXES:
        found = {r.spacing_um.get(axis) for r in records}
        if len(found) == 1 and None not in found:
            spacing[axis] = found.pop()
        elif found - {None}:
            notes.append(f"{axis} left out of INFO.json: the volumes disagree or some lack it "
                         f"({', '.join(sorted(str(v) for v in found))})")
    return spacing, notes


def _info(plan, with_invalid, spacing):
    labels = plan.labels + ([INVALID_LABEL] if with_invalid else [])
    values = plan.values() + ([INVALID_VALUE] if with_invalid else [])
    info = {str(i): {"value": v, "label": label}
            for i, (v, label) in enumerate(zip(values, labels))}
    if spacing:
        info[SPACING_KEY] = spacing
    return info


def build_dataset(sources, target, layers=None, fluids=None, split=(0.6, 0.2, 0.2),
                  seed=0, overwrite=False, skip_bad=False, workers=2, log=print):
    """Build the dataset at ``target`` from ``sources`` (:func:`find_sources`); see the
    module's docstring. ``layers``/``fluids``: names to use (None: all the first volume
    has). Returns :class:`Prepared`; raises UserError, the dataset untouched."""
    import_eyepy()  # before anything: its absence is one line, not one per file
    target = Path(target).expanduser()
    _check_target(target, overwrite)
    records, problems, plan = [], [], None
    with atomic_folder(target) as staging:
        pool = staging / POOL
        for source in sources:
            try:
                volume = read_volume(source)
                if plan is None:
                    plan = _plan(volume, layers, fluids)
                counts = _write_volume(volume, plan, pool, source.stem)
            except (UserError, Exception) as err:  # noqa: BLE001: any failure is the file's
                text = str(err) if isinstance(err, UserError) else (
                    f"{source.reader} read it, but its annotations could not be converted: "
                    f"{type(err).__name__}: {' '.join(str(err).split())[:300]}")
                problems.append(text if text.startswith(str(source.path))
                                else f"{source.path}: {text}")
                shutil.rmtree(pool / source.stem, ignore_errors=True)
                log(f"error: {problems[-1]}" if skip_bad else f"  failed: {source.path}")
                continue
            written, left_out, how, no_height, crossing = counts
            records.append(VolumeRecord(
                file=str(source.path), reader=source.reader, volume=source.stem,
                patient=patient_of(volume), bscans=written, left_out=left_out,
                intensity=how, spacing_um=spacing_um(volume), missing_columns=no_height,
                crossing_columns=crossing))
            log(f"  {source.path} ({source.reader}): {written} B-scans"
                + (f", {left_out} without labels left out" if left_out else "")
                + f"; intensities {how}")
            del volume
        if problems and not skip_bad:
            raise DatasetProblems(problems, "the input files; nothing was written")
        if not records:
            raise DatasetProblems(problems or ["no volume read"], "the input files")
        keys = [r.patient if r.patient is not None else f"file:{r.volume}" for r in records]
        by_patient = assign_splits(keys, split, seed)
        for record, key in zip(records, keys):
            record.split = by_patient[key]
            for kind in ("bscan", "semseg"):
                folder = staging / record.split / kind
                folder.mkdir(parents=True, exist_ok=True)
                for png in sorted((pool / record.volume / kind).iterdir()):
                    os.replace(png, folder / png.name)
        shutil.rmtree(pool)
        spacing, notes = _agreed_spacing(records)
        with_invalid = any(r.missing_columns or r.crossing_columns for r in records)
        write_text(staging / "INFO.json",
                   json.dumps(_info(plan, with_invalid, spacing), indent=4) + "\n")
        write_text(staging / RECORD, json.dumps({
            "layers_top_to_bottom": plan.layers, "pixel_classes": plan.fluids,
            "split": [float(x) for x in split], "seed": seed,
            "left_out_files": problems, "volumes": [asdict(r) for r in records]},
            indent=2) + "\n")
        try:
            summary = check_dataset(staging, workers=workers)
        except UserError as err:  # said of the dataset it would have been
            raise UserError(str(err).replace(str(staging), str(target))
                            + "\n(nothing was written)") from None
    summary = replace(summary, root=target, name=target.name,
                      classes=replace(summary.classes, source=str(target / "INFO.json")))
    if with_invalid:
        notes.append(f"class {len(plan.labels)} ({INVALID_LABEL}) marks columns with a "
                     "missing or crossing boundary: the evaluation leaves it out; train "
                     f"with --ignore_index {len(plan.labels)} to not learn it")
    if problems:
        notes.append(f"{len(problems)} file(s) left out (--skip_bad; listed above)")
    return Prepared(records=records, summary=summary, notes=notes)
