"""Parameter groups (layer decay, no-decay sets) and the cosine schedules, against the
original's rules written out in the tests."""
import math

import numpy as np
import pytest
import torch

from fm_seg_config import MirageTiny
from mirage.models.segmentation_model import SegmentationModel
from mirage.models.decoders import build_decoder, names
from mirage.errors import UserError
from conftest import optim_spec
from mirage.train.optim import (apply_schedule, build_optimizer, cosine_schedule, param_groups,
                                warmup_steps)


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
    # the class embeddings decay like any other decoder weight, as in the original
    head = group_of(groups, "decoder.cls_emb")
    assert head["lr_scale"] == 1.0 and head["wd_scale"] == pytest.approx(0.1)
    assert group_of(groups, "decoder.patch_proj.weight")["wd_scale"] == pytest.approx(0.1)
    names_ = [n for g in groups for n in g["names"]]
    assert len(names_) == len(set(names_))
    # the fixed position embedding is not trained at all
    assert "backbone.input_adapter.pos_emb" not in names_


@pytest.mark.parametrize("decoder", names())
def test_decoder_weight_decay_follows_the_original_rule(decoder):
    """Every decoder parameter decays unless it is 1-D or a bias (the original's rule; no
    decoder adds names of its own), and learns at the full LR (layer id L + 1)."""
    model = tiny_model(decoder=decoder)
    groups = param_groups(model, 0.05, layer_decay=0.5)
    decoder_params = {n: p for n, p in model.named_parameters() if n.startswith("decoder.")}
    assert decoder_params
    for name, param in decoder_params.items():
        group = group_of(groups, name)
        no_decay = param.ndim == 1 or name.endswith(".bias")
        assert group["wd_scale"] == (0.0 if no_decay else 1.0), name
        assert group["lr_scale"] == 1.0 and group["layer_id"] == 5, name


def test_frozen_blocks_are_not_in_the_optimiser():
    groups = param_groups(tiny_model(freeze=True), 0.05, 0.75)
    names = {n for g in groups for n in g["names"]}
    assert not any(n.startswith("backbone.blocks.") for n in names)
    assert {"backbone.input_adapter.proj.weight", "backbone.global_tokens"} <= names


def test_no_lr_scale_list():
    groups = param_groups(tiny_model(), 0.05, 0.5, no_lr_scale=["input_adapter"])
    assert group_of(groups, "backbone.input_adapter.proj.weight")["lr_scale"] == 1.0
    assert group_of(groups, "backbone.global_tokens")["lr_scale"] == 0.5 ** 5
    exact = param_groups(tiny_model(), 0.05, 0.5, no_lr_scale=["backbone.global_tokens", ""])
    assert group_of(exact, "backbone.global_tokens")["lr_scale"] == 1.0  # full names work
    with pytest.raises(UserError, match="'backbone.blocks' is in no trainable"):
        param_groups(tiny_model(freeze=True), 0.05, 0.5, no_lr_scale=["backbone.blocks"])


def test_cosine_schedule_warmup_from_zero_with_the_endpoint():
    """The original: np.linspace(0, base, W) (both ends), then the cosine from base over
    the T = total - W remaining steps: final + (base - final)/2 (1 + cos(pi t / T))."""
    values = cosine_schedule(1e-4, 0.0, total=3 * 4, warmup=1 * 4)
    assert len(values) == 12
    np.testing.assert_array_equal(values[:4], [0.0, 1e-4 / 3, 2e-4 / 3, 1e-4])
    assert values[4] == 1e-4                                          # base twice
    for t in range(8):
        assert values[4 + t] == 0.5 * 1e-4 * (1 + math.cos(math.pi * t / 8))
    started = cosine_schedule(1.0, 0.0, 2 * 5, warmup=5, warmup_start=0.2)
    np.testing.assert_allclose(started[:5], [0.2, 0.4, 0.6, 0.8, 1.0], rtol=0, atol=1e-15)
    steps = cosine_schedule(1.0, 0.0, 2 * 5, warmup=3)
    np.testing.assert_array_equal(steps[:4], [0.0, 0.5, 1.0, 1.0])
    assert len(cosine_schedule(1.0, 0.0, 1 * 4, warmup=3 * 4)) == 4  # warmup capped
    flat = cosine_schedule(0.05, 0.05, 2 * 3)
    assert np.all(flat == 0.05)


@pytest.mark.parametrize("opt, cls", [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam),
                                      ("sgd", torch.optim.SGD), ("momentum", torch.optim.SGD)])
def test_optimizers_and_schedule_application(opt, cls):
    groups = param_groups(tiny_model(), 0.05, 0.5)
    optimizer = build_optimizer(groups, optim_spec(opt=opt, lr=1e-3))
    assert isinstance(optimizer, cls)
    if opt in ("sgd", "momentum"):
        assert optimizer.defaults["nesterov"] == (opt == "sgd")
    apply_schedule(optimizer, 2e-3, 0.1)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(2e-3 * group["lr_scale"])
        assert group["weight_decay"] == pytest.approx(0.1 * group["wd_scale"])


def test_warmup_steps_override_warmup_epochs():
    assert warmup_steps(optim_spec(warmup_epochs=2, warmup_steps=-1), 5) == 10
    assert warmup_steps(optim_spec(warmup_epochs=2, warmup_steps=3), 5) == 3
    assert warmup_steps(optim_spec(warmup_epochs=0, warmup_steps=0), 5) == 0
