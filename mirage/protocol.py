"""The tuning protocol: one value, resolved where options are parsed or a run is read back.

    resolve_tuning(config, layers)     the command line's and YAML's names -> ``tuning``
    tuning_of(options)                 the protocol of a run's config.yaml / identity.json
    Protocol.from_options(config)      the typed value every stage reads

``--tuning`` names the protocol; ``--freeze_encoder`` / ``--no_freeze_encoder`` and
``--freeze_patch_embed`` are its older spellings (the options of runs trained before
``--tuning`` existed). They exist only here: everything downstream reads a
:class:`Protocol` (docs/segmentation_tuning.md, "Protocols").
"""
from dataclasses import dataclass
from typing import Optional

from mirage.errors import UserError

TUNINGS = ("frozen", "fully_frozen", "linear_probe", "lora", "full")
# Each protocol as (trains the transformer blocks, trains the patch projector).
TRAINS = {"frozen": (False, True), "fully_frozen": (False, False),
          "linear_probe": (False, False), "lora": (False, True), "full": (True, True)}
ALIASES = ("freeze_encoder", "freeze_patch_embed")


def alias_values(tuning):
    """``(freeze_encoder, freeze_patch_embed)``: what the older options say for ``tuning``."""
    trains_blocks, trains_projector = TRAINS[tuning]
    return not trains_blocks, not trains_projector


@dataclass(frozen=True)
class Lora:
    """LoRA adapters (``--lora_*``): rank r, scaling alpha, dropout on the adapter's input,
    and the layers of each block that get one (names, e.g. ('qkv', 'proj'))."""

    rank: int
    alpha: float
    dropout: float
    targets: tuple

    def options(self):
        """The ``--lora_*`` options as config.yaml and checkpoints record them."""
        return {"lora_rank": self.rank, "lora_alpha": self.alpha,
                "lora_dropout": self.dropout, "lora_targets": "-".join(self.targets)}


@dataclass(frozen=True)
class Protocol:
    """What a run trains of the backbone.

    name: the ``--tuning`` value; trains_blocks: the transformer blocks train ('full');
    trains_projector: the patch projector and global tokens train (a graph runs through
    the backbone); lora: the adapters, for 'lora' only.
    """

    name: str
    trains_blocks: bool
    trains_projector: bool
    lora: Optional[Lora] = None

    @property
    def backbone_fixed(self):
        """The whole backbone is a fixed function of its input (no graph runs through it)."""
        return not (self.trains_blocks or self.trains_projector)

    @classmethod
    def from_options(cls, config):
        """The protocol of resolved options (``tuning`` set by :func:`resolve_tuning`)."""
        name = config["tuning"]
        lora = None
        if name == "lora":
            lora = Lora(rank=config["lora_rank"], alpha=config["lora_alpha"],
                        dropout=config["lora_dropout"],
                        targets=tuple(t for t in config["lora_targets"].split("-") if t))
        return cls(name, *TRAINS[name], lora=lora)


def tuning_of_flags(freeze_encoder, freeze_patch_embed, decoder):
    """The protocol the older options name (runs trained before ``--tuning`` existed):
    a fully-frozen backbone is ``fully_frozen``, or ``linear_probe`` under the ``linear``
    decoder (the same run by definition); trained blocks are ``full``; else ``frozen``."""
    if freeze_patch_embed:
        return "linear_probe" if decoder == "linear" else "fully_frozen"
    return "frozen" if freeze_encoder else "full"


def tuning_of(options):
    """The protocol a run's stored options name (config.yaml, identity.json: any may lack
    entries): ``tuning`` when it holds one, else what the older options say."""
    tuning = options.get("tuning")
    if tuning not in TUNINGS:
        return tuning_of_flags(options.get("freeze_encoder") is not False,
                               options.get("freeze_patch_embed") is True,
                               options.get("output_adapter"))
    if tuning == "fully_frozen" and options.get("output_adapter") == "linear":
        return "linear_probe"
    return tuning


def resolve_tuning(config, layers):
    """Set ``tuning`` and its aliases ``freeze_encoder`` / ``freeze_patch_embed`` to one
    protocol, in place.

    The highest layer (``[(where, values)]`` above the defaults, lowest first) that names
    any of the three decides, so a command-line ``--tuning full`` wins over
    ``freeze_encoder: true`` in a YAML file; within that layer they must agree. The
    aliases alone give frozen, fully_frozen or full, and a fully-frozen backbone under the
    ``linear`` decoder is ``linear_probe`` by definition (so both spellings are one run).
    ``linear_probe`` brings the ``linear`` decoder unless another one is given.
    """
    names = ("tuning",) + ALIASES
    level, where, values = next(((i, w, v) for i, (w, v) in reversed(list(enumerate(layers)))
                                 if any(n in v for n in names)), (-1, "defaults", {}))
    if "tuning" in values:
        tuning = values["tuning"]
        for alias, implied in zip(ALIASES, alias_values(tuning)):
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
    config["freeze_encoder"], config["freeze_patch_embed"] = alias_values(tuning)
