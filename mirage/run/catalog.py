"""Find run directories and read each one whole: options, training log, evaluations.

    find_runs([root or run dir, ...])   -> [Run, ...] (every directory with a config.yaml,
                                           and every scored run_seg_predict.py output folder)
    find_run_dirs(root)                 -> [Path, ...] the same directories, not read
    read_run(run_dir)                   -> Run

A Run never raises for a damaged or unfinished run directory: what cannot be read becomes
a note (``run.notes``) or a status ("not evaluated: ..."), so a summary lists the run
instead of dropping it or crashing.

A scored output folder of ``run_seg_predict.py`` (``prediction_record.json`` and results
CSVs, written by ``run_seg_eval.py -m OUT``) is a Run too: its model, dataset, decoder,
loss and protocol are its member runs' (which must agree), ``ensemble`` says how many runs
and which seeds, ``tta`` the test-time augmentation. A run whose ``preds/`` was made with
``--tta flip`` has ``tta == "flip"``.
"""
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from mirage.options import LORA_OPTIONS, OPTION_BY_NAME, RUNTIME_OPTIONS, TRAIN_SET_OPTIONS
from mirage.protocol import tuning_of
from mirage.errors import UserError
from mirage.run.folder import CONFIG, PREDS, RESULTS_GLOB, RunFolder
from mirage.run.predictions import PREDICTION_RECORD, prediction_source
from mirage.run.results import read_evaluations

DEFAULT_SEED = 42  # run_seg_tuning.py's default, for configs written without a seed
# Identity entries that are the model itself: its weights file (never part of a protocol
# or a row label; the summary keeps the SHA-256 in a column of its own).
WEIGHTS_ENTRIES = frozenset({"weights", "weights_name", "weights_sha256"})
# Identity entries with a column of their own in the summary (or implied by the dataset).
KEY_ENTRIES = WEIGHTS_ENTRIES | {"seed", "output_adapter", "loss", "data_path", "dataset"}
# Identity entries that say the --tuning protocol (Run.tuning, Run.tuning_options): the
# option and its older aliases, and the LoRA options (in an identity only under lora).
TUNING_ENTRIES = frozenset({"tuning", "freeze_encoder", "freeze_patch_embed", *LORA_OPTIONS})

_SEED_IN_NAME = re.compile(r"_s(\d+)(?:_[0-9a-f]{8})?$")


