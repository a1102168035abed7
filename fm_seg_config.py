"""The registry of foundation models: which encoder a weights file holds and how to load it.

The model is named explicitly (``--fm NAME`` / ``load_backbone(..., fm=NAME)``, which wins)
or else chosen from the weights file name (case-insensitive, the longest matching keyword
wins): ``MIRAGE-Base.pth`` -> ``mirage-base``, ``VFM_OCT_weights.pth`` -> ``vfm_oct``.
Registered: MIRAGE-Base/Large (and a toy MIRAGE-Tiny), RETFound (MAE and DINOv2), DINOv2
ViT-S/B/L/g (with or without registers), SAM ViT-B, MedSAM and VisionFM (one encoder per
imaging modality); their encoders are in mirage/models/backbones.py. To add a model, subclass
:class:`FoundModel` in this file with a ``name``, the ``keywords`` to match in file names,
and ``build`` / ``load_weights``; defining the subclass registers it (see
docs/segmentation_tuning.md, "Adding a model").

Each family is run as its authors run it: its input normalisation (``norm``, a name in
``mirage.data.transforms.MEAN_STD`` or ``minmax``) and its own rule for resampling the position
embedding to another input size (``pos_embed_rule``, see
``mirage.models.input_adapters.POS_EMBED_RULES``).

Public API, for users who want features::

    from fm_seg_config import load_backbone
    bb = load_backbone("MIRAGE-Base.pth", input_size=1024)   # eval mode, on the CPU
    tokens = bb(images)   # (B, 1, 1024, 1024) in [0, 1] -> (B, 32*32 + 1, 768)
    bb = load_backbone("best.pth", input_size=518, fm="dinov2_vitb14")  # any file name

``bb`` exposes ``in_chans``, ``embed_dim``, ``grid_size`` and ``num_global_tokens``.
Other families take the input their authors used (``find_model(...).in_chans`` and
``.norm``: e.g. 3 channels with ImageNet mean/std for RETFound and DINOv2, VisionFM's
per-modality statistics for VisionFM).
"""
import re
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from mirage.checkpoint_io import load_file
from mirage.data.transforms import MEAN_STD
from mirage.errors import UserError
from mirage.models.backbones import (build_sam_encoder, build_vit_encoder, load_sam_weights,
                                     load_vit_weights)
from mirage.models.input_geometry import nearest_valid, pair
from mirage.models.mirage_checkpoint import (load_mirage_weights, split_checkpoint,
                                             to_checkpoint_key, unwrap_state_dict)
from mirage.models.segmentation_model import MirageEncoder, width_and_depth

REGISTRY = {}  # keyword -> FoundModel subclass


class FoundModel(ABC):
    """A foundation-model family: how to build its encoder and read its checkpoint."""

    name = ""          # for messages, e.g. "MIRAGE-Base"
    keywords = ()      # lower-case strings matched in the weights file name; the first is
    #                    the family's name for --fm (every keyword is accepted there)
    in_chans = 1       # channels the encoder takes
    norm = "minmax"    # input normalisation: "minmax" ([0, 1] per image) or a name in
    #                    mirage.data.transforms.MEAN_STD (min-max, then that mean/std)
    default_patch_size = 32
    pos_embed_rule = "bicubic"  # the authors' resampling (input_adapters.POS_EMBED_RULES)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for keyword in cls.keywords:
            REGISTRY[keyword.lower()] = cls

    @classmethod
    def select(cls, source):
        """The family's instance when ``source`` (``--fm NAME`` or ``--weights FILE``, for
        messages) picked it; a family that cannot be used as picked raises UserError."""
        return cls()

    @abstractmethod
    def build(self, input_size, patch_size, num_global_tokens, drop_path_rate=0.0,
              learnable_pos_emb=False):
        """A randomly initialised encoder for ``input_size`` = (h, w)."""

    @abstractmethod
    def load_weights(self, backbone, checkpoint, source):
        """Copy the checkpoint's tensors into ``backbone``; return a one-line report.

        Must raise UserError naming the key when a tensor the encoder needs is missing
        or mis-shaped: the encoder is never left at random initialisation.
        """

    def num_global_tokens_in(self, checkpoint):
        """Global tokens stored in the checkpoint (used when the caller gives none)."""
        return 1


