"""Parameter groups (layer decay, no-decay sets) and the cosine schedules."""
import math

import numpy as np
import pytest
import torch

from fm_seg_config import MirageTiny
from mirage.model import SegmentationModel
from mirage.optim import apply_schedule, build_optimizer, cosine_schedule, param_groups
from mirage.output_adapters import build_decoder


def tiny_model(freeze=True, decoder="segmenter"):
    backbone = MirageTiny().build((64, 64), (16, 16), 1)
    dec = build_decoder(decoder, embed_dim=MirageTiny.embed_dim, num_classes=3,
                        grid_size=(4, 4), patch_size=(16, 16), image_size=(64, 64),
                        encoder_depth=backbone.depth)
    model = SegmentationModel(backbone, dec)
    if freeze:
        model.freeze_blocks()
    return model


def group_of(groups, name):
    return next(g for g in groups if name in g["names"])


def test_layer_decay_scales_and_no_decay_sets():
    model = tiny_model(freeze=False)
    groups = param_groups(model, 0.05, layer_decay=0.5, decoder_decay=0.1)
    depth = 4
    proj = group_of(groups, "backbone.input_adapter.proj.weight")
    assert proj["lr_scale"] == pytest.approx(0.5 ** (depth + 1)) and proj["wd_scale"] == 1
    assert group_of(groups, "backbone.global_tokens")["wd_scale"] == 0
    block = group_of(groups, "backbone.blocks.2.attn.qkv.weight")
    assert block["lr_scale"] == pytest.approx(0.5 ** (depth + 1 - 3)) and block["wd_scale"] == 1
    assert group_of(groups, "backbone.blocks.2.attn.qkv.bias")["wd_scale"] == 0
    assert group_of(groups, "backbone.blocks.0.norm1.weight")["wd_scale"] == 0
    head = group_of(groups, "decoder.cls_emb")
    assert head["lr_scale"] == 1.0 and head["wd_scale"] == 0
    dec_weight = next(n for n, p in model.named_parameters()
                      if n.startswith("decoder.") and p.ndim == 2 and n != "decoder.cls_emb")
    assert group_of(groups, dec_weight)["wd_scale"] == pytest.approx(0.1)
    names = [n for g in groups for n in g["names"]]
    assert len(names) == len(set(names))
    # the fixed position embedding is not trained at all
    assert "backbone.input_adapter.pos_emb" not in names


def test_frozen_blocks_are_not_in_the_optimiser():
    groups = param_groups(tiny_model(freeze=True), 0.05, 0.75)
    names = {n for g in groups for n in g["names"]}
    assert not any(n.startswith("backbone.blocks.") for n in names)
    assert {"backbone.input_adapter.proj.weight", "backbone.global_tokens"} <= names


def test_no_lr_scale_list():
    groups = param_groups(tiny_model(), 0.05, 0.5, no_lr_scale=["input_adapter"])
    assert group_of(groups, "backbone.input_adapter.proj.weight")["lr_scale"] == 1.0


def test_cosine_schedule_with_warmup():
    values = cosine_schedule(1e-4, 0.0, epochs=3, steps_per_epoch=10, warmup_epochs=1,
                             warmup_start=1e-6)
    assert len(values) == 30
    assert values[0] == pytest.approx(1e-6)
    assert np.all(np.diff(values[:10]) > 0)
    assert values[10] == pytest.approx(1e-4)                          # cosine starts at base
    assert values[20] == pytest.approx(0.5 * 1e-4)                    # halfway down
    assert values[29] == pytest.approx(0.5 * 1e-4 * (1 + math.cos(math.pi * 19 / 20)))
    steps = cosine_schedule(1.0, 0.0, 2, 5, warmup_epochs=1, warmup_steps=2)
    assert steps[0] == 0.0 and steps[2] == 1.0                        # steps override epochs
    flat = cosine_schedule(0.05, 0.05, 2, 3)
    assert np.allclose(flat, 0.05)


@pytest.mark.parametrize("opt, cls", [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam),
                                      ("sgd", torch.optim.SGD), ("momentum", torch.optim.SGD)])
def test_optimizers_and_schedule_application(opt, cls):
    groups = param_groups(tiny_model(), 0.05, 0.5)
    optimizer = build_optimizer(groups, opt, 1e-3)
    assert isinstance(optimizer, cls)
    if opt in ("sgd", "momentum"):
        assert optimizer.defaults["nesterov"] == (opt == "sgd")
    apply_schedule(optimizer, 2e-3, 0.1)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(2e-3 * group["lr_scale"])
        assert group["weight_decay"] == pytest.approx(0.1 * group["wd_scale"])
