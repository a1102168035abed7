"""Command-line options: built-in defaults < YAML config (``-c FILE``) < command line.

Every option is declared once in ``OPTIONS``; the argparse parser, the YAML validation
and the saved ``config.yaml`` are all derived from that table. Option names and meanings
follow the original MIRAGE tuning script so existing shell scripts keep working. The
checks of values against each other (``check_config``) are in :mod:`mirage.option_checks`.
"""
import argparse
import difflib
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from mirage.argparsing import ArgumentParser
from mirage.errors import UserError
from mirage.models import decoders

DEVICE_AUTO = "auto"
CONFIGS = Path(__file__).resolve().parent / "configs"  # package data: works installed
DEMO_CONFIG = CONFIGS / "demo.yaml"
DEMO_ROOT = Path("__demo")  # --demo writes its dataset and weights here
DEMO_DATASET = "Synth_OCT"


def demo_paths(root=DEMO_ROOT):
    """The demo's ``(weights path, dataset path)`` (which may not exist yet)."""
    return root / "weights" / "MIRAGE-Tiny.pth", root / "datasets" / DEMO_DATASET


@dataclass(frozen=True)
class Option:
    """One option: ``--name`` on the command line, ``name:`` in YAML."""

    name: str
    default: object
    help: str
    kind: str = "str"  # str | int | float | bool | size | floats | path
    choices: tuple = ()
    nullable: bool = False  # may be null / None
    short: str = ""
    group: str = "training"


# --tuning: each protocol and the (freeze_encoder, freeze_patch_embed) values it stands
# for; the last two are the older options, kept as aliases.
TUNINGS = ("frozen", "fully_frozen", "linear_probe", "lora", "full")
TUNING_FLAGS = {"frozen": (True, False), "fully_frozen": (True, True),
                "linear_probe": (True, True), "lora": (True, False), "full": (False, False)}
PROTOCOL_ALIASES = ("freeze_encoder", "freeze_patch_embed")
LORA_OPTIONS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")


def _default_workers():
    return min(8, os.cpu_count() or 1)


