"""RETFound, DINOv2, VisionFM and SAM/MedSAM: loading their published layouts (tiny models).

Each checkpoint is written in its authors' layout (wrappers, prefixes, the parts a loader
must drop) from a randomly initialised timm model of the family's architecture at toy
width and depth; that timm model is the reference the loaded backbone is checked against.
"""
import argparse
from functools import partial

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import GluMlp
from torch import nn

from fm_seg_config import (Dinov2BaseReg, Dinov2Giant, Dinov2GiantReg, Dinov2Large,
                           Dinov2Small, Dinov2SmallReg, MedSam, MirageBase, RetFound,
                           RetFoundDinov2, SamViTB, VisionFMFundus, VisionFMOCT, build_backbone,
                           find_model)
from conftest import build_from_options
from mirage import checkpoint_io as ckpt
from mirage.config import parse_config
from mirage.errors import UserError
from mirage.train.optim import param_groups

TINY_VIT = dict(embed_dim=32, depth=3, num_heads=2)
TINY_SAM = dict(embed_dim=32, depth=4, num_heads=2, global_attn_indexes=(1, 3), window_size=3)
GRID = 4      # ViT pretraining grid (4x4 patches)
SAM_SIZE = 128  # SAM pretraining input: an 8x8 grid, windows of 3 tokens (padded)


def tiny(family):
    """``family`` at toy size, unregistered (no keywords) so the registry is untouched."""
    kwargs = TINY_SAM if issubclass(family, SamViTB) else TINY_VIT
    return type(f"Tiny{family.__name__}", (family,), {"keywords": (),
                                                       "timm_kwargs": dict(kwargs)})()


def source_model(fm, seed=0):
    """A random timm model of ``fm``'s architecture at its pretraining size, with every
    parameter (norms and layer scales included) drawn at random."""
    if isinstance(fm, SamViTB):
        model = timm.create_model(fm.timm_name, pretrained=False, img_size=SAM_SIZE,
                                  num_classes=0, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                                  **fm.timm_kwargs)  # keeps its neck, as SAM's file does
    else:
        model = timm.create_model(fm.timm_name, pretrained=False,
                                  img_size=GRID * fm.default_patch_size, num_classes=0,
                                  global_pool="", **fm.timm_kwargs)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    return model.eval()


# ----------------------------------------------------------------------------- layouts
def extra(*shape):
    return torch.randn(*shape)


def weights(source):
    return {k: v.clone() for k, v in source.state_dict().items()}, source.embed_dim


def mae_layout(source):
    """RETFound: a full MAE pretraining checkpoint."""
    sd, dim = weights(source)
    model = {**sd, "mask_token": extra(1, 1, dim), "decoder_embed.weight": extra(16, dim),
             "decoder_embed.bias": extra(16), "decoder_pos_embed": extra(1, 17, 16),
             "decoder_blocks.0.norm1.weight": extra(16), "decoder_blocks.0.mlp.fc1.weight":
             extra(64, 16), "decoder_norm.weight": extra(16), "decoder_pred.weight":
             extra(768, 16)}
    return {"model": model, "optimizer": {}, "epoch": 799,
            "args": argparse.Namespace(model="mae_vit_large_patch16")}


def dinov2_layout(source):
    """The official DINOv2 state dict of a timm DINOv2 model."""
    sd, dim = weights(source)
    swiglu = isinstance(source.blocks[0].mlp, GluMlp)  # ViT-g: mlp.w12 / mlp.w3
    out = {k.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.") if swiglu
           else k: v for k, v in sd.items()}
    if "reg_token" in out:  # DINOv2 adds pos_embed[:, 0] to the class token, timm folds it
        cls_pos = extra(1, 1, dim)
        out["pos_embed"] = torch.cat([cls_pos, out["pos_embed"]], dim=1)
        out["cls_token"] = out["cls_token"] - cls_pos
        out["register_tokens"] = out.pop("reg_token")
    out["mask_token"] = extra(1, dim)
    return out


