"""The protocols and speed options keep the maths (issue 9, "Numerical sameness").

Tiny MIRAGE-layout models on 32x48 B-scans on the CPU. Each expected value comes from an
independent reference: a textbook training loop, a second run without the option, or the
same run with the tokens rounded to float16 by hand.
"""
import inspect
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import run_seg_tuning
from conftest import epoch_context, make_dataset, optim_spec
from mirage import checkpoint_io as ckpt
from fm_seg_config import MirageTiny, build_backbone
from mirage.option_checks import check_config
from mirage.train import distributed, precision as precision_module
from mirage.train import loop as engine
from mirage.train.precision import Precision
from mirage.train import protocols
from mirage.models.backbones import build_sam_encoder, build_vit_encoder, fused_attention_layers
from mirage.config import parse_config
from mirage.data.dataset import SegmentationDataset
from mirage.data.layout import find_split, open_dataset
from mirage.errors import UserError
from mirage.run.spec import PrecisionSpec, SpeedSpec
from mirage.train.feature_cache import CacheSpec, FeatureCache
from mirage.train.losses import build_loss
from mirage.models.segmentation_model import SegmentationModel
from mirage.train.optim import build_optimizer, param_groups
from mirage.models.decoders import build_decoder, names as decoder_names
from mirage.data.transforms import SegmentationTransform

SIZE, PATCH = (32, 48), 16
CPU = torch.device("cpu")
LR = 1e-3


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def weights16(tmp_path_factory):
    """MIRAGE-Tiny weights at patch 16 and a 2x3 grid: loading resamples nothing (the
    session's tiny_weights are at patch 32, whose resampling to 16 takes seconds)."""
    torch.manual_seed(0)
    encoder = MirageTiny().build(SIZE, (PATCH, PATCH), num_global_tokens=1)
    path = tmp_path_factory.mktemp("weights16") / "MIRAGE-Tiny.pth"
    ckpt.save(path, MirageTiny().checkpoint_from(encoder))
    return path


def tiny_model(weights, drop_path=0.0, decoder="linear", protocol="paper"):
    torch.manual_seed(0)
    backbone, _, _ = build_backbone(weights, SIZE, PATCH, 1, drop_path_rate=drop_path)
    head = build_decoder(decoder, embed_dim=backbone.embed_dim, num_classes=3,
                         grid_size=backbone.grid_size, patch_size=(PATCH, PATCH),
                         image_size=SIZE, encoder_depth=backbone.depth)
    model = SegmentationModel(backbone, head)
    model.freeze_blocks()
    if protocol == "fully_frozen":
        model.freeze_backbone()
    return model


def train_set(dataset, aug="none"):
    info = open_dataset(dataset)
    data = SegmentationDataset(find_split(dataset / "train", True), info.class_table,
                               SegmentationTransform(SIZE, train=True, aug_name=aug))
    return protocols.training_views(data, aug)


def run_epochs(model, data, epochs=2, cache=None, opt="adamw", seed=1):
    """engine.train_one_epoch ``epochs`` times (constant LR, batch 4, fixed order)."""
    torch.manual_seed(seed)
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=False)
    optimizer = build_optimizer(param_groups(model, 0.05, 0.75), optim_spec(opt=opt, lr=LR))
    precision = Precision(CPU, PrecisionSpec(), quiet)
    steps = len(loader)
    ctx = epoch_context(model, loader, optimizer, precision,
                        (np.full(epochs * steps, LR), np.full(epochs * steps, 0.05)),
                        feature_cache=cache, epochs=epochs)
    losses = []
    for epoch in range(epochs):
        stats = engine.train_one_epoch(ctx, epoch)
        losses.append(stats["loss"])
    return losses


def cache_for(model, data, mode, folder=None, views=1):
    identity = {"format": 1, "model": "MIRAGE-Tiny", "weights_sha256": "ab" * 32,
                "input_size": list(SIZE), "patch_size": [PATCH, PATCH], "num_global_tokens": 1,
                "embed_dim": model.backbone.embed_dim, "norm": "minmax", "compute": "fp32"}
    return FeatureCache(CacheSpec(mode, identity, folder, CPU), data, views, quiet)


def backbone_state(model):
    return {k: v.clone() for k, v in model.backbone.state_dict().items()}


