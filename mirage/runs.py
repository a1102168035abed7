"""Find run directories and read what they hold: options, training log, evaluation results.

    find_runs([root or run dir, ...])   -> [Run, ...] (every directory with a config.yaml)
    read_run(run_dir)                   -> Run
    record_evaluation(evaluation, ...)  -> writes <run>/evaluation.json (run_seg_eval.py)

A Run never raises for a damaged or unfinished run directory: what cannot be read becomes
a note (``run.notes``) or a status ("not evaluated: ..."), so a summary lists the run
instead of dropping it or crashing. Scores are kept as the CSV files hold them: Dice and
IoU as fractions, HD95 in pixels.
"""
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from mirage.errors import UserError
from mirage.evaluation import LESION_LABELS, METRICS
from mirage.fileio import write_text

CONFIG_NAME = "config.yaml"
LOG_NAME = "log.txt"
EVAL_RECORD = "evaluation.json"  # how each results file was made (written by run_seg_eval)
DEFAULT_SEED = 42  # run_seg_tuning.py's default, for configs written without a seed

IDENTITY_NAME = "identity.json"  # the run's identity (written by run_seg_tuning.py)
# Options that decide where and how a run is executed but not what it learns; used for runs
# without identity.json when mirage.identity (which has the tool's own list) is missing.
NOT_IDENTITY = frozenset({
    "base_output_dir", "version", "device", "num_workers", "pin_mem", "resume",
    "auto_resume", "save_ckpt", "save_ckpt_freq", "keep_ckpts", "start_epoch", "infer_only",
    "test", "test_data_path", "log_images", "log_images_freq", "show_user_warnings",
    "compile", "grad_checkpointing", "feature_cache_dir", "weights", "data_path",
    "mapping_fn",
})
# Identity entries with a column of their own in the summary (or implied by the dataset).
KEY_ENTRIES = frozenset({"seed", "weights", "weights_name", "output_adapter", "loss",
                         "data_path", "dataset"})

_SEED_IN_NAME = re.compile(r"_s(\d+)(?:_[0-9a-f]{8})?$")


@dataclass
class Evaluation:
    """One dataset's scores of a run, read back from its results CSV file(s).

    rows: DataFrame with ID (str), Class, Group ("layers" or "lesions"), Dice, IoU, HD95.
    empty_volume: the --empty_volume mode ("zero", "nan"), or "" when not known.
    """

    dataset: str
    external: str
    rows: pd.DataFrame
    files: list
    empty_volume: str = ""
    options: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    @property
    def classes(self):
        return tuple(sorted(self.rows["Class"].unique()))

    def kinds(self):
        """The class groups present: "layers" and/or "lesions"."""
        return [g for g in ("layers", "lesions") if (self.rows["Group"] == g).any()]

    def group_rows(self, group):
        return self.rows if group == "all" else self.rows[self.rows["Group"] == group]


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

    @property
    def name(self):
        return self.path.name

    @property
    def train_dataset(self):
        return self.path.parent.name

    @property
    def seed(self):
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
    def decoder(self):
        return str(self.config.get("output_adapter", "?"))

    @property
    def loss(self):
        return str(self.config.get("loss", "?"))

    @property
    def evaluated(self):
        return bool(self.evaluations)

    def protocol(self):
        """((entry, value as JSON text), ...): the identity other than seed, model weights
        name, decoder, loss and dataset, which have their own columns."""
        return tuple((name, json.dumps(value, sort_keys=True))
                     for name, value in sorted(self.identity.items())
                     if name not in KEY_ENTRIES)


def read_identity(run_dir, config):
    """identity.json of the run when there is one, else the identity options of its
    config.yaml (every option except the runtime ones)."""
    path = Path(run_dir) / IDENTITY_NAME
    if path.is_file():
        try:
            identity = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(identity, dict):
                return identity
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            pass
    try:
        from mirage.identity import RUNTIME_OPTIONS as runtime  # the tool's own list
    except ImportError:
        runtime = NOT_IDENTITY
    return {name: value for name, value in config.items() if name not in runtime}


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
            raise UserError(f"no run directory (a folder with {CONFIG_NAME}) in or under "
                            f"{root}; train first, or give the folder that holds the runs")
    return [read_run(path) for path in sorted(found)]


