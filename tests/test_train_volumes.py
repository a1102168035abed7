"""Training-set size (issue 28): --train_volumes / --train_fraction / --subset_seed.

Nested subsets of whole volumes, chosen the same way by every model, training seed,
process and resume; the run identity and name (the whole split keeps today's); a size the
split cannot give; what the loader serves; resume and the feature cache under a subset."""
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, make_dataset, write_mirage_checkpoint
from mirage.config import build_parser, load_yaml, parse_config
from mirage.data.dataset import SegmentationDataset
from mirage.data.layout import find_split
from mirage.data.subsets import TrainSubset, choose_volumes, subset_size, volume_order
from mirage.errors import UserError
from mirage.option_checks import check_train_set
from mirage.options import TRAIN_SET_OPTIONS, default_options
from mirage.run.identity import identity_hash, option_identity, run_dir_for_argv
from test_exact_resume import assert_identical, interrupted, kill_in_epoch
from test_run_identity import fails_with
from test_training import argv, run

IDS = [f"patient{i:02d}" for i in range(12)]
VOLUMES = 4  # of the training split below, 4 B-scans each


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A dataset whose training split has 4 volumes (trainvol0..3, 4 B-scans each)."""
    from fm_seg_config import MirageTiny
    root = tmp_path_factory.mktemp("subsets")
    dataset = make_dataset(root / "datasets", splits={"train": 4 * VOLUMES, "val": 2,
                                                      "test": 3})
    weights = write_mirage_checkpoint(root / "MIRAGE-Tiny.pth", MirageTiny(), input_size=64)
    return dataset, weights


# ----------------------------------------------------------------------------- choosing
def test_subsets_are_nested_and_another_subset_seed_draws_other_volumes():
    for seed in (0, 1, 7):
        chosen = {n: choose_volumes(IDS, size=n, seed=seed) for n in (1, 2, 4, 8, 12)}
        for n, volumes in chosen.items():
            assert volumes == sorted(volumes) and len(set(volumes)) == n
        assert set(chosen[1]) < set(chosen[2]) < set(chosen[4]) < set(chosen[8])
        assert chosen[12] == IDS
    assert choose_volumes(IDS, size=4, seed=0) != choose_volumes(IDS, size=4, seed=1)
    # the order is the SHA-256 of "<seed>/<volume ID>": the same in every version and
    # process, whatever random generators the libraries have
    by_hash = sorted(IDS, key=lambda v: hashlib.sha256(f"3/{v}".encode()).hexdigest())
    assert volume_order(IDS, 3) == by_hash
    assert choose_volumes(IDS, size=5, seed=3) == sorted(by_hash[:5])
    # a volume added to the split leaves the others in their order
    grown = volume_order(IDS + ["patient99"], 3)
    assert [v for v in grown if v != "patient99"] == by_hash


def test_fractions_round_up_to_whole_volumes():
    assert subset_size(12, fraction=0.25) == 3
    assert subset_size(10, fraction=0.3) == 3  # 0.3 x 10 = 3.0000000000000004
    assert subset_size(12, fraction=0.01) == 1  # at least one
    assert subset_size(12, fraction=0.26) == 4
    assert subset_size(12, fraction=1.0) == 12
    assert choose_volumes(IDS, fraction=0.25, seed=2) == choose_volumes(IDS, size=3, seed=2)


def test_a_size_larger_than_the_split_names_its_size():
    with pytest.raises(UserError, match="the training split has 12 volumes; give at most 12"):
        choose_volumes(IDS, size=13)


def test_select_keeps_whole_volumes(data):
    dataset, _ = data
    slices = find_split(dataset / "train", True)
    subset = TrainSubset(volumes=2, seed=0).select(slices)
    assert len(subset.volumes) == 2 and subset.split_volumes == [f"trainvol{i}"
                                                                 for i in range(VOLUMES)]
    assert sorted(s.slice_id for s in subset.slices) == sorted(
        s.slice_id for s in slices if s.slice_id.rsplit("_", 1)[0] in subset.volumes)
    assert len(subset.slices) == 8
    assert TrainSubset().select(slices).slices == slices  # the whole split, in its order


# ----------------------------------------------------------------------------- options
def test_options_parse_from_the_command_line_and_yaml(tmp_path):
    config, _, _ = parse_config(["--train_volumes", "ALL"])
    assert config["train_volumes"] == "all" and config["train_fraction"] == "all"
    config, _, _ = parse_config(["--train_volumes", "4", "--subset_seed", "2"])
    assert (config["train_volumes"], config["subset_seed"]) == (4, 2)
    config, _, _ = parse_config(["--train_fraction", "0.25"])
    assert config["train_fraction"] == 0.25
    path = tmp_path / "c.yaml"
    path.write_text("train_volumes: all\ntrain_fraction: 0.5\nsubset_seed: 3\n")
    assert load_yaml(path) == {"train_volumes": "all", "train_fraction": 0.5,
                               "subset_seed": 3}
    path.write_text("train_volumes: 8\n")
    assert load_yaml(path) == {"train_volumes": 8}
    with pytest.raises(UserError, match="expected a whole number or all"):
        parse_config(["--train_volumes", "2.5"])
    with pytest.raises(UserError, match=r"expected a number in \(0, 1\] or all"):
        parse_config(["--train_fraction", "half"])
    text = build_parser().format_help()
    assert "--train_volumes" in text and "(default: all)" in text


@pytest.mark.parametrize("changes, words", [
    ({"train_volumes": 4, "train_fraction": 0.5}, "--train_volumes 4 and --train_fraction "
                                                  "0.5 both give the training-set size"),
    ({"train_fraction": 0.0}, "--train_fraction 0: must be in (0, 1]"),
    ({"train_fraction": 1.5}, "--train_fraction 1.5: must be in (0, 1]"),
    ({"subset_seed": 1}, "--subset_seed 1 applies only with --train_volumes N or "
                         "--train_fraction F"),
])
def test_impossible_combinations_are_refused(changes, words):
    with pytest.raises(UserError) as error:
        check_train_set(default_options(**changes))
    assert words in str(error.value) and "\n" not in str(error.value)


def test_a_bad_size_is_one_line_at_the_command_line(data, tmp_path, capsys):
    dataset, weights = data
    base = argv(dataset, weights, tmp_path)
    assert "--train_volumes must be at least 1 (got 0)" in fails_with(
        capsys, *base, "--train_volumes", "0")
    error = fails_with(capsys, *base, "--train_volumes", "5")
    assert "--train_volumes 5: the training split has 4 volumes; give at most 4" in error
    assert not (tmp_path / "v1").exists() or not any((tmp_path / "v1").rglob("*.json"))
    # the runner asks the same before a grid starts
    with pytest.raises(UserError, match="the training split has 4 volumes"):
        run_dir_for_argv(base + ["--train_volumes", "5"])


# ----------------------------------------------------------------------------- identity
# identity_hash of the default options plus these entries, computed with the code before
# the training-set size existed (commit 20593a8): a run of the whole split keeps it.
FIXED = {"weights_name": "MIRAGE-Tiny.pth", "weights_sha256": "0" * 64, "dataset": "Tiny",
         "classes": [[0, "Background"], [100, "Layer"]]}
BEFORE = {(): "02ca2fd0", (("lr", 1e-3), ("seed", 3)): "0e22d80e",
          (("tuning", "lora"),): "64532b5f"}


def test_the_whole_split_keeps_todays_identity_and_hash():
    for changes, expected in BEFORE.items():
        for whole in ({}, {"train_volumes": "all", "train_fraction": "all",
                           "subset_seed": 0}):
            identity = option_identity(default_options(**dict(changes), **whole))
            assert not set(identity) & set(TRAIN_SET_OPTIONS)
            assert identity_hash({**identity, **FIXED}) == expected


def test_a_size_names_the_run_and_the_whole_split_keeps_its_name(data, tmp_path):
    dataset, weights = data
    base = argv(dataset, weights, tmp_path)
    whole = run_dir_for_argv(base)
    assert run_dir_for_argv(base + ["--train_volumes", "all", "--train_fraction", "all",
                                    "--subset_seed", "0"]) == whole
    assert whole.name.startswith("MIRAGE-Tiny_frozen_linear_CE-ignore-bg_s42_")
    names = {extra: run_dir_for_argv(base + list(extra)).name for extra in (
        ("--train_volumes", "2"), ("--train_volumes", "2", "--subset_seed", "1"),
        ("--train_fraction", "0.5"), ("--train_fraction", "0.125"))}
    assert names[("--train_volumes", "2")].startswith(
        "MIRAGE-Tiny_frozen_linear_CE-ignore-bg_v2_s42_")
    assert "_v2_ss1_s42_" in names[("--train_volumes", "2", "--subset_seed", "1")]
    assert "_f50_s42_" in names[("--train_fraction", "0.5")]
    assert "_f12.5_s42_" in names[("--train_fraction", "0.125")]
    assert len(set(names.values()) | {whole.name}) == 5
    config, _, _ = parse_config(base + ["--train_volumes", "2"])
    identity = option_identity(config)
    assert (identity["train_volumes"], identity["subset_seed"]) == (2, 0)
    assert "train_fraction" not in identity


# ----------------------------------------------------------------------------- training
@pytest.fixture
def served(monkeypatch):
    """{split folder name: [slice ids]} of every item the datasets serve."""
    found = {}
    real = SegmentationDataset.__getitem__

    def recording(self, index):
        files = self.slices[index]
        found.setdefault(files.split_dir.name, []).append(files.slice_id)
        return real(self, index)
    monkeypatch.setattr(SegmentationDataset, "__getitem__", recording)
    return found


def test_training_serves_only_the_chosen_volumes(data, tmp_path, capsys, served):
    dataset, weights = data
    run_dir = run(*argv(dataset, weights, tmp_path, "--epochs", 2, "--train_volumes", 2,
                        "--subset_seed", 5))
    chosen = choose_volumes([f"trainvol{i}" for i in range(VOLUMES)], size=2, seed=5)
    record = json.loads((run_dir / "train_volumes.json").read_text())
    assert record["volumes"] == chosen and record["split_volumes"] == VOLUMES
    assert (record["bscans"], record["train_volumes"], record["subset_seed"]) == (8, 2, 5)
    expected = {f"{volume}_{i}" for volume in chosen for i in range(4)}
    assert set(served["train"]) == expected and len(served["train"]) == 2 * len(expected)
    assert set(served["val"]) == {"valvol0_0", "valvol0_1"}  # validation: unchanged
    assert set(served["test"]) == {"testvol0_0", "testvol0_1", "testvol0_2"}
    out = capsys.readouterr().out
    assert f"training set: 2 of 4 volumes (subset seed 5): {', '.join(chosen)} (8 B-scans)" \
        in out
    assert "8 training / 2 validation B-scans" in out


@pytest.mark.parametrize("tuning", ["frozen", "fully_frozen", "linear_probe", "lora",
                                    "full"])
def test_every_protocol_trains_on_the_subset(data, tmp_path, served, tuning):
    dataset, weights = data
    extra = ("--output_adapter", "linear") if tuning == "linear_probe" else ()
    command = argv(dataset, weights, tmp_path, "--epochs", 1, "--tuning", tuning,
                   "--train_volumes", 1, "--subset_seed", 3)
    if extra:  # linear_probe brings its own decoder: the base options' one is dropped
        command = command[:command.index("--output_adapter")] + \
            command[command.index("--output_adapter") + 2:]
    run_dir = run(*command)
    (chosen,) = choose_volumes([f"trainvol{i}" for i in range(VOLUMES)], size=1, seed=3)
    assert {s.rsplit("_", 1)[0] for s in served["train"]} == {chosen}
    assert len(served["train"]) == 4
    named = "linear_probe" if tuning == "fully_frozen" else tuning  # the linear decoder
    assert "_v1_ss3_s42_" in run_dir.name and f"_{named}_linear_" in run_dir.name


def test_a_whole_split_run_records_every_volume(data, tmp_path, capsys):
    dataset, weights = data
    run_dir = run(*argv(dataset, weights, tmp_path, "--epochs", 1))
    record = json.loads((run_dir / "train_volumes.json").read_text())
    assert record["volumes"] == [f"trainvol{i}" for i in range(VOLUMES)]
    assert (record["train_volumes"], record["subset_seed"]) == ("all", None)
    assert "training set: all 4 volumes of the training split (16 B-scans)" in \
        capsys.readouterr().out


def _outcome(run_dir):
    log = [{k: v for k, v in json.loads(line).items() if k != "time"}
           for line in (run_dir / "log.txt").read_text().splitlines()]
    return log, torch.load(run_dir / "checkpoint-best.pth", weights_only=True)["model"]


def test_a_killed_subset_run_resumes_on_its_volumes_exactly(data, tmp_path, monkeypatch,
                                                            capsys):
    dataset, weights = data
    extra = ("--epochs", 3, "--save_ckpt_freq", 1, "--train_volumes", 2, "--device", "cpu",
             "--aug_name", "flip", "--lr", 3e-3)
    straight = run(*argv(dataset, weights, tmp_path / "straight", *extra))
    command = argv(dataset, weights, tmp_path / "killed", *extra)
    interrupted(monkeypatch, command, lambda mp: kill_in_epoch(mp, 1, 2))
    capsys.readouterr()
    resumed = run(*command)
    assert "resumed from" in capsys.readouterr().out
    assert_identical(_outcome(resumed), _outcome(straight))
    assert (resumed / "train_volumes.json").read_text() == \
        (straight / "train_volumes.json").read_text()


def test_a_subset_run_whose_split_changed_is_not_resumed(tmp_path, monkeypatch, capsys):
    from fm_seg_config import MirageTiny
    dataset = make_dataset(tmp_path / "datasets", splits={"train": 16, "val": 2})
    weights = write_mirage_checkpoint(tmp_path / "MIRAGE-Tiny.pth", MirageTiny())
    command = argv(dataset, weights, tmp_path / "out", "--epochs", 2, "--train_volumes", 1,
                   "--save_ckpt_freq", 1)
    interrupted(monkeypatch, command, lambda mp: kill_in_epoch(mp, 1, 0))
    (chosen,) = choose_volumes([f"trainvol{i}" for i in range(4)], size=1)
    for sub in ("bscan", "semseg"):  # the volume it trained on leaves the split
        for path in (dataset / "train" / sub).glob(f"{chosen}_*"):
            path.unlink()
    error = fails_with(capsys, *command)
    assert f"the run started on the volumes {chosen}, but the training split now gives" \
        in error


def test_a_subset_run_reuses_the_disk_cache_of_a_whole_split_run(data, tmp_path, capsys):
    """The cache keys an entry by dataset, split and B-scan: a run on 2 of 4 volumes reads
    the tokens a run of the whole split computed, and computes none."""
    dataset, weights = data
    cache = tmp_path / "cache"
    frozen = ("--epochs", 1, "--tuning", "fully_frozen", "--feature_cache", "disk",
              "--feature_cache_dir", cache, "--device", "cpu")
    run(*argv(dataset, weights, tmp_path / "whole", *frozen))
    assert "16 views computed, 0 reused" in capsys.readouterr().out
    run(*argv(dataset, weights, tmp_path / "part", *frozen, "--train_volumes", 2))
    out = capsys.readouterr().out
    assert "8 training views of" in out and "0 views computed, 8 reused" in out
    assert "validation: 2 B-scans cached" in out and "2 of them read from the cache" in out
    entries = sorted(p.name for p in cache.rglob("*.pt"))
    assert len(entries) == 16 + 2  # one per training and validation B-scan, never twice


def test_a_whole_split_run_computes_only_what_a_subset_run_left(data, tmp_path, capsys):
    dataset, weights = data
    cache = tmp_path / "cache"
    frozen = ("--epochs", 1, "--tuning", "fully_frozen", "--feature_cache", "disk",
              "--feature_cache_dir", cache, "--device", "cpu")
    run(*argv(dataset, weights, tmp_path / "part", *frozen, "--train_volumes", 1))
    assert "4 views computed, 0 reused" in capsys.readouterr().out
    run(*argv(dataset, weights, tmp_path / "whole", *frozen))
    assert "12 views computed, 4 reused" in capsys.readouterr().out


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")
def test_torchrun_processes_train_on_the_same_volumes(data, tmp_path):
    """2 gloo processes: each draws the same subset and takes its shard of it."""
    dataset, weights = data
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", str(REPO / "run_seg_tuning.py"),
               *argv(dataset, weights, tmp_path / "out", "--epochs", 1, "--device", "cpu",
                     "--train_volumes", 3, "--subset_seed", 1)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    chosen = choose_volumes([f"trainvol{i}" for i in range(VOLUMES)], size=3, seed=1)
    assert result.stdout.count(f"training set: 3 of 4 volumes (subset seed 1): "
                               f"{', '.join(chosen)} (12 B-scans)") == 1  # rank 0 logs
    assert "12 training / 2 validation B-scans, 3 steps per epoch of 4" in result.stdout
    (run_dir,) = (tmp_path / "out" / "v1" / "Tiny").iterdir()
    assert json.loads((run_dir / "train_volumes.json").read_text())["volumes"] == chosen


# ----------------------------------------------------------------------------- the runner
def test_the_runner_passes_all_through_and_checks_every_size_up_front(data, tmp_path,
                                                                      capsys):
    """The label-efficiency grid of the docs: sizes (with 'all') x seeds; every job's
    run directory is resolved before anything runs, and 'all' is today's folder."""
    from mirage.grid import runner
    from test_runner import one_error_line, tuning_base
    dataset, weights = data
    out = tmp_path / "out"
    base = tuning_base(dataset, weights, out)
    grid = ["--train_volumes", "1", "2", "all", "--seed", "0", "1"]
    assert runner.main(base + ["--runner-info", "--", *grid]) == 0
    printed = capsys.readouterr().out
    assert "6 combination(s) of --train_volumes x3, --seed x2" in printed
    assert printed.count("--train_volumes all --seed") == 2
    names = {run_dir_for_argv([*map(str, base[2:]), "--train_volumes", size, "--seed",
                               seed]).name for size in ("1", "2", "all") for seed in "01"}
    assert len(names) == 6
    assert sum("_v" not in name.split("CE-ignore-bg")[1] for name in names) == 2
    # a size the split cannot give stops the grid before it starts, naming the job
    with pytest.raises(SystemExit) as stop:
        runner.main(base + ["--runner-info", "--", "--train_volumes", "2", "8"])
    assert stop.value.code == 2
    line = one_error_line(capsys)
    assert "job 2 (--train_volumes 8)" in line and "the training split has 4 volumes" in line
    # subset seeds beside 'all' would change nothing: refused, with the filter to use
    with pytest.raises(SystemExit):
        runner.main(base + ["--runner-info", "--", "--train_volumes", "2", "all",
                            "--subset_seed", "0", "1"])
    assert "--runner-filter train_volumes=all,subset_seed=1" in one_error_line(capsys)
    assert runner.main(base + ["--runner-info", "--runner-filter",
                               "train_volumes=all,subset_seed=1", "--", "--train_volumes",
                               "2", "all", "--subset_seed", "0", "1"]) == 0