# ----------------------------------------------------------------------------- fast loop
def test_fast_loop_loss_curve_equals_a_textbook_loop(tiny_dataset, weights16):
    """The loop without host syncs gives today's loss curve and weights: a plain loop
    (loss.item() every step) over the same batches. Tolerance: 1e-6 relative on the
    per-epoch mean loss, 1e-5 on the weights (only the order of float64 sums differs)."""
    data = train_set(tiny_dataset)
    fast = tiny_model(weights16, drop_path=0.1)
    fast_losses = run_epochs(fast, data, epochs=2)

    plain = tiny_model(weights16, drop_path=0.1)
    torch.manual_seed(1)
    optimizer = build_optimizer(param_groups(plain, 0.05, 0.75), optim_spec(lr=LR))
    for group in optimizer.param_groups:  # layer-wise LR decay, constant schedule
        group["lr"] = LR * group["lr_scale"]
    criterion = build_loss("CEGDice")
    plain_losses = []
    for _ in range(2):
        plain.train()
        total, count = 0.0, 0
        for batch in torch.utils.data.DataLoader(data, batch_size=4, shuffle=False):
            loss = criterion(plain(batch["image"]).float(), batch["mask"].long())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, count = total + loss.item(), count + 1
        plain_losses.append(total / count)
    np.testing.assert_allclose(fast_losses, plain_losses, rtol=1e-6)
    assert plain_losses[1] < plain_losses[0]  # it learns
    for (name, a), b in zip(fast.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_no_host_sync_per_step(tiny_dataset, weights16, monkeypatch):
    """engine.py reads a device value (item/float/bool/int) only at the end of the epoch,
    not once or twice per step as before."""
    calls = []
    for method in ("item", "__float__", "__bool__", "__int__"):
        real = getattr(torch.Tensor, method)

        def counted(self, *args, _real=real, **kwargs):
            if inspect.currentframe().f_back.f_code.co_filename == engine.__file__:
                calls.append(1)
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, method, counted)
    data = train_set(make_dataset(tiny_dataset.parent / "more", splits={"train": 24}))
    run_epochs(tiny_model(weights16), data, epochs=1)  # 6 steps
    assert 0 < len(calls) <= 4


def test_non_finite_loss_stops_with_the_likely_causes(tiny_dataset, weights16,
                                                      monkeypatch):
    data = train_set(tiny_dataset)
    real = data.__getitem__.__func__

    def poisoned(self, index):
        item = real(self, index)
        if index == 5:  # second batch of 4
            item["image"] = item["image"].clone()
            item["image"][0, 0, 0] = float("nan")
        return item
    monkeypatch.setattr(type(data), "__getitem__", poisoned)
    with pytest.raises(RuntimeError) as info:
        run_epochs(tiny_model(weights16), data, epochs=1)
    message = str(info.value)
    assert "\n" not in message and "epoch 0, step 1" in message
    for cause in ("--lr", "--amp_dtype bf16", "--no_fp16", "NaN/Inf values in the input"):
        assert cause in message


# ----------------------------------------------------------------------------- frozen tensors
PROTOCOLS = {  # name: (model protocol, drop path, cache mode, augmentation)
    "paper": ("paper", 0.1, None, "simple"),
    "paper_checkpointing": ("paper", 0.1, None, "simple"),
    "fully_frozen": ("fully_frozen", 0.1, None, "simple"),
    "fully_frozen_ram_cache": ("fully_frozen", 0.0, "ram", "flip"),
    "fully_frozen_disk_cache": ("fully_frozen", 0.0, "disk", "flip"),
}


@pytest.mark.parametrize("name", PROTOCOLS)
def test_frozen_backbone_tensors_bit_identical_after_training(tiny_dataset, weights16,
                                                              tmp_path, name):
    protocol, drop_path, mode, aug = PROTOCOLS[name]
    model = tiny_model(weights16, drop_path, protocol=protocol)
    if name == "paper_checkpointing":
        assert model.set_grad_checkpointing(True)
    data = train_set(tiny_dataset, aug)
    cache = cache_for(model, data, mode, tmp_path / "cache", 2) if mode else None
    before = backbone_state(model)
    decoder_before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    run_epochs(model, data, epochs=2, cache=cache)
    after = model.backbone.state_dict()
    trained = {"input_adapter.proj.weight", "input_adapter.proj.bias", "global_tokens"}
    for key, tensor in before.items():
        if protocol == "paper" and key in trained:
            assert not torch.equal(tensor, after[key]), key  # the projector trains
        else:
            assert torch.equal(tensor, after[key]), key
    assert all(not torch.equal(v, model.decoder.state_dict()[k])
               for k, v in decoder_before.items() if v.is_floating_point())


