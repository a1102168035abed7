"""The validation tokens of a fully fixed backbone are computed once and reused (issue 18,
"Cache what never changes").

End to end through run_seg_tuning on a tiny dataset (5 validation B-scans: batches of 2,
2 and 1) with MIRAGE-Tiny weights. The reference of each comparison is a run of the same
command with the validation store switched off (``feature_cache.CACHE_SPLITS``)."""
import json

import pytest

from conftest import make_dataset
from mirage.models.segmentation_model import MirageEncoder
from mirage.train import feature_cache as fc
from test_exact_resume import assert_identical, interrupted, kill_in_epoch
from test_training import argv, run
from mirage import checkpoint_io as ckpt

EPOCHS = 3
VAL = 5  # B-scans; batch 2 -> 3 validation batches


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A dataset without a test split (so that every eval-mode backbone call is a
    validation's) and MIRAGE-Tiny weights."""
    from conftest import write_mirage_checkpoint
    from fm_seg_config import MirageTiny
    root = tmp_path_factory.mktemp("valcache")
    dataset = make_dataset(root / "datasets", splits={"train": 4, "val": VAL})
    weights = write_mirage_checkpoint(root / "MIRAGE-Tiny.pth", MirageTiny(), input_size=64)
    return dataset, weights


def frozen(*extra, decoder="linear"):
    return ("--epochs", EPOCHS, "--freeze_patch_embed", "--output_adapter", decoder,
            "--device", "cpu", *extra)


@pytest.fixture
def backbone_calls(monkeypatch):
    """[training mode of the backbone] per encoder forward."""
    calls = []
    real = MirageEncoder.forward_layers

    def counted(self, x, indices):
        calls.append(self.training)
        return real(self, x, indices)
    monkeypatch.setattr(MirageEncoder, "forward_layers", counted)
    return calls


def run_dir(out):
    found = list((out / "v1" / "Tiny").iterdir())
    assert len(found) == 1, found
    return found[0]


def log_of(out):
    """log.txt without the epoch times."""
    return [{k: v for k, v in json.loads(line).items() if k != "time"}
            for line in (run_dir(out) / "log.txt").read_text().splitlines()]


def uncached(monkeypatch, *command):
    with monkeypatch.context() as patch:
        patch.setattr(fc, "CACHE_SPLITS", False)
        run(*command)


@pytest.mark.parametrize("decoder", ["linear", "convnext", "dpt"])
def test_float32_store_gives_the_uncached_validation_bit_for_bit(data, tmp_path, monkeypatch,
                                                                 capsys, backbone_calls,
                                                                 decoder):
    """--feature_cache off: the tokens kept as the backbone gives them; log.txt (losses,
    every validation metric and per-class IoU) equals an uncached run's exactly, and the
    backbone runs once per validation batch in the whole run instead of every epoch."""
    dataset, weights = data
    uncached(monkeypatch, *argv(dataset, weights, tmp_path / "plain",
                                *frozen(decoder=decoder)))
    assert backbone_calls.count(False) == 3 * EPOCHS
    out = capsys.readouterr().out
    assert "feature cache: validation" not in out
    del backbone_calls[:]
    run(*argv(dataset, weights, tmp_path / "cached", *frozen(decoder=decoder)))
    assert backbone_calls.count(False) == 3  # the first validation only
    out = capsys.readouterr().out
    assert out.count(">> feature cache: validation: ") == 1
    assert f">> feature cache: validation: {VAL} B-scans cached (ram, float32)" in out
    cached, plain = log_of(tmp_path / "cached"), log_of(tmp_path / "plain")
    assert [e["epoch"] for e in cached] == list(range(EPOCHS)) and "val/IoU" in cached[0]
    assert cached == plain


def test_no_store_where_the_encoder_trains(data, tmp_path, capsys, backbone_calls):
    """The paper protocol trains the patch projector: its tokens change at every step, so
    validation runs the backbone every time."""
    dataset, weights = data
    run(*argv(dataset, weights, tmp_path, "--epochs", 2, "--device", "cpu"))
    assert backbone_calls.count(False) == 3 * 2
    assert "feature cache" not in capsys.readouterr().out


def test_ram_and_disk_stores_hold_float16_and_agree(data, tmp_path, capsys, backbone_calls):
    """--feature_cache ram/disk: the validation tokens join the training views' store
    (float16; on disk in a group of their own, one 'orig' entry per B-scan); the two
    modes give the same log, bit for bit. A second run of the same backbone reads every
    validation entry from disk: its backbone never runs in eval mode."""
    dataset, weights = data
    cache_dir = tmp_path / "cache"
    disk = ("--feature_cache", "disk", "--feature_cache_dir", cache_dir,
            "--aug_name", "none", "--drop_path_encoder", 0)
    run(*argv(dataset, weights, tmp_path / "disk", *frozen(*disk)))
    assert backbone_calls.count(False) == VAL  # one B-scan per call (float16 store)
    out = capsys.readouterr().out
    folder = next(cache_dir.iterdir())
    assert f">> feature cache: validation: {VAL} B-scans cached (disk, {folder}, float16)" \
        in out
    groups = sorted(p.name for p in folder.iterdir() if p.is_dir())
    assert [g.split("-")[:2] for g in groups] == [["Tiny", "train"], ["Tiny", "val"]]
    val_entries = sorted(p.name for p in (folder / groups[1]).iterdir())
    assert len(val_entries) == VAL and all(n.endswith(".orig.pt") for n in val_entries)

    del backbone_calls[:]
    run(*argv(dataset, weights, tmp_path / "ram", *frozen("--feature_cache", "ram",
                                                          "--aug_name", "none",
                                                          "--drop_path_encoder", 0)))
    assert backbone_calls.count(False) == VAL  # one B-scan per call (float16 store)
    assert f"validation: {VAL} B-scans cached (ram, float16)" in capsys.readouterr().out
    assert log_of(tmp_path / "ram") == log_of(tmp_path / "disk")

    del backbone_calls[:]
    run(*argv(dataset, weights, tmp_path / "again", *frozen(*disk, "--seed", 7)))
    assert backbone_calls.count(False) == 0 and backbone_calls.count(True) == 0
    out = capsys.readouterr().out
    assert f"validation: {VAL} B-scans cached (disk, {folder}, float16), {VAL} of them " \
           "read from the cache" in out
    assert "0 views computed, 4 reused" in out


def test_a_store_that_does_not_fit_is_skipped_with_a_note(data, tmp_path, monkeypatch,
                                                          capsys, backbone_calls):
    dataset, weights = data
    monkeypatch.setattr(fc, "_memory_available", lambda: 10_000)
    run(*argv(dataset, weights, tmp_path / "small", *frozen()))
    out = capsys.readouterr().out
    # 5 B-scans x 6 tokens x 128 x 4 B + 2048 B each = 25600 B > 25% of 10000 B
    assert ">> feature cache: validation tokens are not cached (recomputed at every " \
           "validation): 5 B-scans need about 25.60 kB of memory, more than 25% of the " \
           "10.00 kB available" in out
    assert "B-scans cached" not in out
    assert backbone_calls.count(False) == 3 * EPOCHS
    uncached(monkeypatch, *argv(dataset, weights, tmp_path / "plain", *frozen()))
    assert log_of(tmp_path / "small") == log_of(tmp_path / "plain")


def test_the_training_ram_cache_counts_against_the_limit(data, monkeypatch):
    """With --feature_cache ram the limit is a share of what the training cache leaves."""
    from mirage.data.dataset import SegmentationDataset
    from mirage.data.layout import find_split, open_dataset
    from test_feature_cache import identity, model

    dataset, _ = data
    classes = open_dataset(dataset).class_table
    val = SegmentationDataset(find_split(dataset / "val", True), classes, None)
    train = SegmentationDataset(find_split(dataset / "train", True), classes, None)
    loader = type("Loader", (), {"dataset": val, "sampler": range(VAL)})
    seg, notes = model(), []
    training = fc.FeatureCache(fc.CacheSpec("ram", identity()), train, 2, notes.append)
    # validation, float16: 5 x (6 x 128 x 2 + 2048) = 17920 B; training: 8 x 3584 = 28672 B
    monkeypatch.setattr(fc, "_memory_available", lambda: 4 * 17920 + 28672)
    assert fc.open_split_cache(seg, loader, training, notes.append).mode == "ram"
    monkeypatch.setattr(fc, "_memory_available", lambda: 4 * 17920 + 28671)
    assert fc.open_split_cache(seg, loader, training, notes.append) is None
    assert notes[-1].endswith("more than 25% of the 100.35 kB available less the training "
                              "cache's 28.67 kB")
    seg.backbone_frozen = False  # an encoder that trains: never a store, no note
    assert fc.open_split_cache(seg, loader, None, notes.append) is None and len(notes) == 1


@pytest.mark.parametrize("mode, threads", [
    pytest.param("off", 1, id="off-1-thread"), pytest.param("off", 2, id="off-2-threads"),
    pytest.param("ram", 1, id="ram-1-thread"),
    pytest.param("ram", 2, id="ram-2-threads")],
    indirect=["threads"])
@pytest.mark.parametrize("kill_at", [(1, 1), (2, 0)], ids=["within-epoch-1", "before-epoch-2"])
def test_a_killed_run_with_the_validation_store_resumes_exactly(data, tmp_path, monkeypatch,
                                                                mode, threads, kill_at):
    """The resumed process fills its store again at its first validation (and, with
    'ram', its training cache, in batches other than those that first filled it): log and
    final checkpoints equal those of the run left alone, bit for bit, under 1 and 2
    threads."""
    dataset, weights = data
    extra = ("--save_ckpt_freq", 1, "--keep_ckpts", EPOCHS, "--lr", 3e-3)
    if mode == "off":  # stochastic depth and augmentation in training: tokens still fixed
        extra += ("--aug_name", "simple", "--drop_path_encoder", 0.1)
    else:
        extra += ("--feature_cache", "ram", "--aug_name", "flip")
    straight = argv(dataset, weights, tmp_path / "straight", *frozen(*extra))
    run(*straight)
    command = argv(dataset, weights, tmp_path / "killed", *frozen(*extra))
    interrupted(monkeypatch, command, lambda mp: kill_in_epoch(mp, *kill_at))
    run(*command)
    assert log_of(tmp_path / "killed") == log_of(tmp_path / "straight")
    for name in ("checkpoint-best.pth", f"checkpoint-{EPOCHS - 1}.pth"):
        a = ckpt.load_file(run_dir(tmp_path / "killed") / name)
        b = ckpt.load_file(run_dir(tmp_path / "straight") / name)
        assert_identical({k: a.get(k) for k in ("model", "optimizer", "random_state",
                                                "best_miou", "best_epoch")},
                         {k: b.get(k) for k in ("model", "optimizer", "random_state",
                                                "best_miou", "best_epoch")}, name)


def test_cli_protocol_benchmark_quick(capsys):
    """benchmarks/bench_protocols_cli.py --quick: one JSON object, epoch times per protocol
    read from each run's log.txt (timings are not asserted)."""
    import importlib.util
    from conftest import REPO
    spec = importlib.util.spec_from_file_location(
        "bench_protocols_cli", REPO / "benchmarks" / "bench_protocols_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.protocol_flags("linear_probe+ram", "c") == \
        ["--tuning", "linear_probe", "--feature_cache", "ram"]
    assert module.protocol_flags("fully_frozen+disk", "c") == \
        ["--freeze_patch_embed", "--feature_cache", "disk", "--feature_cache_dir", "c"]
    report = module.main(["--quick"])
    assert json.loads(capsys.readouterr().out) == report
    rows = {row["name"]: row for row in report["protocols"]}
    assert list(rows) == ["paper", "fully_frozen", "fully_frozen+ram"]
    for row in rows.values():
        assert len(row["epoch_seconds"]) == 2 and row["vs_paper"] > 0
    assert ">> feature cache: validation: 4 B-scans cached (ram, float32)" in \
        rows["fully_frozen"]["feature_cache_lines"]
    assert rows["paper"]["feature_cache_lines"] == []
    assert len(report["targets_met"]) == 8  # 2 targets x (wall, CPU) x (all, after first)


@pytest.mark.skipif(not __import__("torch").distributed.is_available(),
                    reason="torch without distributed")
def test_each_torchrun_process_keeps_its_shard(data, tmp_path):
    """2 gloo processes: each validates (and keeps the tokens of) its shard of the split;
    rank 0 says so."""
    import os
    import subprocess
    import sys
    from conftest import REPO
    dataset, weights = data
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", str(REPO / "run_seg_tuning.py"),
               *argv(dataset, weights, tmp_path / "out", *frozen())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout.replace("\r", "\n")
    # ShardSampler: rank 0 scores items 0, 2, 4
    assert out.count(">> feature cache: validation: ") == 1
    assert f"validation: 3 B-scans cached (ram, float32; this process's shard of {VAL})" in out
    assert [e["epoch"] for e in log_of(tmp_path / "out")] == list(range(EPOCHS))
