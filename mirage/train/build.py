"""Building what a run trains: the segmentation model (backbone + decoder) and the loaders."""
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from fm_seg_config import build_backbone
from mirage.data.transforms import SegmentationTransform
from mirage.errors import UserError
from mirage.models.decoders import build_decoder
from mirage.models.lora import add_lora
from mirage.models.segmentation_model import SegmentationModel
from mirage.train import distributed
from mirage.train.protocols import apply_speed_options

PREFETCH_BATCHES = 4  # batches each DataLoader worker keeps ready


def build_model(model, protocol, num_classes):
    """Backbone (pretrained) + decoder, with what ``protocol`` (a mirage.protocol.Protocol)
    keeps fixed frozen; ``model``: the run's ModelSpec. Returns (SegmentationModel, the
    loading report line)."""
    backbone, fm, report = build_backbone(
        model.weights, model.input_size, model.patch_size, model.num_global_tokens,
        model.drop_path, model.learnable_pos_emb, fm=model.fm)
    decoder = build_decoder(model.decoder, embed_dim=backbone.embed_dim,
                            num_classes=num_classes, grid_size=backbone.grid_size,
                            patch_size=backbone.patch_size, image_size=model.input_size,
                            encoder_depth=backbone.depth,
                            interpolate_mode=model.interpolate_mode)
    bad = next((name for name, tensor in backbone.state_dict().items()
                if tensor.is_floating_point() and not torch.isfinite(tensor).all()), None)
    if bad is not None:
        raise UserError(f"--weights {model.weights}: tensor {bad} holds NaN or Inf "
                        "values; the file is damaged, download it again")
    segmentation_model = SegmentationModel(backbone, decoder)
    segmentation_model.family = fm.name
    report += apply_protocol(segmentation_model, protocol)
    return segmentation_model, report


def apply_protocol(model, protocol):
    """Freeze what the protocol keeps fixed and add LoRA adapters; returns a note for the
    model's report line ('' if none)."""
    if not protocol.trains_blocks:  # frozen, fully_frozen, linear_probe, lora
        model.freeze_blocks()
    if protocol.backbone_fixed:  # fully_frozen, linear_probe: no graph either
        model.freeze_backbone()
    lora = protocol.lora
    if lora is not None:
        count = add_lora(model.backbone, lora.rank, lora.alpha, lora.dropout,
                         list(lora.targets))
        return (f"; LoRA rank {lora.rank}, alpha {lora.alpha:g} on {count} layers "
                f"({'-'.join(lora.targets)})")
    return ""


def make_loader(dataset, loader, dist_info, train):
    """A DataLoader of ``dataset`` as the LoaderSpec ``loader`` says. Training: shuffled
    (seeded per epoch), drop_last. Evaluation: each process a shard.

    With workers, a training item's random draws depend only on (--seed, epoch, item)
    (``SeededItems``), and the loaders draw their workers' base seed from their own
    generator, not from torch's global one: persistent workers are started once, in the
    first epoch a process runs, so what they draw must not depend on when that was (a
    resumed run starts them later). Without workers the items draw from the main process's
    generators, which checkpoints save and a resume restores.
    """
    workers = loader.num_workers
    if train:
        sampler_class = EpochItemSampler if workers > 0 else DistributedSampler
        sampler = sampler_class(dataset, num_replicas=dist_info.world_size,
                                rank=dist_info.rank, shuffle=True, seed=loader.seed,
                                drop_last=True)
        if workers > 0:
            dataset = SeededItems(dataset, loader.seed)
    else:
        sampler = distributed.ShardSampler(len(dataset), dist_info)
    # Workers stay alive between epochs (no restart and re-import per epoch) and keep
    # PREFETCH_BATCHES batches each ready; pinned memory makes the .to(device,
    # non_blocking=True) copies asynchronous.
    extra = {"prefetch_factor": PREFETCH_BATCHES, "persistent_workers": True,
             "generator": torch.Generator().manual_seed(0)} if workers > 0 else {}
    return DataLoader(dataset, batch_size=loader.batch_size, sampler=sampler,
                      num_workers=workers, drop_last=train,
                      pin_memory=loader.pin_mem and torch.cuda.is_available(), **extra)


class EpochItemSampler(DistributedSampler):
    """DistributedSampler (seeded per epoch with ``set_epoch``) whose items are
    ``(epoch, index)``, so that ``SeededItems`` in a worker knows the epoch."""

    def __iter__(self):
        epoch = self.epoch
        return ((epoch, index) for index in super().__iter__())


class SeededItems(Dataset):
    """Item ``(epoch, i)`` is ``dataset[i]`` with its random draws (torch, numpy, Python
    ``random``) made from generators seeded by (seed, epoch, i): the augmentation of an
    item does not depend on which worker loads it, how many there are, or when they were
    started. The process's own generators are left as they were."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        words = np.random.SeedSequence([self.seed % 2**64, epoch, index]).generate_state(4)
        python_state, numpy_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(words[0]) << 32 | int(words[1]))
                np.random.seed(words[2])
                random.seed(int(words[3]))
                return self.dataset[index]
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def model_for(spec, runtime, num_classes=None):
    """The RunSpec's model (pretrained backbone + decoder, its protocol applied) on the
    run's device with the speed options on: the one way training, testing, inference and
    the predictor build a run's model. ``num_classes``: default the spec's class table
    (the predictor gives the checkpoint's)."""
    num_classes = spec.classes.num_classes if num_classes is None else num_classes
    model, report = build_model(spec.model, spec.protocol, num_classes)
    runtime.setup_line(f">> {spec.model.fm.name}: {report}")
    model.to(runtime.device)
    return apply_speed_options(model, spec.speed, runtime.device, runtime.setup_line)


def test_transform(model_spec):
    """Resize to the input size and normalise, as validation, testing and inference do."""
    return SegmentationTransform(model_spec.input_size, norm=model_spec.norm,
                                 in_chans=model_spec.in_chans)