OPTIONS = (
    # --- training
    Option("batch_size", 8, "Batch size per GPU (per process).", "int"),
    Option("epochs", 200, "Number of training epochs.", "int"),
    Option("save_ckpt_freq", 20, "Save checkpoint-<epoch>.pth every this many epochs "
           "(and at the end).", "int"),
    Option("seed", 42, "Random seed.", "int"),
    Option("aug_name", "simple", "Training augmentation: 'simple' = horizontal flip, "
           "resize to 1.1x input, random crop; 'flip' = resize, then horizontal flip "
           "(p 0.5); 'none' = resize only.", "str", choices=("simple", "flip", "none")),
    # --- task
    Option("in_domains", "bscan", "Input domains, separated by hyphens. The benchmark "
           "layout provides 'bscan' only.", group="task"),
    Option("mapping_fn", None, "Class table (INFO.json format) mapping mask values to "
           "classes; default <data_path>/INFO.json.", "path", nullable=True, group="task"),
    Option("ignore_index", None, "Class index left out of CE-ignore-bg and of the "
           "validation mIoU_fg; -1 = none; default: the first class whose label contains "
           "'background' or 'bg'.",
           "int", nullable=True, group="task"),
    # --- model
    Option("fm", None, "Foundation model of --weights, named explicitly (e.g. "
           "dinov2_vitb14, visionfm_oct, mirage-base); wins over the file name, so any "
           "file name works. Default: chosen from the file name.", nullable=True,
           group="model"),
    Option("num_global_tokens", 1, "Number of global tokens appended to the patch tokens.",
           "int", group="model"),
    Option("patch_size", None, "Patch size: an int, 'H W', or in YAML a per-domain mapping "
           "{bscan: [32, 32]}; default: the model's pretraining patch size (MIRAGE: 32; "
           "another size resamples the patch projection).", "size", nullable=True,
           group="model"),
    Option("input_size", 1024, "Input size the B-scans are resized to: an int, 'H W', or in "
           "YAML a per-domain mapping {bscan: [1024, 1024]}.", "size", group="model"),
    Option("drop_path_encoder", 0.1, "Stochastic depth rate of the encoder blocks (acts "
           "in frozen blocks too while training).", "float", group="model"),
    Option("learnable_pos_emb", False, "Train the position embedding.", "bool",
           group="model"),
    Option("tuning", "frozen", "Tuning protocol (docs/segmentation_tuning.md, "
           "'Protocols'): 'frozen' = the paper's (blocks frozen; patch projector, global "
           "tokens and decoder train); 'fully_frozen' = the whole backbone frozen, run "
           "without a graph; 'linear_probe' = fully frozen with the 'linear' decoder; "
           "'lora' = frozen blocks with trained low-rank adapters (pip install .[lora]); "
           "'full' = every encoder tensor trains, with layer-wise LR decay.",
           choices=TUNINGS, group="protocol"),
    Option("freeze_encoder", True, "Alias: --freeze_encoder is --tuning frozen, "
           "--no_freeze_encoder is --tuning full.", "bool", group="protocol"),
    Option("freeze_patch_embed", False, "Alias of --tuning fully_frozen.", "bool",
           group="protocol"),
    Option("lora_rank", 8, "LoRA: rank r of each adapter (--tuning lora).", "int",
           group="protocol"),
    Option("lora_alpha", 16.0, "LoRA: scaling alpha; an adapter adds (alpha / r) B A x.",
           "float", group="protocol"),
    Option("lora_dropout", 0.1, "LoRA: dropout on each adapter's input while training.",
           "float", group="protocol"),
    Option("lora_targets", "qkv-proj", "LoRA: the layers of every transformer block that "
           "get an adapter, separated by hyphens: qkv and proj (attention; every family), "
           "fc1 and fc2 (MLP; w12 and w3 for DINOv2's SwiGLU).", group="protocol"),
    Option("output_adapter", decoders.DEFAULT, "Segmentation decoder: a module of "
           "mirage/decoders/ ('convnext' is the paper's).", choices=decoders.Choices(),
           group="model"),
    Option("decoder_interpolate_mode", "bilinear", "Upsampling of the decoder output.",
           choices=decoders.INTERPOLATE_MODES, group="model"),
    Option("decoder_main_tasks", "bscan", "Domains whose tokens the decoder reads, "
           "separated by hyphens.", group="model"),
    Option("loss", "CE-ignore-bg", "Loss: CE, CE ignoring the background class, or "
           "0.5 CE + 0.5 generalised Dice.", choices=("CE", "CE-ignore-bg", "CEGDice"),
           group="model"),
    Option("minmax", False, "Force per-image min-max normalisation to [0, 1] for models "
           "whose own normalisation differs.", "bool", group="model"),
    # --- optimiser
    Option("opt", "adamw", "Optimiser ('sgd' is Nesterov momentum SGD, 'momentum' plain "
           "momentum SGD).", choices=("adamw", "adam", "sgd", "momentum"), group="optimiser"),
    Option("opt_eps", 1e-8, "Optimiser epsilon.", "float", group="optimiser"),
    Option("opt_betas", [0.9, 0.999], "Optimiser betas.", "floats", group="optimiser"),
    Option("clip_grad", None, "Clip the gradient norm to this value (none = no clipping).",
           "float", nullable=True, group="optimiser"),
    Option("momentum", 0.9, "SGD momentum.", "float", group="optimiser"),
    Option("weight_decay", 0.05, "Weight decay.", "float", group="optimiser"),
    Option("weight_decay_end", None, "Final weight decay of the cosine schedule "
           "(default: constant weight_decay).", "float", nullable=True, group="optimiser"),
    Option("decoder_decay", None, "Multiplier of the weight decay for decoder parameters.",
           "float", nullable=True, group="optimiser"),
    Option("no_lr_scale_list", "", "Parameter-name substrings, separated by hyphens, "
           "exempt from layer-wise LR decay.", group="optimiser"),
    Option("lr", 1e-4, "Peak learning rate.", "float", group="optimiser"),
    Option("warmup_lr", 0.0, "Learning rate at the start of the warmup (the original "
           "code always starts at 0).", "float", group="optimiser"),
    Option("min_lr", 0.0, "Final learning rate of the cosine schedule.", "float",
           group="optimiser"),
    Option("layer_decay", 0.75, "Layer-wise LR decay: block i gets "
           "lr * layer_decay^(L - i); 1 = off.", "float", group="optimiser"),
    Option("warmup_epochs", 1, "Linear warmup epochs.", "int", group="optimiser"),
    Option("warmup_steps", -1, "Linear warmup steps (overrides warmup_epochs if > 0).",
           "int", group="optimiser"),
    # --- data and evaluation
    Option("test_data_path", None, "Another dataset to test/predict on (its test/ split, "
           "or bscan/ for evaluation-only layouts); predictions go to preds_<name>/.",
           "path", nullable=True, group="data"),
    Option("eval_freq", 1, "Validate every this many epochs.", "int", group="data"),
    Option("select_metric", "mIoU_all", "Validation metric that selects "
           "checkpoint-best.pth: 'mIoU_all' (the paper's: mean IoU over all classes, "
           "background included) or 'mIoU_fg' (without the --ignore_index class).",
           choices=("mIoU_all", "mIoU_fg"), group="data"),
    Option("num_workers", _default_workers(), "DataLoader worker processes.", "int",
           group="data"),
    Option("pin_mem", True, "Pin host memory in the DataLoader (CUDA only).", "bool",
           group="data"),
    # --- runtime
    Option("base_output_dir", "./__output/seg", "Root of the run directories.", "path",
           group="runtime"),
    Option("device", DEVICE_AUTO, "Device: 'auto' (CUDA if available, else CPU), 'cpu', "
           "'cuda' or 'cuda:N'.", group="runtime"),
    Option("resume", "", "Resume training from this checkpoint file.", "path",
           group="runtime"),
    Option("auto_resume", True, "Continue an interrupted run from its latest "
           "checkpoint-<epoch>.pth.", "bool", group="runtime"),
    Option("save_ckpt", True, "Save checkpoints.", "bool", group="runtime"),
    Option("keep_ckpts", 1, "Keep this many of the newest checkpoint-<epoch>.pth files "
           "(older ones are deleted once a newer one is safely on disk; "
           "checkpoint-best.pth is always kept).", "int", group="runtime"),
    Option("start_epoch", 0, "Epoch to start from (set by resuming).", "int",
           group="runtime"),
    Option("infer_only", False, "With --test: only write the test predictions as PNGs.",
           "bool", group="runtime"),
    Option("test", False, "Test the run's best checkpoint instead of training.", "bool",
           group="runtime"),
    Option("fp16", True, "Mixed precision on CUDA in --amp_dtype (default float16 with a "
           "grad scaler); --no_fp16 trains in float32. CPU runs are always float32.", "bool",
           group="runtime"),
    Option("bf16", False, "Old name of --amp_dtype bf16 (kept for existing scripts).",
           "bool", group="runtime"),
    # --- speed: the same maths in less time or memory (docs/segmentation_tuning.md)
    Option("amp_dtype", "fp16", "Mixed-precision dtype on CUDA: 'fp16' (float16 autocast "
           "with a grad scaler) or 'bf16' (bfloat16, no scaler; Ampere GPUs or newer).",
           choices=("fp16", "bf16"), group="speed"),
    Option("compile", False, "torch.compile the encoder and the decoder (the first steps "
           "are slower while compiling); falls back to eager with a notice where "
           "unsupported.", "bool", group="speed"),
    Option("grad_checkpointing", False, "Recompute the encoder blocks' activations in the "
           "backward pass instead of storing them: much less GPU memory for about one "
           "more encoder forward per step.", "bool", group="speed"),
    Option("feature_cache", "off", "With --freeze_patch_embed: keep each training view's "
           "tokens (float16) after their first computation and reuse them; 'ram' for this "
           "run, 'disk' in --feature_cache_dir, shared by every run of the same weights "
           "file, input and patch size. Needs --aug_name none or flip and "
           "--drop_path_encoder 0.", choices=("off", "ram", "disk"), group="speed"),
    Option("feature_cache_dir", "./__cache/features", "Folder of the disk feature cache.",
           "path", group="speed"),
    Option("log_images", False, "Save input | truth | prediction panels during "
           "validation.", "bool", group="runtime"),
    Option("log_images_freq", 5, "Save image panels every this many epochs.", "int",
           group="runtime"),
    Option("show_user_warnings", False, "Show Python UserWarnings.", "bool",
           group="runtime"),
    Option("run_dir", None, "A trained run's folder: its config.yaml gives every option, and "
           "only options that do not change what was trained (device, workers, --test, "
           "--infer_only, --test_data_path, moved --weights/--data_path files, ...) may be "
           "given beside it, e.g. --run_dir RUN --infer_only --test.", "path", nullable=True,
           group="runtime"),
    Option("version", "v1", "Experiment version: a folder level of the run directory.",
           short="-v", group="runtime"),
    Option("weights", None, "Foundation-model weights file; its name selects the model "
           "(e.g. MIRAGE-Base.pth) unless --fm names it. Required.", "path", nullable=True,
           group="required"),
    Option("data_path", None, "Dataset folder in the benchmark layout. Required.", "path",
           nullable=True, group="required"),
)
OPTION_BY_NAME = {opt.name: opt for opt in OPTIONS}
# Options that change how or where a run executes but not what it trains.
RUNTIME_OPTIONS = frozenset({
    "base_output_dir", "version", "device", "num_workers", "pin_mem", "resume",
    "auto_resume", "save_ckpt", "save_ckpt_freq", "keep_ckpts", "start_epoch",
    "infer_only", "test", "test_data_path", "log_images", "log_images_freq",
    "show_user_warnings", "compile", "grad_checkpointing", "feature_cache_dir", "run_dir",
    # replaced by what they stand for (see run_identity)
    "weights", "data_path", "mapping_fn",
})
POSITIVE_INTS = ("batch_size", "epochs", "save_ckpt_freq", "eval_freq", "log_images_freq",
                 "num_global_tokens", "keep_ckpts", "lora_rank")


