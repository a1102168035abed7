"""Transforms keep B-scan and mask aligned and scale intensities per image."""
import numpy as np
import torch

from mirage.data.transforms import SegmentationTransform, normalise


def coded_pair(h=50, w=70):
    """A B-scan whose pixel value equals its mask's class: alignment is checkable."""
    rng = np.random.default_rng(0)
    mask = np.kron(rng.integers(0, 4, (h // 10, w // 10)), np.ones((10, 10))).astype(np.uint8)
    image = (mask * 60).astype(np.uint8)
    return image, mask


def test_train_transform_keeps_alignment_and_size():
    image, mask = coded_pair()
    transform = SegmentationTransform((64, 96), train=True)
    for seed in range(10):
        torch.manual_seed(seed)
        out, out_mask = transform(image, mask)
        assert out.shape == (1, 64, 96) and out_mask.shape == (64, 96)
        # away from class edges, the bilinear image equals the nearest-neighbour mask
        interior = np.ones_like(out_mask, bool)
        for dy in (-2, 0, 2):
            for dx in (-2, 0, 2):
                interior &= np.roll(out_mask, (dy, dx), (0, 1)) == out_mask
        interior[:2] = interior[-2:] = False
        interior[:, :2] = interior[:, -2:] = False
        assert interior.sum() > 1000
        expected = out_mask[interior] * 60 / 180.0
        np.testing.assert_allclose(out[0][interior], expected, atol=1e-6)


def test_flip_happens_about_half_the_time():
    image, mask = coded_pair()
    transform = SegmentationTransform((55, 77), train=True)
    torch.manual_seed(0)
    flips = 0
    for _ in range(200):
        _, out_mask = transform(image, mask)
        left_class = np.bincount(out_mask[:, :5].ravel(), minlength=4).argmax()
        flips += left_class != np.bincount(mask[:, :5].ravel(), minlength=4).argmax()
    assert 60 < flips < 140


def test_eval_transform_is_a_plain_resize():
    image, mask = coded_pair(40, 40)
    out, out_mask = SegmentationTransform((80, 80))(image, mask)
    assert np.array_equal(out_mask, np.kron(mask, np.ones((2, 2), np.uint8)))
    assert out.min() == 0.0 and out.max() == 1.0


def test_normalisations():
    image = np.array([[10, 20], [30, 50]], np.uint16)
    out = normalise(image, 10, 50)
    np.testing.assert_allclose(out[0], [[0, 0.25], [0.5, 1.0]])
    flat = normalise(np.full((2, 2), 7, np.uint8), 7, 7)
    assert np.all(flat == 0)
    net = normalise(image, 10, 50, norm="imagenet", in_chans=3)
    assert net.shape == (3, 2, 2)
    np.testing.assert_allclose(net[1, 1, 1], (1.0 - 0.456) / 0.224, rtol=1e-6)
