"""The tuning protocols (``--tuning``): what each trains, LoRA on every family, full
fine-tuning's per-layer learning rates, checkpoints, inference and exact resume."""
import json

import pytest
import torch

from conftest import build_from_options, make_dataset, write_mirage_checkpoint
from fm_seg_config import MirageTiny, build_backbone
from mirage import checkpoint_io as ckpt
from mirage.config import parse_config
from mirage.errors import UserError
from mirage.models import lora
from mirage.train.optim import param_groups
from mirage.train.predictor import load_run
from test_backbones_timm import CASES, tiny, write_case
from test_exact_resume import assert_identical, interrupted, kill_in_epoch
from test_training import argv, run

FAMILY_CASES = ["mirage"] + list(CASES)  # every family of the registry, at toy size


def family_model(tmp_path, case, *options):
    """(model, input size) of ``case`` built as run_seg_tuning.py builds it, with a seeded
    decoder (the same for every call with the same case)."""
    if case == "mirage":
        path, fm = tmp_path / "MIRAGE-Tiny.pth", MirageTiny()
        if not path.is_file():
            write_mirage_checkpoint(path, fm)
    else:
        path, fm = tmp_path / CASES[case][1], tiny(CASES[case][0])
        if not path.is_file():  # written once: its layout draws some extra tensors at random
            write_case(tmp_path, case)
    patch = fm.default_patch_size
    size = (2 * patch, 3 * patch) if case not in ("sam", "medsam") else (64, 96)
    config, _, _ = parse_config(["--weights", str(path), "--data_path", str(tmp_path),
                                 "--drop_path_encoder", "0", *options])
    torch.manual_seed(0)
    model, _ = build_from_options(config, fm=fm, input_size=size, patch_size=(
        patch, patch) if case not in ("sam", "medsam") else (16, 16))
    return model, size, fm