# ----------------------------------------------------------------------------- MIRAGE
class MirageFamily(FoundModel):
    """MIRAGE encoders (MultiMAE-style ViT; B-scan input adapter, patch 32); the file
    layout is read by mirage/models/mirage_checkpoint.py."""

    embed_dim, depth, num_heads = 768, 12, 12
    pretrain_input_size = 512

    def build(self, input_size, patch_size, num_global_tokens, drop_path_rate=0.0,
              learnable_pos_emb=False):
        return MirageEncoder(image_size=input_size, patch_size=patch_size, in_chans=1,
                             embed_dim=self.embed_dim, depth=self.depth,
                             num_heads=self.num_heads, num_global_tokens=num_global_tokens,
                             drop_path_rate=drop_path_rate,
                             learnable_pos_emb=learnable_pos_emb)

    def num_global_tokens_in(self, checkpoint):
        tokens = unwrap_state_dict(checkpoint).get("global_tokens")
        return tokens.shape[1] if torch.is_tensor(tokens) and tokens.ndim == 3 else 1

    def load_weights(self, backbone, checkpoint, source):
        mapped, ignored = split_checkpoint(checkpoint)
        self._check_width(mapped, source)  # before any tensor: the cause, not a symptom
        return load_mirage_weights(backbone, mapped, ignored, source, self.name, self.depth,
                                   self.embed_dim, self.pos_embed_rule)

    def _check_width(self, mapped, source):
        """UserError when the file holds a MIRAGE model of another width than this family
        (e.g. MIRAGE-Tiny weights named MIRAGE-Base.pth): every tensor would mismatch, so
        the first mismatch found would point at the wrong cause."""
        width, depth = width_and_depth(mapped)
        if width is None or width == self.embed_dim:
            return
        same = [cls for cls in dict.fromkeys(REGISTRY.values())
                if issubclass(cls, MirageFamily) and (cls.embed_dim, cls.depth) == (width, depth)]
        fix = (f": it looks like {same[0].name} (pass --fm {same[0].keywords[0]} or put "
               f"{same[0].name} in the file name)" if same else
               ": use the weights of the model the file name says, or pass --fm NAME")
        raise UserError(f"{source}: the file holds a model of width {width} ({depth} blocks) "
                        f"but {self.name} has width {self.embed_dim} ({self.depth} blocks), "
                        f"so the file name or --fm names the wrong model{fix}")

    def checkpoint_from(self, backbone):
        """The published MIRAGE layout of ``backbone``'s weights (for tests and the demo)."""
        return {"model": {to_checkpoint_key(n): t.detach().clone()
                          for n, t in backbone.state_dict().items()}}


class MirageBase(MirageFamily):
    name, keywords = "MIRAGE-Base", ("mirage-base",)
    embed_dim, depth, num_heads = 768, 12, 12


class MirageLarge(MirageFamily):
    name, keywords = "MIRAGE-Large", ("mirage-large",)
    embed_dim, depth, num_heads = 1024, 24, 16


class MirageTiny(MirageFamily):
    """Same structure at toy width and depth: for the demo and the tests."""

    name, keywords = "MIRAGE-Tiny", ("mirage-tiny",)
    embed_dim, depth, num_heads = 128, 4, 4


# ------------------------------------------------------ other families (mirage/models/backbones.py)
class TimmViTFamily(FoundModel):
    """Models that are a timm VisionTransformer: 3 channels, ImageNet mean/std unless the
    family says otherwise.

    Each family has a fixed number of global tokens (class token, registers); the
    ``num_global_tokens`` asked for is ignored (the load report says so).
    """

    in_chans, norm, default_patch_size = 3, "imagenet", 16
    timm_name = ""
    timm_kwargs = {}        # extra timm arguments (the tests shrink width and depth here)
    drop = ()               # key prefixes of the published file that are not the encoder
    dinov2_layout = False   # DINOv2 names (register_tokens, SwiGLU mlp.w12 / mlp.w3)
    global_tokens = 1       # class token (+ registers)

    def build(self, input_size, patch_size, num_global_tokens, drop_path_rate=0.0,
              learnable_pos_emb=False):
        return build_vit_encoder(self.timm_name, input_size, patch_size, drop_path_rate,
                                 learnable_pos_emb, **self.timm_kwargs)

    def load_weights(self, backbone, checkpoint, source):
        return load_vit_weights(backbone, checkpoint, source, self.name, self.drop,
                                self.dinov2_layout, self.pos_embed_rule)

    def num_global_tokens_in(self, checkpoint):
        return self.global_tokens


