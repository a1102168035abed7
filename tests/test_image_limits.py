"""Image sizes read from file headers, and images over the pixel limit refused before decoding.

A decompression bomb is built by hand (:func:`png_bomb`): a ~1.5 MB PNG whose header says
40000 x 40000 pixels, made without ever holding the image, so these tests stay small in
memory. 40000 x 40000 is also over OpenCV's own limit (2**30 pixels), so code that hands
the file to OpenCV fails fast (with a traceback) instead of decoding 1.6 GB.
"""
import shutil
import struct

import cv2
import numpy as np
import pytest

from conftest import make_dataset
from mirage import fileio
from mirage.cli import evaluate
from mirage.data.layout import check_split, find_split, open_dataset
from benchmarks.bench_image_limits import png_bomb  # one builder for tests and benchmark
from mirage.errors import UserError
from mirage.fileio import DEFAULT_MAX_PIXELS, MAX_PIXELS_ENV, image_size, read_gray

BOMB_SIDE = 40000


@pytest.fixture(scope="module")
def bomb():
    return png_bomb(BOMB_SIDE, BOMB_SIDE)


def assert_bomb_error(message, path, side=BOMB_SIDE):
    """The one-line refusal: the file, its size, the limit and how to raise it."""
    assert "\n" not in message
    assert str(path) in message and f"{side}x{side} pixels" in message
    assert f"limit of {DEFAULT_MAX_PIXELS} pixels (16384x16384)" in message
    assert f"{MAX_PIXELS_ENV}={side * side}" in message


# ----------------------------------------------------------------------------- headers
# OpenCV writes BMP and JPEG with 8 bits only.
FORMATS = [(".png", np.uint8), (".png", np.uint16), (".tif", np.uint8), (".tif", np.uint16),
           (".bmp", np.uint8), (".jpg", np.uint8)]


@pytest.mark.parametrize("shape", [(1, 1), (5, 17), (64, 96), (1000, 333), (496, 1536)])
@pytest.mark.parametrize("suffix, dtype", FORMATS)
def test_header_size_and_pixels_of_images_written_by_opencv(tmp_path, shape, suffix, dtype):
    rng = np.random.default_rng(shape[0] * shape[1])
    image = rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)
    path = tmp_path / f"image{suffix}"
    assert cv2.imwrite(str(path), image)
    assert image_size(path) == (shape[1], shape[0])
    decoded = read_gray(path)
    assert decoded.shape == shape and decoded.dtype == dtype
    if suffix != ".jpg":  # lossless: the very same pixels
        assert np.array_equal(decoded, image)


def test_jpeg_size_is_found_after_other_segments(tmp_path):
    image = np.full((40, 70), 128, np.uint8)
    ok, encoded = cv2.imencode(".jpg", image)
    data = encoded.tobytes()
    comment = b"\xff\xfe" + struct.pack(">H", 2 + 3000) + bytes(3000)  # a COM segment
    path = tmp_path / "image.jpg"
    path.write_bytes(data[:2] + comment + data[2:])
    assert image_size(path) == (70, 40)
    assert read_gray(path).shape == (40, 70)


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("big", [False, True])
def test_tiff_headers_in_both_byte_orders_and_bigtiff(tmp_path, order, big):
    """Headers only (never decoded): width as LONG, height as SHORT, another tag first."""
    mark = b"II" if order == "<" else b"MM"
    if big:
        head = mark + struct.pack(order + "HHHQ", 43, 8, 0, 16)
        count = struct.pack(order + "Q", 3)
        entries = [struct.pack(order + "HHQ", tag, kind, 1) + value.ljust(8, b"\0")
                   for tag, kind, value in [(254, 4, struct.pack(order + "I", 0)),
                                            (256, 4, struct.pack(order + "I", 70000)),
                                            (257, 3, struct.pack(order + "H", 123))]]
    else:
        head = mark + struct.pack(order + "HI", 42, 8)
        count = struct.pack(order + "H", 3)
        entries = [struct.pack(order + "HHI", tag, kind, 1) + value.ljust(4, b"\0")
                   for tag, kind, value in [(254, 4, struct.pack(order + "I", 0)),
                                            (256, 4, struct.pack(order + "I", 70000)),
                                            (257, 3, struct.pack(order + "H", 123))]]
    path = tmp_path / "image.tif"
    path.write_bytes(head + count + b"".join(entries))
    assert image_size(path) == (70000, 123)


def test_hand_built_bomb_is_a_valid_png(tmp_path):
    """The builder makes real PNGs: a small one decodes to zeros of its size."""
    path = tmp_path / "small.png"
    path.write_bytes(png_bomb(300, 700, block_rows=64))
    assert image_size(path) == (300, 700)
    decoded = read_gray(path)
    assert decoded.shape == (700, 300) and decoded.dtype == np.uint8 and not decoded.any()