@dataclass
class Run:
    """A run directory: its options, training log, evaluations and what is wrong with it."""

    path: Path
    config: dict = field(default_factory=dict)
    log: list = field(default_factory=list)
    evaluations: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    status: str = ""
    identity: dict = field(default_factory=dict)
    # train_volumes.json: the volumes the run trained on (None for runs before it existed)
    training_set: Optional[dict] = None
    # the test-time augmentation of the scored predictions ("none" or "flip")
    tta: str = "none"
    # a scored run_seg_predict.py output folder of several runs: {"runs": count, "seeds":
    # [seed, ...], "paths": [run dir, ...]}; None for a run folder
    ensemble: Optional[dict] = None
    trained_on: str = ""  # an ensemble's training dataset (its runs'); else the parent

    @property
    def name(self):
        return self.path.name

    @property
    def train_dataset(self):
        return self.trained_on or self.path.parent.name

    @property
    def variant(self):
        """What the predictions were besides one run's plain argmax, in words ("" for
        none): "ensemble of seeds 0,1,2", "flip", "ensemble of seeds 0,1,2, flip"."""
        parts = []
        if self.ensemble:
            parts.append("ensemble of seeds " + ",".join(map(str, self.ensemble["seeds"])))
        if self.tta and self.tta != "none":
            parts.append(self.tta)
        return ", ".join(parts)

    @property
    def seed(self):
        if self.ensemble:  # one prediction of several seeds: its first seed stands for it
            return self.ensemble["seeds"][0]
        seed = self.config.get("seed")
        if isinstance(seed, int) and not isinstance(seed, bool):
            return seed
        match = _SEED_IN_NAME.search(self.name)
        return int(match.group(1)) if match else DEFAULT_SEED

    @property
    def model(self):
        weights = self.config.get("weights")
        return Path(str(weights)).stem if weights else "?"

    @property
    def weights_sha256(self):
        """The SHA-256 of the weights file (identity.json), or "" for older runs."""
        return str(self.identity.get("weights_sha256") or "")

    @property
    def weights_id(self):
        """What tells two weights files apart: their SHA-256, else their name."""
        return self.weights_sha256 or str(self.identity.get("weights_name") or self.model)

    @property
    def decoder(self):
        return str(self.config.get("output_adapter", "?"))

    @property
    def loss(self):
        return str(self.config.get("loss", "?"))

    @property
    def tuning(self):
        """The --tuning protocol (frozen, fully_frozen, linear_probe, lora or full): from
        config.yaml, or for runs trained before --tuning existed from its older options
        (see tuning_of); an option config.yaml lacks is read from identity.json."""
        return tuning_of({**self.identity, **self.config})

    def tuning_options(self):
        """{LoRA option: value} of a lora run (from identity.json, else config.yaml, else
        the default); {} for the other protocols."""
        if self.tuning != "lora":
            return {}
        return {name: self.identity.get(name, self.config.get(name,
                                                              OPTION_BY_NAME[name].default))
                for name in LORA_OPTIONS}

    def train_set_options(self):
        """{train_volumes, train_fraction, subset_seed}: from identity.json, else
        config.yaml, else the default (``all``: the whole split; runs trained before the
        options existed)."""
        return {name: self.identity.get(name, self.config.get(
            name, OPTION_BY_NAME[name].default)) for name in TRAIN_SET_OPTIONS}

    @property
    def trained_volumes(self):
        """How many training volumes the run trained on: from train_volumes.json, else
        ``--train_volumes``; None when neither says (a fraction or the whole split of a
        run without the record: see split_volumes)."""
        if self.training_set is not None:
            return len(self.training_set["volumes"])
        volumes = self.train_set_options()["train_volumes"]
        return volumes if isinstance(volumes, int) and not isinstance(volumes, bool) \
            else None

    @property
    def split_volumes(self):
        """The number of volumes of its training split (train_volumes.json), or None."""
        count = (self.training_set or {}).get("split_volumes")
        return count if isinstance(count, int) and not isinstance(count, bool) else None

    @property
    def evaluated(self):
        return bool(self.evaluations)

    def protocol(self):
        """((entry, value as JSON text), ...): the identity other than seed, the model
        weights (name and SHA-256), decoder, loss and dataset, which have their own
        columns."""
        return tuple((name, json.dumps(value, sort_keys=True))
                     for name, value in sorted(self.identity.items())
                     if name not in KEY_ENTRIES)


def _identity(folder, config):
    """identity.json of the run when it is readable, else the identity options of its
    config.yaml (every option except the runtime ones; ``tuning`` and the LoRA options
    only for a lora run, the training-set size only for a subset, as run_seg_tuning.py
    writes identities)."""
    try:
        identity = folder.read_identity()
    except UserError:
        identity = None
    if isinstance(identity, dict):
        return identity
    lora = tuning_of(config) == "lora"
    whole = all(config.get(name, OPTION_BY_NAME[name].default) ==
                OPTION_BY_NAME[name].default for name in TRAIN_SET_OPTIONS)
    return {name: value for name, value in config.items() if name not in RUNTIME_OPTIONS
            and (lora or name not in ("tuning", *LORA_OPTIONS))
            and not (whole and name in TRAIN_SET_OPTIONS)}


# ----------------------------------------------------------------------------- finding
def find_runs(paths):
    """Every run directory (one holding config.yaml) at or under ``paths``, read.

    Raises UserError when a path does not exist or holds no run directory at all.
    """
    found = {}
    for given in paths:
        root = Path(given).expanduser()
        if not root.exists():
            raise UserError(f"{root} not found; give output roots (e.g. ./__output/seg/v1) or "
                            "run directories")
        if not root.is_dir():
            raise UserError(f"{root} is not a directory; give output roots or run directories")
        run_dirs = list(_run_dirs(root.resolve()))
        for run_dir in run_dirs:
            found.setdefault(run_dir, None)
        if not run_dirs:
            raise UserError(f"no run directory (a folder with {CONFIG}) in or under "
                            f"{root}; train first, or give the folder that holds the runs")
    return [read_run(path) for path in sorted(found)]


def find_run_dirs(root):
    """The run directories (folders holding config.yaml) at or under ``root``, sorted;
    [] when there is none (nothing is read)."""
    root = Path(root).expanduser()
    return sorted(_run_dirs(root.resolve())) if root.is_dir() else []


