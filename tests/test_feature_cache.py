"""The disk feature cache's bad cases: read-only or full folders, entries of another
backbone or size, damaged entries, changed B-scans, interrupted writes."""
import errno
import json
import os
import time
from collections import namedtuple

import cv2
import pytest
import torch

from fm_seg_config import MirageTiny
from mirage.train import feature_cache as fc
from mirage.data.layout import find_split
from mirage.errors import UserError
from mirage.fileio import atomic_path
from mirage.models.segmentation_model import SegmentationModel
from mirage.models.decoders import build_decoder

SIZE = (32, 48)


class Dataset:
    """What the cache reads of a training dataset: its slices."""

    def __init__(self, folder):
        self.slices = find_split(folder / "train", need_masks=True)


def model(decoder="linear"):
    torch.manual_seed(0)
    backbone = MirageTiny().build(SIZE, (16, 16), 1)
    head = build_decoder(decoder, embed_dim=backbone.embed_dim, num_classes=3,
                         grid_size=backbone.grid_size, patch_size=(16, 16), image_size=SIZE,
                         encoder_depth=backbone.depth)
    seg = SegmentationModel(backbone, head)
    seg.freeze_backbone()
    return seg.eval()


def identity(**changes):
    return {"format": 1, "model": "MIRAGE-Tiny", "weights_sha256": "12" * 32,
            "input_size": list(SIZE), "patch_size": [16, 16], "num_global_tokens": 1,
            "embed_dim": 128, "norm": "minmax", "compute": "fp32", **changes}


def open_cache(root, dataset, notes=None, **changes):
    log = notes.append if notes is not None else (lambda *_: None)
    return fc.FeatureCache(fc.CacheSpec("disk", identity(**changes), root), dataset, 1, log)


def batch(indices):
    return {"index": torch.tensor(indices)}


def images(n=2):
    return torch.rand(n, 1, *SIZE, generator=torch.Generator().manual_seed(1))


def fill(cache, seg, indices=(0, 1)):
    return cache.features(seg, images(len(indices)), batch(list(indices)))


def test_entries_are_reused_across_cache_objects(tiny_dataset, tmp_path):
    seg, data = model(), Dataset(tiny_dataset)
    first = fill(open_cache(tmp_path, data), seg)
    cache = open_cache(tmp_path, data)
    again = cache.features(seg, torch.zeros(2, 1, *SIZE), batch([0, 1]))  # not recomputed
    assert torch.equal(first[0], again[0]) and cache.stats["reused"] == 2
    assert json.loads((cache.folder / "meta.json").read_text()) == identity()