# ----------------------------------------------------------------------------- feature cache
def test_cache_changes_the_decoder_weights_by_float16_rounding_only(tiny_dataset,
                                                                    weights16, tmp_path):
    """Fully frozen, 2 epochs (the second reads the cache). With a RAM or disk cache the
    decoder weights are *exactly* those of an uncached run whose tokens are rounded to
    float16 by hand; and within 2e-3 (about 2 AdamW steps' rounding) of the plain run."""
    data = train_set(tiny_dataset)

    def trained(mode=None, round_by_hand=False):
        model = tiny_model(weights16, protocol="fully_frozen")
        if round_by_hand:
            real = model.backbone_features
            model.backbone_features = lambda images: [t.half().float() for t in real(images)]
        cache = cache_for(model, data, mode, tmp_path / f"cache-{mode}") if mode else None
        losses = run_epochs(model, data, epochs=2, cache=cache)
        if cache is not None:
            assert (cache.mode == "ram") == bool(cache.ram)
        return model.decoder.state_dict(), losses

    reference, reference_losses = trained(round_by_hand=True)
    plain, plain_losses = trained()
    for mode in ("ram", "disk"):
        weights, losses = trained(mode)
        assert losses == reference_losses
        for key, tensor in reference.items():
            assert torch.equal(weights[key], tensor), (mode, key)
    for key, tensor in reference.items():
        torch.testing.assert_close(plain[key], tensor, rtol=0, atol=2e-3, msg=key)
    np.testing.assert_allclose(plain_losses, reference_losses, rtol=1e-3)


def test_flip_views_are_both_cached_and_reused(tiny_dataset, weights16, tmp_path):
    data = train_set(tiny_dataset, "flip")
    model = tiny_model(weights16, protocol="fully_frozen")
    cache = cache_for(model, data, "disk", tmp_path / "cache", views=2)
    run_epochs(model, data, epochs=4, cache=cache)
    files = sorted(p.name for p in cache.folder.rglob("*.pt"))
    assert {n.split(".")[1] for n in files} == {"orig", "flip"}
    assert len(data) < len(files) <= 2 * len(data)
    # A flipped view's tokens are those of the flipped image, not flipped tokens.
    path = next(cache.folder.rglob("*.flip.pt"))
    index = [s.slice_id for s in data.slices].index(path.name.split(".")[0])
    with torch.no_grad():
        expected = model.features(data.dataset[index]["image"].flip(-1)[None])[0][0]
    stored = torch.load(path, weights_only=True)["layers"][model.backbone.depth - 1]
    torch.testing.assert_close(stored.float(), expected, rtol=1e-3, atol=1e-4)  # float16