def retfound_dinov2_layout(source):
    dim = source.embed_dim
    teacher = {f"backbone.{k}": v for k, v in dinov2_layout(source).items()}
    teacher.update({"dino_head.mlp.0.weight": extra(8, dim),
                    "ibot_head.last_layer.weight_g": extra(1, 8)})
    return {"teacher": teacher}


def sam_layout(source):
    """SAM / MedSAM: the whole promptable model as a plain state dict."""
    sd, _ = weights(source)
    out = {f"image_encoder.{k.replace('.mlp.fc', '.mlp.lin')}": v for k, v in sd.items()}
    out.update({"prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": extra(2, 128),
                "prompt_encoder.point_embeddings.0.weight": extra(1, 256),
                "mask_decoder.iou_token.weight": extra(1, 256)})
    return out


def visionfm_layout(source):
    """VisionFM: iBOT training state, teacher and student under a DDP 'module.' prefix."""
    sd, dim = weights(source)

    def network(state):
        out = {f"module.backbone.{k}": v for k, v in state.items()}
        out.update({"module.backbone.masked_embed": extra(1, dim),
                    "module.head.mlp.0.weight": extra(8, dim),
                    "module.head.last_layer.weight_g": extra(1, 8)})
        return out
    student = {k: v + 1.0 for k, v in sd.items()}
    return {"teacher": network(sd), "student": network(student), "optimizer": {},
            "epoch": 100, "args": argparse.Namespace(arch="vit_base")}


CASES = {  # family, published file name, layout writer, groups the loader must ignore
    "retfound": (RetFound, "RETFound_cfp_weights.pth", mae_layout,
                 ["decoder_blocks (2)", "decoder_embed (2)", "decoder_norm (1)",
                  "decoder_pos_embed (1)", "decoder_pred (1)", "mask_token (1)"]),
    "retfound_dinov2": (RetFoundDinov2, "RETFound_dinov2_meh.pth", retfound_dinov2_layout,
                        ["dino_head (1)", "ibot_head (1)", "mask_token (1)"]),
    "dinov2_s": (Dinov2Small, "dinov2_vits14_pretrain.pth", dinov2_layout,
                 ["mask_token (1)"]),
    "dinov2_b_reg": (Dinov2BaseReg, "dinov2_vitb14_reg4_pretrain.pth", dinov2_layout,
                     ["mask_token (1)"]),
    "dinov2_g": (Dinov2Giant, "dinov2_vitg14_pretrain.pth", dinov2_layout,
                 ["mask_token (1)"]),
    "sam": (SamViTB, "sam_vit_b_01ec64.pth", sam_layout,
            ["image_encoder.neck (6)", "mask_decoder (1)", "prompt_encoder (2)"]),
    "medsam": (MedSam, "medsam_vit_b.pth", sam_layout,
               ["image_encoder.neck (6)", "mask_decoder (1)", "prompt_encoder (2)"]),
    "visionfm": (VisionFMOCT, "VFM_OCT_weights.pth", visionfm_layout,
                 ["head (2)", "masked_embed (1)"]),
}


def write_case(tmp_path, case, seed=0, mutate=None):
    """(path, tiny family, reference timm model) for ``CASES[case]``."""
    family, file_name, layout, _ = CASES[case]
    fm = tiny(family)
    source = source_model(fm, seed)
    payload = layout(source)
    if mutate is not None:
        mutate(payload)
    path = tmp_path / file_name
    ckpt.save(path, payload)
    return path, fm, source


def pretrain_size(fm):
    return (SAM_SIZE,) * 2 if isinstance(fm, SamViTB) else (GRID * fm.default_patch_size,) * 2


