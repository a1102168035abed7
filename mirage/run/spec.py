"""The typed run spec: one run's options resolved once, into what each stage needs.

    resolve_spec(config) -> RunSpec             options checked by check_config
    RunSpec.from_run_dir(run_dir, overrides)    a trained run, read back from its folder

``config`` is the dict of every option (mirage.config.parse_config). Each stage takes the
sub-spec it uses: the model and the protocol to build, the optimiser and its schedules,
the epoch loop and its checkpoints, the loaders, mixed precision, the speed options, the
job (train, test or predict), where it runs, and the data. The raw dict stays only in
``spec.options``, for what needs the whole set: the ``config.yaml`` a run writes (and its
checkpoints' copy) and the run identity.
"""
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Optional, Tuple

from fm_seg_config import FoundModel, find_model
from mirage.config import RUN_CONFIG, domains_of, load_yaml, per_domain, run_dir_config
from mirage.data.classes import ClassTable
from mirage.data.layout import DatasetInfo, open_dataset
from mirage.data.subsets import TrainSubset
from mirage.errors import UserError
from mirage.option_checks import check_config
from mirage.protocol import Protocol
from mirage.run.folder import IDENTITY, RunFolder
from mirage.run.identity import (option_identity, run_directory, run_identity,
                                 train_subset_of)


@dataclass(frozen=True)
class DataSpec:
    """What the run is trained on.

    dataset: the ``--data_path`` folder with its class table (``--mapping_fn``).
    ignore_index: the class index left out of CE-ignore-bg and of the validation mIoU_fg
    (None: no class).
    train_subset: the training-set size (``--train_volumes`` / ``--train_fraction``,
    ``--subset_seed``); the default is the whole training split.
    """

    dataset: DatasetInfo
    ignore_index: Optional[int]
    train_subset: TrainSubset = TrainSubset()

    @property
    def classes(self) -> ClassTable:
        return self.dataset.class_table


@dataclass(frozen=True)
class ModelSpec:
    """The model the run builds: a foundation model family, its input geometry and the
    decoder.

    input_size: (H, W) the B-scans are resized to. patch_size: (h, w), or None for the
    model's pretraining patch size. norm: the input normalisation (``MEAN_STD`` name or
    'minmax'). drop_path: the encoder's stochastic depth rate. interpolate_mode: the
    decoder output's upsampling.
    """

    fm: FoundModel
    weights: Path
    input_size: Tuple[int, int]
    patch_size: Optional[Tuple[int, int]]
    norm: str
    decoder: str
    num_global_tokens: int
    drop_path: float
    learnable_pos_emb: bool
    interpolate_mode: str

    @property
    def in_chans(self) -> int:
        return self.fm.in_chans


@dataclass(frozen=True)
class OptimSpec:
    """The optimiser and its per-step schedules (``--opt``, ``--lr``, ...).

    betas: (beta1, beta2); no_lr_scale: parameter-name parts exempt from layer-wise LR
    decay; clip_grad: the gradient-norm limit, or None.
    """

    name: str
    lr: float
    min_lr: float
    warmup_lr: float
    warmup_epochs: int
    warmup_steps: int
    eps: float
    betas: Tuple[float, float]
    momentum: float
    weight_decay: float
    weight_decay_end: Optional[float]
    decoder_decay: Optional[float]
    layer_decay: float
    no_lr_scale: Tuple[str, ...]
    clip_grad: Optional[float]

    @classmethod
    def from_options(cls, config):
        return cls(name=config["opt"], lr=config["lr"], min_lr=config["min_lr"],
                   warmup_lr=config["warmup_lr"], warmup_epochs=config["warmup_epochs"],
                   warmup_steps=config["warmup_steps"], eps=config["opt_eps"],
                   betas=tuple(config["opt_betas"]), momentum=config["momentum"],
                   weight_decay=config["weight_decay"],
                   weight_decay_end=config["weight_decay_end"],
                   decoder_decay=config["decoder_decay"], layer_decay=config["layer_decay"],
                   no_lr_scale=tuple(s for s in config["no_lr_scale_list"].split("-") if s),
                   clip_grad=config["clip_grad"])


