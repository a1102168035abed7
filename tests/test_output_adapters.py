"""The segmentation decoders (mirage/decoders/): registry, shapes, wiring, the original's
structure, parameter counts and initialisation (tiny dims on CPU unless a count is pinned)."""
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO
from mirage.models import decoders
from mirage.options import OPTION_BY_NAME
from mirage.models.decoders import build_decoder, names
from mirage.models.decoders.dpt import dpt_layer_indices

PATCH = (16, 16)
DECODERS = names()


def _build(name, *, dim=32, classes=3, grid=(2, 3), depth=4, patch=PATCH, **kwargs):
    image = (grid[0] * patch[0], grid[1] * patch[1])
    return build_decoder(name, embed_dim=dim, num_classes=classes, grid_size=grid,
                         patch_size=patch, image_size=image, encoder_depth=depth, **kwargs)


def _features(decoder, batch=2, seed=0):
    """One (B, N, D) token tensor per hooked block, as the segmentation model passes them."""
    gen = torch.Generator().manual_seed(seed)
    n = decoder.grid_size[0] * decoder.grid_size[1]
    return [torch.randn(batch, n, decoder.embed_dim, generator=gen)
            for _ in decoder.layer_indices]


@pytest.fixture(scope="module")
def paper_convnext():
    """The paper's decoder for MIRAGE-Base: D = 768, 9 classes, 1024 input, patch 32."""
    torch.manual_seed(0)
    return build_decoder("convnext", embed_dim=768, num_classes=9, grid_size=32,
                         patch_size=32, image_size=1024, encoder_depth=12)


