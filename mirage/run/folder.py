"""One run directory and every file in it: the names, and how each file is read and written.

    <base_output_dir>/<version>/<dataset>/<run name>/
        config.yaml                  every option of the run (``-c`` reads it back)
        identity.json                the options that define what it trains (run/identity.py)
        train_volumes.json           the training split's volumes the run trains on
        .lock                        the process writing into it (run/lock.py)
        log.txt                      one JSON line per epoch, then one per test
        checkpoint-<epoch>.pth       resumable training state (the newest --keep_ckpts)
        checkpoint-best.pth          the checkpoint the validation metric selected
        images/                      validation panels (--log_images)
        preds/, preds_<name>/        test predictions, their manifest.json and the options
                                     of the inference, config_infer.yaml (run/predictions.py)
        config_test_<name>.yaml      options of a --test
        results*.csv                 per-volume scores (run_seg_eval.py; run/results.py)
        layer_boundaries*.csv, layer_thickness*.csv, lesion_areas*.csv, lesion_volumes*.csv
                                     boundary errors, thicknesses, lesion areas per B-scan and
                                     volumes (run_seg_eval.py; mirage/evaluate/measurements.py)
        overlays/, overlays_<name>/  every test B-scan drawn (run_seg_eval.py --overlays)
        evaluation.json              how each results file was scored
        report.html, tensorboard/    the run's report and TensorBoard curves

Every tool names these files through :class:`RunFolder`; nothing else spells them.
Writes are atomic (a temporary file renamed over the old one).
"""
import contextlib
import json
import re
from pathlib import Path

from mirage.config import RUN_CONFIG
from mirage.errors import UserError
from mirage.fileio import write_text

CONFIG = RUN_CONFIG  # spelled in mirage/config.py, which reads it for --run_dir
IDENTITY = "identity.json"
TRAIN_VOLUMES = "train_volumes.json"
LOCK = ".lock"
LOG = "log.txt"
BEST_CHECKPOINT = "checkpoint-best.pth"
EPOCH_CHECKPOINT = re.compile(r"^checkpoint-(\d+)\.pth$")
IMAGES = "images"
PREDS = "preds"
EVALUATION_RECORD = "evaluation.json"
REPORT = "report.html"
TENSORBOARD = "tensorboard"
RESULTS_GLOB = "results*.csv"
# Measurement files of run_seg_eval.py beside the results (never matching RESULTS_GLOB, which
# is read as scores): <kind>.csv, or <kind>_<external>.csv.
MEASUREMENTS = ("layer_boundaries", "layer_thickness", "lesion_areas", "lesion_volumes")
# What a run folder's name ends in: the seed and the identity hash (run/identity.py).
RUN_NAME_ENDING = re.compile(r"_s\d+_[0-9a-f]{8}")