# ----------------------------------------------------------------------------- values
def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _coerce(opt, value, where):
    """Check and convert a YAML or command-line value of ``opt``; UserError if invalid."""
    def fail(expected):
        raise UserError(f"{where}: {opt.name} = {value!r} is not valid; expected {expected}")

    if value is None:
        if opt.nullable:
            return None
        fail("a value (null is not allowed here)")
    kind = opt.kind
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        fail("true or false")
    if isinstance(value, str) and not value.isascii():
        fail("ASCII digits" if kind in ("int", "float", "floats", "size") else "ASCII text")
    if kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        fail("an integer")
    if kind == "float":
        number = None
        if _is_number(value):
            number = float(value)
        elif isinstance(value, str):
            try:  # PyYAML reads 1e-4 (no dot) as a string
                number = float(value)
            except ValueError:
                pass
        if number is None or not math.isfinite(number):
            fail("a finite number")
        return number
    if kind == "floats":
        items = value if isinstance(value, (list, tuple)) else [value]
        try:
            if items and not any(isinstance(v, bool) or (isinstance(v, str) and
                                                         not v.isascii()) for v in items):
                numbers = [float(v) for v in items]
                if all(math.isfinite(v) for v in numbers):
                    return numbers
        except (TypeError, ValueError):
            pass
        fail("a list of finite numbers")
    if kind == "size":
        return _coerce_size(opt, value, where)
    if kind in ("str", "path"):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = str(value)
        else:
            fail("a string")
        if opt.choices and value not in opt.choices:
            close = difflib.get_close_matches(value, opt.choices, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            fail(f"one of {', '.join(opt.choices)}{hint}")
        return value
    raise AssertionError(kind)


def _coerce_size(opt, value, where):
    """int | [h, w] | {domain: int | [h, w]}  ->  the same, checked (ints > 0)."""
    def pair(v):
        if isinstance(v, str) and not v.isascii():
            raise UserError(f"{where}: {opt.name} = {value!r} is not valid; expected ASCII "
                            "digits")
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
        if isinstance(v, str) and v.isascii() and v.isdigit() and int(v) > 0:
            return int(v)
        if isinstance(v, (list, tuple)) and len(v) in (1, 2):
            items = [pair(x) for x in v]
            if all(isinstance(x, int) for x in items):
                return items[0] if len(items) == 1 else items
        raise UserError(f"{where}: {opt.name} = {value!r} is not valid; expected a positive "
                        "int, [height, width], or a mapping {bscan: [height, width]}")

    if isinstance(value, dict):
        if not value:
            pair(None)
        return {str(domain): pair(v) for domain, v in value.items()}
    return pair(value)


def per_domain(value, domains):
    """Expand an int / [h, w] / {domain: ...} size to ``{domain: (h, w)}`` for ``domains``."""
    result = {}
    for domain in domains:
        v = value.get(domain) if isinstance(value, dict) else value
        if v is None:
            raise UserError(f"no size given for domain {domain!r} in {value!r}; add "
                            f"{domain}: [height, width]")
        result[domain] = (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))
    return result


