"""Row labels of a study: a readable name for each group of runs.

    label_groups(groups, labels=None) -> notes (the labels are set on the groups)
    tuning_words(tuning, options, shown) -> the --tuning protocol in words

A label is the model (its weights file stem) plus, in words, only what tells two groups on
one dataset apart: the decoder, the loss, the options that differ, and last the tuning
protocol (``MIRAGE-Base, lr 1e-3, fully frozen``), said once in words ("frozen (paper)",
"fully frozen", "linear probe", "LoRA r8", "full fine-tuning") rather than by its options.
Each group also gets ``model_label``, the label without the protocol (the rows of the
tables with protocols as columns), and ``tuning_label``, the protocol in words (their
columns), even where the protocol is the same for every group. What identifies the
weights (their SHA-256 and file name) is the model itself and never part of a label:
summary.csv and runs.csv keep it in columns of its own. Options that only change with the
dataset (its class table) are said by the dataset column. A label longer than MAX_LABEL
characters names its options (all but the protocol) "setting 1", "setting 2", ... with a
legend; a user's labels (``labels``) replace either a model's name (key: its weights file
name or stem), a whole automatic label, or an automatic label without its protocol (then
every protocol's label of that row).
"""
import json
from pathlib import PurePath

from mirage.options import LORA_OPTIONS, OPTION_BY_NAME
from mirage.errors import UserError
from mirage.run.catalog import TUNING_ENTRIES

MAX_LABEL = 40  # characters: the tables, heat maps and tests stay readable at 1280 px
# The training-set size (--train_volumes or --train_fraction; neither: the whole split),
# said as one part of a label, TRAINING_SET ("4 train volumes").
SIZE_ENTRIES = ("train_volumes", "train_fraction")
TRAINING_SET = "training set"
# Identity entries given by the dataset column, never by a row label.
DATASET_ENTRIES = frozenset({"dataset", "data_path", "classes", "mapping_fn"})
# The --tuning protocols in words (a LoRA run adds its rank: "LoRA r8").
TUNING_WORDS = {"frozen": "frozen (paper)", "fully_frozen": "fully frozen",
                "linear_probe": "linear probe", "lora": "LoRA", "full": "full fine-tuning"}
# LoRA options other than the rank, in words where a study has a value not the default.
LORA_PHRASES = {"lora_alpha": "alpha {}", "lora_dropout": "dropout {}",
                "lora_targets": "on {}"}
# Switches in words: option -> (when on, when off); "" says nothing.
SWITCHES = {
    "learnable_pos_emb": ("learned pos. embedding", "fixed pos. embedding"),
    "minmax": ("min-max input", ""),
}
# Options with a value, in words ("{}" is the value); others read "<name in words> <value>".
PHRASES = {"lr": "lr {}", "min_lr": "min lr {}", "warmup_lr": "warmup lr {}",
           "epochs": "{} epochs", "warmup_epochs": "{} warmup epochs",
           "batch_size": "batch {}", "input_size": "input {}", "patch_size": "patch {}",
           "weight_decay": "wd {}", "layer_decay": "layer decay {}",
           "drop_path_encoder": "drop path {}", "aug_name": "{} augmentation",
           "opt": "{}", "amp_dtype": "{}", "output_adapter": "{}", "loss": "{}"}