# ----------------------------------------------------------------------------- registry
def test_registry_is_the_module_files_and_lists_them_without_torch():
    files = sorted(p.stem for p in (REPO / "mirage" / "models" / "decoders").glob("*.py")
                   if not p.stem.startswith("_"))
    assert list(DECODERS) == files
    assert {"convnext", "convnext_ls", "linear", "segmenter", "dpt"} <= set(DECODERS)
    assert list(OPTION_BY_NAME["output_adapter"].choices) == files
    assert OPTION_BY_NAME["output_adapter"].default == "convnext"
    code = ("import sys; import mirage.config, mirage.models.decoders as d; "
            "print(','.join(d.names()), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == [",".join(files), "False"]


def test_unknown_decoder_raises_listing_choices():
    with pytest.raises(ValueError, match="convnext, convnext_ls, dpt, linear, segmenter"):
        _build("unet")


@pytest.mark.parametrize("kwargs,match", [
    (dict(interpolate_mode="bicubic"), "interpolate_mode"),
    (dict(patch=(32, 16)), "does not give image size"),
])
def test_bad_options_raise(kwargs, match):
    grid = (2, 3)
    patch = kwargs.pop("patch", PATCH)
    with pytest.raises(ValueError, match=match):
        build_decoder("linear", embed_dim=32, num_classes=3, grid_size=grid, patch_size=patch,
                      image_size=(32, 48), encoder_depth=4, **kwargs)


# ----------------------------------------------------------------------------- shapes, wiring
@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize("grid,classes", [((2, 2), 2), ((2, 3), 5), ((3, 2), 9)])
def test_output_shape_square_and_non_square(name, grid, classes):
    decoder = _build(name, classes=classes, grid=grid).eval()
    with torch.no_grad():
        out = decoder(_features(decoder))
    assert out.shape == (2, classes, grid[0] * 16, grid[1] * 16)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_patch_32_non_square_image_and_odd_embed_dim(name, mode):
    # 64x96 image, patch 32 -> grid 2x3 (odd: DPT's 0.5x map does not double back).
    decoder = _build(name, dim=40, classes=4, grid=(2, 3), patch=(32, 32),
                     interpolate_mode=mode).eval()
    with torch.no_grad():
        out = decoder(_features(decoder, batch=1))
    assert out.shape == (1, 4, 64, 96)


@pytest.mark.parametrize("name", DECODERS)
def test_gradients_reach_every_parameter(name):
    # drop_path=0: a dropped residual branch would get no gradient.
    torch.manual_seed(0)
    decoder = _build(name, dim=32, classes=3, grid=(2, 3), drop_path=0.0).train()
    features = _features(decoder)
    target = torch.randint(0, 3, (2, 32, 48))
    F.cross_entropy(decoder(features), target).backward()
    for pname, param in decoder.named_parameters():
        assert param.grad is not None, f"{name}: {pname} gets no gradient"
        assert torch.isfinite(param.grad).all(), f"{name}: {pname} has non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{name}: {pname} has an all-zero gradient"


@pytest.mark.parametrize("name", ["convnext", "convnext_ls", "segmenter"])
def test_drop_path_reaches_the_residual_blocks(name):
    torch.manual_seed(0)
    decoder = _build(name, drop_path=0.5)
    features = _features(decoder, batch=4)
    with torch.no_grad():
        decoder.train()
        assert not torch.equal(decoder(features), decoder(features))  # stochastic depth on
        decoder.eval()
        torch.testing.assert_close(decoder(features), decoder(features))


def test_default_drop_path_is_the_originals():
    """ConvNeXt: none; Segmenter: 0 in block 1, 0.1 in block 2."""
    convnext = _build("convnext")
    assert all(isinstance(b.drop_path, torch.nn.Identity) for b in convnext.blocks)
    segmenter = _build("segmenter")
    assert isinstance(segmenter.blocks[0].drop_path1, torch.nn.Identity)
    assert segmenter.blocks[1].drop_path1.drop_prob == pytest.approx(0.1)


@pytest.mark.parametrize("depth,expected", [
    (12, (2, 5, 8, 11)), (24, (5, 11, 17, 23)), (4, (0, 1, 2, 3)), (6, (0, 2, 3, 5)),
    (3, (0, 1, 2, 2)), (2, (0, 0, 1, 1)), (1, (0, 0, 0, 0))])
def test_dpt_layer_indices(depth, expected):
    assert dpt_layer_indices(depth) == expected
    assert _build("dpt", depth=depth).layer_indices == expected


@pytest.mark.parametrize("name", ["convnext", "convnext_ls", "linear", "segmenter"])
@pytest.mark.parametrize("depth", [1, 12, 24])
def test_single_feature_decoders_use_the_last_block(name, depth):
    assert _build(name, depth=depth).layer_indices == (depth - 1,)


def test_dpt_consumes_four_distinct_features():
    decoder = _build("dpt", grid=(2, 3)).eval()
    features = _features(decoder, batch=1)
    with torch.no_grad():
        base = decoder(features)
        for i in range(4):
            perturbed = [f.clone() for f in features]
            perturbed[i] += 0.5 * torch.randn_like(perturbed[i])
            change = (decoder(perturbed) - base).abs().max()
            assert change > 1e-4, f"feature {i} does not affect the output"


def test_nearest_mode_copies_grid_cells():
    # A linear probe with nearest resize paints each patch with one value per class.
    decoder = _build("linear", grid=(2, 3), interpolate_mode="nearest").eval()
    with torch.no_grad():
        out = decoder(_features(decoder, batch=1))[0]
    blocks = out.reshape(3, 2, 16, 3, 16)
    assert torch.equal(blocks, blocks[:, :, :1, :, :1].expand_as(blocks))
    assert not torch.equal(blocks[:, 0, 0, 0, 0], blocks[:, 1, 0, 2, 0])  # cells differ


def test_wrong_token_count_is_reported():
    decoder = _build("convnext", grid=(2, 3))
    with pytest.raises(ValueError, match=r"\(B, 6, 32\)"):
        decoder([torch.randn(1, 9, 32)])


# ----------------------------------------------------------------------------- ConvNeXt
def test_paper_convnext_parameter_count(paper_convnext):
    """The original's count for MIRAGE-Base with 9 classes, by hand:
    Linear 768 -> 16*384: 768*6144 + 6144 = 4,724,736; per block (C = 384): depthwise
    7x7 384*49 + 384 = 19,200, LayerNorm 768, Linear 384 -> 1536: 591,360, Linear
    1536 -> 384: 590,208, together 1,201,536, x4 = 4,806,144; 1x1 conv 384*9 + 9 = 3,465.
    """
    assert sum(p.numel() for p in paper_convnext.parameters()) == 9_534_345
    assert not any("gamma" in n for n, _ in paper_convnext.named_parameters())  # no layer scale


def test_layer_scale_variant_adds_only_the_gammas():
    ls = build_decoder("convnext_ls", embed_dim=768, num_classes=9, grid_size=32,
                       patch_size=32, image_size=1024, encoder_depth=12)
    gammas = {n: p for n, p in ls.named_parameters() if "gamma" in n}
    assert len(gammas) == 4 and all(torch.all(g == 1e-6) for g in gammas.values())
    assert sum(p.numel() for p in ls.parameters()) == 9_534_345 + 4 * 384


def _uniform_std(bound):
    return bound / math.sqrt(3)


def test_paper_convnext_initialisation_is_the_originals(paper_convnext):
    """Linear: Xavier-uniform, bound sqrt(6 / (fan_in + fan_out)), zero bias. Conv:
    PyTorch's default, weights and biases uniform within 1 / sqrt(fan_in), biases non-zero.
    LayerNorm: weight 1, bias 0."""
    seen = set()
    for name, m in paper_convnext.named_modules():
        if isinstance(m, torch.nn.Linear):
            bound = math.sqrt(6 / (m.in_features + m.out_features))
            w = m.weight.detach()
            assert w.abs().max() <= bound
            assert w.std().item() == pytest.approx(_uniform_std(bound), rel=0.02), name
            assert torch.all(m.bias == 0), name
            seen.add("linear")
        elif isinstance(m, torch.nn.Conv2d):
            fan_in = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            bound = 1 / math.sqrt(fan_in)
            w, b = m.weight.detach(), m.bias.detach()
            assert w.abs().max() <= bound and b.abs().max() <= bound, name
            assert w.std().item() == pytest.approx(_uniform_std(bound), rel=0.05), name
            assert (b != 0).all(), name
            seen.add("conv")
        elif isinstance(m, torch.nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0) and m.eps == 1e-6
            seen.add("norm")
    assert seen == {"linear", "conv", "norm"}


def test_initial_output_statistics():
    """Unit-normal tokens: the projection's std is sqrt(D * 2 / (D + 16 * 384)) (Xavier,
    = 0.4714 at D = 768); the paper's blocks change the map at once (no layer scale),
    while the layer-scale variant's blocks start as the identity to ~1e-6."""
    def measure(name):
        torch.manual_seed(1)
        decoder = build_decoder(name, embed_dim=768, num_classes=9, grid_size=8,
                                patch_size=32, image_size=256, encoder_depth=12)
        captured = {}
        decoder.blocks.register_forward_hook(
            lambda m, i, o: captured.update(before=i[0], after=o))
        tokens = torch.randn(2, 64, 768)
        with torch.no_grad():
            proj = decoder.proj_dec(tokens)
            logits = decoder([tokens])
        assert logits.shape == (2, 9, 256, 256) and torch.isfinite(logits).all()
        change = (captured["after"] - captured["before"]).norm() / captured["before"].norm()
        return proj.std().item(), change.item()

    std, change = measure("convnext")
    assert std == pytest.approx(math.sqrt(768 * 2 / (768 + 6144)), rel=0.01)
    assert change > 0.5
    ls_std, ls_change = measure("convnext_ls")
    assert ls_std == pytest.approx(0.02 * math.sqrt(768), rel=0.01)  # timm cuts at +-2, not 2 std
    assert ls_change < 1e-4


def _reference_convnext(decoder, tokens):
    """The original ConvNeXt adapter written out from its rule with plain functions:
    Linear; token n = (r, q)'s feature (4 i + j) * C + c -> map[c, 4r + i, 4q + j]; per
    block x + fc2(gelu(fc1(LN(dwconv7x7(x))))); 1x1 conv; bilinear resize."""
    sd = {k: v.detach() for k, v in decoder.state_dict().items()}
    b = tokens.shape[0]
    gh, gw = decoder.grid_size
    c = sd["final_layer.weight"].shape[1]
    feats = tokens @ sd["proj_dec.weight"].T + sd["proj_dec.bias"]
    x = torch.zeros(b, c, 4 * gh, 4 * gw)
    for r in range(gh):
        for q in range(gw):
            for i in range(4):
                for j in range(4):
                    p = 4 * i + j
                    x[:, :, 4 * r + i, 4 * q + j] = feats[:, r * gw + q, p * c:(p + 1) * c]
    for k in range(len(decoder.blocks)):
        pre = f"blocks.{k}."
        y = F.conv2d(x, sd[pre + "dwconv.weight"], sd[pre + "dwconv.bias"], padding=3, groups=c)
        y = y.permute(0, 2, 3, 1)
        y = F.layer_norm(y, (c,), sd[pre + "norm.weight"], sd[pre + "norm.bias"], eps=1e-6)
        y = F.linear(F.gelu(F.linear(y, sd[pre + "fc1.weight"], sd[pre + "fc1.bias"])),
                     sd[pre + "fc2.weight"], sd[pre + "fc2.bias"])
        x = x + y.permute(0, 3, 1, 2)
    x = F.conv2d(x, sd["final_layer.weight"], sd["final_layer.bias"])
    return F.interpolate(x, size=decoder.image_size, mode="bilinear", align_corners=False)


def test_convnext_computes_the_originals_function():
    from mirage.models.decoders import DecoderSpec
    from mirage.models.decoders.convnext import ConvNeXtDecoder
    torch.manual_seed(0)
    spec = DecoderSpec(embed_dim=12, num_classes=3, grid_size=(2, 3), patch_size=(16, 16),
                       image_size=(32, 48), encoder_depth=2)
    decoder = ConvNeXtDecoder(spec, hidden_dim=8).eval()
    tokens = torch.randn(2, 6, 12)
    with torch.no_grad():
        torch.testing.assert_close(decoder([tokens]), _reference_convnext(decoder, tokens),
                                   atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- the others
def test_parameter_counts_of_the_other_decoders():
    """By hand. Segmenter, D = 1024 (ViT-L), 9 classes, width 768: Linear 1024 -> 768
    787,200; class embeddings 6,912; per block 7,087,872 (x2); decoder norm 1,536; two
    bias-free 768 x 768 projections 1,179,648; mask norm 18 -> 16,151,058. DPT, ViT-B,
    9 classes: reassemble 10,029,504; fusion 8,524,288 (the coarsest without a skip unit);
    head 589,824 + 2,313 -> 19,145,929. Linear probe: 768 * 9 + 9."""
    def count(name, dim):
        return sum(p.numel() for p in build_decoder(
            name, embed_dim=dim, num_classes=9, grid_size=4, patch_size=16, image_size=64,
            encoder_depth=12).parameters())
    assert count("segmenter", 1024) == 16_151_058
    assert count("dpt", 768) == 19_145_929
    assert count("linear", 768) == 6_921


def test_segmenter_initialisation_is_the_originals():
    """Xavier-uniform Linear layers (the fused qkv as three D x D matrices), zero biases,
    LayerNorm eps 1e-6, class embeddings normal std 0.02 (timm cuts at +-2)."""
    torch.manual_seed(0)
    decoder = _build("segmenter", dim=64, classes=5)
    for name, m in decoder.named_modules():
        if isinstance(m, torch.nn.Linear):
            out = m.out_features // 3 if name.endswith("qkv") else m.out_features
            bound = math.sqrt(6 / (m.in_features + out))
            assert m.weight.abs().max() <= bound, name
            assert m.weight.std().item() == pytest.approx(_uniform_std(bound), rel=0.05), name
            assert m.bias is None or torch.all(m.bias == 0), name
        elif isinstance(m, torch.nn.LayerNorm):
            assert m.eps == 1e-6, name
    assert decoder.patch_proj.bias is None and decoder.classes_proj.bias is None
    assert decoder.cls_emb.std().item() == pytest.approx(0.02, rel=0.05)


def test_segmenter_logits_are_normalised_cosine_similarities():
    """Logit (k, pixel) = LayerNorm over classes of cos(patch projection, class k projection)."""
    grid, classes = (2, 3), 4
    # Patch size 1: the image is the grid, so the final resize is the identity.
    decoder = _build("segmenter", classes=classes, grid=grid, patch=(1, 1)).eval()
    with torch.no_grad():
        decoder.mask_norm.weight.uniform_(0.5, 2.0)  # non-trivial affine, to check it too
        decoder.mask_norm.bias.uniform_(-1.0, 1.0)
    captured = {}
    decoder.decoder_norm.register_forward_hook(lambda m, i, o: captured.update(x=o))
    features = _features(decoder)
    with torch.no_grad():
        out = decoder(features)
        x = captured["x"]                                    # (B, N + K, d)
        n = grid[0] * grid[1]
        patches = x[:, :n] @ decoder.patch_proj.weight.T     # (B, N, d)
        cls = x[:, n:] @ decoder.classes_proj.weight.T       # (B, K, d)
        cos = F.cosine_similarity(patches[:, :, None], cls[:, None], dim=-1)
        ref = F.layer_norm(cos, (classes,), decoder.mask_norm.weight, decoder.mask_norm.bias,
                           eps=1e-6)
        ref = ref.permute(0, 2, 1).reshape(2, classes, *grid)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_segmenter_treats_classes_symmetrically():
    """Permuting the class embeddings permutes the output channels, nothing else."""
    decoder = _build("segmenter", classes=5, grid=(2, 3)).eval()
    features = _features(decoder)
    perm = torch.tensor([3, 0, 4, 1, 2])
    with torch.no_grad():
        base = decoder(features)
        decoder.cls_emb.copy_(decoder.cls_emb[:, perm])
        permuted = decoder(features)
    torch.testing.assert_close(permuted, base[:, perm], atol=1e-5, rtol=1e-5)


def test_decoder_base_class_is_exported_lazily():
    from mirage.models.decoders._base import Decoder
    assert decoders.Decoder is Decoder
