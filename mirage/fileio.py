"""Reading images and writing files without ever leaving a half-written one behind.

Every file this tool writes (checkpoints, prediction PNGs, CSVs, logs of configs) goes
through :func:`atomic_path`: the data is written to a temporary file in the destination
folder and renamed over the target only once complete, so a run killed at any moment
leaves the previous version of the file intact.
"""
import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np

from mirage.errors import UserError

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg")


def _current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files readable by their owner only; give them the usual mode instead.
_FILE_MODE = 0o666 & ~_current_umask()

# Grayscale, but keep 16-bit images 16-bit (IMREAD_GRAYSCALE alone would drop to 8 bits).
_GRAY_ANY_DEPTH = cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise _write_error(path, err) from None
    try:
        yield Path(tmp)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if isinstance(err, OSError) and err.errno in _DISK_ERRNOS:
            raise _write_error(path, err) from None
        raise


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _write_error(path, err):
    """One line for a write that cannot happen: a full disk, or a folder not writable."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(f"no space left on {path.parent} while writing {path.name}; free "
                         "some space and run again")
    return UserError(f"cannot write {path}: {err.strerror or err}; check the folder's "
                     "permissions or choose another --base_output_dir")


@contextlib.contextmanager
def atomic_folder(path):
    """Yield an empty temporary folder next to ``path``; on success it replaces ``path``
    whole (the old folder, if any, is deleted after the swap), on failure it is removed.

    Readers see the old folder or the complete new one, never a mix.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial",
                                        dir=path.parent))
    except OSError as err:
        raise _write_error(path, err) from None
    try:
        yield staging
        os.chmod(staging, 0o777 & ~_current_umask())  # mkdtemp makes it owner-only
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old",
                                        dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(staging, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_text(path, text):
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def read_gray(path):
    """Decode an image file as a 2-D grayscale array, uint8 or uint16 as stored.

    Raises :class:`UserError` naming the file when it is missing, empty or not an image.
    """
    path = Path(path)
    try:
        buf = np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        raise UserError(f"cannot read image {path}: {err.strerror or err}") from None
    if buf.size == 0:
        raise UserError(f"image file {path} is empty; replace it with a valid image")
    image = cv2.imdecode(buf, _GRAY_ANY_DEPTH)
    if image is None or image.size == 0:
        raise UserError(f"{path} is not a readable image; replace it with a valid PNG")
    if image.dtype not in (np.uint8, np.uint16):
        raise UserError(f"{path} has pixel type {image.dtype}; expected an 8- or 16-bit "
                        "grayscale image")
    return image


def write_png(path, image):
    """Write a 2-D uint8/uint16 array to ``path`` as a PNG, atomically."""
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode {path} as PNG")
    with atomic_path(path) as tmp:
        encoded.tofile(tmp)


def list_images(folder):
    """The image files of ``folder`` (non-recursive), sorted by name."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


_SHA256_CACHE = {}  # (resolved path, size, mtime) -> hex digest


def file_sha256(path):
    """SHA-256 of a file (hex), computed once per process for an unchanged file."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
        _SHA256_CACHE[key] = digest.hexdigest()
    return _SHA256_CACHE[key]