# ----------------------------------------------------------------------------- parser
def build_parser():
    """The argparse parser; ``-h`` lists every option with its built-in default."""
    parser = ArgumentParser(
        prog="run_seg_tuning.py",
        description="Tune a segmentation decoder on a frozen retinal-OCT foundation model. "
                    "Precedence: built-in defaults < YAML config (-c) < command line.",
        argument_default=argparse.SUPPRESS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-c", "--config", metavar="FILE.yaml",
                        help="YAML file with option values (keys = option names).")
    parser.add_argument("--demo", action="store_true",
                        help="Run the whole pipeline on a synthetic OCT dataset and a tiny "
                             "random MIRAGE-layout model (CPU, a few minutes, no download).")
    groups = {}
    for opt in OPTIONS:
        group = groups.get(opt.group) or groups.setdefault(
            opt.group, parser.add_argument_group(f"{opt.group} options"))
        flags = [f"--{opt.name}"] + ([opt.short] if opt.short else [])
        default = opt.default if opt.default not in ("", None) else "none"
        text = f"{opt.help} (default: {default})"
        if opt.kind == "bool":
            group.add_argument(*flags, dest=opt.name, action="store_const", const=True,
                               help=text)
            group.add_argument(f"--no_{opt.name}", dest=opt.name, action="store_const",
                               const=False, help=f"Disable --{opt.name}.")
        elif opt.kind in ("size", "floats"):
            group.add_argument(*flags, dest=opt.name, nargs="+", metavar="N", help=text)
        else:
            metavar = "{" + ",".join(opt.choices) + "}" if opt.choices else opt.name.upper()
            group.add_argument(*flags, dest=opt.name, metavar=metavar, help=text)
    return parser