@dataclass(frozen=True)
class LoopSpec:
    """The epoch loop: what trains, how long, when it validates and saves checkpoints.

    resume: a checkpoint file to resume from ('' = none); log_images_freq: epochs between
    the validation panels of ``log_images``.
    """

    epochs: int
    seed: int
    loss: str
    aug_name: str
    eval_freq: int
    select_metric: str
    save_ckpt: bool
    save_ckpt_freq: int
    keep_ckpts: int
    start_epoch: int
    resume: str
    auto_resume: bool
    log_images: bool
    log_images_freq: int

    @classmethod
    def from_options(cls, config):
        return cls(**{name: config[name] for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class LoaderSpec:
    """The DataLoaders: B-scans per batch (per process), worker processes, pinned memory,
    and the seed of the training order."""

    batch_size: int
    num_workers: int
    pin_mem: bool
    seed: int

    @classmethod
    def from_options(cls, config):
        return cls(**{name: config[name] for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class PrecisionSpec:
    """Mixed precision on CUDA: ``mixed`` on or off and its ``dtype`` ('fp16' with a
    gradient scaler, or 'bf16'). The default, ``PrecisionSpec()``, is float32."""

    mixed: bool = False
    dtype: str = "fp16"

    @classmethod
    def from_options(cls, config):
        # --bf16, the old switch for bfloat16, turns mixed precision on by itself.
        bf16 = config["bf16"] or config["amp_dtype"] == "bf16"
        return cls(mixed=config["fp16"] or config["bf16"], dtype="bf16" if bf16 else "fp16")


@dataclass(frozen=True)
class SpeedSpec:
    """The same maths in less time or memory: ``--compile``, ``--grad_checkpointing`` and
    the feature cache (``feature_cache``: 'off', 'ram' or 'disk' in ``feature_cache_dir``).
    The default, ``SpeedSpec()``, is all off."""

    compile: bool = False
    grad_checkpointing: bool = False
    feature_cache: str = "off"
    feature_cache_dir: str = ""

    @classmethod
    def from_options(cls, config):
        return cls(**{name: config[name] for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class TaskSpec:
    """What the job does: train (both False), ``test`` the best checkpoint, or with
    ``infer_only`` write its predictions; ``test_data_path``: another dataset to test;
    ``tta``: the test-time augmentation of written predictions ('none' or 'flip')."""

    test: bool
    infer_only: bool
    test_data_path: Optional[str]
    tta: str = "none"

    @classmethod
    def from_options(cls, config):
        return cls(**{name: config[name] for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class RuntimeSpec:
    """Where the job runs: ``--device`` and whether Python's UserWarnings are shown."""

    device: str
    show_user_warnings: bool

    @classmethod
    def from_options(cls, config):
        return cls(**{name: config[name] for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class RunSpec:
    """One run: its options (read-only), typed sub-specs, data, identity and folder.

    ``data`` and ``identity`` are None for a run read back without its dataset (the
    predictor: the classes come from the checkpoint).
    """

    options: Mapping[str, object]
    model: ModelSpec
    protocol: Protocol
    optim: OptimSpec
    loop: LoopSpec
    loader: LoaderSpec
    precision: PrecisionSpec
    speed: SpeedSpec
    task: TaskSpec
    runtime: RuntimeSpec
    data: Optional[DataSpec]
    identity: Optional[dict]
    folder: RunFolder

    @property
    def classes(self) -> ClassTable:
        return self.data.classes

    @classmethod
    def from_run_dir(cls, run_dir, overrides=None, need_data=True):
        """The spec of a trained run folder, read back and checked as training checks its
        options; ``overrides``: ``{option: value}`` of options that do not change what was
        trained (device, workers, --test, moved --weights, ...). ``need_data=False``: the
        dataset need not be present (``data`` and ``identity`` are None)."""
        config = run_dir_config(run_dir, overrides, need_data)
        check_config(config)
        return resolve_spec(config, with_data=need_data)


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


def resolve_model(config, family_from=None):
    """The ModelSpec of ``config``: the family of --weights (or --fm; ``family_from``: the
    file whose name chooses it, default --weights) and its geometry."""
    fm = find_model(family_from or config["weights"], fm=config["fm"])
    domain = domains_of(config)[0]
    input_size = per_domain(config["input_size"], [domain])[domain]
    patch_size = (per_domain(config["patch_size"], [domain])[domain]
                  if config["patch_size"] is not None else None)  # None: the model's own
    return ModelSpec(fm=fm, weights=Path(config["weights"]), input_size=input_size,
                     patch_size=patch_size, norm="minmax" if config["minmax"] else fm.norm,
                     decoder=config["output_adapter"],
                     num_global_tokens=config["num_global_tokens"],
                     drop_path=config["drop_path_encoder"],
                     learnable_pos_emb=config["learnable_pos_emb"],
                     interpolate_mode=config["decoder_interpolate_mode"])


def resolve_spec(config, with_data=True):
    """The RunSpec of ``config`` (every option, already checked by check_config).

    ``with_data=False`` (a run read back for predicting files): no dataset is opened and
    the folder is ``--run_dir`` itself. A run read back (``--run_dir``) must agree with
    its identity.json.
    """
    if config.get("run_dir"):
        _check_options_against_identity(config, RunFolder(Path(config["run_dir"])))
    trained_weights = _trained_weights(config)
    model = resolve_model(config, trained_weights)
    data = identity = None
    if with_data:
        dataset = open_dataset(config["data_path"], config["mapping_fn"])
        data = DataSpec(dataset=dataset,
                        ignore_index=resolve_ignore_index(config["ignore_index"],
                                                          dataset.class_table),
                        train_subset=train_subset_of(config))
        identity = run_identity(config, dataset, trained_weights and trained_weights.name)
        folder = RunFolder(run_directory(config, dataset, identity))
        _check_run_dir(config, folder)
    else:
        folder = RunFolder(Path(config["run_dir"]))
    return RunSpec(options=MappingProxyType(dict(config)), model=model,
                   protocol=Protocol.from_options(config),
                   optim=OptimSpec.from_options(config), loop=LoopSpec.from_options(config),
                   loader=LoaderSpec.from_options(config),
                   precision=PrecisionSpec.from_options(config),
                   speed=SpeedSpec.from_options(config), task=TaskSpec.from_options(config),
                   runtime=RuntimeSpec.from_options(config), data=data, identity=identity,
                   folder=folder)


def _trained_weights(config):
    """For a run read back (``--run_dir``) whose weights file is given under another name:
    the file ``config.yaml`` names, whose name chose the model family and names the run
    (the checkpoint checks that the given file has its SHA-256). Else None."""
    if not config.get("run_dir"):
        return None
    stored = load_yaml(Path(config["run_dir"]) / RUN_CONFIG, what="--run_dir").get("weights")
    if not stored or Path(stored).name == Path(config["weights"]).name:
        return None
    return Path(stored)


def _check_options_against_identity(config, folder):
    """A run folder's config.yaml is a text file a user can edit; identity.json records
    what the run was trained with. Every option both name must agree, or the run would be
    rebuilt with other options than it was trained with (the model, the normalisation)."""
    stored = folder.read_identity()
    if stored is None:
        return  # runs of the first version: their checkpoint's meta is checked on loading
    current = option_identity(config)
    for name in sorted(set(stored) & set(current)):
        if stored[name] != current[name]:
            raise UserError(f"{folder.config_file}: {name} is {current[name]!r} there, but "
                            f"the run was trained with {stored[name]!r} ({IDENTITY}); "
                            f"restore {name}: {stored[name]!r} in it")


def _check_run_dir(config, folder):
    """``--run_dir``: the options it gives must lead back to that folder."""
    if config.get("run_dir") and folder.path.resolve() != Path(config["run_dir"]).resolve():
        raise UserError(f"--run_dir {config['run_dir']}: its config.yaml and the files it "
                        f"names now give the run folder {folder.path} (another weights file, "
                        "dataset or class table than it was trained with, or a run of an "
                        "earlier version); give the --weights/--data_path it was trained on")
