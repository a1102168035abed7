"""A split of the benchmark layout as a map-style torch Dataset."""
import torch

from mirage.fileio import read_gray


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
