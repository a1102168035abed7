"""The benchmark dataset layout: INFO.json class tables, slice names, splits, dataset folders.

Layout (see docs/segmentation_benchmark.md)::

    <Dataset>/INFO.json
    <Dataset>/{train,val,test}/bscan/<scan_id>_<slice>.png
    <Dataset>/{train,val,test}/semseg/<scan_id>_<slice>.png   (mask values from INFO.json)

Evaluation-only datasets (Duke iAMD) have ``bscan/`` and ``semseg/`` at the top level.
"""
import errno
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from mirage.data.classes import UNKNOWN_CLASS, ClassTable, read_class_table
from mirage.data.problems import DatasetProblems
from mirage.errors import UserError
from mirage.fileio import IMAGE_SUFFIXES, list_images, read_gray
from mirage.progress import progress


# ----------------------------------------------------------------------------- slice names
def parse_slice_name(stem, path=None):
    """Split ``<scan_id>_<slice>`` into ``(scan_id, slice_number)``.

    Raises UserError (naming ``path`` if given) when there is no ``_<integer>`` suffix.
    """
    scan_id, sep, number = stem.rpartition("_")
    # ASCII digits only: int() would also read '١' or '５' as a slice number.
    if not sep or not scan_id or not (number.isascii() and number.isdigit()):
        where = path if path is not None else stem
        raise UserError(f"{where}: file name must be <scan_id>_<slice number>.png "
                        "(e.g. patient01_5.png)")
    return scan_id, int(number)



# ----------------------------------------------------------------------------- splits
@dataclass(frozen=True)
class SliceFiles:
    """One B-scan and its mask (``mask`` is None where a split has no masks)."""

    slice_id: str  # file stem, e.g. "patient01_5"
    bscan: Path
    mask: Path = None

    @property
    def split_dir(self):
        """The split folder the slice is in (``<dataset>/train``, ...): ``bscan/``'s parent."""
        return self.bscan.parent.parent


def _first(names, n=5):
    names = sorted(names)
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _dead_links(folder):
    """``({stem}, [problem, ...])`` of the image-named symbolic links in ``folder`` that
    lead nowhere (a loop or a missing target). ``list_images`` skips them as it skips
    anything that is not a file; said here, a B-scan cannot vanish from a split unseen."""
    stems, problems = set(), []
    with os.scandir(folder) as entries:  # is_symlink() reads the entry's type, no stat
        links = sorted(Path(entry.path) for entry in entries if entry.is_symlink())
    for path in links:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        try:
            path.stat()
        except OSError as err:
            if err.errno == errno.ELOOP:
                why = "a symbolic link loop (it leads back to itself)"
            else:
                why = f"a symbolic link to {os.readlink(path)}, which does not exist"
            stems.add(path.stem)
            problems.append(f"{path} is {why}; replace it with the image file or remove it")
    return stems, problems


def _images_by_stem(folder):
    """``({stem: path}, {stem of a dead link}, [problem, ...])`` of a folder whose
    images are each named ``<scan_id>_<slice>``.

    The problems name the files: names without ``_<slice>``, two files sharing a stem
    (``a_1.png`` and ``a_1.bmp``: one would silently replace the other) or two stems for
    one slice (``a_1.png`` and ``a_01.png``); the first of two such files is kept.
    """
    by_stem, by_slice, bad_names, problems = {}, {}, [], []
    dead, dead_problems = _dead_links(folder)
    for path in list_images(folder):
        if path.stem in by_stem:
            problems.append(f"{folder}: {by_stem[path.stem].name} and {path.name} are two "
                            "files for one slice; keep one of them")
            continue
        try:
            key = parse_slice_name(path.stem)
        except UserError:
            bad_names.append(path.name)
            continue
        if key in by_slice:
            problems.append(f"{folder}: {by_slice[key].name} and {path.name} are both slice "
                            f"{key[1]} of volume {key[0]}; rename or remove one of them")
            continue
        by_slice[key] = path
        by_stem[path.stem] = path
    if bad_names:
        problems.insert(0, f"{len(bad_names)} file(s) in {folder} are not named "
                           f"<scan_id>_<slice number> (e.g. patient01_5.png): "
                           f"{_first(bad_names)}; rename them")
    return by_stem, dead, dead_problems + problems


