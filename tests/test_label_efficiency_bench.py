"""Smoke test of benchmarks/bench_label_efficiency.py (--quick): one JSON object with the
figures the docs quote. Timings are not asserted; the encoder's work is."""
import json

from test_protocols_bench import bench


def test_label_efficiency_benchmark_quick(capsys):
    report = bench("bench_label_efficiency").main(["--quick"])
    assert json.loads(capsys.readouterr().out) == report  # exactly one JSON object
    modes = {row["mode"]: row for row in report["modes"]}
    assert list(modes) == ["off", "ram", "disk"]
    for row in modes.values():
        assert [(r["train_volumes"], r["seed"]) for r in row["runs"]] == [
            (1, 0), (1, 1), (2, 0), (2, 1), (4, 0), (4, 1)]
        assert row["cpu_seconds"] > 0 and all(r["cpu_s"] > 0 for r in row["runs"])
    # 2 B-scans a volume, 1 epoch: every run encodes its 2, 4 or 8 training B-scans and
    # the 2 validation ones; with the shared disk cache the grid encodes each B-scan once
    assert modes["off"]["encoder_bscans"] == {"training": 2 * (2 + 4 + 8), "validation": 12}
    assert modes["ram"]["encoder_bscans"] == {"training": 2 * (2 + 4 + 8), "validation": 12}
    assert modes["disk"]["encoder_bscans"] == {"training": 8, "validation": 2}
    assert set(report["cpu_ratios"]) == {"disk_vs_off", "disk_vs_ram", "ram_vs_off"}
    assert report["config"]["runs_per_mode"] == 6 and report["machine"]["cpu_count"] >= 1