def load_yaml(path, what="--config"):
    """Read a YAML config into a checked ``{option: value}`` dict (``what``: the option that
    named the file, for messages)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path}: file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        first_line = str(err).splitlines()[0] if str(err) else "syntax error"
        raise UserError(f"{what} {path}: not valid YAML ({first_line})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{what} {path}: expected a mapping of option: value")
    values = {}
    for key, value in raw.items():
        opt = OPTION_BY_NAME.get(str(key))
        if opt is None:
            close = difflib.get_close_matches(str(key), OPTION_BY_NAME, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UserError(f"{what} {path}: unknown option {key!r}{hint} "
                            "(run with -h for the list)")
        values[opt.name] = _coerce(opt, value, f"{what} {path}")
    return values


def parse_config(argv=None):
    """Parse ``argv`` into ``(config dict of every option, demo flag, YAML path or None)``.

    Layers, each overriding the one before: built-in defaults, ``mirage/configs/demo.yaml``
    (with ``--demo``), the ``-c`` YAML file or the ``--run_dir`` run's own config.yaml, the
    command line.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    given = vars(build_parser().parse_args(argv))
    demo = given.pop("demo", False)
    config_file = given.pop("config", None)
    layers = []  # (where, {option: value}) above the built-in defaults, lowest first
    if demo:
        layers.append(("--demo", load_yaml(DEMO_CONFIG)))
    if given.get("run_dir"):
        config_file = _run_config(given, demo, config_file)
        layers.append((f"--run_dir {given['run_dir']}", load_yaml(config_file,
                                                                    what="--run_dir")))
    elif config_file:
        config_file = resolve_config_file(config_file)
        layers.append((f"--config {config_file}", load_yaml(config_file)))
    command_line = {}
    for name, value in given.items():
        opt = OPTION_BY_NAME[name]
        if opt.kind == "size" and len(value) > 2:
            raise UserError(f"--{name}: give one size or two (height width)")
        command_line[name] = _coerce(opt, value, "command line")
    layers.append(("command line", command_line))
    config = {opt.name: opt.default for opt in OPTIONS}
    for _, values in layers:
        config.update(values)
    resolve_tuning(config, layers)
    if config["run_dir"]:
        _place_in_run_dir(config, given)
    return config, demo, config_file