def _run_dirs(root):
    """Directories holding config.yaml, not descending into a run directory."""
    for folder, subdirs, files in os.walk(root):
        if CONFIG_NAME in files:
            subdirs[:] = []
            yield Path(folder)
            continue
        subdirs[:] = sorted(d for d in subdirs if not d.startswith((".", "preds")))


# ----------------------------------------------------------------------------- reading
def read_run(run_dir):
    """Read one run directory into a Run; problems become notes, never exceptions."""
    run = Run(path=Path(run_dir).resolve())
    config_path = run.path / CONFIG_NAME
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not a mapping of option: value")
        run.config = config
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        run.status = f"not used: unreadable {CONFIG_NAME} ({first})"
        return run
    run.identity = read_identity(run.path, config)
    run.log = read_log(run.path / LOG_NAME, run.notes)
    _note_training(run)
    run.evaluations = read_evaluations(run.path, run.notes)
    if run.evaluations:
        run.status = "evaluated"
    elif not (run.path / "preds").is_dir():
        run.status = "not evaluated: no preds/ (run run_seg_tuning.py ... --infer_only --test)"
    else:
        run.status = "not evaluated: no results*.csv (run run_seg_eval.py -m on it)"
    return run


def read_log(path, notes=None):
    """The JSON lines of log.txt as dicts (unreadable lines skipped and counted in notes)."""
    path = Path(path)
    if not path.is_file():
        if notes is not None:
            notes.append(f"no {path.name}")
        return []
    entries, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(entry, dict):
            entries.append(entry)
        else:
            bad += 1
    if bad and notes is not None:
        notes.append(f"{path.name}: {bad} unreadable line(s) skipped")
    return entries


def _note_training(run):
    epochs = [e["epoch"] for e in run.log if isinstance(e.get("epoch"), int)]
    wanted = run.config.get("epochs")
    if isinstance(wanted, int) and epochs and max(epochs) < wanted - 1:
        run.notes.append(f"training stopped after epoch {max(epochs) + 1} of {wanted}")


def _split_results_name(stem):
    """'results_lesions_Duke_iAMD' -> ('lesions', 'Duke_iAMD'); 'results' -> ('all', '')."""
    rest = stem[len("results"):]
    for group in ("layers", "lesions"):
        tag = f"_{group}"
        if rest == tag or rest.startswith(tag + "_"):
            return group, rest[len(tag) + 1:]
    if rest == "":
        return "all", ""
    return ("all", rest[1:]) if rest.startswith("_") else (None, None)


def _read_record(run_dir, notes):
    path = Path(run_dir) / EVAL_RECORD
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        return record if isinstance(record, dict) else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        notes.append(f"{EVAL_RECORD} unreadable; evaluation options unknown")
        return {}


def read_evaluations(run_dir, notes):
    """Every results*.csv of a run, one Evaluation per evaluated dataset."""
    run_dir = Path(run_dir)
    record = _read_record(run_dir, notes)
    files = {}
    for path in sorted(run_dir.glob("results*.csv")):
        group, external = _split_results_name(path.stem)
        known = external == "" or (run_dir / f"preds_{external}").is_dir() or external in record
        if group is None or not known:
            notes.append(f"{path.name}: not a results file of run_seg_eval.py (no "
                         f"preds_{external}/); ignored")
            continue
        files.setdefault(external, {})[group] = path
    evaluations = []
    for external, by_group in files.items():
        if "all" in by_group and len(by_group) > 1:
            # A dataset evaluated once with one class group and once with two: keep the newer.
            newest = max(by_group.values(), key=lambda p: p.stat().st_mtime)
            keep = {"all": by_group["all"]} if newest == by_group["all"] else \
                {g: p for g, p in by_group.items() if g != "all"}
            dropped = sorted(p.name for g, p in by_group.items() if g not in keep)
            notes.append(f"both results.csv and per-group files for "
                         f"{external or 'the test set'}; using the newer, ignoring "
                         f"{', '.join(dropped)}")
            by_group = keep
        dataset = external or run_dir.parent.name
        evaluation = _read_results(dataset, external, by_group, record.get(dataset, {}), notes)
        if evaluation is not None:
            _note_stale(run_dir, evaluation, notes)
            evaluations.append(evaluation)
    return evaluations


