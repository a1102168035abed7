"""Reading images and writing files without ever leaving a half-written one behind.

Every file this tool writes (checkpoints, prediction PNGs, CSVs, logs of configs) goes
through :func:`atomic_path`: the data is written to a temporary file in the destination
folder and renamed over the target only once complete, so a run killed at any moment
leaves the previous version of the file intact.

Every image this tool reads goes through :func:`read_gray`, which reads the width and
height from the file's header first (:func:`image_size`) and refuses, before decoding, an
image of more than :func:`max_image_pixels` pixels (16384 x 16384 unless the environment
variable ``MIRAGE_MAX_IMAGE_PIXELS`` says otherwise): a small PNG of zeros can announce
40000 x 40000 pixels and would take gigabytes to decode (a "decompression bomb").
"""
import contextlib
import errno
import hashlib
import math
import os
import shutil
import struct
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
# rename() errors of a folder that cannot be moved: a mount point (EBUSY; EXDEV for a bind
# mount), or a folder the system protects (EPERM).
_UNMOVABLE = {errno.EBUSY, errno.EXDEV, errno.EPERM}
# The folders atomic_folder works in inside a folder it cannot replace (a mount point);
# a name of this prefix found there is a leftover of a killed write.
IN_PLACE_PREFIX = ".mirage-staging."
# What a mount point of a fresh file system holds (fsck's): never ours to delete.
_MOUNT_OWN = {"lost+found"}


def _write_error(path, err, folder=None):
    """One line for a write that cannot happen: a full disk, or a folder not writable
    (``folder``: the one written in, by default ``path``'s)."""
    folder = path.parent if folder is None else folder
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(f"no space left on {folder} while writing {path.name}; free "
                         "some space and run again")
    # Every tool writes through here: name the path, never one tool's option.
    return UserError(f"cannot write {path}: {err.strerror or err}; check the permissions "
                     f"of {folder} or write somewhere else")


def replaceable_target(path):
    """The folder :func:`atomic_folder` replaces for ``path``: the target of a symlink
    (the link stays a link), else ``path`` itself."""
    path = Path(path)
    return path.resolve() if path.is_symlink() else path


@contextlib.contextmanager
def atomic_folder(path):
    """Yield an empty temporary folder next to ``path``; on success it replaces ``path``
    whole (the old folder, if any, is deleted after the swap), on failure it is removed.

    Readers see the old folder or the complete new one, never a mix. When ``path`` is a
    symlink, the folder it points to is replaced and the link stays.

    A folder that cannot be renamed (a mount point; or a rename refused with EBUSY, EXDEV
    or EPERM) is written into instead, with a weaker guarantee: the new files are written
    in a hidden folder inside it and, only once all are written, moved into place one by
    one (each file whole) and the old entries that are not among them deleted. A failure
    before that leaves the folder as it was; a reader in that last moment, or a failure
    in it, can see old and new files mixed.
    """
    path = replaceable_target(path)
    if os.path.ismount(path):
        # Its parent may not even be writable (/mnt): stage inside it, on its file system.
        with _staging_in(path) as staging:
            yield staging
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial",
                                        dir=path.parent))
    except OSError as err:
        raise _write_error(path, err) from None
    try:
        yield staging
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, OSError) and err.errno in _DISK_ERRNOS:
            raise _write_error(path, err) from None
        raise
    try:
        os.chmod(staging, 0o777 & ~_current_umask())  # mkdtemp makes it owner-only
        if path.exists():
            _swap(path, staging)
        else:
            os.replace(staging, path)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, OSError):
            raise _swap_error(path, err) from None
        raise


def _swap(path, staging):
    """Replace the folder ``path`` by the complete folder ``staging`` beside it."""
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
    try:
        os.replace(path, old / path.name)
    except OSError as err:
        os.rmdir(old)
        if err.errno not in _UNMOVABLE:
            raise
        # Not movable (a bind mount, a protected folder): its content is replaced instead.
        with _staging_in(path) as inner:
            for entry in staging.iterdir():
                _copy(entry, inner / entry.name)
        shutil.rmtree(staging, ignore_errors=True)
        return
    try:
        os.replace(staging, path)
    except BaseException:
        os.replace(old / path.name, path)  # the old folder back where it was
        os.rmdir(old)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _swap_error(path, err):
    if err.errno in _DISK_ERRNOS:
        return _write_error(path, err)
    return UserError(f"cannot replace {path} by its new version: {err.strerror or err}")


def _copy(source, target):
    if source.is_dir() and not source.is_symlink():
        shutil.copytree(source, target, symlinks=True)
    else:
        shutil.copy2(source, target, follow_symlinks=False)


