"""The synthetic OCT dataset: layout, labels, determinism and learnable image content."""
import json
import re

import numpy as np
import pytest

from mirage.data.classes import read_class_table
from mirage.data.layout import parse_slice_name
from mirage.errors import UserError
from mirage.fileio import list_images, read_gray
from mirage.data.synthetic import make_volume, write_synthetic_dataset

EXPECTED_VALUES = [0, 32, 64, 96, 128, 160, 192, 224, 255]
EXPECTED_LABELS = ["Background", "ILM-NFL", "NFL-IPL", "IPL-OPL", "OPL-ONL", "ONL-ISM",
                   "ISM-OS", "RPE-BM", "Fluid"]
SPLITS = {"train": 6, "val": 2, "test": 2}
SLICES = 8
NAME_PATTERN = re.compile(r"^synth\d{3}_\d+\.png$")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The default synthetic dataset, written once for the module."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("synth"))


def load_split(folder):
    """(bscans (N, H, W), mask class indices (N, H, W)) of one split folder."""
    lut = read_class_table(folder.parent / "INFO.json").value_to_index()
    names = [p.name for p in list_images(folder / "bscan")]
    bscans = np.stack([read_gray(folder / "bscan" / n) for n in names])
    masks = np.stack([lut[read_gray(folder / "semseg" / n)] for n in names])
    return bscans, masks


def load_all(root):
    parts = [load_split(root / split) for split in SPLITS]
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


# ----------------------------------------------------------------------------- layout
def test_info_json_lists_nine_evenly_spaced_classes(dataset):
    raw = json.loads((dataset / "INFO.json").read_text())
    assert sorted(raw, key=int) == [str(i) for i in range(9)]
    table = read_class_table(dataset / "INFO.json")
    assert list(table.values) == EXPECTED_VALUES
    assert list(table.labels) == EXPECTED_LABELS
    assert table.background_index() == 0


def test_layout_file_names_and_pairs(dataset):
    assert dataset.name == "Synth_OCT"
    assert sorted(p.name for p in dataset.iterdir()) == ["INFO.json", "test", "train", "val"]
    ids_per_split = {}
    for split, num_volumes in SPLITS.items():
        bscans = [p.name for p in list_images(dataset / split / "bscan")]
        masks = [p.name for p in list_images(dataset / split / "semseg")]
        assert bscans == masks
        assert len(bscans) == num_volumes * SLICES
        assert all(NAME_PATTERN.match(name) for name in bscans)
        slices = {}
        for name in bscans:
            scan_id, number = parse_slice_name(name[:-4])
            slices.setdefault(scan_id, []).append(number)
        assert len(slices) == num_volumes
        assert all(sorted(n) == list(range(SLICES)) for n in slices.values())
        ids_per_split[split] = set(slices)
    all_ids = [i for ids in ids_per_split.values() for i in ids]
    assert len(all_ids) == len(set(all_ids)) == sum(SPLITS.values())


def test_images_are_8_bit_and_masks_hold_only_info_values(dataset):
    for split in SPLITS:
        for path in list_images(dataset / split / "bscan"):
            bscan = read_gray(path)
            mask = read_gray(dataset / split / "semseg" / path.name)
            assert bscan.shape == mask.shape == (128, 192)
            assert bscan.dtype == mask.dtype == np.uint8
            assert set(np.unique(mask)) <= set(EXPECTED_VALUES)


def test_custom_size_and_splits(tmp_path):
    root = write_synthetic_dataset(tmp_path, name="Tiny", splits={"train": 1, "test": 1},
                                   slices_per_volume=3, size=(64, 96))
    assert sorted(p.name for p in root.iterdir()) == ["INFO.json", "test", "train"]
    names = [p.name for p in list_images(root / "test" / "bscan")]
    assert names == ["synth001_0.png", "synth001_1.png", "synth001_2.png"]
    assert read_gray(root / "test" / "bscan" / names[0]).shape == (64, 96)


def test_eval_only_layout_puts_every_volume_at_top_level(tmp_path):
    root = write_synthetic_dataset(tmp_path, name="Eval", eval_only=True,
                                   splits={"train": 2, "test": 1}, slices_per_volume=4)
    assert sorted(p.name for p in root.iterdir()) == ["INFO.json", "bscan", "semseg"]
    bscans = [p.name for p in list_images(root / "bscan")]
    assert bscans == [p.name for p in list_images(root / "semseg")]
    assert len(bscans) == 3 * 4
    assert {parse_slice_name(n[:-4])[0] for n in bscans} == {"synth000", "synth001",
                                                              "synth002"}


def test_16_bit_bscans_use_the_full_range_and_match_the_8_bit_ones(tmp_path):
    splits = {"train": 1, "val": 1, "test": 1}
    root8 = write_synthetic_dataset(tmp_path / "a", splits=splits, seed=3)
    root16 = write_synthetic_dataset(tmp_path / "b", splits=splits, seed=3, bit_depth=16)
    for path in list_images(root16 / "val" / "bscan"):
        b16 = read_gray(path)
        b8 = read_gray(root8 / "val" / "bscan" / path.name)
        assert b16.dtype == np.uint16
        assert b16.max() > 0.9 * 65535
        # Same picture, finer steps: 65535 / 255 = 257.
        assert np.abs(b16 / 257.0 - b8).max() <= 1.0
        # Masks do not change with the B-scan bit depth.
        assert np.array_equal(read_gray(root16 / "val" / "semseg" / path.name),
                              read_gray(root8 / "val" / "semseg" / path.name))


