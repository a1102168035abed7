"""Checks of a parsed config (:func:`check_config`): each value, pairs of options that must
be in order, and the protocol combinations.

Every rule raises a one-line :class:`mirage.errors.UserError` that names the option(s) and
says what to give instead. The options table, parsing and YAML are :mod:`mirage.config`.
"""
import math
import re
from pathlib import Path

from mirage.config import domains_of, per_domain
from mirage.options import ALL, LORA_OPTIONS, OPTION_BY_NAME, OPTIONS
from mirage.protocol import alias_values
from mirage.models.lora import LORA_TARGETS, import_peft
from mirage.errors import UserError

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:[0-9]+)?)$")


def check_config(config):
    """Validate option values and combinations; raises UserError naming the option."""
    for opt in OPTIONS:
        if opt.minimum is not None and config[opt.name] != ALL and \
                config[opt.name] < opt.minimum:
            raise UserError(f"--{opt.name} must be at least {opt.minimum:g} (got "
                            f"{config[opt.name]})")
    for name in ("weights", "data_path"):
        if not config[name]:
            raise UserError(f"--{name} is required (give it on the command line or as "
                            f"'{name}:' in the YAML config)")
    if config["infer_only"] and not config["test"]:
        raise UserError("--infer_only needs --test (predict the test split of the run's "
                        "best checkpoint)")
    if config["tta"] != "none" and not config["infer_only"]:
        raise UserError(f"--tta {config['tta']} changes written predictions only: give it "
                        "with --infer_only --test (score them with run_seg_eval.py)")
    if config["test"] and config["resume"]:
        raise UserError(f"--resume {config['resume']} continues training, but --test"
                        f"{' --infer_only' if config['infer_only'] else ''} uses the run's "
                        "checkpoint-best.pth; drop --resume")
    if not 0.0 <= config["drop_path_encoder"] < 1.0:
        raise UserError("--drop_path_encoder must be in [0, 1)")
    _check_optimiser_values(config)
    check_option_order(config)
    if not DEVICE_PATTERN.match(str(config["device"])):
        raise UserError(f"--device {config['device']}: not supported; use auto, cpu, cuda "
                        "or cuda:N")
    base = Path(config["base_output_dir"])
    if base.exists() and not base.is_dir():
        raise UserError(f"--base_output_dir {base}: is a file, not a folder; choose a "
                        "folder for the run directories")
    _check_protocol(config)
    _check_sizes(config)
    check_train_set(config)


def _check_sizes(config):
    """The input size must be a multiple of the patch size; the decoder reads input domains."""
    domains = domains_of(config)
    input_size = per_domain(config["input_size"], domains)
    if config["patch_size"] is None:  # the model's own; build_backbone checks it
        return
    patch_size = per_domain(config["patch_size"], domains)
    for domain in domains:
        (h, w), (ph, pw) = input_size[domain], patch_size[domain]
        if h % ph or w % pw:
            raise UserError(f"--input_size {h}x{w} is not divisible by --patch_size "
                            f"{ph}x{pw} for {domain}; choose a multiple of the patch size")
    unknown = [d for d in config["decoder_main_tasks"].split("-") if d not in domains]
    if unknown:
        raise UserError(f"--decoder_main_tasks {config['decoder_main_tasks']}: "
                        f"{unknown[0]!r} is not an input domain ({config['in_domains']})")