@contextlib.contextmanager
def _staging_in(folder):
    """Yield an empty hidden folder inside ``folder``; on success its entries replace
    those of ``folder`` (see :func:`atomic_folder`), on failure it is removed."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=IN_PLACE_PREFIX, suffix=".partial",
                                        dir=folder))
    except OSError as err:
        raise _write_error(folder, err, folder) from None
    try:
        yield staging
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, OSError) and err.errno in _DISK_ERRNOS:
            raise _write_error(folder, err, folder) from None
        raise
    try:
        _move_in(folder, staging)
    except OSError as err:
        raise UserError(f"cannot finish writing into {folder} ({err.strerror or err}): it "
                        "may hold old and new files mixed; run again") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_in(folder, staging):
    """Move every entry of ``staging`` into ``folder`` (a file replaces its namesake
    whole), then delete what else ``folder`` holds (earlier output, leftovers of killed
    writes) but a file system's own ``lost+found``."""
    new = {entry.name for entry in staging.iterdir()}
    trash = Path(tempfile.mkdtemp(prefix=IN_PLACE_PREFIX, suffix=".old", dir=folder))
    try:
        for name in sorted(new):
            target = folder / name
            if os.path.lexists(target) and ((target.is_dir() and not target.is_symlink())
                                            or (staging / name).is_dir()):
                # rename() puts a folder only over an empty folder, a file never over one
                os.replace(target, trash / name)
            os.replace(staging / name, target)
        for entry in folder.iterdir():
            if entry.name in new or entry.name in _MOUNT_OWN or entry in (staging, trash):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def write_text(path, text):
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


# ----------------------------------------------------------------------------- image size limit
MAX_PIXELS_ENV = "MIRAGE_MAX_IMAGE_PIXELS"
# A B-scan is at most a few thousand pixels per side; 16384 x 16384 leaves a wide margin
# while a decoded image stays at most 256 MiB (8 bit) or 512 MiB (16 bit).
DEFAULT_MAX_PIXELS = 16384 * 16384


def max_image_pixels():
    """The largest width x height :func:`read_gray` decodes: ``$MIRAGE_MAX_IMAGE_PIXELS``,
    else :data:`DEFAULT_MAX_PIXELS`."""
    value = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not value:
        return DEFAULT_MAX_PIXELS
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit < 1:
        raise UserError(f"environment variable {MAX_PIXELS_ENV}={value!r} is not a whole "
                        f"number of pixels above 0; e.g. {MAX_PIXELS_ENV}={DEFAULT_MAX_PIXELS} "
                        "(16384x16384)")
    return limit


def _pixels_text(count):
    side = math.isqrt(count)
    return f"{count} pixels ({side}x{side})" if side * side == count else f"{count} pixels"


class _NotAnImage(Exception):
    """The header is truncated or is not what the file's first bytes announce."""


