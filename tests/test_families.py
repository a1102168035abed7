"""Each foundation model as its authors run it: input normalisation, choice of the model
(file name or --fm), and position-embedding resampling at native and other input sizes.

The resampling references below are written from each family's rule in numpy (float64),
not with torch.nn.functional.interpolate or the code under test:

- ``bicubic``: Keys cubic convolution (a = -0.75), half-pixel centres, source position
  (i + 0.5) / scale - 0.5 with scale = new / old, edge pixels repeated. MAE/RETFound
  (``interpolate_pos_embed``), RETFound-DINOv2 (the same function), VisionFM
  (``resize_pos_embed``), MIRAGE.
- ``bicubic_offset``: the same kernel, but scale = (new + 0.1) / old: DINOv2 without
  registers (``interpolate_offset=0.1``).
- ``bicubic_antialias``: the PIL-style antialiased cubic filter (a = -0.5, support
  2 * max(old / new, 1), weights normalised over the pixels inside): DINOv2 ``_reg``
  (``interpolate_antialias=True``) and SAM/MedSAM as timm runs them.
- ``linear``: SAM's ``get_rel_pos`` resizing of relative-position tables (half-pixel
  centres, clamped at the ends).

Each loaded encoder is then run against a reference forward: the family's architecture at
the tuning size holding the reference-resampled embedding.
"""
import math
import runpy
from functools import partial

import numpy as np
import pytest
import timm
import torch
from timm.models.vision_transformer import Block
from torch import nn

from conftest import REPO
from fm_seg_config import (VISIONFM_MODALITIES, Dinov2Small, MedSam, MirageBase, MirageLarge,
                           MirageTiny, RetFound, RetFoundDinov2, SamViTB, VisionFM,
                           VisionFMFundus, VisionFMOCT, build_backbone, find_model,
                           load_backbone, registered_names)
from mirage import checkpoint_io as ckpt
from mirage.config import parse_config
from mirage.errors import UserError
from mirage.data.transforms import MEAN_STD, SegmentationTransform, normalise
from test_backbones_timm import (GRID, SAM_SIZE, pretrain_size, reference_layers,
                                 write_case)


# ============================================================ independent references
def cubic(x, a):
    """Keys' cubic convolution kernel."""
    x = np.abs(x)
    return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, a * (((x - 5) * x + 8) * x - 4), 0.0))


def bicubic_matrix(n_in, n_out, scale=None):
    """(n_out, n_in) weights of bicubic resampling; ``scale`` defaults to n_out / n_in."""
    scale = n_out / n_in if scale is None else scale
    weights = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) / scale - 0.5
        base = math.floor(src)
        for k in (-1, 0, 1, 2):
            weights[i, min(max(base + k, 0), n_in - 1)] += cubic(src - (base + k), -0.75)
    return weights


def antialias_matrix(n_in, n_out):
    """(n_out, n_in) weights of PIL-style antialiased cubic resampling."""
    scale = n_in / n_out
    stretch = max(scale, 1.0)
    support = 2.0 * stretch
    weights = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = (i + 0.5) * scale
        lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), n_in)
        taps = np.arange(lo, hi)
        w = cubic((taps - centre + 0.5) / stretch, -0.5)
        weights[i, lo:hi] = w / w.sum()
    return weights


def linear_matrix(n_in, n_out):
    """(n_out, n_in) weights of linear resampling with half-pixel centres."""
    weights = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        j = int(src)
        weights[i, j] += 1 - (src - j)
        weights[i, min(j + 1, n_in - 1)] += src - j
    return weights


def resample_reference(grid, size, rule):
    """A (D, h, w) array resampled to ``size`` = (gh, gw) by ``rule``, in float64."""
    (h, w), (gh, gw) = grid.shape[1:], size
    if (h, w) == (gh, gw):  # every family keeps its embedding at its own grid
        return np.asarray(grid, np.float64)
    if rule == "bicubic":
        rows, cols = bicubic_matrix(h, gh), bicubic_matrix(w, gw)
    elif rule == "bicubic_offset":
        rows, cols = bicubic_matrix(h, gh, (gh + 0.1) / h), bicubic_matrix(w, gw, (gw + 0.1) / w)
    elif rule == "bicubic_antialias":
        rows, cols = antialias_matrix(h, gh), antialias_matrix(w, gw)
    return np.einsum("ij,djk,lk->dil", rows, np.asarray(grid, np.float64), cols)