class RetFound(TimmViTFamily):
    """RETFound (MAE, ViT-L/16): weights under 'model'; the MAE decoder is dropped.
    Another input size: MAE's ``interpolate_pos_embed`` (bicubic to the new size)."""

    name, keywords = "RETFound (MAE ViT-L/16)", ("retfound_mae", "retfound")
    timm_name = "vit_large_patch16_224"
    drop = ("mask_token", "decoder_", "head.")


class RetFoundDinov2(TimmViTFamily):
    """RETFound's DINOv2 variant (ViT-L/14): DINOv2 names under 'teacher', 'backbone.'.
    RETFound's code builds timm's DINOv2 at the tuning size and resamples the teacher's
    embedding with MAE's ``interpolate_pos_embed`` (bicubic to the new size), not with
    DINOv2's offset rule."""

    name, keywords = "RETFound-DINOv2 (ViT-L/14)", ("retfound_dinov2", "retfound-dinov2")
    timm_name, default_patch_size = "vit_large_patch14_dinov2", 14
    drop, dinov2_layout = ("mask_token",), True


class Dinov2Family(TimmViTFamily):
    """The official DINOv2 files (plain state dicts); ``_reg`` variants: 4 registers.

    DINOv2 resamples its 37x37 embedding at run time: the original models by scale factor
    (new + 0.1) / 37 (``interpolate_offset=0.1``), the ``_reg`` models with antialiased
    bicubic to the new size (``interpolate_offset=0``, ``interpolate_antialias=True``).
    """

    default_patch_size, drop, dinov2_layout = 14, ("mask_token",), True
    pos_embed_rule = "bicubic_offset"


class Dinov2Small(Dinov2Family):
    name, keywords = "DINOv2 ViT-S/14", ("dinov2_vits14",)
    timm_name = "vit_small_patch14_dinov2"


class Dinov2Base(Dinov2Family):
    name, keywords = "DINOv2 ViT-B/14", ("dinov2_vitb14",)
    timm_name = "vit_base_patch14_dinov2"


class Dinov2Large(Dinov2Family):
    name, keywords = "DINOv2 ViT-L/14", ("dinov2_vitl14",)
    timm_name = "vit_large_patch14_dinov2"


class Dinov2Giant(Dinov2Family):
    name, keywords = "DINOv2 ViT-g/14", ("dinov2_vitg14",)
    timm_name = "vit_giant_patch14_dinov2"


class Dinov2SmallReg(Dinov2Family):
    name, keywords = "DINOv2 ViT-S/14 reg4", ("dinov2_vits14_reg",)
    timm_name, global_tokens = "vit_small_patch14_reg4_dinov2", 5
    pos_embed_rule = "bicubic_antialias"


class Dinov2BaseReg(Dinov2Family):
    name, keywords = "DINOv2 ViT-B/14 reg4", ("dinov2_vitb14_reg",)
    timm_name, global_tokens = "vit_base_patch14_reg4_dinov2", 5
    pos_embed_rule = "bicubic_antialias"


class Dinov2LargeReg(Dinov2Family):
    name, keywords = "DINOv2 ViT-L/14 reg4", ("dinov2_vitl14_reg",)
    timm_name, global_tokens = "vit_large_patch14_reg4_dinov2", 5
    pos_embed_rule = "bicubic_antialias"


class Dinov2GiantReg(Dinov2Family):
    name, keywords = "DINOv2 ViT-g/14 reg4", ("dinov2_vitg14_reg",)
    timm_name, global_tokens = "vit_giant_patch14_reg4_dinov2", 5
    pos_embed_rule = "bicubic_antialias"