def format_value(value, exponent=False):
    """A JSON-able option value as short text: 1e-3, 512x512, none, on. exponent: write
    every non-zero float below 1 as mantissa-exponent (learning rates: 1e-2, not 0.01)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        small = abs(value) < (1 if exponent else 0.01)
        if value != 0 and (small or abs(value) >= 1e5):
            mantissa, exponent = f"{value:.2e}".split("e")
            return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        return f"{value:g}"
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return "x".join(format_value(v) for v in value)
    if isinstance(value, dict):
        if len(value) == 1:  # one input domain (bscan): its value says it all
            return format_value(next(iter(value.values())))
        return "/".join(f"{k} {format_value(v)}" for k, v in sorted(value.items()))
    return str(value)


def describe(name, value, recorded=True):
    """One option's value in words, e.g. ("lr", 0.001) -> "lr 1e-3"; "" for an off switch
    that needs no words."""
    words = name.replace("_", " ")
    if not recorded:
        return f"{words} not recorded"
    if name in SWITCHES and isinstance(value, bool):
        return SWITCHES[name][0 if value else 1]
    if isinstance(value, bool):
        return words if value else f"no {words}"
    text = format_value(value, exponent=name.endswith("lr"))
    return PHRASES.get(name, words + " {}").format(text)


def _varying(groups, words):
    """(protocol entries that differ between two groups of one dataset (sorted), whether
    the tuning protocols do). words: {id(group): its protocol in words}.

    The protocol is said by its words, so its own entries (--tuning, its older aliases,
    the LoRA options) count only where two groups with the same words differ in them (e.g.
    an entry one identity lacks); the decoder of a linear probe is part of the protocol,
    so it counts only where the other groups differ in decoder."""
    by_dataset = {}
    for group in groups:
        by_dataset.setdefault(group.key.column, []).append(group)
    varying, tuning_varies = set(), False
    for members in by_dataset.values():
        protocols = [dict(g.key.protocol) for g in members]
        names = {n for p in protocols for n in p} - DATASET_ENTRIES
        for name in names - TUNING_ENTRIES:
            # an entry only some identities hold differs where it is absent, except one
            # named only beside others (--subset_seed: absent for the whole split)
            absent = () if _only_beside(name) else ("\0absent",)
            if len({p.get(name, *absent) for p in protocols} - {None}) > 1:
                varying.add(name)
        for name in names & TUNING_ENTRIES:
            values = {}
            for group, protocol in zip(members, protocols):
                values.setdefault(words[id(group)], set()).add(protocol.get(name, "\0absent"))
            if any(len(same) > 1 for same in values.values()):
                varying.add(name)
        if len({g.key.decoder for g in members if g.key.tuning != "linear_probe"}) > 1:
            varying.add("decoder")
        if len({g.key.loss for g in members}) > 1:
            varying.add("loss")
        tuning_varies = tuning_varies or len({words[id(g)] for g in members}) > 1
    if varying & set(SIZE_ENTRIES):  # one phrase for the size, however it was given
        varying = (varying - set(SIZE_ENTRIES)) | {TRAINING_SET}
    return sorted(varying, key=lambda n: (n not in ("decoder", "loss"), n)), tuning_varies


def _only_beside(name):
    return name in OPTION_BY_NAME and bool(OPTION_BY_NAME[name].only_beside)


def training_set_words(protocol):
    """The training-set size of an identity in words: '1 train volume', '25% of train
    volumes', or 'all train volumes' (no size: the whole split)."""
    volumes, fraction = (json.loads(protocol[name]) if name in protocol else None
                         for name in SIZE_ENTRIES)
    if volumes is not None:
        return f"{volumes} train volume{'' if volumes == 1 else 's'}"
    if fraction is not None:
        return f"{format_value(100 * fraction)}% of train volumes"
    return "all train volumes"


def tuning_words(tuning, options=None, shown=()):
    """The --tuning protocol in words: "frozen (paper)", "linear probe", "LoRA r8"; a LoRA
    run's options named in ``shown`` (lora_alpha, lora_dropout, lora_targets) follow its
    rank: "LoRA r16 alpha 32 dropout 0 on qkv-proj-fc1-fc2"."""
    words = TUNING_WORDS.get(tuning, str(tuning).replace("_", " "))
    if tuning != "lora":
        return words
    options = dict(options or {})
    words += f" r{format_value(_lora_option(options, 'lora_rank'))}"
    for name, phrase in LORA_PHRASES.items():
        if name in shown:
            words += " " + phrase.format(format_value(_lora_option(options, name)))
    return words


def _lora_option(options, name):
    return options.get(name, OPTION_BY_NAME[name].default)


def _tuning_labels(groups):
    """{id(group): its protocol in words}; a LoRA option other than the rank is said for
    every LoRA group when one of them has a value other than the default."""
    options = {id(g): g.members[0].run.tuning_options() if g.members else {} for g in groups}
    shown = {name for g in groups if g.key.tuning == "lora" for name in LORA_OPTIONS
             if _lora_option(options[id(g)], name) != OPTION_BY_NAME[name].default}
    return {id(g): tuning_words(g.key.tuning, options[id(g)], shown) for g in groups}


def _option_parts(group, varying):
    protocol = dict(group.key.protocol)
    parts = []
    for name in varying:
        if name in ("decoder", "loss"):
            parts.append(getattr(group.key, name))
        elif name == TRAINING_SET:
            parts.append(training_set_words(protocol))
        elif name in protocol:
            parts.append(describe(name, json.loads(protocol[name])))
        elif name not in OPTION_BY_NAME or not OPTION_BY_NAME[name].only_beside:
            # (--subset_seed is in an identity only beside a size: nothing to say)
            parts.append(describe(name, None, recorded=False))
    return [p for p in parts if p]


def model_names(groups):
    """{(stem, weights id): model name}: the weights file stem, or parent/stem where two
    different weights files share a stem (numbered if even that is not enough)."""
    stems = {}
    for group in groups:
        stems.setdefault(group.key.model, {})[group.key.weights] = _weights_path(group)
    names = {}
    for stem, files in stems.items():
        if len(files) == 1:
            names.update({(stem, weights): stem for weights in files})
            continue
        longer = {weights: f"{PurePath(path).parent.name}/{stem}" if path else stem
                  for weights, path in files.items()}
        unique = len(set(longer.values())) == len(longer)
        for number, weights in enumerate(sorted(files), 1):
            names[(stem, weights)] = longer[weights] if unique else f"{stem} #{number}"
    return names


def _name(names, group):
    return names[(group.key.model, group.key.weights)]


def _weights_path(group):
    return str(group.members[0].run.config.get("weights") or "") if group.members else ""