def scan_split(split_dir, need_masks):
    """Pair ``<split_dir>/bscan/*`` with ``<split_dir>/semseg/*`` by file stem, finding
    every problem of the folders: ``([SliceFiles] that pair up, [problem, ...])``.

    With ``need_masks=False`` a missing ``semseg/`` folder is allowed (e.g. RETOUCH's test
    split); the slices then carry ``mask=None``. The problems: a missing folder, an empty
    split, misnamed or duplicate files (:func:`_images_by_stem`), symbolic links leading
    nowhere, B-scans and masks that do not pair up.
    """
    split_dir = Path(split_dir)
    bscan_dir, mask_dir = split_dir / "bscan", split_dir / "semseg"
    if not bscan_dir.is_dir():
        return [], [f"{bscan_dir} not found; a split needs bscan/ and semseg/ folders "
                    "(see docs/segmentation_benchmark.md)"]
    bscans, dead_bscans, problems = _images_by_stem(bscan_dir)
    if not bscans and not dead_bscans and not problems:
        return [], [f"{bscan_dir} holds no images: the split is empty"]
    if not mask_dir.is_dir():
        if need_masks:
            problems.append(f"{mask_dir} not found; this split needs masks in semseg/")
        return [SliceFiles(stem, path) for stem, path in sorted(bscans.items())], problems
    masks, dead_masks, mask_problems = _images_by_stem(mask_dir)
    problems += mask_problems
    # A pair with a dead link on one side is reported once, as the link.
    no_mask = bscans.keys() - masks.keys() - dead_masks
    no_bscan = masks.keys() - bscans.keys() - dead_bscans
    if no_mask:
        problems.append(f"{len(no_mask)} B-scan(s) in {bscan_dir} have no mask in "
                        f"{mask_dir}: {_first(no_mask)}")
    if no_bscan:
        problems.append(f"{len(no_bscan)} mask(s) in {mask_dir} have no B-scan in "
                        f"{bscan_dir}: {_first(no_bscan)}")
    return [SliceFiles(stem, bscans[stem], masks[stem])
            for stem in sorted(bscans.keys() & masks.keys())], problems


def find_split(split_dir, need_masks):
    """The slices of a split (:func:`scan_split`); raises
    :class:`~mirage.data.problems.DatasetProblems` listing every problem of its folders."""
    slices, problems = scan_split(split_dir, need_masks)
    if problems:
        raise DatasetProblems(problems, split_dir)
    return slices


# ----------------------------------------------------------------------------- slices
@dataclass
class SliceStats:
    """One decoded B-scan: (height, width), bit depth (8 or 16), the pixel count of each
    class (K,) in its mask (None without a mask or a class table), and ``digest``: a
    digest of its pixels, None when they all hold one value or were not hashed (see
    :func:`leak_problems`)."""

    size: Tuple[int, int]
    bits: int
    class_pixels: Optional[np.ndarray]
    digest: Optional[bytes]


def _decode(path, problems):
    """The image at ``path``, or None with its problem appended to ``problems``."""
    try:
        return read_gray(path)
    except UserError as err:
        problems.append(str(err))
        return None


def _pixel_digest(image):
    """SHA-256 of the B-scan's pixels, or None for a blank one (a single value: blank
    frames carry nothing that could leak, and two of them are not one B-scan).

    Pixels, not file bytes: a B-scan copied to another split re-encoded (another PNG
    compression level, 8-bit PNG to BMP) is still the same B-scan. The image is decoded
    for the checks anyway; hashing it adds about a tenth to that (SHA-256 runs on the
    CPU's SHA instructions, faster here than BLAKE2), and hashlib releases the GIL.
    """
    if np.ptp(image) == 0:
        return None
    # Shape and depth are part of the content: the same bytes can be another image.
    digest = hashlib.sha256(f"{image.shape} {image.dtype}".encode())
    digest.update(np.ascontiguousarray(image).data)
    return digest.digest()


def inspect_slice(files, class_table=None, lut=None, digest=True):
    """Decode one B-scan and its mask once and check them: ``(SliceStats or None,
    [problem, ...])``.

    The problems name the files: unreadable images, a mask of another size than its
    B-scan, mask values not in ``class_table`` (not checked when it is None). ``lut``:
    ``class_table.value_to_index()``, built once per split by the caller. ``digest``:
    whether to hash the pixels (``SliceStats.digest``; only a comparison between splits
    needs it).
    """
    problems = []
    image = _decode(files.bscan, problems)
    mask = None if files.mask is None else _decode(files.mask, problems)
    if image is None or (files.mask is not None and mask is None):
        return None, problems
    stats = SliceStats(image.shape, 16 if image.dtype == np.uint16 else 8, None,
                       _pixel_digest(image) if digest else None)
    if mask is None:
        return stats, problems
    if mask.shape != image.shape:
        problems.append(f"{files.mask} is {mask.shape[1]}x{mask.shape[0]} but its "
                        f"B-scan {files.bscan.name} is {image.shape[1]}x"
                        f"{image.shape[0]}; masks must match their B-scans")
        return None, problems
    if class_table is None:
        return stats, problems
    lut = class_table.value_to_index() if lut is None else lut
    counts = np.bincount(mask.ravel(), minlength=1)
    present = np.flatnonzero(counts)
    unknown = present[lut[present] == UNKNOWN_CLASS]
    if unknown.size:
        problems.append(f"{files.mask} holds value(s) {unknown.tolist()} not in "
                        f"{class_table.source} (known: {list(class_table.values)})")
        return None, problems
    stats.class_pixels = np.bincount(lut[present], weights=counts[present],
                                     minlength=class_table.num_classes).astype(np.int64)
    return stats, problems


