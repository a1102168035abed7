"""The benchmark dataset layout: INFO.json class tables, slice names, splits, dataset folders.

Layout (see docs/segmentation_benchmark.md)::

    <Dataset>/INFO.json
    <Dataset>/{train,val,test}/bscan/<scan_id>_<slice>.png
    <Dataset>/{train,val,test}/semseg/<scan_id>_<slice>.png   (mask values from INFO.json)

Evaluation-only datasets (Duke iAMD) have ``bscan/`` and ``semseg/`` at the top level.
"""
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mirage.data.classes import ClassTable, read_class_table
from mirage.errors import UserError
from mirage.fileio import list_images, read_gray


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


def _first(names, n=5):
    names = sorted(names)
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _images_by_stem(folder):
    """``{stem: path}`` of a folder's images, each named ``<scan_id>_<slice>``.

    Raises UserError naming the files when a name has no ``_<slice>``, when two files
    share a stem (``a_1.png`` and ``a_1.bmp``: one would silently replace the other) or
    when two stems are one slice (``a_1.png`` and ``a_01.png``).
    """
    by_stem, by_slice, bad_names = {}, {}, []
    for path in list_images(folder):
        if path.stem in by_stem:
            raise UserError(f"{folder}: {by_stem[path.stem].name} and {path.name} are two "
                            "files for one slice; keep one of them")
        by_stem[path.stem] = path
        try:
            key = parse_slice_name(path.stem)
        except UserError:
            bad_names.append(path.name)
            continue
        if key in by_slice:
            raise UserError(f"{folder}: {by_slice[key].name} and {path.name} are both slice "
                            f"{key[1]} of volume {key[0]}; rename or remove one of them")
        by_slice[key] = path
    if bad_names:
        raise UserError(f"{len(bad_names)} file(s) in {folder} are not named "
                        f"<scan_id>_<slice number> (e.g. patient01_5.png): "
                        f"{_first(bad_names)}; rename them")
    return by_stem


def find_split(split_dir, need_masks):
    """Pair ``<split_dir>/bscan/*`` with ``<split_dir>/semseg/*`` by file stem.

    With ``need_masks=False`` a missing ``semseg/`` folder is allowed (e.g. RETOUCH's test
    split); the returned slices then carry ``mask=None``. Raises UserError for a missing
    folder, an empty split, misnamed or duplicate files (:func:`_images_by_stem`), or
    B-scans and masks that do not pair up.
    """
    split_dir = Path(split_dir)
    bscan_dir, mask_dir = split_dir / "bscan", split_dir / "semseg"
    if not bscan_dir.is_dir():
        raise UserError(f"{bscan_dir} not found; a split needs bscan/ and semseg/ folders "
                        "(see docs/segmentation_benchmark.md)")
    bscans = _images_by_stem(bscan_dir)
    if not bscans:
        raise UserError(f"{bscan_dir} holds no images: the split is empty")
    if not mask_dir.is_dir():
        if need_masks:
            raise UserError(f"{mask_dir} not found; this split needs masks in semseg/")
        return [SliceFiles(stem, path) for stem, path in sorted(bscans.items())]
    masks = _images_by_stem(mask_dir)
    no_mask = bscans.keys() - masks.keys()
    no_bscan = masks.keys() - bscans.keys()
    if no_mask:
        raise UserError(f"{len(no_mask)} B-scan(s) in {bscan_dir} have no mask in "
                        f"{mask_dir}: {_first(no_mask)}")
    if no_bscan:
        raise UserError(f"{len(no_bscan)} mask(s) in {mask_dir} have no B-scan in "
                        f"{bscan_dir}: {_first(no_bscan)}")
    return [SliceFiles(stem, bscans[stem], masks[stem]) for stem in sorted(bscans)]


def check_slice(files, class_table):
    """Decode one pair and check it; returns the B-scan's (height, width).

    Raises UserError for unreadable images, size mismatches or mask values that are
    not in the class table.
    """
    image = read_gray(files.bscan)
    if files.mask is not None:
        mask = read_gray(files.mask)
        if mask.shape != image.shape:
            raise UserError(f"{files.mask} is {mask.shape[1]}x{mask.shape[0]} but its "
                            f"B-scan {files.bscan.name} is {image.shape[1]}x"
                            f"{image.shape[0]}; masks must match their B-scans")
        counts = np.bincount(mask.ravel(), minlength=1)
        present = np.flatnonzero(counts)
        unknown = sorted(set(present.tolist()) - set(class_table.values))
        if unknown:
            raise UserError(f"{files.mask} holds value(s) {unknown} not in "
                            f"{class_table.source} (known: {list(class_table.values)})")
    return image.shape


def check_split(slices, class_table, workers=4):
    """Decode and check every slice of a split before training starts.

    Returns the (height, width) of each B-scan, in the order of ``slices``.
    """
    # OpenCV releases the GIL while decoding, so threads give a real speed-up here.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        jobs = pool.map(lambda f: check_slice(f, class_table), slices)
        return list(tqdm(jobs, total=len(slices), desc="checking dataset", leave=False,
                         disable=len(slices) < 50))


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


def open_dataset(data_path, mapping_fn=None):
    """Resolve ``--data_path`` (and ``--mapping_fn``) to a :class:`DatasetInfo`."""
    root = Path(data_path)
    if not root.is_dir():
        raise UserError(f"--data_path {root}: folder not found")
    info = Path(mapping_fn) if mapping_fn else root / "INFO.json"
    return DatasetInfo(root=root, name=root.resolve().name,
                       class_table=read_class_table(info))


