"""The typed run spec: one run's options resolved once, with everything derived from them.

    resolve_spec(config) -> RunSpec

``config`` is the dict of every option (mirage.config.parse_config, checked by
check_config). Training, testing and inference read single option values from
``spec.options`` and get what is derived from several of them here, once: the
foundation model, the dataset and its class table, the ignore index, the input and patch
sizes, the normalisation, the run identity and the run folder.
"""
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Optional, Tuple

from fm_seg_config import FoundModel, find_model
from mirage.config import domains_of, per_domain
from mirage.data.classes import ClassTable
from mirage.data.layout import DatasetInfo, open_dataset
from mirage.errors import UserError
from mirage.run.folder import RunFolder
from mirage.run.identity import run_directory, run_identity


@dataclass(frozen=True)
class DataSpec:
    """What the run is trained on.

    dataset: the ``--data_path`` folder with its class table (``--mapping_fn``).
    ignore_index: the class index left out of CE-ignore-bg and of the validation mIoU_fg
    (None: no class).
    """

    dataset: DatasetInfo
    ignore_index: Optional[int]

    @property
    def classes(self) -> ClassTable:
        return self.dataset.class_table


@dataclass(frozen=True)
class ModelSpec:
    """The model the run builds: a foundation model family and its input geometry.

    input_size: (H, W) the B-scans are resized to. patch_size: (h, w), or None for the
    model's pretraining patch size. norm: the input normalisation (``MEAN_STD`` name or
    'minmax').
    """

    fm: FoundModel
    weights: Path
    input_size: Tuple[int, int]
    patch_size: Optional[Tuple[int, int]]
    norm: str
    decoder: str

    @property
    def in_chans(self) -> int:
        return self.fm.in_chans


@dataclass(frozen=True)
class RunSpec:
    """One run: its options (read-only), data, model, identity and folder."""

    options: Mapping[str, object]
    data: DataSpec
    model: ModelSpec
    identity: dict
    folder: RunFolder

    @property
    def classes(self) -> ClassTable:
        return self.data.classes


def resolve_ignore_index(ignore_index, classes):
    """``None`` -> the background class (or None); ``-1`` -> None; else checked."""
    if ignore_index is None:
        return classes.background_index()
    if ignore_index == -1:
        return None
    if not 0 <= ignore_index < classes.num_classes:
        raise UserError(f"--ignore_index {ignore_index}: must be -1 or a class index in "
                        f"0..{classes.num_classes - 1} ({classes.source})")
    return ignore_index


def resolve_model(config):
    """The ModelSpec of ``config``: the family of --weights (or --fm) and its geometry."""
    fm = find_model(config["weights"], fm=config["fm"])
    domain = domains_of(config)[0]
    input_size = per_domain(config["input_size"], [domain])[domain]
    patch_size = (per_domain(config["patch_size"], [domain])[domain]
                  if config["patch_size"] is not None else None)  # None: the model's own
    return ModelSpec(fm=fm, weights=Path(config["weights"]), input_size=input_size,
                     patch_size=patch_size, norm="minmax" if config["minmax"] else fm.norm,
                     decoder=config["output_adapter"])


def resolve_spec(config):
    """The RunSpec of ``config`` (every option, already checked by check_config)."""
    model = resolve_model(config)
    dataset = open_dataset(config["data_path"], config["mapping_fn"])
    ignore_index = resolve_ignore_index(config["ignore_index"], dataset.class_table)
    identity = run_identity(config, dataset)
    folder = RunFolder(run_directory(config, dataset, identity))
    if config.get("run_dir") and folder.path.resolve() != Path(config["run_dir"]).resolve():
        raise UserError(f"--run_dir {config['run_dir']}: its config.yaml and the files it "
                        f"names now give the run folder {folder.path} (another weights file, "
                        "dataset or class table than it was trained with, or a run of an "
                        "earlier version); give the --weights/--data_path it was trained on")
    return RunSpec(options=MappingProxyType(dict(config)),
                   data=DataSpec(dataset=dataset, ignore_index=ignore_index),
                   model=model, identity=identity, folder=folder)