def reference_layers(source, x, indices):
    """What the published model hands on after each block in ``indices``, patch tokens
    first: block outputs caught by hooks, ViTs' final norm applied, prefix tokens last."""
    caught = {}
    hooks = [source.blocks[i].register_forward_hook(
        lambda _m, _i, out, i=i: caught.__setitem__(i, out)) for i in indices]
    with torch.no_grad():
        source.forward_features(x)
    for hook in hooks:
        hook.remove()
    if not hasattr(source, "num_prefix_tokens"):  # SAM: NHWC maps, no prefix tokens
        return [caught[i].flatten(1, 2) for i in indices]
    g = source.num_prefix_tokens
    normed = [source.norm(caught[i]) for i in indices]
    return [torch.cat([t[:, g:], t[:, :g]], dim=1) for t in normed]


# ----------------------------------------------------------------------------- loading
@pytest.mark.parametrize("case", list(CASES))
def test_published_layout_loads_every_tensor_and_gives_timm_tokens(tmp_path, case):
    path, fm, source = write_case(tmp_path, case)
    size = pretrain_size(fm)
    bb, _, report = build_backbone(path, size, fm=fm)
    bb.eval()
    state = bb.state_dict()
    inner = "sam." if isinstance(fm, SamViTB) else "vit."
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith("neck.")}
    assert len(state) == len(expected) and f"loaded {len(expected)} encoder tensors" in report
    for name, tensor in expected.items():
        if name == "cls_token" and "reg_token" in expected:  # pos_embed[:, 0] folded in
            torch.testing.assert_close(state[inner + name], tensor)
        else:
            assert torch.equal(state[inner + name], tensor), name
    for group in CASES[case][3]:
        assert group in report
    assert f"global tokens: {fm.num_global_tokens_in(None)}, fixed by" in report

    x = torch.randn(2, 3, *size)
    depth = len(source.blocks)
    with torch.no_grad():
        tokens = bb(x)
        layers = bb.forward_layers(x, [0, depth - 1])
    want = reference_layers(source, x, [0, depth - 1])
    n = bb.grid_size[0] * bb.grid_size[1]
    assert tokens.shape == (2, n + bb.num_global_tokens, bb.embed_dim)
    if not isinstance(fm, SamViTB):  # timm's own features (final norm, prefix tokens first)
        with torch.no_grad():
            features = source.forward_features(x)
        g = bb.num_global_tokens
        torch.testing.assert_close(tokens, torch.cat([features[:, g:], features[:, :g]], 1))
    torch.testing.assert_close(tokens, want[1])
    for got, ref in zip(layers, want):
        torch.testing.assert_close(got, ref)


def test_teacher_is_taken_not_student(tmp_path):
    path, fm, source = write_case(tmp_path, "visionfm")
    bb, _, _ = build_backbone(path, pretrain_size(fm), fm=fm)
    assert torch.equal(bb.vit.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)


def test_fc_norm_only_checkpoint_gives_unnormalised_tokens(tmp_path):
    """A RETFound fine-tuned with global pooling: fc_norm + head, no norm."""
    def finetuned(payload):
        model = payload["model"]
        model["fc_norm.weight"] = model.pop("norm.weight")
        model["fc_norm.bias"] = model.pop("norm.bias")
        model["head.weight"], model["head.bias"] = torch.randn(5, 32), torch.randn(5)

    path, fm, source = write_case(tmp_path, "retfound", mutate=finetuned)
    bb, _, report = build_backbone(path, pretrain_size(fm), fm=fm)
    assert "fc_norm (2)" in report and "head (2)" in report and "no final norm" in report
    source.norm = nn.Identity()
    x = torch.randn(1, 3, *pretrain_size(fm))
    with torch.no_grad():
        torch.testing.assert_close(bb.eval()(x), reference_layers(source, x, [2])[0])