def images_for(model, size, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(2, model.backbone.in_chans, *size, generator=generator)


def train_steps(model, images, steps=3, lr=1e-2):
    """A few AdamW steps on every trainable tensor (random targets)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    targets = torch.randint(0, 3, (images.shape[0], *images.shape[2:]),
                            generator=torch.Generator().manual_seed(2))
    model.train()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


# ----------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("case", FAMILY_CASES)
def test_lora_on_every_family(tmp_path, case):
    frozen, size, _ = family_model(tmp_path, case)
    adapted, _, _ = family_model(tmp_path, case, "--tuning", "lora", "--lora_rank", "2",
                                 "--lora_dropout", "0")
    images = images_for(frozen, size)
    frozen.eval(), adapted.eval()
    with torch.no_grad():  # an untrained adapter (B = 0) changes nothing, bit for bit
        assert torch.equal(adapted(images), frozen(images))

    adapters = [n for n, _ in adapted.named_parameters() if "lora_" in n]
    depth = adapted.backbone.depth
    assert len(adapters) == 2 * 2 * depth  # A and B on qkv and proj of every block
    assert all(".attn.qkv." in n or ".attn.proj." in n for n in adapters)
    before = {k: v.clone() for k, v in adapted.state_dict().items()}
    train_steps(adapted, images)
    changed = {k for k, v in adapted.state_dict().items() if not torch.equal(v, before[k])}
    assert any("lora_B" in k for k in changed) and any(k.startswith("decoder.") for k in changed)
    # only adapters, the decoder and what the paper's protocol trains in the backbone
    paper_trained = {f"backbone.{n}" for n, p in frozen.backbone.named_parameters()
                     if p.requires_grad}
    assert changed <= ({k for k in before if "lora_" in k or k.startswith("decoder.")}
                       | paper_trained)
    assert not any("base_layer" in k for k in changed)

    adapted.eval()
    with torch.no_grad():
        unmerged = adapted(images)
        assert lora.merge_lora(adapted) == 2 * depth
        merged = adapted(images)
    assert not torch.equal(unmerged, frozen(images))  # the adapters did learn something
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


def test_lora_targets_pick_the_mlp_too(tmp_path):
    model, _, _ = family_model(tmp_path, "dinov2_g", "--tuning", "lora", "--lora_targets",
                               "qkv-proj-fc1-fc2")  # DINOv2 giant: SwiGLU MLP
    adapted = {n.rsplit(".lora_", 1)[0] for n, _ in model.named_parameters() if "lora_A" in n}
    assert len(adapted) == 4 * model.backbone.depth
    assert any(n.endswith(".mlp.fc1") or n.endswith(".mlp.w12") for n in adapted)


def test_lora_without_peft_is_a_one_line_error(tmp_path, monkeypatch):
    import builtins
    real = builtins.__import__

    def no_peft(name, *args, **kwargs):
        if name == "peft" or name.startswith("peft."):
            raise ImportError("No module named 'peft'")
        return real(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_peft)
    with pytest.raises(UserError, match=r"pip install \.\[lora\]") as info:
        family_model(tmp_path, "mirage", "--tuning", "lora")
    assert "\n" not in str(info.value)


def test_lora_without_peft_is_refused_before_training(tmp_path, monkeypatch):
    import sys
    from mirage.option_checks import check_config
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now finds no module
    config, _, _ = parse_config(["--weights", "w.pth", "--data_path", str(tmp_path),
                                 "--tuning", "lora"])
    with pytest.raises(UserError, match=r"needs Hugging Face's PEFT library.*\.\[lora\]"):
        check_config(config)


# ----------------------------------------------------------------------------- full
def test_full_fine_tuning_trains_the_encoder_at_the_original_layer_rates(tmp_path):
    model, size, _ = family_model(tmp_path, "mirage", "--tuning", "full")
    fixed = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert fixed == {"backbone.input_adapter.pos_emb"}  # sin-cos unless --learnable_pos_emb
    lr, decay, depth = 1e-3, 0.75, model.backbone.depth
    groups = param_groups(model, 0.05, decay)
    for group in groups:  # the original's rule: layer i gets lr * decay^(L + 1 - i)
        assert group["lr_scale"] == pytest.approx(decay ** (depth + 1 - group["layer_id"]))
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert scale["backbone.blocks.0.attn.qkv.weight"] == pytest.approx(decay ** depth)
    assert scale[f"backbone.blocks.{depth - 1}.mlp.fc2.weight"] == pytest.approx(decay)
    assert scale["backbone.input_adapter.proj.weight"] == pytest.approx(decay ** (depth + 1))
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    train_steps(model, images_for(model, size), lr=lr)
    changed = [k for k, v in model.backbone.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("blocks.0.") for k in changed)
    assert any(k.startswith(f"blocks.{depth - 1}.") for k in changed)


@pytest.mark.parametrize("tuning, trainable_backbone", [
    ("frozen", {"input_adapter.proj.weight", "input_adapter.proj.bias", "global_tokens"}),
    ("fully_frozen", set()),
    ("linear_probe", set()),
])
def test_what_each_protocol_trains(tmp_path, tuning, trainable_backbone):
    model, _, _ = family_model(tmp_path, "mirage", "--tuning", tuning)
    trained = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trained == trainable_backbone
    assert model.backbone_frozen == (tuning != "frozen")
    if tuning == "linear_probe":
        assert type(model.decoder).__name__.lower().startswith("linear")


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tuning")
    return (make_dataset(root / "datasets"),
            write_mirage_checkpoint(root / "MIRAGE-Tiny.pth", MirageTiny()))


def only_run_dir(out):
    found = list((out / "v1" / "Tiny").iterdir())
    assert len(found) == 1, found
    return found[0]


RESUME_OPTIONS = ("--epochs", 2, "--save_ckpt_freq", 1, "--keep_ckpts", 2, "--aug_name",
                  "flip", "--drop_path_encoder", 0.1, "--lr", 3e-3, "--device", "cpu")


@pytest.mark.parametrize("tuning", ["fully_frozen", "linear_probe", "lora", "full"])
def test_each_protocol_resumes_exactly(data, tmp_path, monkeypatch, tuning):
    """Killed within its second epoch and resumed, each protocol ends as the run left
    alone: the same log and bit-identical tensors, optimiser and random state (LoRA's
    dropout and stochastic depth draw random numbers at every step)."""
    dataset, weights = data
    # argv's linear decoder, except where it would make another protocol of it
    extra = ["--tuning", tuning] + (["--output_adapter", "convnext"]
                                    if tuning == "fully_frozen" else [])
    outcomes = []
    for out, kill in ((tmp_path / "straight", False), (tmp_path / "killed", True)):
        command = argv(dataset, weights, out, *RESUME_OPTIONS, *extra)
        if kill:
            interrupted(monkeypatch, command, lambda mp: kill_in_epoch(mp, 1, 2))
        run(*command)
        run_dir = only_run_dir(out)
        assert run_dir.name.startswith(f"MIRAGE-Tiny_{tuning}_")
        log = [{k: v for k, v in json.loads(line).items() if k != "time"}
               for line in (run_dir / "log.txt").read_text().splitlines()]
        last = ckpt.load_file(run_dir / "checkpoint-1.pth")
        outcomes.append((log, {k: last[k] for k in ("model", "optimizer", "random_state")}))
    assert [line.get("epoch") for line in outcomes[0][0]][:2] == [0, 1]
    assert outcomes[0][0] == outcomes[1][0]
    assert_identical(outcomes[0][1], outcomes[1][1])


def test_checkpoints_hold_what_changed_and_lora_runs_predict(data, tmp_path):
    dataset, weights = data
    sizes = {}
    for tuning in ("frozen", "lora", "full"):
        out = tmp_path / tuning
        run(*argv(dataset, weights, out, "--epochs", 1, "--tuning", tuning))
        run_dir = only_run_dir(out)
        saved = ckpt.load_file(run_dir / "checkpoint-best.pth")
        names = set(saved["model"])
        sizes[tuning] = len(names)
        assert saved["meta"]["tuning"] == tuning
        if tuning == "full":  # the whole encoder changed: the whole encoder is saved
            assert "backbone.blocks.0.attn.qkv.weight" in names
        else:
            assert not any(".blocks." in n and "lora_" not in n for n in names)
        if tuning == "lora":
            assert any("lora_A" in n for n in names) and "meta" in saved
            assert saved["meta"]["lora"]["lora_rank"] == 8
            # --infer_only --test and the Python predictor rebuild the adapters, merged
            run(*argv(dataset, weights, out, "--epochs", 1, "--tuning", "lora", "--test",
                      "--infer_only"))
            assert len(list((run_dir / "preds").glob("*.png"))) > 0
            predictor = load_run(run_dir, device="cpu")
            assert lora.lora_layers(predictor.model) and all(
                layer.merged for layer in lora.lora_layers(predictor.model))
    assert sizes["frozen"] < sizes["lora"] < sizes["full"]


def test_a_lora_checkpoint_does_not_load_into_another_protocol(data, tmp_path):
    dataset, weights = data
    run(*argv(dataset, weights, tmp_path, "--epochs", 1, "--tuning", "lora"))
    best = only_run_dir(tmp_path) / "checkpoint-best.pth"
    config, _, _ = parse_config(argv(dataset, weights, tmp_path))
    backbone, fm, _ = build_backbone(weights, (32, 48), 16)
    model, _ = build_from_options(config, fm=fm, input_size=(32, 48), patch_size=(16, 16))
    from mirage.data.classes import ClassTable
    from mirage.run.spec import resolve_spec
    from mirage.train.checkpointing import checkpoint_meta, load_model_weights
    classes = ClassTable.from_entries(ckpt.load_file(best)["meta"]["classes"], "INFO.json")
    with pytest.raises(UserError, match="trained with --tuning lora, this run has frozen"):
        load_model_weights(model, best, checkpoint_meta(resolve_spec(config), classes,
                                                        model))


# ----------------------------------------------------------------------------- identity
@pytest.mark.parametrize("tuning", ["frozen", "fully_frozen", "linear_probe", "full"])
def test_runs_trained_before_tuning_existed_keep_their_identity(data, tuning):
    """The identity of these protocols is what --freeze_encoder / --freeze_patch_embed
    said before --tuning existed: the same hash, so the same run."""
    from mirage.data.layout import open_dataset
    from mirage.run.identity import run_identity
    dataset, weights = data
    config, _, _ = parse_config(argv(dataset, weights, "out", "--tuning", tuning))
    identity = run_identity(config, open_dataset(dataset))
    assert "tuning" not in identity and not any(k.startswith("lora_") for k in identity)
    flags = {"frozen": (True, False), "fully_frozen": (True, True),
             "linear_probe": (True, True), "full": (False, False)}[tuning]
    assert (identity["freeze_encoder"], identity["freeze_patch_embed"]) == flags
    lora_config, _, _ = parse_config(argv(dataset, weights, "out", "--tuning", "lora"))
    lora_identity = run_identity(lora_config, open_dataset(dataset))
    assert lora_identity["tuning"] == "lora" and lora_identity["lora_rank"] == 8


def test_a_run_folder_of_the_older_name_is_still_found(data, tmp_path, capsys):
    dataset, weights = data
    command = argv(dataset, weights, tmp_path, "--epochs", 1, "--tuning", "fully_frozen",
                   "--output_adapter", "convnext_ls")
    run(*command)
    new = only_run_dir(tmp_path)
    assert new.name.startswith("MIRAGE-Tiny_fully_frozen_convnext_ls_")
    # as the version before --tuning named it
    seed_and_hash = new.name.split("_CE-ignore-bg_")[1]
    old = new.parent / f"MIRAGE-Tiny_frozen_convnext_ls_CE-ignore-bg_fullyfrozen_{seed_and_hash}"
    new.rename(old)
    capsys.readouterr()
    run(*command)
    assert "already finished 1 epochs: skipping" in capsys.readouterr().out
    assert only_run_dir(tmp_path) == old