def tuning_of_flags(freeze_encoder, freeze_patch_embed, decoder):
    """The protocol the older options name (runs trained before ``--tuning`` existed):
    a fully-frozen backbone is ``fully_frozen``, or ``linear_probe`` under the ``linear``
    decoder (the same run by definition); trained blocks are ``full``; else ``frozen``."""
    if freeze_patch_embed:
        return "linear_probe" if decoder == "linear" else "fully_frozen"
    return "frozen" if freeze_encoder else "full"


def resolve_tuning(config, layers):
    """Set ``tuning`` and its aliases ``freeze_encoder`` / ``freeze_patch_embed`` to one
    protocol, in place.

    The highest layer (``[(where, values)]`` above the defaults, lowest first) that names
    any of the three decides, so a command-line ``--tuning full`` wins over ``freeze_encoder: true`` in a
    YAML file; within that layer they must agree. The aliases alone give frozen,
    fully_frozen or full, and a fully-frozen backbone under the ``linear`` decoder is
    ``linear_probe`` by definition (so both spellings are one run). ``linear_probe``
    brings the ``linear`` decoder unless another one is given.
    """
    names = ("tuning",) + PROTOCOL_ALIASES
    level, where, values = next(((i, w, v) for i, (w, v) in reversed(list(enumerate(layers)))
                                 if any(n in v for n in names)), (-1, "defaults", {}))
    if "tuning" in values:
        tuning = values["tuning"]
        for alias, implied in zip(PROTOCOL_ALIASES, TUNING_FLAGS[tuning]):
            if alias in values and values[alias] != implied:
                flag = f"--{alias}" if values[alias] else f"--no_{alias}"
                raise UserError(f"{where}: --tuning {tuning} and {flag} name different "
                                "protocols; drop the older option")
    else:
        freeze_encoder = values.get("freeze_encoder", True)
        freeze_patch_embed = values.get("freeze_patch_embed", False)
        if freeze_patch_embed and not freeze_encoder:
            raise UserError(f"{where}: --freeze_patch_embed freezes the whole backbone but "
                            "--no_freeze_encoder trains its blocks; drop one of them")
        tuning = tuning_of_flags(freeze_encoder, freeze_patch_embed, config["output_adapter"])
    if tuning == "fully_frozen" and config["output_adapter"] == "linear":
        tuning = "linear_probe"
    if tuning == "linear_probe":
        # A decoder named where the protocol is named (or above) must be 'linear'; one
        # from a lower layer (a YAML file under a command-line --tuning) gives way.
        named = [w for w, v in layers[max(level, 0):] if "output_adapter" in v]
        if named and config["output_adapter"] != "linear":
            raise UserError(f"--tuning linear_probe trains the 'linear' decoder, but "
                            f"{named[-1]} gives --output_adapter "
                            f"{config['output_adapter']}; drop one of them (or use --tuning "
                            "fully_frozen)")
        config["output_adapter"] = "linear"
    config["tuning"] = tuning
    config["freeze_encoder"], config["freeze_patch_embed"] = TUNING_FLAGS[tuning]