def test_bad_bit_depth_is_refused(tmp_path):
    with pytest.raises(ValueError, match="bit_depth"):
        write_synthetic_dataset(tmp_path, bit_depth=12)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- safety
def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    small = {"train": 1, "val": 1, "test": 1}
    a = write_synthetic_dataset(tmp_path / "a", splits=small, seed=7)
    b = write_synthetic_dataset(tmp_path / "b", splits=small, seed=7)
    c = write_synthetic_dataset(tmp_path / "c", splits=small, seed=8)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / "train/bscan/synth000_0.png").read_bytes() != \
        (c / "train/bscan/synth000_0.png").read_bytes()


def test_existing_dataset_is_kept_unless_overwrite(tmp_path):
    first = write_synthetic_dataset(tmp_path, splits={"train": 2}, slices_per_volume=2)
    before = (first / "train/bscan/synth000_0.png").read_bytes()
    with pytest.raises(UserError, match="already exists"):
        write_synthetic_dataset(tmp_path, splits={"train": 1}, seed=5)
    assert (first / "train/bscan/synth000_0.png").read_bytes() == before
    assert len(list_images(first / "train" / "bscan")) == 4

    write_synthetic_dataset(tmp_path, splits={"train": 1}, slices_per_volume=2, seed=5,
                            overwrite=True)
    # No files of the old dataset survive, and no staging folders are left behind.
    assert [p.name for p in list_images(first / "train" / "bscan")] == \
        ["synth000_0.png", "synth000_1.png"]
    assert (first / "train/bscan/synth000_0.png").read_bytes() != before
    assert [p.name for p in tmp_path.iterdir()] == ["Synth_OCT"]


# ----------------------------------------------------------------------------- content
def test_every_layer_is_in_most_slices_and_fluid_in_some(dataset):
    _, masks = load_all(dataset)
    present = np.stack([(masks == k).any(axis=(1, 2)) for k in range(9)], axis=1)
    assert present[:, 0].all()
    assert (present[:, 1:8].mean(axis=0) >= 0.9).all(), present[:, 1:8].mean(axis=0)
    assert 0 < present[:, 8].mean() < 1


def test_layers_are_stacked_top_to_bottom(dataset):
    """In each column, layer indices never decrease with depth inside the retina."""
    _, masks = load_all(dataset)
    layers = np.where((masks >= 1) & (masks <= 7), masks, 0).astype(int)
    # Running maximum down each column: a layer index below a deeper one is an error.
    running = np.maximum.accumulate(layers, axis=1)
    inside = layers > 0
    assert np.array_equal(layers[inside], running[inside])


def test_fluid_lies_inside_the_retina(dataset):
    """Every fluid pixel has retina (layer or fluid) above and below it in its column."""
    _, masks = load_all(dataset)
    retina = masks > 0
    has_above = np.maximum.accumulate(retina, axis=1)
    has_below = np.maximum.accumulate(retina[:, ::-1], axis=1)[:, ::-1]
    fluid = masks == 8
    assert fluid.any()
    assert (has_above & has_below)[fluid].all()
    # The pockets are not stray pixels: at least a few dozen pixels per fluid slice.
    per_slice = fluid.sum(axis=(1, 2))
    assert per_slice[per_slice > 0].min() >= 20


def test_intensities_carry_the_labels(dataset):
    """Neighbouring bands differ clearly in mean brightness; fluid is dark."""
    bscans, masks = load_all(dataset)
    bscans = bscans.astype(float)
    # Vitreous: background rows above the first retina pixel of each column.
    vitreous = np.cumsum(masks > 0, axis=1) == 0
    means = [bscans[vitreous].mean()] + [bscans[masks == k].mean() for k in range(1, 9)]
    top_to_bottom = means[:8]  # vitreous, then layers 1..7
    assert np.abs(np.diff(top_to_bottom)).min() > 30, np.round(top_to_bottom)
    assert means[1] > 120 and means[7] > 150  # bright RNFL and RPE
    assert means[8] < min(means[1:8]) - 20  # fluid darker than every layer


def test_neighbouring_slices_agree_more_than_different_volumes():
    """Boundaries change smoothly from slice to slice within a volume."""
    volumes = [make_volume(np.random.default_rng(i), 6, 96, 128, fluid_prob=0)[1]
               for i in range(4)]
    within = np.mean([(v[s] != v[s + 1]).mean() for v in volumes for s in range(5)])
    between = np.mean([(volumes[i][0] != volumes[i + 1][0]).mean() for i in range(3)])
    assert within < 0.5 * between, (within, between)


def test_make_volume_shapes_classes_and_layer_count():
    rng = np.random.default_rng(0)
    bscans, masks = make_volume(rng, 3, 64, 80, num_layers=3, fluid_prob=1.0)
    assert bscans.shape == masks.shape == (3, 64, 80)
    assert bscans.dtype == masks.dtype == np.uint8
    assert set(np.unique(masks)) == {0, 1, 2, 3, 4}  # background, 3 layers, fluid
    _, no_fluid = make_volume(np.random.default_rng(0), 4, 64, 80, fluid_prob=0.0)
    assert no_fluid.max() == 7
