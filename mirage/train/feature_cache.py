"""The feature cache of the fully-frozen protocol: each training view's tokens, computed
once and reused in later epochs.

Under ``--freeze_patch_embed`` the backbone is a fixed function of its input, so the
decoder inputs of a training B-scan are the same in every epoch as long as the
augmentation gives a fixed set of views: ``--aug_name none`` (one view) or ``flip`` (two,
both cached); ``simple`` (random resize-crop) cannot be cached (mirage.config refuses
it). The tokens are stored as float16, and the decoder always reads the float16 values,
also in the epoch that computes them, so every epoch sees the same inputs.

``--feature_cache ram`` keeps them in this process's memory for the run. ``disk`` writes
them under ``--feature_cache_dir``, shared by every run of the same weights file, model
family, input size, patch size, normalisation and compute precision (all decoders, seeds
and learning rates of a grid)::

    <feature_cache_dir>/<model>_<sha256[:12]>_<H>x<W>_p<ph>x<pw>_<norm>_<precision>/
        meta.json                               what the folder holds, checked on opening
        <dataset>-<split>-<path hash>/<slice_id>.<orig|flip>.pt

One entry (``torch.save``, read with ``weights_only=True``) holds its key, the size and
SHA-256 of the B-scan file it was computed from (its content, never its mtime), and ``{block index: float16 (N, D)}`` with
a CRC-32 per tensor. Entries are written atomically (temporary file + rename), so an
interrupted run leaves only whole entries; a damaged entry is recomputed with a notice, a
B-scan changed since is recomputed too, and an entry or folder of another backbone or
size is an error, never reused. A read-only folder or one without room for the cache is
an error when the run starts.

Validation B-scans (:func:`open_split_cache`): whenever the backbone is fully fixed
(``SegmentationModel.backbone_frozen``), their tokens are the same at every validation too
(eval mode: no stochastic depth; the B-scans are only resized), so they are computed at
the first validation and reused at the later ones. With ``--feature_cache off`` they are
kept in this process's memory exactly as the backbone gives them (float32 on the CPU: the
validation numbers are those of an uncached run, bit for bit), if they fit in
``SPLIT_MEMORY_SHARE`` of the memory available, else a note says why they are not cached.
With ``ram``/``disk`` they go in the same kind of store as the training views (float16; on
disk under their own group ``<dataset>-val-<hash>``, one 'orig' view each, shared by every
run of the same backbone), and the decoder reads the float16 values at every validation,
as it does in training. The test split, scored once per run, is not cached.
"""
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from mirage.errors import UserError
from mirage.fileio import atomic_path, file_sha256, write_text
from mirage.units import format_size

CACHE_FORMAT = 1
VIEWS = ("orig", "flip")
META = "meta.json"
STALE_TMP_SECONDS = 3600  # temporary files older than this were left by a killed run
MAX_NOTICES = 5           # per kind; then one summary line per epoch
SPLIT_MEMORY_SHARE = 0.25  # of the memory available: the most a validation store may take
CACHE_SPLITS = True       # internal switch (tests compare against uncached validation)


def describe_precision(precision):
    """'fp16' / 'bf16' / 'fp32': the dtype the backbone computes in (part of the key)."""
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(precision.dtype, "fp32")


def cache_identity(model_spec, model, compute, weights_sha256=None):
    """What the cached tokens depend on besides the B-scan (the key of a cache folder):
    the RunSpec's ``model_spec`` (family, input size, normalisation), the built
    ``model``'s backbone geometry and the ``compute`` precision; ``weights_sha256``:
    default the SHA-256 of the spec's weights file."""
    backbone = model.backbone
    if weights_sha256 is None:
        weights_sha256 = file_sha256(model_spec.weights)
    return {"format": CACHE_FORMAT, "model": model_spec.fm.name,
            "weights_sha256": weights_sha256,
            "input_size": [int(v) for v in model_spec.input_size],
            "patch_size": [int(v) for v in backbone.patch_size],
            "num_global_tokens": int(backbone.num_global_tokens),
            "embed_dim": int(backbone.embed_dim), "norm": model_spec.norm,
            "compute": compute}


