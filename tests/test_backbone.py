"""Loading MIRAGE checkpoints: reference tokens, the published layouts, and bad files."""
import json

import numpy as np
import pytest
import torch

from conftest import DATA
from fm_seg_config import MirageLarge, MirageTiny, build_backbone, find_model, load_backbone
from mirage import checkpoint_io as ckpt
from mirage.errors import UserError
from mirage.models.mirage_checkpoint import from_checkpoint_key


def test_reference_tokens_reproduced(base_layout_checkpoint):
    """The encoder computes what the original MIRAGE-Base computes (257 x 768 tokens)."""
    bb = load_backbone(base_layout_checkpoint, input_size=512)
    image = torch.from_numpy(np.load(DATA / "bscan_512.npy"))[None, None]
    expected = np.load(DATA / "mirage_base_tokens_512.npy")
    with torch.no_grad():
        tokens = bb(image)
    assert tokens.shape == (1, 257, 768)
    np.testing.assert_allclose(tokens[0].numpy(), expected, atol=1e-4, rtol=0)
    assert (bb.in_chans, bb.embed_dim, bb.grid_size, bb.num_global_tokens) == \
        (1, 768, (16, 16), 1)
    assert not bb.training


def test_base_layout_loads_every_encoder_tensor_and_resamples(base_layout_checkpoint):
    spec = json.loads((DATA / "mirage_base_keys.json").read_text())["model"]
    bb, fm, report = build_backbone(base_layout_checkpoint, input_size=(1024, 768))
    assert fm.name == "MIRAGE-Base" and bb.grid_size == (32, 24)
    stored = ckpt.load_file(base_layout_checkpoint)["model"]
    used = {k for k in spec if k.startswith(("input_adapters.bscan.", "encoder.",
                                             "global_tokens"))}
    state = bb.state_dict()
    assert len(state) == len(used) and f"loaded {len(used)} encoder tensors" in report
    for key in used:
        name = from_checkpoint_key(key)
        if key != "input_adapters.bscan.pos_emb":
            assert torch.equal(state[name], stored[key]), key
    # bicubic, align_corners=False resampling of the stored 16x16 grid
    expected = torch.nn.functional.interpolate(
        stored["input_adapters.bscan.pos_emb"], size=(32, 24), mode="bicubic",
        align_corners=False)
    assert torch.allclose(state["input_adapter.pos_emb"], expected)
    assert "output_adapters.bscan (49)" in report


def test_large_layout_shapes(tmp_path):
    """Every encoder tensor of the published MIRAGE-Large layout fits MIRAGE-Large."""
    spec = json.loads((DATA / "mirage_large_keys.json").read_text())["model"]
    bb = MirageLarge().build((512, 512), (32, 32), 1)
    state = bb.state_dict()
    used = {from_checkpoint_key(k): tuple(s) for k, s in spec.items()
            if from_checkpoint_key(k) is not None}
    assert set(used) == set(state)
    assert all(tuple(state[n].shape) == s for n, s in used.items())


def test_file_name_selects_model(tmp_path):
    assert find_model("x/MIRAGE-Base.pth").name == "MIRAGE-Base"
    assert find_model("mirage-large_v2.safetensors").name == "MIRAGE-Large"
    assert find_model("Mirage-Tiny.pth").name == "MIRAGE-Tiny"
    with pytest.raises(UserError, match="matches no known model.*mirage-base"):
        find_model("resnet50.pth")


def test_safetensors_with_model_prefix(tmp_path, tiny_weights):
    from safetensors.torch import save_file
    state = ckpt.load_file(tiny_weights)["model"]
    path = tmp_path / "MIRAGE-Tiny.safetensors"
    save_file({f"model.{k}": v.contiguous() for k, v in state.items()}, str(path))
    a = load_backbone(path, input_size=64)
    b = load_backbone(tiny_weights, input_size=64)
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_patch_size_change_resamples_projection(tiny_weights):
    bb, _, _ = build_backbone(tiny_weights, input_size=64, patch_size=16)
    assert bb.input_adapter.proj.weight.shape[-2:] == (16, 16) and bb.grid_size == (4, 4)


def test_tokens_order_patch_first_then_global(tiny_weights):
    bb = load_backbone(tiny_weights, input_size=(64, 96))
    with torch.no_grad():
        tokens = bb(torch.rand(2, 1, 64, 96))
    assert tokens.shape == (2, 2 * 3 + 1, MirageTiny.embed_dim)


@pytest.mark.parametrize("mutate, message", [
    (lambda m: m.pop("encoder.2.attn.qkv.weight"), "encoder.2.attn.qkv.weight is missing"),
    (lambda m: m.__setitem__("encoder.0.mlp.fc1.weight", torch.zeros(3, 3)),
     "encoder.0.mlp.fc1.weight has shape"),
    (lambda m: m.__setitem__("global_tokens", torch.zeros(1, 2, MirageTiny.embed_dim)),
     "--num_global_tokens"),
    (lambda m: m.__setitem__("encoder.9.norm1.weight", torch.zeros(MirageTiny.embed_dim)),
     "encoder.9.norm1.weight does not exist"),
])
def test_bad_checkpoint_tensors_are_errors(tmp_path, tiny_weights, mutate, message):
    payload = ckpt.load_file(tiny_weights)
    mutate(payload["model"])
    path = tmp_path / "MIRAGE-Tiny.pth"
    torch.save(payload, path)
    with pytest.raises(UserError, match=message):
        build_backbone(path, input_size=64, num_global_tokens=1)


def test_bad_weight_files(tmp_path, tiny_weights):
    with pytest.raises(UserError, match="file not found"):
        build_backbone(tmp_path / "MIRAGE-Base.pth", 64)
    not_ckpt = tmp_path / "MIRAGE-Tiny.pth"
    not_ckpt.write_text("hello")
    with pytest.raises(UserError, match="not a PyTorch checkpoint"):
        build_backbone(not_ckpt, 64)
    unknown = tmp_path / "resnet50.pth"
    unknown.write_bytes(tiny_weights.read_bytes())
    with pytest.raises(UserError, match="matches no known model"):
        build_backbone(unknown, 64)


class Payload:
    """Unpickling this would call os.system: weights_only loading must refuse it."""

    def __reduce__(self):
        import os
        return os.system, ("echo pwned",)


def test_checkpoint_needing_code_is_refused(tmp_path):
    path = tmp_path / "MIRAGE-Tiny.pth"
    torch.save({"model": {}, "evil": Payload()}, path)
    with pytest.raises(UserError, match="arbitrary code"):
        ckpt.load_file(path)


def test_checkpoint_with_namespace_args_loads(base_layout_checkpoint):
    payload = ckpt.load_file(base_layout_checkpoint)
    assert payload["args"].patch_size == 32


def test_input_size_must_fit_the_models_own_patch_size(tiny_weights):
    with pytest.raises(UserError, match="--input_size 100x100 is not divisible by the patch "
                                        "size 32x32 of MIRAGE-Tiny"):
        build_backbone(tiny_weights, input_size=100)
