"""The options table: every option of ``run_seg_tuning.py`` once, with what the code needs
to know about it.

Each row says the option's name (``--name`` on the command line, ``name:`` in YAML), its
default, help text, kind and allowed values, and its metadata: whether it names the run
(``names_run``: part of the run's identity and hash), its smallest value (``minimum``), the
protocol it belongs to (``only_with``) and whether it is an older alias (``alias_of``).
The parser and YAML reader (mirage/config.py), the checks (mirage/option_checks.py) and
the run identity (mirage/run/identity.py) derive their name lists from these rows, so a
new option is one row here. Option names and meanings follow the original MIRAGE tuning
script so existing shell scripts keep working.
"""
import os
from dataclasses import dataclass
from typing import Optional

from mirage.models import decoders
from mirage.protocol import TUNINGS

DEVICE_AUTO = "auto"
ALL = "all"  # --train_volumes / --train_fraction: the whole training split


@dataclass(frozen=True)
class Option:
    """One option: ``--name`` on the command line, ``name:`` in YAML."""

    name: str
    default: object
    help: str
    # str | int | float | bool | size | floats | path | count_or_all | fraction_or_all
    kind: str = "str"
    choices: tuple = ()
    nullable: bool = False  # may be null / None
    short: str = ""
    group: str = "training"  # the -h section
    # False: changes how or where a run executes, not what it trains (not in the run's
    # identity, may be given beside --run_dir); weights, data_path and mapping_fn are
    # False too because the identity holds what they stand for (mirage/run/identity.py).
    names_run: bool = True
    minimum: Optional[float] = None  # the smallest value check_config accepts
    only_with: str = ""  # the --tuning protocol the option belongs to ('' = every one)
    alias_of: str = ""  # an older spelling of this option (resolved in mirage/protocol.py)
    # Not in the identity at its default, so that the runs trained before the option
    # existed keep their identity, hash and folder (a run at the default trains as they did).
    omit_at_default: bool = False
    # Names the run only when one of these options is away from its default (the subset
    # seed orders the volumes of a training-set size; the whole split has no order).
    only_beside: tuple = ()


def _default_workers():
    return min(8, os.cpu_count() or 1)