def _run_dirs(root):
    """Directories holding config.yaml (or a scored prediction_record.json), not
    descending into a run directory."""
    for folder, subdirs, files in os.walk(root):
        if CONFIG in files or is_scored_prediction_folder(Path(folder)):
            subdirs[:] = []
            yield Path(folder)
            continue
        subdirs[:] = sorted(d for d in subdirs if not d.startswith((".", PREDS)))


def is_scored_prediction_folder(folder):
    """True for an output folder of run_seg_predict.py (prediction_record.json, no
    config.yaml) that run_seg_eval.py has scored (results*.csv)."""
    folder = Path(folder)
    return (folder / PREDICTION_RECORD).is_file() and not (folder / CONFIG).is_file() \
        and any(folder.glob(RESULTS_GLOB))


# ----------------------------------------------------------------------------- reading
def read_run(run_dir):
    """Read one run directory into a Run; problems become notes, never exceptions."""
    run = Run(path=Path(run_dir).resolve())
    folder = RunFolder(run.path)
    if is_scored_prediction_folder(run.path):
        return _read_prediction_folder(run)
    config_path = folder.config_file
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not a mapping of option: value")
        run.config = config
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        run.status = f"not used: unreadable {CONFIG} ({first})"
        return run
    run.identity = _identity(folder, config)
    run.training_set = folder.read_train_volumes(run.notes)
    run.log = folder.read_log(run.notes)
    _note_training(run)
    run.evaluations = read_evaluations(run.path, run.notes)
    run.tta = (prediction_source(folder.preds_dir()) or {}).get("tta") or "none"
    if run.evaluations:
        run.status = "evaluated"
    elif not folder.preds_dir().is_dir():
        run.status = "not evaluated: no preds/ (run run_seg_tuning.py ... --infer_only --test)"
    else:
        run.status = "not evaluated: no results*.csv (run run_seg_eval.py -m on it)"
    return run


def _note_training(run):
    epochs = [e["epoch"] for e in run.log if isinstance(e.get("epoch"), int)]
    wanted = run.config.get("epochs")
    if isinstance(wanted, int) and epochs and max(epochs) < wanted - 1:
        run.notes.append(f"training stopped after epoch {max(epochs) + 1} of {wanted}")




# What the member runs of an ensemble must share, in words (the row of the study is theirs).
_MEMBER_FIELDS = (("dataset", lambda r: r.train_dataset), ("model", lambda r: r.weights_id),
                  ("decoder", lambda r: r.decoder), ("loss", lambda r: r.loss),
                  ("protocol", lambda r: (r.tuning, r.protocol())))


def _read_prediction_folder(run):
    """A scored run_seg_predict.py output folder as a Run of its member runs' model,
    dataset, decoder, loss and protocol; "not used: ..." when they cannot be read or
    differ."""
    source = prediction_source(run.path)
    members = [entry.get("run_dir") for entry in (source or {}).get("runs") or []
               if isinstance(entry, dict)]
    if not members or not all(isinstance(m, str) for m in members):
        run.status = f"not used: {PREDICTION_RECORD} names no runs"
        return run
    read = [read_run(member) for member in members]
    broken = next((r for r in read if not r.config), None)
    if broken is not None:
        run.status = f"not used: its run {broken.path} is unreadable ({broken.status})"
        return run
    for name, value in _MEMBER_FIELDS:
        if len({repr(value(r)) for r in read}) > 1:
            run.status = f"not used: its runs differ in {name}"
            run.notes.append(f"{PREDICTION_RECORD} names runs that differ in {name}: "
                             + ", ".join(str(r.path) for r in read))
            return run
    first = read[0]
    run.config = {k: v for k, v in first.config.items() if k != "seed"}
    run.identity = {k: v for k, v in first.identity.items() if k != "seed"}
    run.training_set = first.training_set
    run.trained_on = first.train_dataset
    run.tta = source.get("tta") or "none"
    if len(read) > 1:
        run.ensemble = {"runs": len(read), "seeds": sorted(r.seed for r in read),
                        "paths": [str(r.path) for r in read]}
    else:
        run.config["seed"] = first.seed
    run.evaluations = read_evaluations(run.path, run.notes, run.train_dataset)
    run.status = "evaluated" if run.evaluations else \
        "not evaluated: no results*.csv (run run_seg_eval.py -m on it)"
    return run