@dataclass(frozen=True)
class CacheSpec:
    """Where and how a FeatureCache keeps tokens.

    mode: 'ram' or 'disk'; identity: :func:`cache_identity` (None only with ``exact``);
    directory: 'disk': the ``--feature_cache_dir`` root; device: where the decoder reads
    the tokens; exact ('ram' only): keep the tokens as the backbone gives them (no
    float16 rounding), then ``token_shape`` (N, D) must be given.
    """

    mode: str
    identity: Optional[dict]
    directory: Optional[Path] = None
    device: object = "cpu"
    exact: bool = False
    token_shape: Optional[tuple] = None


def folder_name(identity):
    slug = re.sub(r"[^A-Za-z0-9.+-]+", "-", identity["model"]).strip("-") or "model"
    (h, w), (ph, pw) = identity["input_size"], identity["patch_size"]
    return (f"{slug}_{identity['weights_sha256'][:12]}_{h}x{w}_p{ph}x{pw}_"
            f"{identity['norm']}_{identity['compute']}")


def group_name(bscan_path):
    """``<dataset>-<split>-<hash of the split folder's path>``: slice ids are unique only
    within one split of one dataset."""
    split_dir = Path(bscan_path).resolve().parent.parent
    digest = hashlib.sha1(str(split_dir).encode("utf-8")).hexdigest()[:8]
    return f"{split_dir.parent.name}-{split_dir.name}-{digest}"