# ----------------------------------------------------------------------------- resampling
@pytest.mark.parametrize("case, input_size", [
    ("retfound", (96, 128)),      # 4x4 -> 6x8
    ("retfound", (32, 128)),      # 4x4 -> 2x8: same token count, still resampled
])  # every family's own rule, at native and other sizes: tests/test_families.py
def test_vit_pos_embed_resampled_to_tuning_grid(tmp_path, case, input_size):
    path, fm, source = write_case(tmp_path, case)
    bb, _, report = build_backbone(path, input_size, fm=fm)
    p = fm.default_patch_size
    grid = (input_size[0] // p, input_size[1] // p)
    assert bb.grid_size == grid
    stored = source.pos_embed.detach()
    prefix = stored.shape[1] - GRID * GRID
    patch_pos = stored[:, prefix:].reshape(1, GRID, GRID, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(patch_pos, size=grid, mode="bicubic", align_corners=False)
    expected = torch.cat([stored[:, :prefix], resized.flatten(2).transpose(1, 2)], dim=1)
    torch.testing.assert_close(bb.vit.pos_embed.detach(), expected)
    assert f"position embedding resampled {GRID}x{GRID} -> {grid[0]}x{grid[1]}" in report
    with torch.no_grad():
        tokens = bb(torch.randn(1, 3, *input_size))
    assert tokens.shape == (1, grid[0] * grid[1] + bb.num_global_tokens, 32)


def test_sam_at_another_size_matches_sam_run_at_that_size(tmp_path):
    """Resampling at load time = what timm's SAM (like SAM itself) does at run time."""
    path, fm, source = write_case(tmp_path, "medsam")
    bb, _, report = build_backbone(path, (96, 64), fm=fm)
    assert bb.grid_size == (6, 4) and bb.num_global_tokens == 0
    assert bb.sam.blocks[1].attn.rel_pos_h.shape[0] == 2 * 6 - 1  # global block
    assert bb.sam.blocks[1].attn.rel_pos_w.shape[0] == 2 * 4 - 1
    assert "position embedding resampled 8x8 -> 6x4" in report
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        layers = bb.eval().forward_layers(x, [1, 3])
    for got, want in zip(layers, reference_layers(source, x, [1, 3])):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_patch_size_change_resamples_projection(tmp_path):
    path, fm, _ = write_case(tmp_path, "retfound")
    bb, _, report = build_backbone(path, 64, patch_size=8, fm=fm)
    assert bb.patch_size == (8, 8) and bb.grid_size == (8, 8)
    assert bb.vit.patch_embed.proj.weight.shape == (32, 3, 8, 8)
    assert "patch projection resampled 16x16 -> 8x8" in report


# ----------------------------------------------------------------------------- errors
def pop(wrapper, key):
    return lambda p: (p[wrapper] if wrapper else p).pop(key)


def put(wrapper, key, value):
    return lambda p: (p[wrapper] if wrapper else p).__setitem__(key, value)


@pytest.mark.parametrize("case, mutate, message", [
    ("retfound", pop("model", "blocks.1.attn.qkv.weight"),
     "encoder tensor blocks.1.attn.qkv.weight is missing"),
    ("retfound", put("model", "blocks.0.mlp.fc1.weight", torch.zeros(3, 3)),
     r"tensor blocks.0.mlp.fc1.weight has shape \(3, 3\)"),
    ("retfound", put("model", "pos_embed", torch.zeros(1, 17, 48)),
     r"tensor pos_embed has shape \(1, 17, 48\)"),
    ("retfound", put("model", "blocks.7.norm1.weight", torch.zeros(32)),
     "tensor blocks.7.norm1.weight does not exist"),
    ("retfound_dinov2", pop("teacher", "backbone.blocks.0.ls1.gamma"),
     "backbone.blocks.0.ls1.gamma is missing"),
    ("dinov2_b_reg", pop(None, "register_tokens"), "register_tokens is missing"),
    ("dinov2_g", put(None, "blocks.1.mlp.w12.weight", torch.zeros(4, 32)),
     "tensor blocks.1.mlp.w12.weight has shape"),
    ("sam", pop(None, "image_encoder.blocks.1.attn.rel_pos_h"),
     "image_encoder.blocks.1.attn.rel_pos_h is missing"),
    ("medsam", put(None, "image_encoder.blocks.0.mlp.lin1.weight", torch.zeros(2, 2)),
     "tensor image_encoder.blocks.0.mlp.lin1.weight has shape"),
    ("visionfm", pop("teacher", "module.backbone.norm.weight"),
     "module.backbone.norm.weight is missing"),
])
def test_bad_encoder_tensor_is_an_error_naming_it(tmp_path, case, mutate, message):
    path, fm, _ = write_case(tmp_path, case, mutate=mutate)
    with pytest.raises(UserError, match=message):
        build_backbone(path, pretrain_size(fm), fm=fm)


def test_register_file_for_a_model_without_registers_is_an_error(tmp_path):
    path, _, _ = write_case(tmp_path, "dinov2_b_reg")
    with pytest.raises(UserError, match="register_tokens does not exist in DINOv2 ViT-S/14"):
        build_backbone(path, 56, fm=tiny(Dinov2Small))


# ----------------------------------------------------------------------------- registry
@pytest.mark.parametrize("file_name, family", [
    ("RETFound_cfp_weights.pth", RetFound),
    ("RETFound_mae_natureOCT.pth", RetFound),
    ("RETFound_dinov2_meh.pth", RetFoundDinov2),         # longest keyword beats "retfound"
    ("dinov2_vits14_pretrain.pth", Dinov2Small),
    ("dinov2_vits14_reg4_pretrain.pth", Dinov2SmallReg),  # "_reg" beats "dinov2_vits14"
    ("dinov2_vitb14_reg4_pretrain.pth", Dinov2BaseReg),
    ("dinov2_vitl14_pretrain.pth", Dinov2Large),
    ("dinov2_vitg14_reg4_pretrain.pth", Dinov2GiantReg),
    ("sam_vit_b_01ec64.pth", SamViTB),
    ("medsam_vit_b.pth", MedSam),                         # also contains "sam_vit_b"
    ("MedSAM-ViT-B.pth", MedSam),
    ("VisionFM_Fundus_teacher.pth", VisionFMFundus),
    ("VFM_OCT_weights.pth", VisionFMOCT),                 # as the authors publish it
    ("MIRAGE-Base.pth", MirageBase),
])
def test_file_name_selects_family(file_name, family):
    assert type(find_model(file_name)) is family


def test_families_declare_their_input():
    assert (MedSam.norm, MedSam.in_chans) == ("minmax", 3)
    for family in (RetFound, RetFoundDinov2, Dinov2Small, SamViTB):
        assert (family.norm, family.in_chans) == ("imagenet", 3)
    assert (VisionFMOCT.norm, VisionFMOCT.in_chans) == ("visionfm_oct", 3)
    assert (RetFound.default_patch_size, Dinov2Small.default_patch_size) == (16, 14)


# ----------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("decoder", ["convnext", "dpt"])
def test_engine_builds_a_working_segmentation_model(tmp_path, decoder):
    path, fm, _ = write_case(tmp_path, "dinov2_b_reg")  # 5 global tokens to leave out
    config, _, _ = parse_config(["--weights", str(path), "--data_path", str(tmp_path),
                                 "--output_adapter", decoder])  # frozen blocks (default)
    model, report = build_from_options(config, fm=fm, input_size=(56, 84), patch_size=(14, 14))
    assert "loaded" in report and model.backbone.grid_size == (4, 6)
    logits = model(torch.randn(2, 3, 56, 84))
    assert logits.shape == (2, 3, 56, 84)
    logits.square().mean().backward()
    vit = model.backbone.vit
    assert all(p.grad is None for p in vit.blocks.parameters())  # frozen
    assert vit.cls_token.grad is not None and vit.patch_embed.proj.weight.grad is not None
    assert not vit.pos_embed.requires_grad
    groups = param_groups(model, 0.05, 0.75)
    layer_of = {n: g["layer_id"] for g in groups for n in g["names"]}
    assert layer_of["backbone.vit.cls_token"] == 0
    assert all(layer == model.backbone.depth + 1 for n, layer in layer_of.items()
               if n.startswith("decoder."))
    no_decay = {n for g in groups if g["wd_scale"] == 0 for n in g["names"]}
    assert {"backbone.vit.cls_token", "backbone.vit.reg_token"} <= no_decay
