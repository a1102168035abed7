"""B-scan / mask transforms: flip, resize, crop and intensity normalisation (OpenCV, numpy).

Geometric steps are applied to the B-scan and its mask together so that they stay
pixel-aligned: B-scans are resized bilinearly and masks with pixel-centre-aligned
nearest neighbour (``INTER_NEAREST_EXACT``; plain ``INTER_NEAREST`` is shifted by half a
pixel with respect to the bilinear grid).
"""
import cv2
import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Per-channel (mean, std) of each named normalisation, applied after min-max to [0, 1].
MEAN_STD = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    # VisionFM: the per-modality statistics its authors pretrain, fine-tune and train
    # decoders with (their utils.get_stats), one encoder and one pair per modality.
    "visionfm_oct": ((0.21091926, 0.21091926, 0.21091919),
                     (0.17598894, 0.17598891, 0.17598893)),
    "visionfm_fundus": ((0.423737496137619, 0.2609460651874542, 0.128403902053833),
                        (0.29482534527778625, 0.20167365670204163, 0.13668020069599152)),
    "visionfm_ffa": ((0.2020487, 0.20205145, 0.20201068),
                     (0.17406046, 0.17404206, 0.17401208)),
    "visionfm_ultrasound": ((0.05989236, 0.05978666, 0.056694973),
                            (0.154277, 0.15504874, 0.14464583)),
    "visionfm_external": ((0.4936253, 0.36324808, 0.25956994),
                          (0.32001, 0.27109432, 0.21991591)),
    "visionfm_slitlamp": ((0.5556667, 0.40288574, 0.38857886),
                          (0.26516676, 0.23311588, 0.23903583)),
    "visionfm_mri": ((0.17368862, 0.17368862, 0.17368862),
                     (0.16198656, 0.16198656, 0.16198656)),
    "visionfm_ubm": ((0.096110865, 0.096110865, 0.096110865),
                     (0.20977867, 0.20977867, 0.20977867)),
}
TRAIN_RESIZE_FACTOR = 1.1  # 'simple' augmentation: resize to 1.1x input, then crop


def resize_pair(image, mask, size):
    """Resize ``image`` bilinearly and ``mask`` by nearest neighbour to ``size`` = (h, w)."""
    h, w = size
    if image.shape != (h, w):
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
        if mask is not None:
            mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST_EXACT)
    return image, mask


def normalise(image, low, high, norm="minmax", in_chans=1):
    """uint8/uint16 (H, W) -> float32 (C, H, W).

    ``minmax``: ``(x - low) / (high - low)`` with the image's own min and max (a flat
    image becomes all zeros). Any other name (``imagenet``, ``visionfm_oct``, ...; see
    ``MEAN_STD``): the same, then that mean/std per channel.
    """
    if norm != "minmax" and norm not in MEAN_STD:
        raise ValueError(f"unknown normalisation {norm!r}; one of minmax, "
                         f"{', '.join(MEAN_STD)}")
    out = image.astype(np.float32)
    out -= low
    out *= 1.0 / (high - low) if high > low else 0.0
    out = out[None] if in_chans == 1 else np.repeat(out[None], in_chans, axis=0)
    if norm != "minmax":
        mean, std = MEAN_STD[norm]
        mean = np.asarray(mean[:in_chans], np.float32)[:, None, None]
        std = np.asarray(std[:in_chans], np.float32)[:, None, None]
        out = (out - mean) / std
    return out


class SegmentationTransform:
    """Turn a decoded B-scan (H, W) and mask of class indices into network inputs.

    train + ``aug_name='simple'``: horizontal flip (p 0.5), resize to 1.1x the input
    size, random crop to the input size. Otherwise: resize to the input size.
    Returns ``(image float32 (C, h, w), mask uint8 (h, w) or None)``.
    """

    def __init__(self, input_size, train=False, aug_name="simple", norm="minmax",
                 in_chans=1):
        self.input_size = tuple(input_size)
        self.augment = train and aug_name == "simple"
        self.norm = norm
        self.in_chans = in_chans

    def __call__(self, image, mask=None):
        # Scale by the original image's range, so that crops keep the per-image scaling.
        low, high = (float(v) for v in cv2.minMaxLoc(image)[:2])
        if self.augment:
            image, mask = self._augment(image, mask)
        else:
            image, mask = resize_pair(image, mask, self.input_size)
        return normalise(image, low, high, self.norm, self.in_chans), mask

    def _augment(self, image, mask):
        # torch's RNG is seeded per DataLoader worker, numpy's global one is not.
        if torch.rand(()) < 0.5:
            image = cv2.flip(image, 1)
            mask = cv2.flip(mask, 1) if mask is not None else None
        h, w = self.input_size
        big = (round(h * TRAIN_RESIZE_FACTOR), round(w * TRAIN_RESIZE_FACTOR))
        image, mask = resize_pair(image, mask, big)
        top = int(torch.randint(0, big[0] - h + 1, ()))
        left = int(torch.randint(0, big[1] - w + 1, ()))
        image = image[top:top + h, left:left + w]
        mask = mask[top:top + h, left:left + w] if mask is not None else None
        return image, (np.ascontiguousarray(mask) if mask is not None else None)