def _memory_available():
    """Bytes of memory available (Linux), else None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class FeatureCache:
    """Float16 decoder inputs per training view, kept as the CacheSpec ``spec`` says.

    ``dataset``: the training dataset (``slices[i]`` gives slice id and B-scan path of
    item i); ``views``: how many views each item has (1, or 2 with ``--aug_name flip``).
    ``role``: what the items are ('training', or 'validation' for a split's B-scans: only
    the log lines differ).
    """

    def __init__(self, spec, dataset, views=1, log=print, role="training"):
        mode, exact = spec.mode, spec.exact
        if mode not in ("ram", "disk"):
            raise ValueError(f"feature cache mode {mode!r}")
        if exact and mode != "ram":
            raise ValueError("unrounded tokens are kept in memory only")
        self.mode, self.identity, self.log = mode, spec.identity, log
        self.role, self.exact = role, exact
        self.stored_dtype = None if exact else torch.float16
        self.device = torch.device(spec.device or "cpu")
        self.slices = list(dataset.slices)
        self.views = views
        token_shape = spec.token_shape
        if token_shape is None:
            grid = self.identity["input_size"][0] // self.identity["patch_size"][0] * \
                (self.identity["input_size"][1] // self.identity["patch_size"][1])
            token_shape = (grid, self.identity["embed_dim"])
        self.token_shape = tuple(int(v) for v in token_shape)
        self.ram = {}
        self.partial = {}  # disk entries that lack a block the decoder needs: kept, merged
        self.stats = {"computed": 0, "reused": 0, "damaged": 0, "changed": 0}
        self.notices = {"damaged": 0, "changed": 0}
        self.reported = False
        self.shard_of = None  # torchrun: how many items the whole split has
        self.folder = None
        if mode == "disk":
            self.folder = self._open_folder(Path(spec.directory))

    # ------------------------------------------------------------------ opening
    def entry_bytes(self, num_layers=1):
        """Bytes of one view's entry (``exact``: at most float32's 4 bytes a value)."""
        element = 4 if self.exact else 2
        return num_layers * self.token_shape[0] * self.token_shape[1] * element + 2048

    def memory_need(self):
        """Bytes a 'ram' cache of every view takes (estimated for one block)."""
        return len(self.slices) * self.views * self.entry_bytes()

    def _open_folder(self, root):
        option = f"--feature_cache_dir {root}"
        if root.exists() and not root.is_dir():
            raise UserError(f"{option}: is a file, not a folder; give a folder for the cache")
        if (root / META).is_file():
            raise UserError(f"{option}: this is the cache folder of one backbone (it holds "
                            f"{META}); give its parent folder, which holds one such folder "
                            "per backbone and size")
        folder = root / folder_name(self.identity)
        try:  # writable? (a read-only mount, or permissions)
            folder.mkdir(parents=True, exist_ok=True)
            handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
            os.close(handle)
            os.remove(probe)
        except OSError as err:
            raise self._os_error(err, folder) from None
        self._check_meta(folder)
        self._check_room(folder)
        return folder

    def _check_meta(self, folder):
        path = folder / META
        if not path.is_file():
            try:
                write_text(path, json.dumps(self.identity, indent=1, sort_keys=True) + "\n")
            except UserError as err:
                raise self._write_error(err) from None
            return
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError) as err:
            raise UserError(f"{path}: unreadable ({err}); delete {folder} (the cache is "
                            "rebuilt) or choose another --feature_cache_dir") from None
        if stored != self.identity:
            differs = sorted(k for k in set(stored) | set(self.identity)
                             if stored.get(k) != self.identity.get(k))
            raise UserError(f"{folder} holds the features of another backbone or size "
                            f"({differs[0]}: {stored.get(differs[0])!r} there, "
                            f"{self.identity.get(differs[0])!r} here); delete it or choose "
                            "another --feature_cache_dir")

    def _check_room(self, folder):
        """Enough free space for the entries not yet on disk (estimated for one block)."""
        present = set()
        now = time.time()
        for group in {group_name(s.bscan) for s in self.slices}:
            group_dir = folder / group
            if not group_dir.is_dir():
                continue
            for name in os.listdir(group_dir):
                if name.endswith(".tmp"):  # left by a killed run (an atomic write)
                    tmp = group_dir / name
                    try:
                        if now - tmp.stat().st_mtime > STALE_TMP_SECONDS:
                            tmp.unlink()
                    except OSError:
                        pass
                elif name.endswith(".pt"):
                    present.add((group, name))
        wanted = [(group_name(s.bscan), f"{s.slice_id}.{view}.pt") for s in self.slices
                  for view in VIEWS[:self.views]]
        missing = sum(1 for key in wanted if key not in present)
        need = missing * self.entry_bytes()
        free = shutil.disk_usage(folder).free
        if need > free:
            raise UserError(f"--feature_cache_dir {folder.parent}: the cache needs about "
                            f"{format_size(need)} more for {missing} views but only "
                            f"{format_size(free)} are free; free some space, choose another "
                            "--feature_cache_dir, or use --feature_cache ram")

    def check_memory(self):
        """'ram': the whole cache must fit in the memory available now."""
        need = self.memory_need()
        available = _memory_available()
        if available is not None and need > 0.8 * available:
            raise UserError(f"--feature_cache ram: the cache needs about {format_size(need)} "
                            f"of memory for {len(self.slices) * self.views} views but "
                            f"{format_size(available)} are available; use --feature_cache "
                            "disk")

    def _write_error(self, err):
        """fileio's one-line error of a failed write, placed in the cache's context."""
        return UserError(f"--feature_cache_dir {self.folder or '(opening)'}: {err} (or use "
                         "--feature_cache ram)")

    def _os_error(self, err, path):
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            return UserError(f"--feature_cache_dir {self.folder or path}: the disk is full "
                             f"({err.strerror}); free some space, choose another "
                             "--feature_cache_dir, or use --feature_cache ram")
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return UserError(f"--feature_cache_dir {path}: not writable ({err.strerror}); "
                             "choose a writable folder, or use --feature_cache ram")
        return UserError(f"--feature_cache_dir {path}: {err.strerror or err}")

    # ------------------------------------------------------------------ entries
    def _key(self, index, view):
        files = self.slices[index]
        return {"folder": folder_name(self.identity), "group": group_name(files.bscan),
                "slice_id": files.slice_id, "view": VIEWS[view]}

    def _path(self, key):
        return self.folder / key["group"] / f"{key['slice_id']}.{key['view']}.pt"

    def _source(self, index):
        """What an entry was computed from: the B-scan file's size and content hash. Not
        its mtime: a file replaced by another (of the same size, its mtime restored, or
        copied with it) must be recomputed, and a copied dataset keep its cache."""
        path = Path(self.slices[index].bscan)
        return {"size": path.stat().st_size, "sha256": file_sha256(path)}

    def _notice(self, kind, message):
        self.stats[kind] += 1
        self.notices[kind] += 1
        if self.notices[kind] <= MAX_NOTICES:
            self.log(f">> feature cache: {message}")

    def get(self, index, view, layers):
        """``{block: float16 (N, D)}`` holding every block of ``layers``, or None."""
        if self.mode == "ram":
            entry = self.ram.get((index, view))
            return entry if entry is not None and all(b in entry for b in layers) else None
        key = self._key(index, view)
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            stored_key, source, tensors, crcs = (payload["key"], payload["source"],
                                                 payload["layers"], payload["crc32"])
            entry = {}
            for block, tensor in tensors.items():
                if tensor.dtype != torch.float16 or tuple(tensor.shape) != self.token_shape \
                        or zlib.crc32(tensor.numpy()) != crcs[block]:
                    raise ValueError(f"block {block} damaged")
                entry[int(block)] = tensor
        except Exception as err:  # noqa: BLE001 -- any unreadable entry is recomputed
            self._notice("damaged", f"{path} is damaged ({type(err).__name__}); "
                                    "recomputing it")
            return None
        if stored_key != key:
            raise UserError(f"{path}: a feature-cache entry of {stored_key} in the folder of "
                            f"{key['folder']}; delete {self.folder} or choose another "
                            "--feature_cache_dir")
        if source != self._source(index):
            self._notice("changed", f"{self.slices[index].bscan} changed since its tokens "
                                    "were cached; recomputing them")
            return None
        if not all(b in entry for b in layers):
            self.partial[(index, view)] = entry  # e.g. DPT after ConvNeXt: more blocks
            return None
        return entry

    def put(self, index, view, entry):
        """Store ``{block: float16 (N, D)}`` (CPU tensors) for one view."""
        if self.mode == "ram":
            self.ram[(index, view)] = entry
            return
        entry = {**self.partial.pop((index, view), {}), **entry}
        key = self._key(index, view)
        path = self._path(key)
        payload = {"key": key, "source": self._source(index),
                   "layers": entry, "crc32": {b: zlib.crc32(t.numpy()) for b, t in entry.items()}}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                torch.save(payload, tmp)
        except OSError as err:
            raise self._os_error(err, self.folder) from None
        except UserError as err:  # fileio: disk full or not writable
            raise self._write_error(err) from None

    # ------------------------------------------------------------------ training
    def features(self, model, images, batch):
        """The decoder's inputs for ``batch`` (what ``model.features(images)`` gives,
        rounded to float16 and back to float32): cached views are read, the others
        computed (one backbone forward per B-scan, see ``_backbone_batches``) and stored.

        ``model``: the SegmentationModel (fully frozen); ``images``: (B, C, H, W) on its
        device; ``batch``: the loader's batch (``index``, and ``flipped`` with 'flip').
        """
        indices = [int(i) for i in batch["index"]]
        flipped = batch.get("flipped")
        views = [int(bool(f)) for f in flipped] if flipped is not None else [0] * len(indices)
        layers = sorted(set(model.decoder.layer_indices))
        entries = [self.get(i, v, layers) for i, v in zip(indices, views)]
        missing = [k for k, entry in enumerate(entries) if entry is None]
        if missing:
            for rows in self._backbone_batches(missing):
                subset = images if len(rows) == len(entries) else images[rows]
                computed = model.features(subset)
                by_block = dict(zip(model.decoder.layer_indices, computed))
                for row, k in enumerate(rows):
                    entry = {b: self._stored(by_block[b][row]) for b in layers}
                    self.put(indices[k], views[k], entry)
                    entries[k] = entry
            self.stats["computed"] += len(missing)
        self.stats["reused"] += len(entries) - len(missing)
        stacked = {}
        for b in layers:
            tokens = torch.stack([entry[b] for entry in entries])  # (B, N, D) float16
            if images.device.type == "cuda":  # pinned: the copy does not block the host
                tokens = tokens.pin_memory()
            tokens = tokens.to(images.device, non_blocking=True)
            stacked[b] = tokens if self.exact else tokens.float()
        return [stacked[b] for b in model.decoder.layer_indices]

    def _backbone_batches(self, missing):
        """The rows of a batch (``missing``: those to compute) that go through the
        backbone together. A matrix product's order of sums follows its shape and the
        thread count, so a B-scan's tokens change in the last bits with the B-scans beside
        it (MIRAGE-Tiny, 2 threads: 2 of 768 float16 values): a stored entry, reused by
        later epochs, runs and resumes, is computed alone, so it depends on its B-scan
        only. The exact store keeps the loader's batches, the same at every validation
        (its tokens stay an uncached validation's, bit for bit)."""
        return [missing] if self.exact else [[k] for k in missing]

    def _stored(self, tokens):
        """One view's (N, D) tokens as the cache keeps them: float16 on the CPU, or
        (``exact``) a CPU copy of their own (not a view that would keep the batch alive)."""
        if not self.exact:
            return tokens.detach().to("cpu", torch.float16).contiguous()
        self.stored_dtype = tokens.dtype
        return tokens.detach().to("cpu", copy=True).contiguous()

    def end_epoch(self):
        """One line after the first epoch or validation (and after any later one that had
        to compute or recompute views), then the counters start again."""
        stats = self.stats
        if not self.reported or stats["computed"] or stats["damaged"] or stats["changed"]:
            self.log(self._summary(stats))
            self.reported = True
        self.stats = dict.fromkeys(stats, 0)
        self.notices = dict.fromkeys(self.notices, 0)

    def _summary(self, stats):
        where = f"disk, {self.folder}" if self.mode == "disk" else "ram"
        extra = "".join(f", {stats[k]} {k}" for k in ("damaged", "changed") if stats[k])
        if self.role == "training":
            return (f">> feature cache ({where}): {stats['computed']} views computed, "
                    f"{stats['reused']} reused{extra}")
        total = stats["computed"] + stats["reused"]
        if self.reported:  # a later validation that had to compute some again
            return (f">> feature cache: {self.role}: {stats['computed']} of {total} B-scans "
                    f"recomputed{extra}")
        dtype = str(self.stored_dtype).replace("torch.", "")
        shard = f"; this process's shard of {self.shard_of}" if self.shard_of else ""
        found = f", {stats['reused']} of them read from the cache" if stats["reused"] else ""
        return (f">> feature cache: {self.role}: {total} B-scans cached ({where}, {dtype}"
                f"{shard}){found}{extra}")


def open_feature_cache(spec, model, train_set, precision, runtime):
    """The run's FeatureCache (``spec``: the RunSpec), or None with ``--feature_cache
    off``."""
    mode, log = spec.speed.feature_cache, runtime.log
    if mode == "off":
        return None
    identity = cache_identity(spec.model, model, describe_precision(precision))
    views = 2 if spec.loop.aug_name == "flip" else 1
    cache = FeatureCache(CacheSpec(mode, identity, spec.speed.feature_cache_dir,
                                   runtime.device), train_set, views, log)
    if mode == "ram":
        cache.check_memory()
    where = cache.folder if mode == "disk" else "memory"
    log(f">> feature cache: {len(train_set) * views} training views of "
        f"{cache.token_shape[0]}x{cache.token_shape[1]} float16 tokens in {where}")
    return cache


def open_split_cache(model, loader, train_cache, log, role="validation"):
    """The store of a validation split's tokens, or None: whenever the backbone is fully
    fixed (``model.backbone_frozen``) they are computed once and reused at every later
    validation.

    ``loader``: the split's loader (its sampler gives the items this process scores);
    ``train_cache``: the run's FeatureCache, or None with ``--feature_cache off``. Without
    one the tokens are kept exactly (in memory, as the backbone gives them); with one, in a
    store of the same mode (float16; 'disk': the same folder, the split's own group). A
    memory store is skipped, with a note saying why, when it would take more than
    ``SPLIT_MEMORY_SHARE`` of the memory available (less the training cache's).
    """
    if not CACHE_SPLITS or not getattr(model, "backbone_frozen", False):
        return None
    dataset, items = loader.dataset, len(loader.sampler)
    layers = len(set(model.decoder.layer_indices))
    if train_cache is None:
        grid = model.backbone.grid_size
        cache = FeatureCache(CacheSpec("ram", None, exact=True,
                                       token_shape=(grid[0] * grid[1],
                                                    model.backbone.embed_dim)),
                             dataset, 1, log, role)
    else:
        directory = train_cache.folder.parent if train_cache.mode == "disk" else None
        cache = FeatureCache(CacheSpec(train_cache.mode, train_cache.identity, directory,
                                       train_cache.device), dataset, 1, log, role)
    if items < len(dataset):
        cache.shard_of = len(dataset)
    if cache.mode == "disk":
        return cache
    need = items * cache.entry_bytes(layers)
    available = _memory_available()
    if available is None:
        return cache
    committed = train_cache.memory_need() if train_cache is not None else 0
    limit = SPLIT_MEMORY_SHARE * max(available - committed, 0)
    if need > limit:
        spare = "" if not committed else \
            f" less the training cache's {format_size(committed)}"
        log(f">> feature cache: {role} tokens are not cached (recomputed at every "
            f"{role}): {items} B-scans need about {format_size(need)} of memory, more than "
            f"{SPLIT_MEMORY_SHARE:.0%} of the {format_size(available)} available{spare}")
        return None
    return cache