def test_references_are_right_on_hand_computed_cases():
    """The references against values worked out by hand."""
    # Upsampling 2 -> 4 (scale 2): outputs sit at source -0.25, 0.25, 0.75, 1.25.
    # At 0.25: weights cubic(1.25), cubic(0.25), cubic(0.75), cubic(1.75) with a = -0.75
    # = -0.10546875, 0.87890625, 0.26171875, -0.03515625; taps 0, 0, 1, 1 (edge clamp).
    w = bicubic_matrix(2, 4)
    np.testing.assert_allclose(w[1], [-0.10546875 + 0.87890625, 0.26171875 - 0.03515625])
    np.testing.assert_allclose(w.sum(axis=1), 1.0)
    # Same size: bicubic is the identity; the DINOv2 offset is not (scale 4.1 / 4).
    np.testing.assert_allclose(bicubic_matrix(4, 4), np.eye(4), atol=1e-12)
    assert np.abs(bicubic_matrix(4, 4, 4.1 / 4) - np.eye(4)).max() > 1e-3
    # Antialiased 4 -> 2 (scale 2): output 0 is centred at 1.0 with support 4: taps 0..3,
    # kernel cubic((j - 1 + 0.5) / 2) with a = -0.5 at -0.25, 0.25, 0.75, 1.25
    # = 0.8671875, 0.8671875, 0.2265625, -0.0703125, normalised by their sum 1.890625.
    np.testing.assert_allclose(antialias_matrix(4, 2)[0],
                               np.array([0.8671875, 0.8671875, 0.2265625, -0.0703125])
                               / 1.890625)
    # Linear 3 -> 5: output 0 at source -0.2 -> clamped to t0; output 1 at source
    # 1.5 * 3 / 5 - 0.5 = 0.4 -> 0.6 * t0 + 0.4 * t1.
    np.testing.assert_allclose(linear_matrix(3, 5)[:2], [[1.0, 0.0, 0.0], [0.6, 0.4, 0.0]])


# ============================================================ normalisation
AUTHORS_VISIONFM_STATS = {  # VisionFM's utils.get_stats, as published
    "MRI": [(0.17368862, 0.17368862, 0.17368862), (0.16198656, 0.16198656, 0.16198656)],
    "Fundus": [(0.423737496137619, 0.2609460651874542, 0.128403902053833),
               (0.29482534527778625, 0.20167365670204163, 0.13668020069599152)],
    "UBM": [(0.096110865, 0.096110865, 0.096110865), (0.20977867, 0.20977867, 0.20977867)],
    "Ultrasound": [(0.05989236, 0.05978666, 0.056694973), (0.154277, 0.15504874, 0.14464583)],
    "External": [(0.4936253, 0.36324808, 0.25956994), (0.32001, 0.27109432, 0.21991591)],
    "FFA": [(0.2020487, 0.20205145, 0.20201068), (0.17406046, 0.17404206, 0.17401208)],
    "SlitLamp": [(0.5556667, 0.40288574, 0.38857886), (0.26516676, 0.23311588, 0.23903583)],
    "OCT": [(0.21091926, 0.21091926, 0.21091919), (0.17598894, 0.17598891, 0.17598893)],
}


def test_normalisation_constants():
    assert MEAN_STD["imagenet"] == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert {m.modality for m in VISIONFM_MODALITIES} == set(AUTHORS_VISIONFM_STATS)
    for family in VISIONFM_MODALITIES:
        mean, std = AUTHORS_VISIONFM_STATS[family.modality]
        assert MEAN_STD[family.norm] == (mean, std), family.modality


def test_each_family_normalises_as_its_authors():
    for family in (MirageBase, MirageLarge, MirageTiny, MedSam):
        assert family.norm == "minmax"
    for family in (RetFound, RetFoundDinov2, Dinov2Small, SamViTB):
        assert family.norm == "imagenet"
    for family in VISIONFM_MODALITIES:
        assert family.norm == f"visionfm_{family.modality.lower()}" and family.in_chans == 3


