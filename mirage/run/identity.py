"""Run identity: which options define what a run trains, its name and its directory.

A run's *identity* is every option that changes what it trains (seed, learning rate,
epochs, sizes, decoder, loss, protocol, ...), with three replaced by what they stand for:

- ``weights``   -> the weights file's name and SHA-256 (moving the file changes nothing;
  replacing its content does),
- ``data_path`` -> the dataset's folder name, ``mapping_fn`` -> the class table itself.

Options that only change how or where a run executes (``names_run=False`` in the options
table, mirage/options.py: device, workers, logging, checkpoint frequency,
--test/--infer_only, ...) are not part of it.

The run directory is ``<base_output_dir>/<version>/<dataset>/<name>`` where the name is
readable and ends in the seed and a short hash of the identity::

    MIRAGE-Base_frozen_convnext_CEGDice_s42_1a2b3c4d

(``frozen`` is the ``--tuning`` protocol.) The full identity is written to
``identity.json`` in the run directory. A directory whose identity differs from the
current options is never trained into, resumed or skipped: that is an error naming the
differing options.
"""
import hashlib
import json
import os
from pathlib import Path

from mirage.config import demo_paths, parse_config, per_domain
from mirage.option_checks import check_config
from mirage.options import ALL, OPTION_BY_NAME, OPTIONS
from mirage.data.layout import open_dataset, scan_split
from mirage.data.subsets import TrainSubset
from mirage.errors import UserError
from mirage.fileio import file_sha256
from mirage.run.folder import IDENTITY, RunFolder


def check_name_part(value, what):
    """A user- or file-supplied text used as one folder name: no separators, no '..'."""
    text = str(value)
    if (not text or text in (".", "..") or "/" in text or "\\" in text or "\0" in text
            or os.path.isabs(text)):
        raise UserError(f"{what} {text!r}: must be a plain folder name (no '/', '\\', '..' "
                        "or absolute path); runs stay inside --base_output_dir")
    return text


def option_identity(config):
    """The options of ``config`` that define what a run trains, as identity.json holds them
    (sizes as ``{domain: [h, w]}``)."""
    identity = {}
    for opt in OPTIONS:
        if not opt.names_run or not _names_the_run(opt, config):
            continue
        value = config.get(opt.name, opt.default)
        if opt.kind == "size" and value is not None:
            value = {d: list(hw) for d, hw in per_domain(value, list(value) if
                                                        isinstance(value, dict)
                                                        else ["bscan"]).items()}
        identity[opt.name] = value
    return identity


def run_identity(config, dataset, weights_name=None):
    """The options that define what a run trains, as a JSON-able dict.

    ``dataset`` is a :class:`mirage.data.layout.DatasetInfo`. ``weights_name``: the name
    the weights file had when the run was trained, for a run read back with the file
    moved under another name (default: the name of ``--weights``).
    """
    identity = option_identity(config)
    weights = Path(config["weights"])
    if not weights.is_file():
        raise UserError(f"--weights {weights}: file not found")
    identity["weights_name"] = weights_name or weights.name
    identity["weights_sha256"] = file_sha256(weights)
    identity["dataset"] = dataset.name
    identity["classes"] = dataset.class_table.entries()
    return identity


def _names_the_run(opt, config):
    """False for ``tuning`` and a protocol's own options (``only_with``, the LoRA ones)
    except under that protocol: the other protocols are what ``freeze_encoder`` /
    ``freeze_patch_embed`` (and the decoder, for ``linear_probe``) already say, so their
    runs keep the identity, and the folder, that runs trained before ``--tuning`` existed
    have. Likewise an option ``omit_at_default`` at its default (``--train_volumes all``:
    the runs from before the training-set size existed), and an option ``only_beside``
    others that are all at their defaults (``--subset_seed`` without a size)."""
    if opt.name == "tuning":
        return config.get("tuning") == "lora"
    if opt.omit_at_default and _at_default(opt.name, config):
        return False
    if opt.only_beside and all(_at_default(name, config) for name in opt.only_beside):
        return False
    return not opt.only_with or config.get("tuning") == opt.only_with


def _at_default(name, config):
    default = OPTION_BY_NAME[name].default
    return config.get(name, default) == default


def train_subset_of(config):
    """The :class:`~mirage.data.subsets.TrainSubset` the options ask for (``all`` ->
    None: the whole split)."""
    volumes, fraction = config.get("train_volumes", ALL), config.get("train_fraction", ALL)
    return TrainSubset(volumes=None if volumes == ALL else int(volumes),
                       fraction=None if fraction == ALL else float(fraction),
                       seed=int(config.get("subset_seed", 0)))


def check_train_set_size(config, dataset):
    """A size larger than the training split of ``dataset`` is a UserError naming the
    split's size (what the job would say once it reads the split; the runner asks before
    a grid starts). Only the folder is listed, nothing decoded; a split with problems is
    left to training, which reports them all."""
    subset = train_subset_of(config)
    if subset.whole:
        return
    slices, problems = scan_split(dataset.split_dir("train"), need_masks=True)
    if slices and not problems:
        subset.select(slices)


def train_set_part(config):
    """The run name's part for the training-set size: '' for the whole split (the name
    runs had before the option existed), '_v4' (4 volumes), '_f25' (25% of them), with
    '_ss<seed>' after it for a subset seed other than 0."""
    volumes, fraction = config.get("train_volumes", ALL), config.get("train_fraction", ALL)
    if volumes == ALL and fraction == ALL:
        return ""
    part = f"_v{volumes}" if volumes != ALL else f"_f{round(100 * fraction, 6):g}"
    seed = config.get("subset_seed", 0)
    return part + (f"_ss{seed}" if seed != OPTION_BY_NAME["subset_seed"].default else "")


