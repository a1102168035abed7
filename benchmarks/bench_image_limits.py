"""Peak memory of the dataset check and of run_seg_eval.py with a decompression bomb; prints JSON.

A bomb is a small PNG whose header announces a huge all-zero image (--side x --side
pixels, 8 bit; 30000 x 30000 is ~0.9 MB on disk and 900 MB decoded). Each case runs in a
fresh Python process that reports its own peak resident memory (``ru_maxrss``):

* ``check_split``: ``mirage.data.layout.check_split`` on a tiny dataset (8 train slices of
  64x96), as is (``normal``) and with one mask replaced by the bomb (``bomb_mask``);
* ``evaluate``: ``run_seg_eval.py`` (``mirage.cli.evaluate``, ``--foreign_predictions
  --no_report --workers 1``) on a run of 6 predictions, as is and with one prediction
  replaced by the bomb (``bomb_prediction``).

For each case: ``peak_rss_mib``, ``outcome`` (``ok``, ``exit <code>`` or the exception
type) and the last line written to stderr; ``extra_mib`` is the bomb case's peak minus
the normal one's.

    python benchmarks/bench_image_limits.py [--side 30000]
"""
import argparse
import json
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]

VALUES = (0, 100, 200)

# Runs in the child process: argv = case, folder. Prints one JSON line.
CHILD = r"""
import contextlib, io, json, resource, sys
sys.path.insert(0, sys.argv[3])
case, folder = sys.argv[1], sys.argv[2]
err = io.StringIO()
outcome = "ok"
try:
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        if case == "check_split":
            from mirage.data.layout import check_split, find_split, open_dataset
            info = open_dataset(folder)
            check_split(find_split(info.split_dir("train"), need_masks=True),
                        info.class_table, workers=1)
        else:
            from mirage.cli import evaluate
            evaluate(["-d", folder + "/datasets", "-m", folder + "/runs/Tiny/run_a",
                      "--foreign_predictions", "--no_report", "--workers", "1"])
except SystemExit as stop:
    outcome = f"exit {stop.code}"
except Exception as exc:
    outcome = type(exc).__name__
    err.write(f"{exc}\n")
lines = [l for l in err.getvalue().splitlines() if l.strip()]
print(json.dumps({"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                        / 1024, 1),
                  "outcome": outcome, "stderr_last_line": lines[-1][:500] if lines else ""}))
"""


def png_bomb(width, height, block_rows=256):
    """PNG bytes of an all-zero 8-bit ``width`` x ``height`` image, built without ever
    holding the image: every row is the filter byte 0 and ``width`` zero bytes, so one
    compressed block of rows (ended by a full flush, which makes it independent of what
    came before) is repeated, and the Adler-32 of n zero bytes is (n mod 65521) << 16 | 1."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    total = (width + 1) * height
    block = (width + 1) * min(block_rows, height)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    piece = deflate.compress(bytes(block)) + deflate.flush(zlib.Z_FULL_FLUSH)
    repeats, rest = divmod(total, block)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    end = deflate.compress(bytes(rest)) + deflate.flush()
    adler = ((total % 65521) << 16) | 1
    idat = b"\x78\xda" + piece * repeats + end + struct.pack(">I", adler)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


def write_split(folder, count, rng, masks_only=False):
    """``count`` slices of 64x96 (B-scan and mask with the VALUES) under ``folder``."""
    for sub in ("semseg",) if masks_only else ("bscan", "semseg"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        mask = np.asarray(VALUES, np.uint8)[rng.integers(0, 3, (64, 96))]
        cv2.imwrite(str(folder / "semseg" / f"vol{i // 4}_{i % 4}.png"), mask)
        if not masks_only:
            image = rng.integers(0, 256, (64, 96), dtype=np.uint8)
            cv2.imwrite(str(folder / "bscan" / f"vol{i // 4}_{i % 4}.png"), image)


def write_info(folder):
    folder.mkdir(parents=True, exist_ok=True)
    info = {str(i): {"value": v, "label": f"class{i}"} for i, v in enumerate(VALUES)}
    (folder / "INFO.json").write_text(json.dumps(info))


def measure(case, folder):
    result = subprocess.run([sys.executable, "-c", CHILD, case, str(folder), str(ROOT)],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", type=int, default=30000, help="bomb width and height")
    args = parser.parse_args(argv)
    bomb = png_bomb(args.side, args.side)
    report = {"bomb": {"width": args.side, "height": args.side, "file_bytes": len(bomb)}}
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        dataset = Path(tmp) / "Tiny"
        write_info(dataset)
        write_split(dataset / "train", 8, rng)
        evaluation = Path(tmp) / "eval"
        write_info(evaluation / "datasets" / "Tiny")
        write_split(evaluation / "datasets" / "Tiny" / "test", 6, rng, masks_only=True)
        preds = evaluation / "runs" / "Tiny" / "run_a" / "preds"
        write_split(preds.parent, 6, rng, masks_only=True)
        (preds.parent / "semseg").rename(preds)
        cases = {"check_split": (dataset, dataset / "train" / "semseg" / "vol1_2.png"),
                 "evaluate": (evaluation, preds / "vol1_1.png")}
        for case, (folder, victim) in cases.items():
            normal = measure(case, folder)
            victim.write_bytes(bomb)
            bombed = measure(case, folder)
            report[case] = {"normal": normal, "bomb": bombed,
                            "extra_mib": round(bombed["peak_rss_mib"]
                                               - normal["peak_rss_mib"], 1)}
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