def _read_results(dataset, external, by_group, options, notes):
    frames, problems = [], []
    for group, path in sorted(by_group.items()):
        frame, problem = read_results_csv(path)
        if problem:
            problems.append(problem)
            continue
        if group == "all":
            lesion = frame["Class"].str.strip().str.lower().isin(LESION_LABELS)
            frame["Group"] = np.where(lesion, "lesions", "layers")
        else:
            frame["Group"] = group
        frames.append(frame)
    notes.extend(problems)
    if problems or not frames:
        return None
    rows = pd.concat(frames, ignore_index=True)
    evaluation = Evaluation(dataset=dataset, external=external, rows=rows,
                            files=sorted(by_group.values()), options=dict(options))
    if isinstance(options, dict) and options.get("note"):
        notes.append(f"{dataset}: {options['note']}")  # e.g. foreign predictions
    mode = options.get("empty_volume") if isinstance(options, dict) else None
    if mode in ("zero", "nan"):
        evaluation.empty_volume = mode
    elif rows["Dice"].isna().any():
        evaluation.empty_volume = "nan"  # --empty_volume zero never gives a NaN Dice
    return evaluation


def read_results_csv(path):
    """(DataFrame ID, Class, Dice, IoU, HD95; problem text or "") of one results file.

    Lines starting with '#' before the header are comments (kept out of the table).
    """
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype={"ID": str, "Class": str}, comment=None,
                            skiprows=_comment_lines(path), keep_default_na=True)
    except (OSError, ValueError, pd.errors.ParserError) as err:
        return None, f"{path.name}: unreadable ({str(err).splitlines()[0]}); ignored"
    missing = [c for c in ("ID", "Class", *METRICS) if c not in frame.columns]
    if missing:
        return None, f"{path.name}: no column {', '.join(missing)}; ignored"
    if frame.empty:
        return None, f"{path.name}: no rows; ignored"
    frame = frame[["ID", "Class", *METRICS]].copy()
    for metric in METRICS:
        frame[metric] = pd.to_numeric(frame[metric], errors="coerce").astype(float)
    frame[["ID", "Class"]] = frame[["ID", "Class"]].astype(str)
    return frame, ""


def _comment_lines(path):
    count = 0
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.startswith("#"):
                break
            count += 1
    return count


def _note_stale(run_dir, evaluation, notes):
    preds = run_dir / (f"preds_{evaluation.external}" if evaluation.external else "preds")
    if preds.is_dir():
        newest_result = min(p.stat().st_mtime for p in evaluation.files)
        if preds.stat().st_mtime > newest_result + 1:
            names = ", ".join(p.name for p in evaluation.files)
            notes.append(f"{preds.name}/ is newer than {names}: re-run run_seg_eval.py")


# ----------------------------------------------------------------------------- recording
def record_evaluation(evaluation, **options):
    """Note in ``<run>/evaluation.json`` how ``evaluation`` (a mirage.evaluation
    RunEvaluation) was scored, so summaries can tell runs scored differently apart."""
    path = Path(evaluation.run_dir) / EVAL_RECORD
    notes = []
    record = _read_record(evaluation.run_dir, notes)
    entry = {key: value for key, value in options.items()
             if value is None or isinstance(value, (str, int, float, bool))}
    entry.update(external=evaluation.external,
                 files=[Path(p).name for p in evaluation.files],
                 volumes=int(evaluation.rows["ID"].nunique()),
                 classes=sorted(map(str, evaluation.rows["Class"].unique())))
    record[evaluation.dataset] = entry
    write_text(path, json.dumps(record, indent=1, sort_keys=True) + "\n")
    return path