def image_size(path):
    """(width, height) of an image file, read from its header without decoding it.

    Reads PNG, JPEG, TIFF (classic and BigTIFF) and BMP, recognised by their first bytes
    whatever the file's suffix (as OpenCV does). Raises :class:`UserError` naming the file
    when it cannot be read, is empty, is none of these formats or has a truncated header.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            return _header_size(handle, path)
    except OSError as err:
        raise UserError(f"cannot read image {path}: {err.strerror or err}") from None


def _header_size(handle, path):
    """(width, height) from the header at the start of the open file ``handle``."""
    head = handle.read(32)
    if not head:
        raise UserError(f"image file {path} is empty; replace it with a valid image")
    try:
        if head.startswith(b"\x89PNG\r\n\x1a\n"):
            size = _png_size(head)
        elif head.startswith(b"\xff\xd8"):
            size = _jpeg_size(handle)
        elif head[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
            size = _tiff_size(handle, head)
        elif head.startswith(b"BM"):
            size = _bmp_size(head)
        else:
            raise UserError(f"{path} is not a readable image (not PNG, JPEG, TIFF or BMP "
                            "data); replace it with a valid PNG")
    except (_NotAnImage, struct.error):
        # struct.error: the file ends inside the header.
        size = None
    if size is None or min(size) < 1:
        raise UserError(f"{path} is not a readable image (truncated or corrupt header); "
                        "replace it with a valid PNG")
    return size


def _png_size(head):
    """PNG: the IHDR chunk comes first; width and height are big-endian at bytes 16-24."""
    if head[12:16] != b"IHDR":
        raise _NotAnImage
    return struct.unpack(">II", head[16:24])


# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic ...): all but
# DHT (C4), JPG (C8) and DAC (CC) in C0-CF.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM, RST0-7, SOI.
_JPEG_STANDALONE = frozenset([0x01, *range(0xD0, 0xD9)])


def _jpeg_size(handle):
    """JPEG: walk the marker segments to the first start-of-frame (EXIF and other segments
    before it are skipped by their lengths); it holds height then width, big-endian."""
    handle.seek(2)
    while True:
        byte = handle.read(1)
        if byte != b"\xff":
            raise _NotAnImage
        marker = handle.read(1)
        while marker == b"\xff":  # fill bytes before a marker
            marker = handle.read(1)
        if not marker:
            raise _NotAnImage
        code = marker[0]
        if code in _JPEG_STANDALONE:
            continue
        if code in (0xD9, 0xDA):  # end of image or start of scan before any frame
            raise _NotAnImage
        (length,) = struct.unpack(">H", handle.read(2))
        if code in _JPEG_SOF:
            height, width = struct.unpack(">xHH", handle.read(5))
            return width, height
        if length < 2:
            raise _NotAnImage
        handle.seek(length - 2, os.SEEK_CUR)


def _tiff_size(handle, head):
    """TIFF: tags 256 (ImageWidth) and 257 (ImageLength) of the first image directory,
    the one OpenCV decodes. Classic TIFF (12-byte entries) or BigTIFF (20-byte entries)."""
    order = "<" if head[:2] == b"II" else ">"
    big = head[2:4] in (b"+\0", b"\0+")
    if big:
        (offset,) = struct.unpack(order + "Q", head[8:16])
        count_format, entry_format, entry_size = "Q", "HHQ8s", 20
    else:
        (offset,) = struct.unpack(order + "I", head[4:8])
        count_format, entry_format, entry_size = "H", "HHI4s", 12
    handle.seek(offset)
    (count,) = struct.unpack(order + count_format, handle.read(struct.calcsize(count_format)))
    values = {}
    value_formats = {3: "H", 4: "I", 16: "Q"}  # SHORT, LONG, LONG8
    for _ in range(min(count, 4096)):  # real directories hold a few dozen tags
        tag, kind, _, value = struct.unpack(order + entry_format, handle.read(entry_size))
        if tag in (256, 257) and kind in value_formats:
            fmt = value_formats[kind]
            values[tag] = struct.unpack(order + fmt, value[:struct.calcsize(fmt)])[0]
        if len(values) == 2:
            return values[256], values[257]
    raise _NotAnImage


def _bmp_size(head):
    """BMP: the DIB header after the 14-byte file header; OS/2 1.x headers (12 bytes) hold
    16-bit sizes, all later ones signed 32-bit (a negative height means top-down rows)."""
    (dib_size,) = struct.unpack("<I", head[14:18])
    if dib_size == 12:
        return struct.unpack("<HH", head[18:22])
    width, height = struct.unpack("<ii", head[18:26])
    return width, abs(height)


def checked_image_size(path):
    """:func:`image_size`, refused (a UserError naming the file) over the pixel limit that
    decoding applies: a size compared before decoding must not hide the limit."""
    width, height = image_size(path)
    _check_pixels(path, width, height)
    return width, height


def _check_pixels(path, width, height):
    """UserError when ``width`` x ``height`` is over :func:`max_image_pixels`."""
    limit = max_image_pixels()
    if width * height > limit:
        raise UserError(
            f"{path} is {width}x{height} pixels, over the limit of {_pixels_text(limit)}; "
            "it was not decoded (a B-scan this large is likely a broken file or a "
            "decompression bomb); if the image is genuine, raise the limit with the "
            f"environment variable {MAX_PIXELS_ENV}={width * height}")


def read_gray(path):
    """Decode an image file as a 2-D grayscale array, uint8 or uint16 as stored.

    The header is read first: an image over :func:`max_image_pixels` is refused before it
    is decoded. Raises :class:`UserError` naming the file when it is missing, empty, not an
    image, truncated or over the limit.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            width, height = _header_size(handle, path)
            _check_pixels(path, width, height)
            handle.seek(0)
            buf = np.fromfile(handle, dtype=np.uint8)
    except OSError as err:
        raise UserError(f"cannot read image {path}: {err.strerror or err}") from None
    try:
        image = cv2.imdecode(buf, _GRAY_ANY_DEPTH)
    except cv2.error as err:
        reason = str(err).strip().splitlines()[-1]
        # OpenCV has its own limit (2**30 pixels), met only when ours is raised above it.
        hint = ("; raise OpenCV's own limit too with the environment variable "
                "OPENCV_IO_MAX_IMAGE_PIXELS" if "MAX_IMAGE_PIXELS" in reason else "")
        raise UserError(f"OpenCV could not decode {path} ({width}x{height} pixels): "
                        f"{reason}{hint}") from None
    if image is None or image.size == 0:
        raise UserError(f"{path} is not a readable image (truncated or corrupt data); "
                        "replace it with a valid PNG")
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


_SHA256_CACHE = {}  # (resolved path, inode, size, mtime, ctime) -> hex digest


def file_sha256(path):
    """SHA-256 of a file (hex), computed once per process for an unchanged file.

    Unchanged means the same inode, size, mtime and ctime: a file replaced by another
    (a new inode) or rewritten in place (a new ctime, which, unlike the mtime, no one can
    set back) is hashed again, even with its size and mtime restored.
    """
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns,
           stat.st_ctime_ns)
    if key not in _SHA256_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
        _SHA256_CACHE[key] = digest.hexdigest()
    return _SHA256_CACHE[key]