OPTIONS = (
    # --- training
    Option("batch_size", 8, "Batch size per GPU (per process).", "int", minimum=1),
    Option("epochs", 200, "Number of training epochs.", "int", minimum=1),
    Option("save_ckpt_freq", 20, "Save checkpoint-<epoch>.pth every this many epochs "
           "(and at the end).", "int", names_run=False, minimum=1),
    Option("seed", 42, "Random seed.", "int"),
    Option("aug_name", "simple", "Training augmentation: 'simple' = horizontal flip, "
           "resize to 1.1x input, random crop; 'flip' = resize, then horizontal flip "
           "(p 0.5); 'none' = resize only.", "str", choices=("simple", "flip", "none")),
    # --- training set: how many labelled volumes (docs: "Label efficiency")
    Option("train_volumes", ALL, "Train on N whole volumes of the training split (the "
           "B-scans of a volume are never split), chosen by --subset_seed; 'all' = the "
           "whole split. Smaller sizes are subsets of larger ones. Names the run (_v<N>).",
           "count_or_all", group="training set", minimum=1, omit_at_default=True),
    Option("train_fraction", ALL, "Train on this share of the training split's volumes "
           "(in (0, 1]; rounded up, at least one volume), chosen by --subset_seed; 'all' = "
           "the whole split. Exclusive with --train_volumes. Names the run (_f<percent>).",
           "fraction_or_all", group="training set", omit_at_default=True),
    Option("subset_seed", 0, "Seed of the order in which --train_volumes / "
           "--train_fraction take volumes; independent of --seed, so that every model and "
           "training seed of a size sees the same volumes. Only with a size.", "int",
           group="training set", minimum=0,
           only_beside=("train_volumes", "train_fraction")),
    # --- task
    Option("in_domains", "bscan", "Input domains, separated by hyphens. The benchmark "
           "layout provides 'bscan' only.", group="task"),
    Option("mapping_fn", None, "Class table (INFO.json format) mapping mask values to "
           "classes; default <data_path>/INFO.json.", "path", nullable=True, group="task",
           names_run=False),
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
           "int", group="model", minimum=1),
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
           "--no_freeze_encoder is --tuning full.", "bool", group="protocol",
           alias_of="tuning"),
    Option("freeze_patch_embed", False, "Alias of --tuning fully_frozen.", "bool",
           group="protocol", alias_of="tuning"),
    Option("lora_rank", 8, "LoRA: rank r of each adapter (--tuning lora).", "int",
           group="protocol", minimum=1, only_with="lora"),
    Option("lora_alpha", 16.0, "LoRA: scaling alpha; an adapter adds (alpha / r) B A x.",
           "float", group="protocol", only_with="lora"),
    Option("lora_dropout", 0.1, "LoRA: dropout on each adapter's input while training.",
           "float", group="protocol", only_with="lora"),
    Option("lora_targets", "qkv-proj", "LoRA: the layers of every transformer block that "
           "get an adapter, separated by hyphens: qkv and proj (attention; every family), "
           "fc1 and fc2 (MLP; w12 and w3 for DINOv2's SwiGLU).", group="protocol",
           only_with="lora"),
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
           "path", nullable=True, group="data", names_run=False),
    Option("eval_freq", 1, "Validate every this many epochs.", "int", group="data", minimum=1),
    Option("select_metric", "mIoU_all", "Validation metric that selects "
           "checkpoint-best.pth: 'mIoU_all' (the paper's: mean IoU over all classes, "
           "background included) or 'mIoU_fg' (without the --ignore_index class).",
           choices=("mIoU_all", "mIoU_fg"), group="data"),
    Option("num_workers", _default_workers(), "DataLoader worker processes.", "int",
           group="data", names_run=False, minimum=0),
    Option("pin_mem", True, "Pin host memory in the DataLoader (CUDA only).", "bool",
           group="data", names_run=False),
    # --- runtime
    Option("base_output_dir", "./__output/seg", "Root of the run directories.", "path",
           group="runtime", names_run=False),
    Option("device", DEVICE_AUTO, "Device: 'auto' (CUDA if available, else CPU), 'cpu', "
           "'cuda' or 'cuda:N'.", group="runtime", names_run=False),
    Option("resume", "", "Resume training from this checkpoint file.", "path",
           group="runtime", names_run=False),
    Option("auto_resume", True, "Continue an interrupted run from its latest "
           "checkpoint-<epoch>.pth.", "bool", group="runtime", names_run=False),
    Option("save_ckpt", True, "Save checkpoints.", "bool", group="runtime", names_run=False),
    Option("keep_ckpts", 1, "Keep this many of the newest checkpoint-<epoch>.pth files "
           "(older ones are deleted once a newer one is safely on disk; "
           "checkpoint-best.pth is always kept).", "int", group="runtime", names_run=False,
           minimum=1),
    Option("start_epoch", 0, "Epoch to start from (set by resuming).", "int",
           group="runtime", names_run=False),
    Option("infer_only", False, "With --test: only write the test predictions as PNGs.",
           "bool", group="runtime", names_run=False),
    Option("test", False, "Test the run's best checkpoint instead of training.", "bool",
           group="runtime", names_run=False),
    Option("tta", "none", "Test-time augmentation of --infer_only --test: 'flip' averages "
           "the class probabilities of each B-scan and of its left-right mirror image "
           "(flipped back) before the argmax; 'none' predicts once.",
           choices=("none", "flip"), group="runtime", names_run=False),
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
           "unsupported.", "bool", group="speed", names_run=False),
    Option("grad_checkpointing", False, "Recompute the encoder blocks' activations in the "
           "backward pass instead of storing them: much less GPU memory for about one "
           "more encoder forward per step.", "bool", group="speed", names_run=False),
    Option("feature_cache", "off", "With --freeze_patch_embed: keep each training view's "
           "tokens (float16) after their first computation and reuse them; 'ram' for this "
           "run, 'disk' in --feature_cache_dir, shared by every run of the same weights "
           "file, input and patch size. Needs --aug_name none or flip and "
           "--drop_path_encoder 0.", choices=("off", "ram", "disk"), group="speed"),
    Option("feature_cache_dir", "./__cache/features", "Folder of the disk feature cache.",
           "path", group="speed", names_run=False),
    Option("log_images", False, "Save input | truth | prediction panels during "
           "validation.", "bool", group="runtime", names_run=False),
    Option("log_images_freq", 5, "Save image panels every this many epochs.", "int",
           group="runtime", names_run=False, minimum=1),
    Option("show_user_warnings", False, "Show Python UserWarnings.", "bool",
           group="runtime", names_run=False),
    Option("run_dir", None, "A trained run's folder: its config.yaml gives every option, and "
           "only options that do not change what was trained (device, workers, --test, "
           "--infer_only, --test_data_path, moved --weights/--data_path files, ...) may be "
           "given beside it, e.g. --run_dir RUN --infer_only --test.", "path", nullable=True,
           group="runtime", names_run=False),
    Option("version", "v1", "Experiment version: a folder level of the run directory.",
           short="-v", group="runtime", names_run=False),
    Option("weights", None, "Foundation-model weights file; its name selects the model "
           "(e.g. MIRAGE-Base.pth) unless --fm names it. Required.", "path", nullable=True,
           group="required", names_run=False),
    Option("data_path", None, "Dataset folder in the benchmark layout. Required.", "path",
           nullable=True, group="required", names_run=False),
)
OPTION_BY_NAME = {opt.name: opt for opt in OPTIONS}
# Derived from the rows (never listed by hand: a forgotten name would change every hash).
RUNTIME_OPTIONS = frozenset(opt.name for opt in OPTIONS if not opt.names_run)
LORA_OPTIONS = tuple(opt.name for opt in OPTIONS if opt.only_with == "lora")
PROTOCOL_ALIASES = tuple(opt.name for opt in OPTIONS if opt.alias_of == "tuning")
TRAIN_SET_OPTIONS = tuple(opt.name for opt in OPTIONS if opt.group == "training set")


def default_options(**changes):
    """Every option at its built-in default, with ``changes`` (name=value) applied; for
    code and tests that build a spec without a command line."""
    unknown = sorted(set(changes) - set(OPTION_BY_NAME))
    if unknown:
        raise KeyError(f"unknown option {unknown[0]!r}")
    return {**{opt.name: opt.default for opt in OPTIONS}, **changes}