def inspect_slices(slices, class_table=None, workers=4, desc="checking dataset"):
    """:func:`inspect_slice` of each slice, in order: ``[(SliceStats or None, [problem,
    ...])]``; the pixels are hashed when the slices come from more than one split.
    Threads: OpenCV releases the GIL while decoding, hashlib while hashing."""
    lut = None if class_table is None else class_table.value_to_index()
    digest = len({files.split_dir for files in slices}) > 1
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        jobs = pool.map(lambda files: inspect_slice(files, class_table, lut, digest), slices)
        return list(progress(jobs, total=len(slices), desc=desc, leave=False,
                             disable=len(slices) < 50))


# ----------------------------------------------------------------------------- leaks
def _split_name(split_dir):
    return split_dir.name or str(split_dir)


def leak_problems(slices, stats):
    """What leaks between the splits of ``slices`` (split: :attr:`SliceFiles.split_dir`),
    one problem each:

    - a volume (``<scan_id>``) with B-scans in two splits;
    - B-scans with identical pixels (``SliceStats.digest``; ``stats[i]`` is None for a
      slice that could not be decoded) in two splits, under other names: a copy under the
      same scan id is the volume's problem already. Blank B-scans are not compared.

    A model tested on what it was trained or tuned on scores too well, silently.
    """
    volumes = {}
    for files in slices:
        scan_id = parse_slice_name(files.slice_id)[0]
        volumes.setdefault(scan_id, {}).setdefault(files.split_dir, []).append(files)
    problems = []
    for scan_id, by_split in volumes.items():
        if len(by_split) > 1:
            where = " and ".join(
                f"{_split_name(split)} ({_first([f.bscan.name for f in files], 3)})"
                for split, files in by_split.items())
            problems.append(f"volume {scan_id} is in {len(by_split)} splits: {where} of "
                            f"{_common_folder(by_split)}; keep each volume in one split "
                            "(move its B-scans and masks together)")
    copies = {}
    for files, stat in zip(slices, stats):
        if stat is not None and stat.digest is not None:
            copies.setdefault(stat.digest, []).append(files)
    for group in copies.values():
        splits = list(dict.fromkeys(files.split_dir for files in group))
        scan_ids = {parse_slice_name(files.slice_id)[0] for files in group}
        if len(splits) > 1 and len(scan_ids) > 1:
            names = ", ".join(str(files.bscan) for files in group)
            problems.append(f"identical B-scans (same pixels) in "
                            f"{' and '.join(_split_name(s) for s in splits)}: {names}; keep "
                            "the B-scan in one split only")
    return problems


def _common_folder(by_split):
    return Path(os.path.commonpath([str(split) for split in by_split]))


def check_split(slices, class_table, workers=4):
    """Decode and check every slice before training starts, and what leaks between the
    splits they come from (:func:`leak_problems`; ``slices`` may hold several splits).

    Returns the (height, width) of each B-scan, in the order of ``slices``; raises
    :class:`~mirage.data.problems.DatasetProblems` listing every problem.
    """
    results = inspect_slices(slices, class_table, workers)
    problems = [problem for _, found in results for problem in found]
    problems += leak_problems(slices, [stats for stats, _ in results])
    if problems:
        where = os.path.commonpath([str(files.split_dir) for files in slices])
        raise DatasetProblems(problems, where)
    return [stats.size for stats, _ in results]


@dataclass
class DatasetInfo:
    """A dataset folder resolved to its class table and split folders."""

    root: Path
    name: str
    class_table: ClassTable

    def split_dir(self, split):
        """``<root>/<split>`` or, for the evaluation-only layout, ``<root>`` itself."""
        if split == "test" and not (self.root / "test" / "bscan").is_dir() \
                and (self.root / "bscan").is_dir():
            return self.root
        return self.root / split


def dataset_folder(data_path):
    """``--data_path`` as a Path; UserError when it is not a folder."""
    root = Path(data_path)
    if not root.is_dir():
        raise UserError(f"--data_path {root}: folder not found")
    return root


def class_table_file(root, mapping_fn=None):
    """The class table of the dataset at ``root``: ``--mapping_fn``, else its INFO.json."""
    return Path(mapping_fn) if mapping_fn else Path(root) / "INFO.json"


def open_dataset(data_path, mapping_fn=None):
    """Resolve ``--data_path`` (and ``--mapping_fn``) to a :class:`DatasetInfo`."""
    root = dataset_folder(data_path)
    return DatasetInfo(root=root, name=root.resolve().name,
                       class_table=read_class_table(class_table_file(root, mapping_fn)))