def resolve_config_file(name):
    """``-c`` as given, or else the packaged config of that name (``seg_200e_convnext``,
    ``seg_200e_convnext.yaml`` or ``_cfgs/seg_200e_convnext.yaml`` from any folder)."""
    path = Path(name)
    if path.is_file():
        return name
    stem = path.name[:-len(".yaml")] if path.name.endswith(".yaml") else path.name
    packaged = CONFIGS / f"{stem}.yaml"
    if packaged.is_file():
        return packaged
    shipped = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.yaml")))
    raise UserError(f"--config {name}: file not found (configs shipped with the package: "
                    f"{shipped})")


def _run_config(given, demo, config_file):
    """The config.yaml of ``--run_dir``, after checking what may be given beside it."""
    run_dir = Path(given["run_dir"])
    if demo or config_file:
        raise UserError(f"--run_dir {run_dir}: its config.yaml gives the options; drop "
                        f"{'--demo' if demo else '-c/--config'}")
    training = sorted(name for name in given if name not in RUNTIME_OPTIONS)
    if training:
        raise UserError(f"--{training[0]} cannot be given with --run_dir: it changes what "
                        f"was trained; the run's value is in {run_dir / 'config.yaml'} (train "
                        "a new run without --run_dir to change it)")
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise UserError(f"--run_dir {run_dir}: no config.yaml there; give a run folder "
                        "<output>/<version>/<dataset>/<run name>/ written by run_seg_tuning.py")
    return path


def _place_in_run_dir(config, given):
    """Make the run folder the one ``--run_dir`` names (its output root and version), and
    check that the weights and data it names exist from here."""
    run_dir = Path(config["run_dir"]).resolve()
    config["base_output_dir"] = str(run_dir.parent.parent.parent)
    config["version"] = run_dir.parent.parent.name
    for name in ("weights", "data_path"):
        if name not in given and config[name] and not Path(config[name]).exists():
            raise UserError(f"--run_dir {config['run_dir']}: its {name} {config[name]} is "
                            f"not found from {Path.cwd()}; give --{name} (the same file or "
                            "folder, moved)")


def domains_of(config):
    domains = [d for d in config["in_domains"].split("-") if d]
    if domains != ["bscan"]:
        raise UserError(f"--in_domains {config['in_domains']}: the benchmark layout provides "
                        "B-scans only; use --in_domains bscan")
    return domains


def yaml_text(config):
    """The options as YAML that ``-c`` reads back (reproduces the run)."""
    return yaml.safe_dump({opt.name: config[opt.name] for opt in OPTIONS},
                          sort_keys=False, default_flow_style=None)
