"""Smoke tests of the speed benchmarks (--quick): each prints one JSON object with the
figures the docs quote. Timings are not asserted (they belong to the benchmarks)."""
import importlib.util
import json

from conftest import REPO


def bench(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_protocols_benchmark_quick(capsys):
    bench("bench_protocols").main(["--quick"])
    report = json.loads(capsys.readouterr().out)  # exactly one JSON object
    names = [row["name"] for row in report["protocols"]]
    assert names == ["paper", "fast_paper", "fully_frozen", "fully_frozen_cached_ram",
                     "fully_frozen_cached_disk", "linear_probe", "linear_probe_cached_ram",
                     "lora", "full"]
    sizes = report["sizes"]["mirage-tiny"]["protocols"]  # at 1024x1024, 9 classes
    assert set(sizes) == {"frozen", "fully_frozen", "linear_probe", "lora", "full"}
    trainable = {name: row["trainable"] for name, row in sizes.items()}
    assert trainable["linear_probe"] < trainable["fully_frozen"] < trainable["frozen"] \
        < trainable["lora"] < trainable["full"]
    assert sizes["full"]["best_checkpoint_MB"] > sizes["frozen"]["best_checkpoint_MB"]
    for row in report["protocols"]:
        assert row["seconds_per_step"] > 0 and row["samples_per_s"] > 0
        assert row["relative_to_paper"] > 0
    assert set(report["targets_met"]) == {"fully_frozen <= 0.85x paper",
                                          "fully_frozen_cached_ram <= 0.6x paper",
                                          "fast_paper <= 1.0x paper (no slower)"}
    assert report["machine"]["cpu_count"] >= 1 and report["config"]["batch"] == 2


def test_cuda_plan_lists_every_protocol_and_dtype():
    module = bench("bench_protocols")
    args = type("Args", (), {"models": ["mirage-large", "vit-l16"], "size": (1024, 1024)})
    import torch
    specs = module.plan(args, torch.device("cuda"))
    names = {s["name"] for s in specs if s["model"] == "vit-l16"}
    assert {"paper_fp16", "fast_paper_bf16", "fast_paper_bf16_checkpointing",
            "fully_frozen_bf16", "fully_frozen_cached_ram_bf16"} <= names
    rows = [{"model": "vit-l16", "name": "paper_fp16", "protocol": "paper",
             "seconds_per_step": 1.0},
            {"model": "vit-l16", "name": "fast_paper_bf16_checkpointing",
             "protocol": "fast_paper", "seconds_per_step": 0.9, "peak_gpu_GiB": 10.0},
            {"model": "vit-l16", "name": "fully_frozen_bf16", "protocol": "fully_frozen",
             "seconds_per_step": 0.5},
            {"model": "vit-l16", "name": "fully_frozen_cached_ram_bf16",
             "protocol": "fully_frozen", "seconds_per_step": 0.35}]
    module.ratios(rows)
    assert module.targets(rows, "cuda") == {
        "vit-l16: fast_paper bf16 + checkpointing peak < 22 GB": True,   # 10.7 GB
        "vit-l16: fully_frozen <= 0.7x paper": True,
        "vit-l16: cached <= 0.3x paper": False}


def test_data_pipeline_benchmark_quick(capsys):
    bench("bench_train").main(["--quick"])
    report = json.loads(capsys.readouterr().out)
    data = report["data"]
    assert data["samples_per_s_per_worker"] > 0
    assert data["dataloader_2_workers_samples_per_s_per_worker"] > 0
    assert report["train_step"][0]["seconds_per_step"] > 0


def test_evaluation_benchmark_quick(capsys):
    report = bench("bench_eval").main(["--quick"])
    assert json.loads(capsys.readouterr().out) == report  # one JSON object
    assert set(report["evaluate_seconds"]) == {"workers_1", "workers_2"}
    assert report["cli_seconds_workers_2"] > 0