class VisionFM(TimmViTFamily):
    """VisionFM (iBOT ViT-B/16), one encoder per imaging modality, published as
    ``VFM_<Modality>_weights.pth``: 'teacher', 'module.'/'backbone.' stripped; the iBOT head
    dropped. Inputs are normalised with the modality's statistics (its authors'
    ``utils.get_stats``), never ImageNet's; another input size: VisionFM's
    ``resize_pos_embed`` (bicubic to the new size). Each modality is a subclass below.
    """

    name, keywords = "VisionFM (ViT-B/16)", ("visionfm", "vfm_")
    timm_name = "vit_base_patch16_224"
    drop = ("masked_embed", "head.")
    modality = None  # as the authors spell it (their --modality), e.g. "OCT", "Fundus"
    norm = None

    def __init_subclass__(cls, **kwargs):
        if "modality" in cls.__dict__:  # a modality: its name, keywords and statistics
            tag = cls.modality.lower()
            cls.name = f"VisionFM {cls.modality} (ViT-B/16)"
            cls.keywords = (f"visionfm_{tag}", f"vfm_{tag}")
            cls.norm = f"visionfm_{tag}"
            assert cls.norm in MEAN_STD, cls.norm
        super().__init_subclass__(**kwargs)

    def __init__(self):
        if self.modality is None:
            raise UserError(_visionfm_modality_message("VisionFM()"))

    @classmethod
    def select(cls, source):
        if cls.modality is None:
            raise UserError(_visionfm_modality_message(source))
        return cls()


def _visionfm_modality_message(source):
    """Why a VisionFM file cannot be used without its modality, on one line."""
    modalities = [m.modality for m in VISIONFM_MODALITIES]
    named = re.search(r"vfm_([a-z0-9]+)_weights", Path(source).name.lower())  # published
    if named:
        return (f"{source}: VisionFM modality '{named.group(1)}' is not one its authors "
                f"publish statistics for ({', '.join(modalities)}); its normalisation is "
                "unknown, so it is not guessed: pass --fm visionfm_<modality> if the file "
                "is one of these")
    return (f"{source}: VisionFM has one encoder and one normalisation per modality and the "
            "name does not say which; pass --fm visionfm_oct (or visionfm_"
            f"{', visionfm_'.join(m.lower() for m in modalities[1:])}) or keep the published "
            "name VFM_<Modality>_weights.pth")


class VisionFMOCT(VisionFM):
    modality = "OCT"


class VisionFMFundus(VisionFM):
    modality = "Fundus"


class VisionFMFFA(VisionFM):
    modality = "FFA"


class VisionFMUltrasound(VisionFM):
    modality = "Ultrasound"


class VisionFMExternal(VisionFM):
    modality = "External"


class VisionFMSlitLamp(VisionFM):
    modality = "SlitLamp"


class VisionFMMRI(VisionFM):
    modality = "MRI"


class VisionFMUBM(VisionFM):
    modality = "UBM"


VISIONFM_MODALITIES = (VisionFMOCT, VisionFMFundus, VisionFMFFA, VisionFMUltrasound,
                       VisionFMExternal, VisionFMSlitLamp, VisionFMMRI, VisionFMUBM)


class SamViTB(FoundModel):
    """SAM ViT-B image encoder (no neck, no class token), ImageNet mean/std at 3 channels.

    SAM's own code only runs at 1024x1024 (it pads); at another size the position
    embedding is resampled as timm runs SAM (antialiased bicubic) and the global blocks'
    relative-position tables linearly, as SAM's own ``get_rel_pos`` does.
    """

    name, keywords = "SAM ViT-B", ("sam_vit_b",)
    in_chans, norm, default_patch_size = 3, "imagenet", 16
    pos_embed_rule = "bicubic_antialias"
    timm_name = "samvit_base_patch16"
    timm_kwargs = {}

    def build(self, input_size, patch_size, num_global_tokens, drop_path_rate=0.0,
              learnable_pos_emb=False):
        return build_sam_encoder(self.timm_name, input_size, patch_size, drop_path_rate,
                                 learnable_pos_emb, **self.timm_kwargs)

    def load_weights(self, backbone, checkpoint, source):
        return load_sam_weights(backbone, checkpoint, source, self.name,
                                self.pos_embed_rule)

    def num_global_tokens_in(self, checkpoint):
        return 0


