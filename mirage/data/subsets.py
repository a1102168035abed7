"""Training-set size: which whole volumes of the training split a run trains on.

    choose_volumes(volume_ids, size=None, fraction=None, seed=0) -> sorted [volume ID]
    volume_order(volume_ids, seed)                               -> every ID, drawn order
    TrainSubset(volumes, fraction, seed).select(slices)          -> TrainingSubset

A volume is every B-scan sharing ``<scan_id>`` (``parse_slice_name``); its B-scans are
never split. ``size`` takes the first ``size`` volumes of one seeded order of the split,
``fraction`` the first ``ceil(fraction x volumes)`` (at least one). The order ranks each
volume by the SHA-256 of ``<seed>/<volume ID>`` (ties by ID), so for one seed:

- the subsets are nested: the volumes of a smaller size are among those of every larger
  one (each is a prefix of one order);
- the order depends on nothing but the seed and the IDs (no random generator of numpy,
  torch or Python whose stream could change between versions), so every model, training
  seed, process (torchrun) and resume of a grid draws the same volumes;
- adding a volume to the split leaves the others in their order.

Nothing here reads an option: the run spec (mirage/run/spec.py) turns ``--train_volumes``,
``--train_fraction`` and ``--subset_seed`` into a :class:`TrainSubset`.
"""
import hashlib
import math
from dataclasses import dataclass
from typing import Optional

from mirage.data.layout import parse_slice_name
from mirage.errors import UserError


def volume_of(slice_files):
    """The volume ID (``<scan_id>``) of a :class:`~mirage.data.layout.SliceFiles`."""
    return parse_slice_name(slice_files.slice_id)[0]


def split_volumes(slices):
    """The sorted volume IDs of a split's slices."""
    return sorted({volume_of(s) for s in slices})


def volume_order(volume_ids, seed):
    """Every volume ID of ``volume_ids``, in the order subset seed ``seed`` draws them."""
    def rank(volume):
        return hashlib.sha256(f"{seed}/{volume}".encode("utf-8")).hexdigest(), volume
    return sorted(set(volume_ids), key=rank)


def subset_size(total, size=None, fraction=None):
    """The number of volumes a subset takes of a split of ``total``: ``size``, or
    ``ceil(fraction x total)`` (at least one), or ``total`` when both are None."""
    if size is not None and fraction is not None:
        raise ValueError("give size or fraction, not both")
    if size is not None:
        return int(size)
    if fraction is not None:
        # rounded first: 0.3 x 10 is 3.0000000000000004 in floating point, and is 3
        return max(1, math.ceil(round(fraction * total, 9)))
    return total


def choose_volumes(volume_ids, size=None, fraction=None, seed=0):
    """The sorted volume IDs of the subset: the first ``subset_size`` volumes of
    ``volume_order(volume_ids, seed)``; all of them when ``size`` and ``fraction`` are None.

    A ``size`` larger than the split is a UserError naming the split's size."""
    ids = sorted(set(volume_ids))
    count = subset_size(len(ids), size, fraction)
    if count > len(ids) or count < 1:
        raise UserError(f"--train_volumes {size}: the training split has "
                        f"{len(ids)} volume{'s' if len(ids) != 1 else ''}; give at most "
                        f"{len(ids)} (or all)")
    return sorted(volume_order(ids, seed)[:count])


@dataclass(frozen=True)
class TrainingSubset:
    """What a run trains on: ``slices`` (those of the chosen volumes, in the split's
    order), the chosen ``volumes`` (sorted) and the split's ``split_volumes`` (sorted)."""

    slices: list
    volumes: list
    split_volumes: list

    @property
    def whole(self):
        return len(self.volumes) == len(self.split_volumes)


@dataclass(frozen=True)
class TrainSubset:
    """The training-set size of a run: ``volumes`` (a number of whole volumes) or
    ``fraction`` (a share of them, in (0, 1]), at most one of them; neither is the whole
    split. ``seed``: the subset seed that orders the volumes."""

    volumes: Optional[int] = None
    fraction: Optional[float] = None
    seed: int = 0

    @property
    def whole(self):
        """True when the run trains on the whole split (no size given)."""
        return self.volumes is None and self.fraction is None

    def describe(self):
        """'all volumes', '4 volumes (subset seed 0)', '25% of the volumes (subset seed
        1)'."""
        if self.whole:
            return "all volumes"
        amount = (f"{self.volumes} volume{'s' if self.volumes != 1 else ''}"
                  if self.volumes is not None else f"{100 * self.fraction:g}% of the volumes")
        return f"{amount} (subset seed {self.seed})"

    def select(self, slices):
        """The :class:`TrainingSubset` of a split's ``slices`` (all of them when whole)."""
        ids = split_volumes(slices)
        chosen = choose_volumes(ids, self.volumes, self.fraction, self.seed)
        keep = set(chosen)
        return TrainingSubset(slices=[s for s in slices if volume_of(s) in keep],
                              volumes=chosen, split_volumes=ids)