@pytest.mark.parametrize("content, match", [
    (b"", "is empty"),
    (b"not an image at all", "is not a readable image (not PNG, JPEG, TIFF or BMP data)"),
    (b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR\0\0", "is not a readable image (truncated or corrupt "
                                             "header)"),
    ("half", "is not a readable image (truncated or corrupt data)"),
])
def test_truncated_and_non_image_files_are_one_line_errors(tmp_path, content, match):
    path = tmp_path / "scan_0.png"
    if content == "half":
        assert cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 255, (64, 96),
                                                                        dtype=np.uint8))
        content = path.read_bytes()[:path.stat().st_size // 2]
    path.write_bytes(content)
    with pytest.raises(UserError) as err:
        read_gray(path)
    assert str(path) in str(err.value) and match in str(err.value)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- the limit
def test_limit_is_read_from_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "scan_0.png"
    assert cv2.imwrite(str(path), np.zeros((64, 64), np.uint8))
    monkeypatch.setenv(MAX_PIXELS_ENV, "4096")  # exactly 64 x 64: allowed
    assert read_gray(path).shape == (64, 64)
    monkeypatch.setenv(MAX_PIXELS_ENV, "4095")
    with pytest.raises(UserError, match=r"scan_0.png is 64x64 pixels, over the limit of "
                                        r"4095 pixels; .* MIRAGE_MAX_IMAGE_PIXELS=4096$"):
        read_gray(path)
    monkeypatch.setenv(MAX_PIXELS_ENV, "100")
    with pytest.raises(UserError, match=r"limit of 100 pixels \(10x10\)"):
        read_gray(path)
    for bad in ("lots", "0", "-5"):
        monkeypatch.setenv(MAX_PIXELS_ENV, bad)
        with pytest.raises(UserError, match=f"environment variable {MAX_PIXELS_ENV}="):
            read_gray(path)


def test_bomb_is_refused_without_decoding(tmp_path, monkeypatch, bomb):
    path = tmp_path / "scan_0.png"
    path.write_bytes(bomb)

    def no_decoding(*args):
        raise AssertionError("the bomb reached the decoder")

    monkeypatch.setattr(fileio.cv2, "imdecode", no_decoding)
    with pytest.raises(UserError) as err:
        read_gray(path)
    assert_bomb_error(str(err.value), path)
    monkeypatch.setenv(MAX_PIXELS_ENV, "1000")  # a bomb under OpenCV's own limit, too
    small = tmp_path / "scan_1.png"
    small.write_bytes(png_bomb(40, 30))
    with pytest.raises(UserError, match="scan_1.png is 40x30 pixels, over the limit of 1000"):
        read_gray(small)


# ----------------------------------------------------------------------------- where it is read
def test_bomb_in_training_bscans_stops_training_with_one_line(tiny_dataset, tiny_weights,
                                                              tmp_path, capsys, bomb):
    import run_seg_tuning
    path = tiny_dataset / "train" / "bscan" / "trainvol1_2.png"
    path.write_bytes(bomb)
    with pytest.raises(SystemExit) as exc:
        run_seg_tuning.main(["--weights", str(tiny_weights), "--data_path", str(tiny_dataset),
                             "--input_size", "32", "48", "--patch_size", "16", "--epochs", "1",
                             "--num_workers", "0", "--base_output_dir", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert_bomb_error(err[0], path)


@pytest.mark.parametrize("folder", ["train/bscan", "test/semseg"])
def test_dataset_check_refuses_a_bomb(tiny_dataset, folder, bomb):
    split, sub = folder.split("/")
    path = tiny_dataset / split / sub / f"{split}vol0_1.png"
    path.write_bytes(bomb)
    info = open_dataset(tiny_dataset)
    with pytest.raises(UserError) as err:
        check_split(find_split(tiny_dataset / split, need_masks=True), info.class_table)
    assert_bomb_error(str(err.value), path)


def scored_run(tmp_path):
    """datasets/Tiny (test masks) and runs/Tiny/run_a/preds holding copies of the masks."""
    datasets = tmp_path / "datasets"
    make_dataset(datasets, splits={"test": 6})
    run_dir = tmp_path / "runs" / "Tiny" / "run_a"
    shutil.copytree(datasets / "Tiny" / "test" / "semseg", run_dir / "preds")
    return datasets, run_dir


@pytest.mark.parametrize("where", ["prediction", "ground truth"])
@pytest.mark.parametrize("workers", [1, 2])
def test_scoring_refuses_a_bomb_with_one_line(tmp_path, capsys, bomb, where, workers):
    datasets, run_dir = scored_run(tmp_path)
    argv = ["-d", str(datasets), "-m", str(run_dir), "--foreign_predictions", "--no_report",
            "--workers", str(workers)]
    assert evaluate(argv)  # scores before the bomb is placed
    capsys.readouterr()
    path = (run_dir / "preds" if where == "prediction"
            else datasets / "Tiny" / "test" / "semseg") / "testvol1_1.png"
    path.write_bytes(bomb)
    with pytest.raises(SystemExit) as exc:
        evaluate(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert_bomb_error(err.strip().splitlines()[-1].split("error: ", 1)[1], path)