def test_visionfm_oct_input_uses_the_oct_statistics():
    """Defect 1: VisionFM was fed ImageNet-normalised input (up to 2.2 off at white)."""
    fm = find_model("VisionFM_OCT_teacher.pth")
    image = np.array([[0, 51, 255]], np.uint8)  # -> 0, 0.2, 1 after min-max
    out, _ = SegmentationTransform((1, 3), norm=fm.norm, in_chans=fm.in_chans)(image)
    # (v - 0.21091926) / 0.17598894, by hand
    np.testing.assert_allclose(out[0, 0], [-1.19848, -0.06205, 4.48370], atol=1e-4)
    np.testing.assert_allclose(out[2, 0, 2], (1 - 0.21091919) / 0.17598893, rtol=1e-6)
    fundus = normalise(image, 0, 255, norm=find_model("VFM_Fundus_weights.pth").norm,
                       in_chans=3)
    np.testing.assert_allclose(fundus[:, 0, 2], [(1 - 0.423737496137619) / 0.29482534527778625,
                                                 (1 - 0.2609460651874542) / 0.20167365670204163,
                                                 (1 - 0.128403902053833) / 0.13668020069599152],
                               rtol=1e-6)


def test_unknown_normalisation_is_an_error():
    with pytest.raises(ValueError, match="unknown normalisation 'visionfm'"):
        normalise(np.zeros((2, 2), np.uint8), 0, 1, norm="visionfm", in_chans=3)


# ============================================================ choosing the model
@pytest.mark.parametrize("family", VISIONFM_MODALITIES)
def test_published_visionfm_names_select_the_modality(family):
    """Defect 2: VFM_<Modality>_weights.pth selected nothing."""
    fm = find_model(f"./weights/VFM_{family.modality}_weights.pth")
    assert type(fm) is family and fm.norm == f"visionfm_{family.modality.lower()}"


@pytest.mark.parametrize("file_name, message", [
    ("VisionFM_teacher.pth", "names? does not say which; pass --fm visionfm_oct"),
    ("VFM_Retina3D_weights.pth", "modality 'retina3d' is not one its authors publish "
                                 "statistics for .*normalisation is unknown"),
])
def test_visionfm_without_a_known_modality_is_an_error(file_name, message):
    with pytest.raises(UserError, match=message):
        find_model(file_name)
    with pytest.raises(UserError, match="--fm visionfm: VisionFM has one encoder"):
        find_model("best.pth", fm="visionfm")


def test_fm_names_the_model_and_wins_over_the_file_name():
    assert type(find_model("best.pth", fm="retfound_mae")) is RetFound
    assert type(find_model("best.pth", fm="RETFound")) is RetFound  # any keyword
    assert type(find_model("VFM_Fundus_weights.pth", fm="visionfm_oct")) is VisionFMOCT
    assert type(find_model("MIRAGE-Base.pth", fm="mirage-large")) is MirageLarge
    assert type(find_model("x.pth", fm=VisionFMFundus)) is VisionFMFundus
    assert "visionfm_oct" in registered_names() and "visionfm" not in registered_names()


def test_unknown_fm_lists_the_registered_names():
    with pytest.raises(UserError) as err:
        find_model("MIRAGE-Base.pth", fm="mirage-huge")
    message = str(err.value)
    assert message.startswith("--fm mirage-huge: no such model; registered: ")
    assert "\n" not in message
    assert all(name in message for name in ("mirage-base", "dinov2_vitb14_reg",
                                            "visionfm_oct", "medsam_vit_b", "retfound_mae"))


def test_a_file_name_without_keyword_suggests_fm():
    with pytest.raises(UserError) as err:
        find_model("checkpoints/best.pth")
    assert "\n" not in str(err.value)
    assert "--weights checkpoints/best.pth: the file name matches no known model; say " \
           "which it is with --fm NAME (one of: " in str(err.value)


def test_any_file_name_loads_with_fm(tmp_path, tiny_weights):
    renamed = tmp_path / "best.pth"
    renamed.write_bytes(tiny_weights.read_bytes())
    bb = load_backbone(renamed, input_size=64, fm="mirage-tiny")
    reference = load_backbone(tiny_weights, input_size=64)
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(bb(x), reference(x))


def test_fm_option(tmp_path, tiny_weights, tiny_dataset, capsys):
    config, _, _ = parse_config(["--weights", "w.pth", "--data_path", "d"])
    assert config["fm"] is None
    config, _, _ = parse_config(["--fm", "visionfm_oct", "--weights", "w.pth",
                                 "--data_path", "d"])
    assert config["fm"] == "visionfm_oct"
    # the tool reads it: an unknown name is a one-line error, exit 2
    run_seg_tuning = runpy.run_path(str(REPO / "run_seg_tuning.py"))
    with pytest.raises(SystemExit) as stop:
        run_seg_tuning["main"](["--weights", str(tiny_weights), "--data_path",
                                str(tiny_dataset), "--fm", "nope", "--device", "cpu",
                                "--base_output_dir", str(tmp_path / "out")])
    assert stop.value.code == 2
    assert "error: --fm nope: no such model; registered:" in capsys.readouterr().err