def test_end_to_end_disk_cache_is_shared_by_runs_of_one_backbone(tiny_dataset, weights16,
                                                                  tmp_path, capsys):
    common = ["--weights", weights16, "--data_path", tiny_dataset, "--input_size", "32",
              "48", "--patch_size", "16", "--batch_size", "2", "--num_workers", "0",
              "--base_output_dir", tmp_path / "out", "--epochs", "1", "--drop_path_encoder",
              "0", "--aug_name", "none", "--freeze_patch_embed", "--feature_cache", "disk",
              "--feature_cache_dir", tmp_path / "cache", "--no_save_ckpt"]
    run_seg_tuning.main([str(a) for a in common + ["--output_adapter", "linear"]])
    first = capsys.readouterr().out
    assert "8 views computed, 0 reused" in first and "whole backbone frozen" in first
    run_seg_tuning.main([str(a) for a in common + ["--output_adapter", "convnext",
                                                   "--seed", "7"]])
    assert "0 views computed, 8 reused" in capsys.readouterr().out
    folders = list((tmp_path / "cache").iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("MIRAGE-Tiny_")
    assert "_32x48_p16x16_minmax_fp32" in folders[0].name


# ----------------------------------------------------------------------------- speed options
def family_backbones(tmp_path, weights16):
    """(name, backbone, input size) of every encoder family at toy size, stochastic depth
    on (the checkpointed recomputation must replay the same drops)."""
    mirage, _, _ = build_backbone(weights16, SIZE, PATCH, 1, drop_path_rate=0.2)
    tiny_vit = dict(embed_dim=32, depth=3, num_heads=2)
    yield "mirage", mirage, SIZE
    yield "vit", build_vit_encoder("vit_base_patch16_224", (32, 48), (16, 16), 0.2,
                                   **tiny_vit), (32, 48)
    yield "dinov2_reg", build_vit_encoder("vit_small_patch14_reg4_dinov2", (28, 42),
                                          (14, 14), 0.2, **tiny_vit), (28, 42)
    yield "sam", build_sam_encoder("samvit_base_patch16", (64, 64), (16, 16), 0.2,
                                   embed_dim=32, depth=4, num_heads=2,
                                   global_attn_indexes=(1, 3), window_size=3), (64, 64)


def seg_model(backbone, size, decoder="dpt"):
    patch = backbone.patch_size
    head = build_decoder(decoder, embed_dim=backbone.embed_dim, num_classes=3,
                         grid_size=backbone.grid_size, patch_size=patch, image_size=size,
                         encoder_depth=backbone.depth)
    model = SegmentationModel(backbone, head)
    model.freeze_blocks()
    return model


def outputs_and_grads(model, images, seed=3):
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    logits = model(images)
    (logits.square().mean() + logits[:, 0].mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def test_every_family_uses_fused_attention(tmp_path, weights16):
    for name, backbone, _ in family_backbones(tmp_path, weights16):
        fused, total = fused_attention_layers(backbone)
        assert total >= 3 and fused == total, name


def test_grad_checkpointing_gives_the_same_outputs_and_gradients(tmp_path, weights16):
    """Per family (ViT, DINOv2, SAM windowed + global attention, MIRAGE), DPT decoder (four
    blocks), stochastic depth on: logits and the gradients of the projector and decoder
    equal those without checkpointing (tolerance 1e-6 relative: the same operations
    recomputed)."""
    for name, backbone, size in family_backbones(tmp_path, weights16):
        model = seg_model(backbone, size, "linear")
        images = torch.rand(2, backbone.in_chans, *size, generator=torch.Generator()
                            .manual_seed(0))
        plain = outputs_and_grads(model, images)
        assert model.set_grad_checkpointing(True), name
        checkpointed = outputs_and_grads(model, images)
        torch.testing.assert_close(checkpointed[0], plain[0], rtol=1e-6, atol=1e-7)
        assert plain[1].keys() == checkpointed[1].keys()
        assert any(k.startswith("backbone.") for k in plain[1]), name  # projector reached
        for key, grad in plain[1].items():
            torch.testing.assert_close(checkpointed[1][key], grad, rtol=1e-6, atol=1e-7,
                                       msg=f"{name} {key}")


def test_compiled_parts_give_the_same_outputs_and_gradients(weights16):
    """torch.compile traced by Dynamo and AOTAutograd (the aot_eager backend; Inductor's
    code generation takes minutes on a CPU: benchmarks/bench_protocols.py --check_compile
    checks it) gives the eager logits and gradients (tolerance 1e-5)."""
    model = tiny_model(weights16, drop_path=0.0)
    images = torch.rand(2, 1, *SIZE, generator=torch.Generator().manual_seed(0))
    eager = outputs_and_grads(model, images)
    notes = []
    protocols.apply_speed_options(model, SpeedSpec(compile=True), CPU, notes.append,
                                  compile_backend="aot_eager")
    compiled = outputs_and_grads(model, images)
    assert not any("could not be compiled" in n for n in notes)
    assert set(model.state_dict()) == set(tiny_model(weights16).state_dict())
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-5)
    for key, grad in eager[1].items():
        torch.testing.assert_close(compiled[1][key], grad, rtol=1e-5, atol=1e-5, msg=key)


def test_compile_falls_back_to_eager_with_one_notice():
    notes = []
    eager = torch.nn.Linear(3, 2)
    part = protocols.CompileOrEager(eager, "decoder", notes.append, backend="eager")

    def broken(*args):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore")
    part.compiled = broken
    x = torch.rand(4, 3)
    assert torch.equal(part(x), eager(x)) and torch.equal(part(x), eager(x))
    assert len(notes) == 1
    assert notes[0] == (">> note: --compile: the decoder could not be compiled (RuntimeError:"
                        " InvalidCxxCompiler: No working C++ compiler found); it runs eagerly")
    # An error of the model itself is not a compiler problem: it propagates, no notice.
    part = protocols.CompileOrEager(eager, "decoder", notes.append, backend="eager")
    part.compiled = broken
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        part(torch.rand(4, 5))
    assert len(notes) == 1 and part.compiled is broken


@pytest.mark.parametrize("decoder", decoder_names())
def test_channels_last_decoders_give_the_same_logits(decoder):
    """What apply_speed_options does: the same logits and gradients (tolerance 1e-5; the
    convolutions sum in another order)."""
    torch.manual_seed(0)
    head = build_decoder(decoder, embed_dim=32, num_classes=3, grid_size=(2, 3),
                         patch_size=(16, 16), image_size=(32, 48), encoder_depth=4).eval()
    features = [torch.rand(2, 6, 32, requires_grad=True) for _ in head.layer_indices]
    reference = head(features)
    reference.square().mean().backward()
    grads = [f.grad.clone() for f in features]
    for f in features:
        f.grad = None
    head.to(memory_format=torch.channels_last)
    logits = head(features)
    logits.square().mean().backward()
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    for got, want in zip((f.grad for f in features), grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- precision
def test_amp_dtype_selects_the_autocast_dtype(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(precision_module, "_bf16_supported", lambda device: True)
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device, enabled: enabled)

    def dtype(**options):
        config = {"fp16": True, "bf16": False, "amp_dtype": "fp16", **options}
        precision = Precision(cuda, PrecisionSpec.from_options(config), quiet)
        return precision.dtype, precision.scaler

    assert dtype() == (torch.float16, True)                    # the default: scaler on
    assert dtype(amp_dtype="bf16") == (torch.bfloat16, False)  # no scaler needed
    assert dtype(bf16=True) == (torch.bfloat16, False)         # the old switch still works
    assert dtype(fp16=False) == (None, False)                  # --no_fp16: float32
    assert Precision(CPU, PrecisionSpec(mixed=True, dtype="bf16"), quiet).dtype is None
    monkeypatch.setattr(precision_module, "_bf16_supported", lambda device: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Tesla V100")
    with pytest.raises(UserError, match="Tesla V100 has no bfloat16 support; use "
                                        "--amp_dtype fp16"):
        dtype(amp_dtype="bf16")


# ----------------------------------------------------------------------------- options
@pytest.mark.parametrize("extra, names", [
    (["--feature_cache", "ram"], ["--feature_cache ram", "--tuning fully_frozen",
                                  "--tuning frozen"]),
    (["--tuning", "lora", "--feature_cache", "ram"], ["--feature_cache ram", "--tuning lora"]),
    (["--tuning", "full", "--feature_cache", "disk"], ["--feature_cache disk", "--tuning full",
                                                       "encoder trains"]),
    (["--freeze_patch_embed", "--feature_cache", "disk"],
     ["--feature_cache disk", "--aug_name simple"]),
    (["--freeze_patch_embed", "--feature_cache", "ram", "--aug_name", "flip"],
     ["--feature_cache ram", "--drop_path_encoder 0"]),
    (["--freeze_patch_embed", "--no_freeze_encoder"],
     ["--freeze_patch_embed", "--no_freeze_encoder"]),
    (["--tuning", "full", "--freeze_encoder"], ["--tuning full", "--freeze_encoder"]),
    (["--tuning", "frozen", "--freeze_patch_embed"], ["--tuning frozen",
                                                      "--freeze_patch_embed"]),
    (["--tuning", "linear_probe", "--output_adapter", "dpt"],
     ["--tuning linear_probe", "--output_adapter dpt"]),
    (["--freeze_patch_embed", "--learnable_pos_emb"],
     ["--tuning fully_frozen", "--learnable_pos_emb"]),
    (["--tuning", "linear_probe", "--learnable_pos_emb"],
     ["--tuning linear_probe", "--learnable_pos_emb"]),
    (["--lora_rank", "4"], ["--lora_rank", "--tuning lora"]),
    (["--tuning", "lora", "--lora_targets", "qkv-attn"], ["--lora_targets", "'attn'", "qkv"]),
    (["--tuning", "lora", "--lora_alpha", "0"], ["--lora_alpha 0"]),
    (["--tuning", "lora", "--lora_rank", "0"], ["--lora_rank"]),
    (["--amp_dtype", "bf16", "--no_fp16"], ["--amp_dtype bf16", "--no_fp16"]),
    (["--freeze_patch_embed", "--feature_cache", "disk", "--aug_name", "none",
      "--drop_path_encoder", "0", "--feature_cache_dir", ""],
     ["--feature_cache disk", "--feature_cache_dir"]),
])
def test_option_conflicts_are_one_line_errors_naming_both(tmp_path, extra, names):
    with pytest.raises(UserError) as info:  # while parsing (protocol aliases) or checking
        config, _, _ = parse_config(["--weights", "w.pth", "--data_path", str(tmp_path),
                                     *extra])
        check_config(config)
    message = str(info.value)
    assert "\n" not in message
    for name in names:
        assert name in message


@pytest.mark.parametrize("argv, tuning, flags, decoder", [
    ([], "frozen", (True, False), "convnext"),
    (["--freeze_encoder"], "frozen", (True, False), "convnext"),
    (["--no_freeze_encoder"], "full", (False, False), "convnext"),
    (["--freeze_patch_embed"], "fully_frozen", (True, True), "convnext"),
    (["--freeze_patch_embed", "--output_adapter", "linear"], "linear_probe", (True, True),
     "linear"),
    (["--tuning", "linear_probe"], "linear_probe", (True, True), "linear"),
    (["--tuning", "fully_frozen", "--output_adapter", "linear"], "linear_probe",
     (True, True), "linear"),
    (["--tuning", "lora"], "lora", (True, False), "convnext"),
    (["--tuning", "full", "--no_freeze_encoder"], "full", (False, False), "convnext"),
    # a command-line protocol wins over the YAML file's alias and decoder
    (["-c", "seg_200e_convnext", "--tuning", "full"], "full", (False, False), "convnext"),
    (["-c", "seg_200e_convnext", "--tuning", "linear_probe"], "linear_probe", (True, True),
     "linear"),
    (["--demo", "--tuning", "linear_probe"], "linear_probe", (True, True), "linear"),
])
def test_tuning_and_its_aliases_resolve_to_one_protocol(argv, tuning, flags, decoder):
    config, _, _ = parse_config(argv)
    assert config["tuning"] == tuning
    assert (config["freeze_encoder"], config["freeze_patch_embed"]) == flags
    assert config["output_adapter"] == decoder


def test_cacheable_options_are_accepted(tmp_path):
    config, _, _ = parse_config(["--weights", "w.pth", "--data_path", str(tmp_path),
                                 "--freeze_patch_embed", "--feature_cache", "disk",
                                 "--aug_name", "flip", "--drop_path_encoder", "0",
                                 "--grad_checkpointing", "--compile", "--amp_dtype", "bf16"])
    check_config(config)


def test_flip_views_flip_image_and_mask_together(tiny_dataset):
    data = train_set(tiny_dataset, "flip")
    plain = data.dataset
    torch.manual_seed(0)
    seen = set()
    for _ in range(12):
        item = data[2]
        reference = plain[2]
        flip = item["flipped"]
        seen.add(flip)
        want_image = reference["image"].flip(-1) if flip else reference["image"]
        want_mask = reference["mask"].flip(-1) if flip else reference["mask"]
        assert torch.equal(item["image"], want_image) and torch.equal(item["mask"], want_mask)
    assert seen == {True, False}
    assert data.slices is plain.slices and len(data) == len(plain)


def test_grad_checkpointing_with_a_fully_frozen_backbone_is_a_note(weights16):
    notes = []
    model = tiny_model(weights16, protocol="fully_frozen")
    protocols.apply_speed_options(model, SpeedSpec(grad_checkpointing=True), CPU,
                                  notes.append)
    assert notes[0].startswith(">> note: --grad_checkpointing has no effect with a fully "
                               "frozen backbone (--tuning fully_frozen or linear_probe")
    assert notes[1] == ">> speed: fused attention in 4/4 attention layers, channels-last " \
                       "decoder"


def test_fully_frozen_forward_records_no_graph(weights16):
    model = tiny_model(weights16, protocol="fully_frozen")
    features = model.features(torch.rand(2, 1, *SIZE))
    assert all(f.grad_fn is None and not f.requires_grad for f in features)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert model(torch.rand(2, 1, *SIZE)).requires_grad  # the decoder still trains
    F.cross_entropy(model(torch.rand(1, 1, *SIZE)), torch.zeros(1, *SIZE).long()).backward()
    assert all(p.grad is None for p in model.backbone.parameters())


def test_dataset_copy_is_not_the_same_cache_group(tiny_dataset, weights16, tmp_path):
    """Slice ids repeat across datasets: a copy of the dataset in another folder gets
    its own entries."""
    copy = tmp_path / "copy" / "Tiny"
    shutil.copytree(tiny_dataset, copy)
    model = tiny_model(weights16, protocol="fully_frozen")
    for folder in (tiny_dataset, copy):
        cache = cache_for(model, train_set(folder), "disk", tmp_path / "cache")
        run_epochs(model, train_set(folder), epochs=1, cache=cache)
    groups = sorted(p.name for p in cache.folder.iterdir() if p.is_dir())
    assert len(groups) == 2 and all(g.startswith("Tiny-train-") for g in groups)