def label_groups(groups, labels=None):
    """Set ``group.label``, ``group.model_label`` and ``group.tuning_label`` of every
    group; returns notes (e.g. the settings legend).

    labels: {weights file name or stem, automatic label, or automatic label without its
    protocol: text} given by the user. Raises UserError for a key that names nothing, or
    labels that would merge two rows.
    """
    labels = dict(labels or {})
    names = model_names(groups)
    words = _tuning_labels(groups)
    varying, tuning_varies = _varying(groups, words)
    parts = {id(g): _option_parts(g, varying) for g in groups}
    suffix = {id(g): f", {words[id(g)]}" if tuning_varies else "" for g in groups}
    rows = {id(g): ", ".join([_name(names, g), *parts[id(g)]]) for g in groups}
    automatic = {id(g): rows[id(g)] + suffix[id(g)] for g in groups}
    notes = []
    if any(len(text) > MAX_LABEL for text in automatic.values()):
        settings = {}
        for group in groups:  # numbered in order of first appearance
            if parts[id(group)]:
                settings.setdefault(", ".join(parts[id(group)]), len(settings) + 1)
        for group in groups:
            described = ", ".join(parts[id(group)])
            if described:
                rows[id(group)] = f"{_name(names, group)}, setting {settings[described]}"
                automatic[id(group)] = rows[id(group)] + suffix[id(group)]
        notes.append("row labels: " + "; ".join(f"setting {n} = {text}" for text, n in
                                                settings.items() if text))
    for group in groups:  # an ensemble or a flip: a row of its own, said after the options
        if group.key.variant:
            rows[id(group)] += f", {group.key.variant}"
            automatic[id(group)] = rows[id(group)] + suffix[id(group)]
    used = set()
    for group in groups:
        if is_ensemble(group):
            group.notes.append(ensemble_note(group))
        group.tuning_label = words[id(group)]
        group.label, group.model_label = _user_label(
            group, automatic[id(group)], rows[id(group)], suffix[id(group)], names, labels,
            used)
    unused = sorted(set(labels) - used)
    if unused:
        known = sorted({g.key.model for g in groups} | set(automatic.values()) |
                       set(rows.values()))
        raise UserError(f"--label {unused[0]}: no model or row label of that name in the "
                        f"study (there are: {', '.join(known)})")
    return notes + _make_unique(groups, automatic)


def _user_label(group, automatic, row, suffix, names, labels, used):
    """(label, model_label) of one group: the user's whole label, or the user's label of
    its row with the protocol, or the user's model name with the automatic options, or the
    automatic label."""
    if automatic in labels:
        used.add(automatic)
        return str(labels[automatic]), str(labels[automatic])
    if row in labels:  # the label without the protocol: the row of every protocol
        used.add(row)
        return f"{labels[row]}{suffix}", str(labels[row])
    path = PurePath(_weights_path(group))
    name = _name(names, group)
    for key in (path.name, path.stem, group.key.model, name):
        if key and key in labels:
            used.add(key)
            rest = row[len(name):]  # ", lr 1e-3" or ""
            return f"{labels[key]}{rest}{suffix}", f"{labels[key]}{rest}"
    return automatic, row


def _make_unique(groups, automatic):
    """Number the labels two groups of one dataset share (they would merge into one row);
    UserError when the user's labels did it. Returns notes."""
    by_label = {}
    for group in groups:
        by_label.setdefault((group.key.column, group.label), []).append(group)
    notes = []
    for (dataset, label), same in by_label.items():
        if len(same) < 2:
            continue
        if any(g.label != automatic[id(g)] for g in same):
            raise UserError(f"two different groups of runs on {dataset} are both labelled "
                            f"{label!r}; give them different --label texts")
        for number, group in enumerate(same, 1):
            group.label = f"{label} #{number}"
            group.model_label = f"{group.model_label} #{number}"
        notes.append(f"{len(same)} groups on {dataset} differ only in what the dataset "
                     f"column says (e.g. the class table); labelled {label} #1, #2, ...; "
                     "name them with --label")
    cells = {}
    for group in groups:  # one cell per row and protocol of the tables by protocol
        cell = (group.key.column, group.model_label, group.tuning_label)
        if cell in cells:
            raise UserError(f"the groups labelled {cells[cell]!r} and {group.label!r} on "
                            f"{cell[0]} would share the row {cell[1]!r} under "
                            f"{cell[2]}; give them different --label texts")
        cells[cell] = group.label
    return notes


ENSEMBLE_NOTE = "one prediction of an ensemble"  # the start of ensemble_note


def ensemble_note(group):
    """The note (and table footnote) of an ensemble's row: what it is, and why it has no
    ± std over seeds."""
    run = group.members[0].run if group.members else None
    seeds = ", ".join(map(str, (run.ensemble or {}).get("seeds", []))) if run else ""
    return (f"{ENSEMBLE_NOTE} of {len((run.ensemble or {}).get('seeds', []))} runs (seeds "
            f"{seeds}; their probabilities averaged): a row of its own, never averaged with "
            "the runs' seeds, no ± std over seeds, not in the Wilcoxon tests")


def is_ensemble(group):
    """True for the row of one prediction of several runs (Run.variant "ensemble of ...")."""
    return group.key.variant.startswith("ensemble")