# ============================================================ sizes the authors refuse
@pytest.mark.parametrize("size, hint", [
    (1024, "nearest valid: 1022 or 1036 (or set --patch_size)"),
    ((1024, 518), "nearest valid: height 1022 or 1036, width 518"),
    (10, "nearest valid: 14 "),
])
def test_size_the_authors_code_refuses_suggests_the_nearest(tmp_path, size, hint):
    path, fm, _ = write_case(tmp_path, "dinov2_s")
    with pytest.raises(UserError) as err:
        build_backbone(path, size, fm=fm)
    message = str(err.value)
    assert "is not divisible by the patch size 14x14 of DINOv2 ViT-S/14 (its own code " \
           "refuses such sizes)" in message and hint in message and "\n" not in message


# ============================================================ resampling, every family
RULES = {  # each family's rule, from its authors' code (see the module docstring)
    "retfound": "bicubic", "retfound_dinov2": "bicubic", "visionfm": "bicubic",
    "dinov2_s": "bicubic_offset", "dinov2_g": "bicubic_offset",
    "dinov2_b_reg": "bicubic_antialias", "sam": "bicubic_antialias",
    "medsam": "bicubic_antialias",
}
VIT_GRIDS = [(GRID, GRID), (6, 8), (2, 3)]  # native, larger (non-square), smaller
SAM_GRIDS = [(SAM_SIZE // 16,) * 2, (6, 4), (12, 10)]
FAMILY_SIZES = [(case, grid) for case in RULES
                for grid in (SAM_GRIDS if case in ("sam", "medsam") else VIT_GRIDS)]
FAMILY_SIZES.append(("dinov2_s", (GRID, 6)))  # one side kept: DINOv2 still resamples it


def reference_vit(fm, source, size, rule):
    """The family's ViT at ``size`` with the stored embedding resampled by ``rule``."""
    p = fm.default_patch_size
    grid = (size[0] // p, size[1] // p)
    model = timm.create_model(fm.timm_name, pretrained=False, img_size=size, num_classes=0,
                              global_pool="", **fm.timm_kwargs)
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens  # class token's own
    stored = source.pos_embed.detach()
    patches = stored[0, prefix:].reshape(GRID, GRID, -1).permute(2, 0, 1).numpy()
    resampled = torch.from_numpy(resample_reference(patches, grid, rule)).float()
    state = source.state_dict()
    state["pos_embed"] = torch.cat([stored[:, :prefix],
                                    resampled.flatten(1).T[None]], dim=1)
    model.load_state_dict(state)
    return model.eval(), state["pos_embed"]


def reference_sam(fm, source, size):
    """SAM at ``size``: antialiased bicubic embedding, linearly resized global tables."""
    grid = (size[0] // 16, size[1] // 16)
    model = timm.create_model(fm.timm_name, pretrained=False, img_size=size, num_classes=0,
                              norm_layer=partial(nn.LayerNorm, eps=1e-6), **fm.timm_kwargs)
    state = source.state_dict()
    stored = state["pos_embed"][0].permute(2, 0, 1).numpy()
    state["pos_embed"] = torch.from_numpy(
        resample_reference(stored, grid, "bicubic_antialias")).float().permute(1, 2, 0)[None]
    for i in fm.timm_kwargs["global_attn_indexes"]:  # windowed blocks keep their tables
        for axis, length in (("h", 2 * grid[0] - 1), ("w", 2 * grid[1] - 1)):
            key = f"blocks.{i}.attn.rel_pos_{axis}"
            table = state[key].numpy()
            state[key] = torch.from_numpy(linear_matrix(len(table), length) @ table).float()
    model.load_state_dict(state)
    return model.eval(), state


@pytest.mark.parametrize("case, grid", FAMILY_SIZES)
def test_family_resamples_as_its_authors_at_native_and_other_sizes(tmp_path, case, grid):
    """Defect 3 among them: DINOv2 (offset rule) and DINOv2 _reg (antialiased)."""
    path, fm, source = write_case(tmp_path, case)
    p = fm.default_patch_size
    size = (grid[0] * p, grid[1] * p)
    bb, _, _ = build_backbone(path, size, fm=fm)
    bb.eval()
    if case in ("sam", "medsam"):
        reference, state = reference_sam(fm, source, size)
        got = bb.sam.state_dict()
        for key in ["pos_embed"] + [k for k in state if "rel_pos" in k]:
            torch.testing.assert_close(got[key], state[key], atol=1e-6, rtol=1e-5)
    else:
        reference, pos = reference_vit(fm, source, size, RULES[case])
        torch.testing.assert_close(bb.vit.pos_embed.detach(), pos, atol=1e-6, rtol=1e-5)
    x = torch.randn(2, 3, *size)
    depth = bb.depth
    with torch.no_grad():
        layers = bb.forward_layers(x, [0, depth - 1])
    for got, want in zip(layers, reference_layers(reference, x, [0, depth - 1])):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("case, rule", [("dinov2_s", "bicubic_offset"),
                                        ("dinov2_b_reg", "bicubic_antialias")])
def test_dinov2_rule_is_not_plain_bicubic(case, rule):
    """The DINOv2 references differ from size-based bicubic (the old behaviour) by far
    more than the tolerance above, so the test above tells them apart."""
    grid = np.random.default_rng(0).standard_normal((8, GRID, GRID))
    for size in ((6, 8), (2, 3)):
        diff = resample_reference(grid, size, rule) - resample_reference(grid, size, "bicubic")
        assert np.abs(diff).max() > 1e-2


@pytest.mark.parametrize("size", [(512, 512), (64, 96), (1024, 768)])
def test_mirage_resamples_as_its_authors(tiny_weights, size):
    """MIRAGE's rule (bicubic to the new size) against a forward written from the spec:
    conv patches + resampled sin-cos embedding, global tokens last, pre-norm blocks."""
    state = ckpt.load_file(tiny_weights)["model"]
    grid = (size[0] // 32, size[1] // 32)
    bb = load_backbone(tiny_weights, input_size=size)
    pos = torch.from_numpy(resample_reference(
        state["input_adapters.bscan.pos_emb"][0].numpy(), grid, "bicubic")).float()[None]
    torch.testing.assert_close(bb.input_adapter.pos_emb.detach(), pos, atol=1e-6, rtol=1e-5)
    if size == (1024, 768):
        return  # the embedding is what differs with the size; the forward is checked below
    dim = MirageTiny.embed_dim
    x = torch.rand(1, 1, *size)
    tokens = torch.nn.functional.conv2d(x, state["input_adapters.bscan.proj.weight"],
                                        state["input_adapters.bscan.proj.bias"], stride=32)
    tokens = (tokens + pos).flatten(2).transpose(1, 2)
    tokens = torch.cat([tokens, state["global_tokens"]], dim=1)
    for i in range(MirageTiny.depth):
        block = Block(dim, MirageTiny.num_heads, 4.0, qkv_bias=True,
                      norm_layer=partial(nn.LayerNorm, eps=1e-6))
        block.load_state_dict({k[len(f"encoder.{i}."):]: v for k, v in state.items()
                               if k.startswith(f"encoder.{i}.")})
        with torch.no_grad():
            tokens = block.eval()(tokens)
    with torch.no_grad():
        torch.testing.assert_close(bb(x), tokens, atol=2e-5, rtol=1e-5)


# ============================================================ forward_layers indices
@pytest.mark.parametrize("case", ["mirage", "retfound", "sam"])
def test_forward_layers_rejects_indices_out_of_range(tmp_path, tiny_weights, case):
    """Issue 7: an index past the last block used to be dropped silently (MIRAGE)."""
    if case == "mirage":
        bb, size, chans = load_backbone(tiny_weights, input_size=64), (64, 64), 1
    else:
        path, fm, _ = write_case(tmp_path, case)
        bb, _, _ = build_backbone(path, pretrain_size(fm), fm=fm)
        size, chans = pretrain_size(fm), 3
    depth = bb.depth
    x = torch.rand(1, chans, *size)
    for indices in ([depth], [-1], [0, depth], [2, 1], [1, 1], [], [0.5]):
        with pytest.raises(UserError, match=rf"^layer indices .*from 0 to {depth - 1}$"):
            bb.forward_layers(x, indices)
    assert len(bb.forward_layers(x, [0, depth - 1])) == 2


def test_visionfm_base_class_cannot_be_used_without_modality():
    with pytest.raises(UserError, match="VisionFM has one encoder"):
        VisionFM()