class RunFolder:
    """A run directory ``.../<dataset>/<run name>/`` (which may not exist yet)."""

    def __init__(self, path):
        self.path = Path(path)

    def __repr__(self):
        return f"RunFolder({str(self.path)!r})"

    def __fspath__(self):
        return str(self.path)

    def __eq__(self, other):
        return isinstance(other, RunFolder) and other.path == self.path

    def __hash__(self):
        return hash(self.path)

    @property
    def name(self):
        return self.path.name

    @property
    def dataset_name(self):
        """The training dataset: the name of the folder holding the run."""
        return self.path.parent.name

    # ------------------------------------------------------------------ file names
    @property
    def config_file(self):
        return self.path / CONFIG

    @property
    def identity_file(self):
        return self.path / IDENTITY

    @property
    def train_volumes_file(self):
        return self.path / TRAIN_VOLUMES

    @property
    def lock_file(self):
        return self.path / LOCK

    @property
    def log_file(self):
        return self.path / LOG

    @property
    def best_checkpoint(self):
        return self.path / BEST_CHECKPOINT

    def epoch_checkpoint(self, epoch):
        return self.path / f"checkpoint-{epoch}.pth"

    @property
    def images_dir(self):
        return self.path / IMAGES

    def preds_dir(self, external=""):
        """``preds/`` (the run's own test split) or ``preds_<external>/``."""
        return self.path / (f"{PREDS}_{external}" if external else PREDS)

    def overlays_dir(self, external=""):
        """``overlays/`` (one B-scan | truth | prediction | errors image per test B-scan) or
        ``overlays_<external>/``."""
        return self.path / (f"overlays_{external}" if external else "overlays")

    def test_record(self, dataset_name):
        """``config_test_<dataset>.yaml``: the options of the last --test on a dataset."""
        return self.path / f"config_test_{dataset_name}.yaml"

    def results_file(self, group="all", external=""):
        """``results[_<group>][_<external>].csv``; group "all" has no tag."""
        tag = "" if group == "all" else f"_{group}"
        suffix = f"_{external}" if external else ""
        return self.path / f"results{tag}{suffix}.csv"

    def results_files(self):
        return sorted(self.path.glob(RESULTS_GLOB))

    def measurement_file(self, kind, external=""):
        """``<kind>[_<external>].csv``, kind one of MEASUREMENTS: per-volume layer boundary
        errors, layer thicknesses, per-B-scan lesion areas, per-volume lesion volumes."""
        if kind not in MEASUREMENTS:
            raise ValueError(f"unknown measurement file {kind!r}; one of {MEASUREMENTS}")
        return self.path / (f"{kind}_{external}.csv" if external else f"{kind}.csv")

    @property
    def evaluation_record(self):
        return self.path / EVALUATION_RECORD

    @property
    def report_file(self):
        return self.path / REPORT

    @property
    def tensorboard_dir(self):
        return self.path / TENSORBOARD

    # ------------------------------------------------------------------ config and identity
    def write_config(self, yaml_text):
        write_text(self.config_file, yaml_text)

    def read_identity(self):
        """The identity stored in identity.json, or None if there is none."""
        path = self.identity_file
        if not path.is_file():
            return None
        try:
            identity = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"{path}: unreadable ({err}); restore it or start the run in "
                            "another --version") from None
        if not isinstance(identity, dict):
            raise UserError(f"{path}: not a JSON object of options (found "
                            f"{type(identity).__name__}); restore it or start the run in "
                            "another --version")
        return identity

    def write_identity(self, identity):
        write_text(self.identity_file, json.dumps(identity, indent=1, sort_keys=True) + "\n")

    # ------------------------------------------------------------------ train_volumes.json
    def write_train_volumes(self, record):
        """``record``: {"volumes": [chosen IDs], "split_volumes": the split's number of
        volumes, "bscans": the B-scans trained on, "train_volumes", "train_fraction",
        "subset_seed": the options that chose them}."""
        write_text(self.train_volumes_file,
                   json.dumps(record, indent=1, sort_keys=True) + "\n")

    def read_train_volumes(self, notes=None):
        """train_volumes.json as a dict, or None when there is none (runs trained before
        it existed) or it cannot be read (said in ``notes`` when given)."""
        path = self.train_volumes_file
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            record = f"unreadable ({type(err).__name__})"
        if isinstance(record, dict) and isinstance(record.get("volumes"), list):
            return record
        if notes is not None:
            what = record if isinstance(record, str) else "not a record of volumes"
            notes.append(f"{TRAIN_VOLUMES}: {what}; ignored")
        return None

    # ------------------------------------------------------------------ log.txt
    def read_log(self, notes=None):
        """The JSON lines of log.txt as dicts; unreadable lines are skipped (and counted
        in ``notes`` when given, as is a missing log)."""
        path = self.log_file
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

    def write_log(self, entries):
        """Replace log.txt by ``entries`` (rewritten atomically: a kill never truncates it)."""
        write_text(self.log_file, "".join(json.dumps(e) + "\n" for e in entries))

    def append_log(self, entry):
        self.write_log(self.read_log() + [entry])

    def trim_log(self, start_epoch, restore=None, notes=None):
        """Prepare log.txt for a run that continues at ``start_epoch``: drop the entries of
        the epochs it will redo (``start_epoch`` on) and the test lines; every complete
        entry of an earlier epoch stays. A line that is not valid JSON (torn by an
        interrupted write) cannot be kept; it is counted in ``notes``. ``restore``: an
        entry (the resumed checkpoint's copy of its epoch's line) put back in its place
        when the log lacks its epoch, e.g. because that line was the torn one."""
        entries = [e for e in self.read_log(notes if self.log_file.is_file() else None)
                   if e.get("epoch", -1) < start_epoch and "test_epoch" not in e]
        epoch = restore.get("epoch") if isinstance(restore, dict) else None
        if isinstance(epoch, int) and epoch < start_epoch \
                and all(e.get("epoch") != epoch for e in entries):
            later = [i for i, e in enumerate(entries) if e.get("epoch", -1) > epoch]
            entries.insert(later[0] if later else len(entries), dict(restore))
        elif not self.log_file.is_file():
            return
        self.write_log(entries)

    def training_finished(self, epochs):
        """True when log.txt records the last of ``epochs`` epochs."""
        return any(entry.get("epoch") == epochs - 1 for entry in self.read_log())

    # ------------------------------------------------------------------ checkpoints
    def epoch_checkpoints(self):
        """``{epoch: path}`` of the run's ``checkpoint-<epoch>.pth`` files."""
        if not self.path.is_dir():
            return {}
        found = {}
        for path in self.path.iterdir():
            match = EPOCH_CHECKPOINT.match(path.name)
            if match:
                found[int(match.group(1))] = path
        return found

    def latest_checkpoint(self):
        """Path of the highest-epoch ``checkpoint-<epoch>.pth``, or None."""
        found = self.epoch_checkpoints()
        return found[max(found)] if found else None

    def prune_epoch_checkpoints(self, keep):
        """Delete all but the ``keep`` newest ``checkpoint-<epoch>.pth`` (called right after
        a new one is safely on disk, so a run can always resume)."""
        found = self.epoch_checkpoints()
        for epoch in sorted(found)[:-keep] if keep > 0 else []:
            with contextlib.suppress(FileNotFoundError):
                found[epoch].unlink()

    # ------------------------------------------------------------------ evaluation.json
    def read_evaluation_record(self, notes=None):
        """{dataset: how its results were scored} from evaluation.json ({} if none)."""
        path = self.evaluation_record
        if not path.is_file():
            return {}
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            return record if isinstance(record, dict) else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            if notes is not None:
                notes.append(f"{EVALUATION_RECORD} unreadable; evaluation options unknown")
            return {}

    def record_evaluation(self, dataset, entry):
        """Set ``dataset``'s entry of evaluation.json (other datasets' entries are kept)."""
        record = self.read_evaluation_record()
        record[dataset] = entry
        write_text(self.evaluation_record, json.dumps(record, indent=1, sort_keys=True) + "\n")
        return self.evaluation_record


def runs_named(path):
    """The run folders ``path`` names: the folder itself if it exists, else every run folder
    beside it whose name is ``path``'s name plus the ``_s<seed>_<hash>`` ending (how the
    MIRAGE guide names runs: ``.../MIRAGE-Base_frozen_convnext_CEGDice/``); [] if none."""
    path = Path(path)
    if path.is_dir():
        return [path]
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.iterdir() if p.is_dir()
                  and p.name.startswith(path.name)
                  and RUN_NAME_ENDING.fullmatch(p.name[len(path.name):]))