def check_option_order(config):
    """Pairs of options whose values must be in order, one rule a line (docs/
    segmentation_tuning.md, "Options checked against each other").

    Left out on purpose: a rising weight decay (``--weight_decay_end`` above
    ``--weight_decay``) is legitimate, as in DINO's 0.04 -> 0.4; a ``--save_ckpt_freq`` or
    ``--eval_freq`` above ``--epochs`` means "only at the end" (the last epoch is always
    validated and saved), a ``--log_images_freq`` above it "panels of epoch 0 only";
    ``--decoder_decay`` is a multiplier, not a value to compare. ``--warmup_steps`` against
    the length of the run needs the steps per epoch, known only once the data is read.
    """
    c = config
    warmup = c["warmup_steps"] > 0 or c["warmup_epochs"] > 0
    rules = (
        (c["min_lr"] <= c["lr"],
         f"--min_lr {c['min_lr']:g} is above --lr {c['lr']:g}: the cosine schedule would "
         "rise from --lr to --min_lr; give a --min_lr of at most --lr (e.g. 0)"),
        (not warmup or c["warmup_lr"] <= c["lr"],
         f"--warmup_lr {c['warmup_lr']:g} is above --lr {c['lr']:g}: the warmup would fall "
         "to --lr instead of rising; give a --warmup_lr of at most --lr (e.g. 0)"),
        (c["warmup_steps"] > 0 or c["warmup_epochs"] <= c["epochs"],
         f"--warmup_epochs {c['warmup_epochs']} is longer than the run (--epochs "
         f"{c['epochs']}): the schedule would squeeze it into the run; give a --warmup_epochs "
         "of at most --epochs"),
        (c["test"] or 0 <= c["start_epoch"] < c["epochs"],
         f"--start_epoch {c['start_epoch']}: must be in 0..epochs-1 (--epochs "
         f"{c['epochs']}); nothing would be trained"),
        (not c["log_images"] or c["log_images_freq"] % c["eval_freq"] == 0,
         f"--log_images_freq {c['log_images_freq']} is not a multiple of --eval_freq "
         f"{c['eval_freq']}: panels are drawn only in validated epochs, so they would come "
         f"every {math.lcm(c['log_images_freq'], c['eval_freq'])} epochs; give a multiple of "
         "--eval_freq"),
    )
    for ok, message in rules:
        if not ok:
            raise UserError(message)


def _check_optimiser_values(config):
    """Values that would silently train nothing or train wrong."""
    def need(ok, message):
        if not ok:
            raise UserError(message)

    need(config["lr"] > 0, f"--lr {config['lr']}: must be a positive number")
    need(config["min_lr"] >= 0, f"--min_lr {config['min_lr']}: must be 0 or more")
    need(config["warmup_lr"] >= 0, f"--warmup_lr {config['warmup_lr']}: must be 0 or more")
    need(config["clip_grad"] is None or config["clip_grad"] > 0,
         f"--clip_grad {config['clip_grad']}: must be a positive gradient norm; leave it "
         "unset (none) for no clipping")
    for name in ("weight_decay", "weight_decay_end", "decoder_decay"):
        need(config[name] is None or config[name] >= 0,
             f"--{name} {config[name]}: must be 0 or more")
    need(len(config["opt_betas"]) == 2,
         "--opt_betas needs two values, e.g. --opt_betas 0.9 0.999")
    need(all(0.0 <= b < 1.0 for b in config["opt_betas"]),
         f"--opt_betas {config['opt_betas']}: each must be in [0, 1), e.g. 0.9 0.999")
    need(config["opt_eps"] > 0, f"--opt_eps {config['opt_eps']}: must be positive")
    need(0.0 <= config["momentum"] < 1.0,
         f"--momentum {config['momentum']}: must be in [0, 1)")
    need(0.0 < config["layer_decay"] <= 1.0,
         f"--layer_decay {config['layer_decay']}: must be in (0, 1] (1 = off)")
    need(config["warmup_epochs"] >= 0,
         f"--warmup_epochs {config['warmup_epochs']}: must be 0 or more")


