"""Tests for the segmentation decoders in mirage/output_adapters.py (tiny dims, CPU)."""
import pytest
import torch

from mirage.output_adapters import DECODERS, build_decoder, dpt_layer_indices

PATCH = (16, 16)


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


@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize("grid,classes", [((2, 2), 2), ((2, 3), 5), ((4, 6), 3), ((3, 2), 9)])
def test_output_shape_square_and_non_square(name, grid, classes):
    decoder = _build(name, classes=classes, grid=grid).eval()
    with torch.no_grad():
        out = decoder(_features(decoder))
    assert out.shape == (2, classes, grid[0] * 16, grid[1] * 16)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_patch_32_non_square_image_and_odd_embed_dim(name, mode):
    # 64x96 image, patch 32 -> grid 2x3; D=40 is not a multiple of 64 (Segmenter's heads).
    decoder = _build(name, dim=40, classes=4, grid=(2, 3), patch=(32, 32),
                     interpolate_mode=mode).eval()
    with torch.no_grad():
        out = decoder(_features(decoder, batch=1))
    assert out.shape == (1, 4, 64, 96)


@pytest.mark.parametrize("name", DECODERS)
def test_gradients_reach_every_parameter(name):
    # drop_path=0 keeps it deterministic: a dropped residual branch gets no gradient.
    decoder = _build(name, dim=32, classes=3, grid=(2, 3)).train()
    features = _features(decoder)
    target = torch.randint(0, 3, (2, 32, 48))
    torch.nn.functional.cross_entropy(decoder(features), target).backward()
    for pname, param in decoder.named_parameters():
        assert param.grad is not None, f"{name}: {pname} gets no gradient"
        assert torch.isfinite(param.grad).all(), f"{name}: {pname} has non-finite gradient"
        # No decoder parameter is zero-initialised in a way that blocks its own gradient.
        assert param.grad.abs().sum() > 0, f"{name}: {pname} has an all-zero gradient"


@pytest.mark.parametrize("name", ["convnext", "segmenter"])
def test_drop_path_reaches_the_residual_blocks(name):
    torch.manual_seed(0)
    decoder = _build(name, drop_path=0.5)
    features = _features(decoder, batch=4)
    with torch.no_grad():
        decoder.train()
        assert not torch.equal(decoder(features), decoder(features))  # stochastic depth on
        decoder.eval()
        torch.testing.assert_close(decoder(features), decoder(features))


@pytest.mark.parametrize("depth,expected", [
    (12, (2, 5, 8, 11)), (24, (5, 11, 17, 23)), (4, (0, 1, 2, 3)), (6, (0, 2, 3, 5)),
    (3, (0, 1, 2, 2)), (2, (0, 0, 1, 1)), (1, (0, 0, 0, 0))])
def test_dpt_layer_indices(depth, expected):
    assert dpt_layer_indices(depth) == expected
    assert _build("dpt", depth=depth).layer_indices == expected


@pytest.mark.parametrize("depth", [1, 5, 7, 12, 13, 24, 32])
def test_dpt_layer_indices_valid_and_distinct_when_possible(depth):
    idx = dpt_layer_indices(depth)
    assert len(idx) == 4 and idx[-1] == depth - 1
    assert all(0 <= i < depth for i in idx)
    assert list(idx) == sorted(idx)
    assert len(set(idx)) == min(4, depth)


@pytest.mark.parametrize("name", ["convnext", "linear", "segmenter"])
@pytest.mark.parametrize("depth", [1, 2, 12, 24])
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


def test_convnext_places_patch_predictions_in_patch_order():
    """Patch (r, c)'s 4x4 predictions land at rows 4r..4r+3, cols 4c..4c+3, row-major."""
    gh, gw, dim = 3, 5, 8
    # Image = 4x the grid, so the final bilinear resize is the identity.
    decoder = build_decoder("convnext", embed_dim=dim, num_classes=2, grid_size=(gh, gw),
                            patch_size=(4, 4), image_size=(4 * gh, 4 * gw),
                            encoder_depth=1).eval()
    hidden = decoder.final_layer.in_channels
    with torch.no_grad():
        # Token n carries n + 1 in its first feature. The Linear copies it to channel 0 of
        # every 4x4 sub-position (i, j) and adds 100 * (4i + j) so positions are tellable.
        weight = torch.zeros(hidden * 16, dim)
        bias = torch.zeros(hidden * 16)
        for i in range(4):
            for j in range(4):
                weight[i * 4 + j, 0] = 1.0            # channel 0 is outputs 0..15: (c, i, j)
                bias[i * 4 + j] = 100.0 * (4 * i + j)
        decoder.proj_dec.weight.copy_(weight)
        decoder.proj_dec.bias.copy_(bias)
        for block in decoder.blocks:                  # zero layer scale -> blocks = identity
            block.gamma.zero_()
        decoder.final_layer.weight.zero_()
        decoder.final_layer.bias.zero_()
        decoder.final_layer.weight[0, 0] = 1.0        # logit 0 = channel 0
        tokens = torch.zeros(1, gh * gw, dim)
        tokens[0, :, 0] = torch.arange(gh * gw, dtype=torch.float32) + 1
        out = decoder([tokens])[0, 0]

    expected = torch.empty(4 * gh, 4 * gw)
    for y in range(4 * gh):
        for x in range(4 * gw):
            patch = (y // 4) * gw + (x // 4)
            expected[y, x] = patch + 1 + 100.0 * (4 * (y % 4) + (x % 4))
    torch.testing.assert_close(out, expected)


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
        patches = x[:, :n] @ decoder.proj_patch              # (B, N, d)
        cls = x[:, n:] @ decoder.proj_classes                # (B, K, d)
        cos = torch.nn.functional.cosine_similarity(patches[:, :, None], cls[:, None], dim=-1)
        assert cos.abs().max() <= 1 + 1e-6                   # bounded before the norm
        ref = torch.nn.functional.layer_norm(cos, (classes,), decoder.mask_norm.weight,
                                             decoder.mask_norm.bias)
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


@pytest.mark.parametrize("name", DECODERS)
def test_no_weight_decay_names_exist(name):
    decoder = _build(name)
    params = dict(decoder.named_parameters())
    names = decoder.no_weight_decay()
    assert names <= params.keys()
    if name == "segmenter":
        assert names == {"cls_emb"}


def test_nearest_mode_copies_grid_cells():
    # A linear probe with nearest resize paints each patch with one value per class.
    decoder = _build("linear", grid=(2, 3), interpolate_mode="nearest").eval()
    with torch.no_grad():
        out = decoder(_features(decoder, batch=1))[0]
    blocks = out.reshape(3, 2, 16, 3, 16)
    assert torch.equal(blocks, blocks[:, :, :1, :, :1].expand_as(blocks))


def test_unknown_decoder_raises_listing_choices():
    with pytest.raises(ValueError, match="convnext, linear, segmenter, dpt"):
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


def test_wrong_token_count_is_reported():
    decoder = _build("convnext", grid=(2, 3))
    with pytest.raises(ValueError, match=r"\(B, 6, 32\)"):
        decoder([torch.randn(1, 9, 32)])