def identity_hash(identity):
    """8 hex digits of the SHA-256 of the identity's canonical JSON."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]


def run_name(config, identity):
    """``<weights stem>_<tuning>_<decoder>_<loss>[_minmax][_v<N>|_f<percent>]_s<seed>_<hash>``,
    e.g. ``MIRAGE-Base_frozen_convnext_CEGDice_s42_1a2b3c4d`` (the paper's protocol) or
    ``..._CEGDice_v4_s42_...`` (4 training volumes)."""
    name = f"{Path(identity['weights_name']).stem}_{config['tuning']}"
    name += f"_{config['output_adapter']}_{config['loss']}"
    name += "_minmax" if config["minmax"] else ""
    name += train_set_part(config)
    name += f"_s{config['seed']}_{identity_hash(identity)}"
    return check_name_part(name, "--weights file name")


def legacy_run_name(config, identity):
    """The name versions before ``--tuning`` gave the run:
    ``<stem>[_frozen]_<decoder>_<loss>[_minmax][_fullyfrozen]_s<seed>_<hash>`` (the same
    for the paper's protocol; fully-frozen, linear-probe and fine-tuned runs differ)."""
    name = Path(identity["weights_name"]).stem
    name += "_frozen" if config["freeze_encoder"] else ""
    name += f"_{config['output_adapter']}_{config['loss']}"
    name += "_minmax" if config["minmax"] else ""
    name += "_fullyfrozen" if config["freeze_patch_embed"] else ""
    return name + f"_s{config['seed']}_{identity_hash(identity)}"


def run_directory(config, dataset, identity=None):
    """``<base_output_dir>/<version>/<dataset>/<run name>`` (checked to stay inside).

    A run trained before ``--tuning`` existed keeps its folder: where only the folder of
    its older name exists (same identity, so same hash), that folder is the run's."""
    identity = run_identity(config, dataset) if identity is None else identity
    base = Path(config["base_output_dir"])
    if base.exists() and not base.is_dir():
        raise UserError(f"--base_output_dir {base}: is a file, not a folder; choose a "
                        "folder for the run directories")
    version = check_name_part(config["version"], "--version")
    dataset_name = check_name_part(dataset.name, "--data_path folder name")
    parent = base / version / dataset_name
    current = parent / run_name(config, identity)
    if config["tuning"] != "lora" and not current.exists():
        legacy = parent / legacy_run_name(config, identity)
        if legacy.is_dir():
            return legacy
    return current


def run_dir_for_argv(argv):
    """The run directory ``run_seg_tuning.py <argv>`` would use (for the runner's checks).

    None for a ``--demo`` whose inputs do not exist yet.
    """
    config, demo, _ = parse_config(argv)
    if demo:
        weights, data_path = demo_paths()
        config["weights"] = config["weights"] or str(weights)
        config["data_path"] = config["data_path"] or str(data_path)
        if not (Path(config["weights"]).is_file() and Path(config["data_path"]).is_dir()):
            return None  # the demo writes its inputs when it starts
    check_config(config)  # what a job would refuse, refused before the grid starts
    dataset = open_dataset(config["data_path"], config["mapping_fn"])
    check_train_set_size(config, dataset)
    return run_directory(config, dataset)


# ----------------------------------------------------------------------------- checks
def differences(stored, current):
    """``[(option, stored value, current value)]`` for every differing identity entry."""
    keys = sorted(set(stored) | set(current))
    return [(k, stored.get(k), current.get(k)) for k in keys
            if stored.get(k) != current.get(k)]


def describe_differences(diffs, limit=6):
    parts = [f"{k}: {a!r} there, {b!r} now" for k, a, b in diffs[:limit]]
    more = f" (+{len(diffs) - limit} more)" if len(diffs) > limit else ""
    return "; ".join(parts) + more


def check_identity(run_dir, identity):
    """Refuse a run directory that holds a run trained with other identity options."""
    stored = RunFolder(run_dir).read_identity()
    if stored is None:
        leftovers = [p.name for p in Path(run_dir).glob("checkpoint-*.pth")] \
            if Path(run_dir).is_dir() else []
        if leftovers:
            raise UserError(f"{run_dir} holds checkpoints ({leftovers[0]}) but no "
                            f"{IDENTITY}; it was not written by this version: move "
                            "it away or use another --version")
        return
    diffs = differences(stored, identity)
    if diffs:
        raise UserError(f"{run_dir} holds a run with other options ("
                        f"{describe_differences(diffs)}); use another --version or restore "
                        "those options")


def nearest_runs(run_dir, identity):
    """A hint naming the trained run next to ``run_dir`` closest to ``identity``, or ''."""
    parent = Path(run_dir).parent
    if not parent.is_dir():
        return ""
    candidates = []
    for other in parent.iterdir():
        try:
            stored = RunFolder(other).read_identity()
        except UserError:  # a damaged identity.json only makes it no candidate for a hint
            stored = None
        if stored is not None and other != Path(run_dir):
            candidates.append((len(differences(stored, identity)), other, stored))
    if not candidates:
        return ""
    _, other, stored = min(candidates, key=lambda c: c[0])
    return (f"; the closest trained run, {other.name}, has other options ("
            f"{describe_differences(differences(stored, identity), limit=3)})")