class MedSam(SamViTB):
    """MedSAM: SAM ViT-B fine-tuned on medical images; its preprocessing is per-image
    min-max to [0, 1] at 3 channels. "medsam_vit_b" outranks SAM's "sam_vit_b"."""

    name, keywords, norm = "MedSAM ViT-B", ("medsam_vit_b", "medsam"), "minmax"


# ----------------------------------------------------------------------------- lookup
def registered_names():
    """The name of every usable registered family (the first keyword of each), sorted."""
    return sorted({cls.keywords[0] for cls in REGISTRY.values()
                   if cls is not VisionFM and cls.keywords})


def find_model(weights, fm=None):
    """The registered :class:`FoundModel` for ``weights``.

    ``fm`` (a registered name or keyword, case-insensitive; or a FoundModel class or
    instance) names it explicitly and wins over the file name; otherwise the longest
    keyword found in the file name selects it.
    """
    if isinstance(fm, FoundModel):
        return fm
    if isinstance(fm, type) and issubclass(fm, FoundModel):
        return fm.select(f"--fm {fm.__name__}")
    if fm is not None:
        cls = REGISTRY.get(str(fm).strip().lower())
        if cls is None:
            raise UserError(f"--fm {fm}: no such model; registered: "
                            f"{', '.join(registered_names())}")
        return cls.select(f"--fm {fm}")
    file_name = Path(weights).name.lower()
    for keyword in sorted(REGISTRY, key=len, reverse=True):
        if keyword in file_name:
            return REGISTRY[keyword].select(str(weights))
    raise UserError(f"--weights {weights}: the file name matches no known model; say which "
                    f"it is with --fm NAME (one of: {', '.join(registered_names())}), or "
                    "rename the file to contain that name")


def build_backbone(weights, input_size, patch_size=None, num_global_tokens=None,
                   drop_path_rate=0.0, learnable_pos_emb=False, fm=None):
    """Build the encoder named by ``weights`` and load its tensors.

    Returns ``(backbone, fm, report)`` where ``report`` is a one-line loading summary.
    """
    weights = Path(weights)
    if not weights.is_file():
        raise UserError(f"--weights {weights}: file not found")
    fm = find_model(weights, fm)
    input_size = pair(input_size)
    patch_size = pair(patch_size if patch_size is not None else fm.default_patch_size)
    if input_size[0] % patch_size[0] or input_size[1] % patch_size[1]:
        raise UserError(f"--input_size {input_size[0]}x{input_size[1]} is not divisible by "
                        f"the patch size {patch_size[0]}x{patch_size[1]} of {fm.name} (its "
                        "own code refuses such sizes); nearest valid: "
                        f"{nearest_valid(input_size, patch_size)} (or set --patch_size)")
    checkpoint = load_file(weights)
    if num_global_tokens is None:
        num_global_tokens = fm.num_global_tokens_in(checkpoint)
    backbone = fm.build(input_size, patch_size, num_global_tokens, drop_path_rate,
                        learnable_pos_emb)
    report = fm.load_weights(backbone, checkpoint, str(weights))
    return backbone, fm, report


def load_backbone(weights, input_size=1024, fm=None, patch_size=None):
    """The pretrained encoder of ``weights`` in eval mode, on the CPU.

    ``bb(images)``: (B, in_chans, H, W) normalised the model's way (MIRAGE: 1 channel,
    per-image min-max to [0, 1]; the others: ``find_model(weights, fm).norm``) ->
    (B, N + G, D) tokens, N patch tokens in row-major order then G global tokens.
    ``input_size`` is an int or (h, w); the stored position embedding is resampled to the
    new grid by the family's own rule. ``fm`` names the model (e.g. ``"dinov2_vitb14"``)
    when the file name does not, and wins over it.
    """
    backbone, _, _ = build_backbone(weights, input_size, patch_size, fm=fm)
    return backbone.eval()
