"""LoRA: low-rank adapters on the encoder's transformer blocks (``--tuning lora``).

Each target linear layer ``W`` of every block becomes ``W x + (alpha / r) B A drop(x)``
with ``A`` (r, in) randomly initialised and ``B`` (out, r) zero, so an untrained adapter
leaves the model's outputs exactly as they were. ``W`` stays frozen; ``A`` and ``B`` train
(with the patch projector, global tokens and decoder, as in the paper's protocol). The
adapters are Hugging Face PEFT's LoRA layers, an optional dependency
(``pip install .[lora]``); PEFT is imported only when a run uses them.

Targets are named per block, the same for every family of the registry (MIRAGE, RETFound,
DINOv2 with or without registers, VisionFM, SAM/MedSAM with its windowed blocks all
use timm's blocks): ``qkv`` and ``proj`` of the attention (the default), ``fc1`` and
``fc2`` of the MLP (DINOv2's SwiGLU names them ``w12`` and ``w3`` in some layouts).

Parameter names gain ``.base_layer`` (the frozen weight) and ``.lora_A.default`` /
``.lora_B.default`` (the adapter): a checkpoint of a LoRA run holds the latter only.
"""
import re

from mirage.errors import UserError

# --lora_targets name -> the module names (relative to a block) it stands for
LORA_TARGETS = {"qkv": ("attn.qkv",), "proj": ("attn.proj",),
                "fc1": ("mlp.fc1", "mlp.w12"), "fc2": ("mlp.fc2", "mlp.w3")}
BLOCK_NAME = re.compile(r"(^|\.)blocks\.\d+$")
LORA_EXTRA = "pip install .[lora] (or pip install peft)"


def import_peft():
    """The ``peft`` module, or a one-line UserError: not installed, or installed but
    failing to import (a broken install, a dependency of another version: its own error,
    which "not installed" would hide), or not Hugging Face's PEFT at all."""
    try:
        import peft  # deferred: optional, and slow to import (it loads transformers)
    except ModuleNotFoundError as err:
        if err.name == "peft":
            raise UserError(f"--tuning lora needs Hugging Face's PEFT library, which is not "
                            f"installed: {LORA_EXTRA}") from None
        raise _broken_peft(err) from None
    except Exception as err:  # noqa: BLE001 (anything its import raises, named in the error)
        raise _broken_peft(err) from None
    if not all(hasattr(peft, name) for name in ("LoraConfig", "inject_adapter_in_model")):
        # e.g. a folder named peft in the working directory, imported instead of the library
        where = (getattr(peft, "__file__", None)
                 or next(iter(getattr(peft, "__path__", [])), "?"))
        raise UserError(f"--tuning lora: the module peft imported from {where} is not Hugging "
                        f"Face's PEFT (no LoraConfig); rename it or reinstall PEFT: "
                        f"{LORA_EXTRA}")
    return peft


def _broken_peft(err):
    lines = str(err).strip().splitlines()
    reason = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    return UserError(f"--tuning lora: Hugging Face's PEFT library is installed but fails to "
                     f"import ({reason}); reinstall it: pip install --force-reinstall peft "
                     "(or pip install .[lora] --force-reinstall)")


def target_module_names(backbone, targets):
    """Full names of the ``nn.Linear`` layers that ``targets`` (``--lora_targets`` names)
    pick in every transformer block of ``backbone``."""
    from torch import nn  # deferred: option checks import LORA_TARGETS, and -h stays fast

    names = dict(backbone.named_modules())
    blocks = [name for name in names if BLOCK_NAME.search(name)]
    found = []
    for target in targets:
        matches = [f"{block}.{suffix}" for block in blocks for suffix in LORA_TARGETS[target]
                   if isinstance(names.get(f"{block}.{suffix}"), nn.Linear)]
        if not matches:
            raise UserError(f"--lora_targets {target}: {type(backbone).__name__} has no "
                            f"{' or '.join(LORA_TARGETS[target])} layer in its blocks; "
                            "choose others of qkv, proj, fc1, fc2")
        found += matches
    return found


def add_lora(backbone, rank, alpha, dropout, targets):
    """Put LoRA adapters on ``targets`` of every block of ``backbone`` (in place); the
    backbone's other parameters keep their ``requires_grad``. Returns the number of
    adapted layers."""
    peft = import_peft()
    modules = target_module_names(backbone, targets)
    trainable = {name: p.requires_grad for name, p in backbone.named_parameters()}
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                             target_modules=modules, bias="none")
    peft.inject_adapter_in_model(config, backbone)
    # PEFT freezes everything but the adapters; the protocol decides about the rest. A
    # wrapped layer's weight moves to ``<layer>.base_layer.``: it was frozen (a block's).
    for name, param in backbone.named_parameters():
        if "lora_" not in name:
            param.requires_grad = trainable.get(name.replace(".base_layer.", "."), False)
    return len(modules)


def lora_layers(model):
    """The LoRA-adapted layers of ``model`` (none if PEFT is not in use)."""
    return [m for m in model.modules()
            if hasattr(m, "merge") and hasattr(m, "lora_A") and hasattr(m, "base_layer")]


def merge_lora(model):
    """Fold every adapter into its frozen weight (``W + (alpha / r) B A``) for inference:
    the same outputs (to float rounding) without the adapters' extra matmuls. Returns the
    number of merged layers; the model should not be trained afterwards."""
    layers = lora_layers(model)
    for layer in layers:
        if not layer.merged:
            layer.merge()
    return len(layers)
