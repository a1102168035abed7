"""The benchmark dataset layout: INFO.json class tables, slice names, splits, Dataset.

Layout (see docs/segmentation_benchmark.md)::

    <Dataset>/INFO.json
    <Dataset>/{train,val,test}/bscan/<scan_id>_<slice>.png
    <Dataset>/{train,val,test}/semseg/<scan_id>_<slice>.png   (mask values from INFO.json)

Evaluation-only datasets (Duke iAMD) have ``bscan/`` and ``semseg/`` at the top level.
"""
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mirage.errors import UserError
from mirage.fileio import list_images, read_gray

BACKGROUND_LABELS = ("background", "bg")
UNKNOWN_CLASS = 255  # class index a mask value not in INFO.json maps to


# ----------------------------------------------------------------------------- classes
@dataclass(frozen=True)
class ClassTable:
    """The classes of a dataset, read from its INFO.json.

    ``values[i]`` is the pixel intensity that marks class ``i`` in the masks and
    ``labels[i]`` its name.
    """

    values: tuple
    labels: tuple
    source: str = "INFO.json"

    @property
    def num_classes(self):
        return len(self.values)

    def background_index(self):
        """Index of the first class whose label contains "background" or "bg"
        (case-insensitive), else None: the original tuning script's rule."""
        for index, label in enumerate(self.labels):
            if any(word in label.lower() for word in BACKGROUND_LABELS):
                return index
        return None

    @property
    def max_value(self):
        return max(self.values)

    def value_to_index(self):
        """Lookup table: ``lut[mask]`` turns mask values into class indices (uint8).

        Values absent from INFO.json map to ``UNKNOWN_CLASS`` (255). The table covers
        the whole 16-bit range so that 8- and 16-bit masks index it directly.
        """
        lut = np.full(1 << 16, UNKNOWN_CLASS, dtype=np.uint8)
        lut[list(self.values)] = np.arange(self.num_classes, dtype=np.uint8)
        return lut

    def index_to_value(self):
        """Lookup table: ``lut[class_index]`` gives the INFO.json value (uint8 or uint16)."""
        dtype = np.uint8 if self.max_value <= 255 else np.uint16
        return np.asarray(self.values, dtype=dtype)


def read_class_table(path):
    """Read an INFO.json file into a :class:`ClassTable` (raises UserError if malformed)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"class table {path} not found; every dataset needs an INFO.json "
                        "(see docs/segmentation_benchmark.md)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); fix the file") from None
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{path} must be a JSON object "
                        '{"0": {"value": 0, "label": "Background"}, ...}')
    entries = {}
    for key, entry in raw.items():
        if not (isinstance(key, str) and key.strip().lstrip("-").isdigit()):
            raise UserError(f"{path}: key {key!r} is not a class index (0..N-1)")
        if not isinstance(entry, dict) or "value" not in entry or "label" not in entry:
            raise UserError(f'{path}: class {key} needs both "value" and "label"')
        value, label = entry["value"], entry["label"]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 16:
            raise UserError(f"{path}: class {key} has value {value!r}; "
                            "expected an integer pixel value in 0..65535")
        if not isinstance(label, str):
            raise UserError(f"{path}: class {key} has label {label!r}; expected a string")
        entries[int(key)] = (value, label)
    if sorted(entries) != list(range(len(entries))):
        raise UserError(f"{path}: class indices must be 0..{len(entries) - 1}, "
                        f"got {sorted(entries)}")
    values = tuple(entries[i][0] for i in range(len(entries)))
    if len(set(values)) != len(values):
        raise UserError(f"{path}: two classes share one pixel value {values}")
    if len(values) > UNKNOWN_CLASS:
        raise UserError(f"{path}: {len(values)} classes; at most {UNKNOWN_CLASS} supported")
    labels = tuple(entries[i][1] for i in range(len(entries)))
    return ClassTable(values=values, labels=labels, source=str(path))


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


# ----------------------------------------------------------------------------- Dataset
class SegmentationDataset:
    """A split as a map-style torch dataset.

    Item ``i`` is a dict with ``image`` (float32 tensor (C, H, W) at the input size),
    ``mask`` (uint8 tensor (H, W) of class indices; only when the split has masks) and
    ``index`` (``i``, to look up the slice's name and original size).
    """

    def __init__(self, slices, class_table, transform, original_sizes=None):
        self.slices = list(slices)
        self.has_masks = all(s.mask is not None for s in self.slices)
        self.transform = transform
        self.class_table = class_table
        self.lut = class_table.value_to_index()
        self.original_sizes = original_sizes  # (h, w) per slice, as check_split returns

    def __len__(self):
        return len(self.slices)

    def original_size(self, index):
        """(height, width) of B-scan ``index`` as stored on disk."""
        if self.original_sizes is not None:
            return tuple(self.original_sizes[index])
        return read_gray(self.slices[index].bscan).shape

    def __getitem__(self, index):
        files = self.slices[index]
        image = read_gray(files.bscan)
        mask = self.lut[read_gray(files.mask)] if self.has_masks else None
        image, mask = self.transform(image, mask)
        item = {"image": torch.from_numpy(image), "index": index}
        if mask is not None:
            item["mask"] = torch.from_numpy(mask)  # uint8: 8x less to copy than int64
        return item