def _check_protocol(config):
    """The protocol (``--tuning``), its options, the feature cache and mixed precision:
    combinations that would change the protocol silently are errors naming both options."""
    cache, tuning = config["feature_cache"], config["tuning"]
    if (config["freeze_encoder"], config["freeze_patch_embed"]) != alias_values(tuning):
        raise UserError(f"--tuning {tuning} and --freeze_encoder {config['freeze_encoder']} "
                        f"/ --freeze_patch_embed {config['freeze_patch_embed']} name "
                        "different protocols; give --tuning alone")
    if config["freeze_patch_embed"] and config["learnable_pos_emb"]:
        raise UserError(f"--tuning {tuning} freezes the position embedding that "
                        "--learnable_pos_emb trains; drop one of them")
    _check_lora_options(config)
    if cache != "off" and not config["freeze_patch_embed"]:
        raise UserError(f"--feature_cache {cache} needs a fixed encoder (--tuning "
                        f"fully_frozen or linear_probe): under --tuning {tuning} the "
                        f"{'patch projector' if tuning in ('frozen', 'lora') else 'encoder'}"
                        " trains, so the tokens change at every step")
    if cache != "off" and config["aug_name"] == "simple":
        raise UserError(f"--feature_cache {cache} cannot represent --aug_name simple (its "
                        "random resize-crop gives new tokens every epoch); use --aug_name "
                        "flip or none, or --feature_cache off")
    if cache != "off" and config["drop_path_encoder"] > 0:
        raise UserError(f"--feature_cache {cache} needs --drop_path_encoder 0 (got "
                        f"{config['drop_path_encoder']}: stochastic depth makes the frozen "
                        "tokens random)")
    if cache == "disk" and not str(config["feature_cache_dir"] or "").strip():
        raise UserError("--feature_cache disk needs --feature_cache_dir (the folder that "
                        "holds the cached tokens)")
    if config["amp_dtype"] == "bf16" and not config["fp16"]:
        raise UserError("--amp_dtype bf16 asks for bfloat16 mixed precision but --no_fp16 "
                        "turns mixed precision off; drop one of them")


def _check_lora_options(config):
    """LoRA's options: valid values, and only under ``--tuning lora`` (elsewhere they would
    be ignored, and two runs differing only in them would share one run folder)."""
    if config["tuning"] != "lora":
        changed = [name for name in LORA_OPTIONS if config[name] != OPTION_BY_NAME[name].default]
        if changed:
            raise UserError(f"--{changed[0]} applies only with --tuning lora (this run has "
                            f"--tuning {config['tuning']}); drop it or add --tuning lora")
        return
    # Imported, not only found: a broken install fails here, before any job of a grid.
    import_peft()
    if config["lora_alpha"] <= 0:
        raise UserError(f"--lora_alpha {config['lora_alpha']}: must be positive (the "
                        "adapters' scale is alpha / rank)")
    if not 0.0 <= config["lora_dropout"] < 1.0:
        raise UserError(f"--lora_dropout {config['lora_dropout']}: must be in [0, 1)")
    targets = [t for t in config["lora_targets"].split("-") if t]
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if not targets or unknown:
        raise UserError(f"--lora_targets {config['lora_targets']}: "
                        f"{'unknown layer ' + repr(unknown[0]) if unknown else 'empty'}; give "
                        f"some of {', '.join(LORA_TARGETS)} separated by hyphens, e.g. qkv-proj")


def check_train_set(config):
    """The training-set size: ``--train_volumes`` or ``--train_fraction`` (not both), a
    fraction in (0, 1], and ``--subset_seed`` only beside a size (with the whole split it
    would change nothing, and two runs differing only in it would share one folder). A size
    larger than the split is found where the split is read (mirage/data/subsets.py)."""
    volumes, fraction = config["train_volumes"], config["train_fraction"]
    if volumes != ALL and fraction != ALL:
        raise UserError(f"--train_volumes {volumes} and --train_fraction {fraction:g} both "
                        "give the training-set size; give one of them (the other: all)")
    if fraction != ALL and not 0.0 < fraction <= 1.0:
        raise UserError(f"--train_fraction {fraction:g}: must be in (0, 1], a share of the "
                        f"training split's volumes (e.g. 0.25 for a quarter), or all")
    seed = config["subset_seed"]
    if volumes == ALL and fraction == ALL and seed != OPTION_BY_NAME["subset_seed"].default:
        raise UserError(f"--subset_seed {seed} applies only with --train_volumes N or "
                        "--train_fraction F (this run trains on the whole split); drop it, "
                        "or in a grid leave its value out of the 'all' jobs "
                        "(--runner-filter train_volumes=all,subset_seed=" + str(seed) + ")")
