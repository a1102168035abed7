"""Building what a run trains: the segmentation model (backbone + decoder) and the loaders."""
import torch
from torch.utils.data import DataLoader, DistributedSampler

from fm_seg_config import build_backbone
from mirage.data.transforms import SegmentationTransform
from mirage.errors import UserError
from mirage.models.decoders import build_decoder
from mirage.models.segmentation_model import SegmentationModel
from mirage.train import distributed

PREFETCH_BATCHES = 4  # batches each DataLoader worker keeps ready


def build_model(config, fm, num_classes, input_size, patch_size):
    """Backbone (pretrained, blocks frozen if asked) + decoder; returns (model, report)."""
    backbone, fm, report = build_backbone(
        config["weights"], input_size, patch_size, config["num_global_tokens"],
        config["drop_path_encoder"], config["learnable_pos_emb"], fm=fm)
    decoder = build_decoder(config["output_adapter"], embed_dim=backbone.embed_dim,
                            num_classes=num_classes, grid_size=backbone.grid_size,
                            patch_size=backbone.patch_size, image_size=input_size,
                            encoder_depth=backbone.depth,
                            interpolate_mode=config["decoder_interpolate_mode"])
    bad = next((name for name, tensor in backbone.state_dict().items()
                if tensor.is_floating_point() and not torch.isfinite(tensor).all()), None)
    if bad is not None:
        raise UserError(f"--weights {config['weights']}: tensor {bad} holds NaN or Inf "
                        "values; the file is damaged, download it again")
    model = SegmentationModel(backbone, decoder)
    model.family = fm.name
    if config["freeze_encoder"]:
        model.freeze_blocks()
    if config["freeze_patch_embed"]:  # the fully-frozen protocol
        model.freeze_backbone()
    return model, report



def make_loader(dataset, config, dist_info, train):
    """Training: shuffled (seeded per epoch), drop_last. Evaluation: each process a shard."""
    if train:
        sampler = DistributedSampler(dataset, num_replicas=dist_info.world_size,
                                     rank=dist_info.rank, shuffle=True, seed=config["seed"],
                                     drop_last=True)
    else:
        sampler = distributed.ShardSampler(len(dataset), dist_info)
    workers = config["num_workers"]
    # Workers stay alive between epochs (no restart and re-import per epoch) and keep
    # PREFETCH_BATCHES batches each ready; pinned memory makes the .to(device,
    # non_blocking=True) copies asynchronous.
    extra = {"prefetch_factor": PREFETCH_BATCHES, "persistent_workers": True} \
        if workers > 0 else {}
    return DataLoader(dataset, batch_size=config["batch_size"], sampler=sampler,
                      num_workers=workers, drop_last=train,
                      pin_memory=config["pin_mem"] and torch.cuda.is_available(), **extra)


def model_for(spec, runtime):
    """The RunSpec's model (pretrained backbone + decoder) on the run's device."""
    model, report = build_model(spec.options, spec.model.fm, spec.classes.num_classes,
                                spec.model.input_size, spec.model.patch_size)
    runtime.log(f">> {spec.model.fm.name}: {report}")
    model.to(runtime.device)
    return model


def test_transform(model_spec):
    """Resize to the input size and normalise, as validation, testing and inference do."""
    return SegmentationTransform(model_spec.input_size, norm=model_spec.norm,
                                 in_chans=model_spec.in_chans)