def test_read_only_folder_is_an_error(tiny_dataset, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(fc.tempfile, "mkstemp", refuse)  # a read-only mount, even for root
    with pytest.raises(UserError) as info:
        open_cache(tmp_path / "cache", Dataset(tiny_dataset))
    assert str(info.value).startswith(f"--feature_cache_dir {tmp_path / 'cache'}")
    assert "not writable (Permission denied)" in str(info.value)
    assert "--feature_cache ram" in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_on_disk_is_an_error(tiny_dataset, tmp_path):
    (tmp_path / "cache").mkdir()
    os.chmod(tmp_path / "cache", 0o500)
    try:
        with pytest.raises(UserError, match="not writable"):
            open_cache(tmp_path / "cache", Dataset(tiny_dataset))
    finally:
        os.chmod(tmp_path / "cache", 0o700)


def test_folder_without_room_is_an_error_before_training(tiny_dataset, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    data = Dataset(tiny_dataset)
    # 8 views of 6 x 128 float16 tokens (1536 B) + 2048 B each: 28672 B needed
    monkeypatch.setattr(fc.shutil, "disk_usage", lambda path: usage(10**6, 10**6, 20000))
    with pytest.raises(UserError) as info:
        open_cache(tmp_path, data)
    # 28672 B = 28.67 kB, 20000 B = 20.00 kB (decimal units)
    assert "needs about 28.67 kB more for 8 views but only 20.00 kB are free" in str(info.value)
    monkeypatch.setattr(fc.shutil, "disk_usage", lambda path: usage(10**6, 0, 28672))
    open_cache(tmp_path, data)


def test_disk_full_while_writing_is_an_error(tiny_dataset, tmp_path, monkeypatch):
    cache = open_cache(tmp_path, Dataset(tiny_dataset))

    def full(obj, path):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(fc.torch, "save", full)
    with pytest.raises(UserError) as info:
        fill(cache, model())
    assert str(info.value).startswith(f"--feature_cache_dir {cache.folder}: no space left")
    assert str(info.value).endswith("(or use --feature_cache ram)")
    assert not list(cache.folder.rglob("*.pt")) and not list(cache.folder.rglob("*.tmp"))


def test_folder_of_another_backbone_or_size_is_never_reused(tiny_dataset, tmp_path):
    data = Dataset(tiny_dataset)
    cache = open_cache(tmp_path, data)
    meta = cache.folder / "meta.json"
    meta.write_text(json.dumps(identity(input_size=[64, 96])))
    with pytest.raises(UserError) as info:
        open_cache(tmp_path, data)
    assert "holds the features of another backbone or size (input_size: [64, 96] there, " \
           "[32, 48] here)" in str(info.value)
    # the folder of one backbone given as the cache root
    with pytest.raises(UserError, match="this is the cache folder of one backbone"):
        open_cache(cache.folder, data)


def test_entry_of_another_backbone_is_an_error(tiny_dataset, tmp_path):
    data, seg = Dataset(tiny_dataset), model()
    other = open_cache(tmp_path, data, input_size=[64, 96], weights_sha256="34" * 32)
    other.token_shape = (6, 128)  # only the key matters here
    fill(other, seg)
    cache = open_cache(tmp_path, data)
    name = f"{data.slices[0].slice_id}.orig.pt"
    source = next(other.folder.rglob(name))
    target = cache.folder / source.parent.name / name
    target.parent.mkdir(parents=True)
    target.write_bytes(source.read_bytes())
    with pytest.raises(UserError) as info:
        fill(cache, seg)
    message = str(info.value)
    assert message.startswith(f"{target}: a feature-cache entry of ")
    assert "MIRAGE-Tiny_343434343434_64x96" in message and "delete" in message


@pytest.mark.parametrize("threads", [1, 2],
                         ids=["1-thread", "2-threads"], indirect=True)
@pytest.mark.parametrize("damage", ["garbage", "truncated", "bit_flip", "wrong_shape"])
def test_damaged_entry_is_recomputed_with_a_notice(tiny_dataset, tmp_path, damage, threads):
    """The recomputed entry (alone in its backbone call) equals the one first computed
    (beside another B-scan), bit for bit, under 1 and 2 threads."""
    data, seg = Dataset(tiny_dataset), model()
    expected = fill(open_cache(tmp_path, data), seg)
    path = next(p for p in tmp_path.rglob("*.pt") if p.name.startswith(data.slices[0].slice_id))
    raw = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"not a torch file")
    elif damage == "truncated":
        path.write_bytes(raw[:len(raw) // 2])
    elif damage == "bit_flip":  # tensor bytes changed: only the CRC notices
        payload = torch.load(path, weights_only=True)
        payload["layers"][3][0, 0] += 1.0
        torch.save(payload, path)
    else:
        payload = torch.load(path, weights_only=True)
        payload["layers"][3] = payload["layers"][3][:2]
        torch.save(payload, path)
    notes = []
    cache = open_cache(tmp_path, data, notes)
    got = fill(cache, seg)
    assert torch.equal(got[0], expected[0])
    assert cache.stats == {"computed": 1, "reused": 1, "damaged": 1, "changed": 0}
    assert notes == [f">> feature cache: {path} is damaged "
                     f"({notes[0].split('(')[-1].split(')')[0]}); recomputing it"]
    cache = open_cache(tmp_path, data)  # rewritten whole
    fill(cache, seg)
    assert cache.stats["reused"] == 2


def test_changed_bscan_is_recomputed_by_its_content_not_its_mtime(tiny_dataset, tmp_path):
    data, seg = Dataset(tiny_dataset), model()
    bscan = data.slices[1].bscan
    image = cv2.imread(str(bscan), cv2.IMREAD_UNCHANGED)
    stored = [cv2.IMWRITE_PNG_COMPRESSION, 0]  # no compression: the size is the shape's
    assert cv2.imwrite(str(bscan), image, stored)
    fill(open_cache(tmp_path, data), seg)

    stat = bscan.stat()  # touched only: the same B-scan, its tokens are reused
    os.utime(bscan, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    cache = open_cache(tmp_path, data)
    fill(cache, seg)
    assert cache.stats["changed"] == 0 and cache.stats["reused"] == 2

    # replaced by another image of the same size, its mtime put back: recomputed
    assert cv2.imwrite(str(bscan), 255 - image, stored)
    assert bscan.stat().st_size == stat.st_size
    os.utime(bscan, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    notes = []
    cache = open_cache(tmp_path, data, notes)
    fill(cache, seg)
    assert cache.stats["changed"] == 1 and cache.stats["computed"] == 1
    assert notes == [f">> feature cache: {bscan} changed since its tokens were cached; "
                     "recomputing them"]


def test_interrupted_write_leaves_no_entry_and_stale_temporaries_go(tiny_dataset, tmp_path,
                                                                    monkeypatch):
    data, seg = Dataset(tiny_dataset), model()
    cache = open_cache(tmp_path, data)
    real = torch.save

    def killed(obj, path):
        real(obj, path)  # written, then interrupted before the rename
        raise KeyboardInterrupt
    monkeypatch.setattr(fc.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        fill(cache, seg)
    monkeypatch.setattr(fc.torch, "save", real)
    assert not list(cache.folder.rglob("*.pt")) and not list(cache.folder.rglob("*.tmp"))
    # a kill -9 leaves the temporary file: one older than an hour is removed on opening
    group = cache.folder / fc.group_name(data.slices[0].bscan)
    group.mkdir(parents=True, exist_ok=True)
    with atomic_path(group / "x.orig.pt") as tmp:
        old, fresh = tmp.parent / ".a.orig.pt.1.tmp", tmp.parent / ".b.orig.pt.2.tmp"
    for path, age in ((old, 2 * fc.STALE_TMP_SECONDS), (fresh, 10)):
        path.write_bytes(b"half")
        os.utime(path, (time.time() - age, time.time() - age))
    open_cache(tmp_path, data)
    assert not old.exists() and fresh.exists()  # fresh: maybe another run writing now


def test_entry_gains_the_blocks_another_decoder_needs(tiny_dataset, tmp_path):
    data = Dataset(tiny_dataset)
    fill(open_cache(tmp_path, data), model("linear"))      # block 3
    cache = open_cache(tmp_path, data)
    dpt = model("dpt")                                       # blocks 0..3
    fill(cache, dpt)
    assert cache.stats["computed"] == 2
    path = next(cache.folder.rglob(f"{data.slices[0].slice_id}.orig.pt"))
    assert sorted(torch.load(path, weights_only=True)["layers"]) == \
        sorted(set(dpt.decoder.layer_indices))
    cache = open_cache(tmp_path, data)
    fill(cache, model("linear"))
    assert cache.stats["reused"] == 2


def test_ram_cache_that_does_not_fit_is_an_error(tiny_dataset, monkeypatch):
    monkeypatch.setattr(fc, "_memory_available", lambda: 10_000)
    cache = fc.FeatureCache(fc.CacheSpec("ram", identity()), Dataset(tiny_dataset), 2)
    with pytest.raises(UserError, match="--feature_cache ram: the cache needs about .* for "
                                        "16 views .*use --feature_cache disk"):
        cache.check_memory()


def test_cache_folder_name_holds_the_key():
    name = fc.folder_name(identity(model="DINOv2 ViT-B/14 reg4", norm="imagenet",
                                   compute="bf16"))
    assert name == "DINOv2-ViT-B-14-reg4_121212121212_32x48_p16x16_imagenet_bf16"
