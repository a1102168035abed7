"""Testing and inference with a run's best checkpoint: ``--test`` scores it on a test split,
``--infer_only --test`` writes its predictions as PNGs, sealed by a manifest.

    test_or_infer(spec, runtime) -> the run directory
"""
import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from mirage.config import yaml_text
from mirage.data.dataset import SegmentationDataset
from mirage.data.layout import check_split, find_split, open_dataset
from mirage.errors import UserError
from mirage.fileio import atomic_folder, write_png, write_text
from mirage.progress import progress
from mirage.run import predictions
from mirage.train import distributed
from mirage.train.build import make_loader, model_for, test_transform
from mirage.train.checkpointing import checkpoint_meta, load_for_inference
from mirage.train.context import RunContext
from mirage.train.losses import build_loss
from mirage.train.precision import Precision
from mirage.train.validation import SplitScoring, validate


@torch.no_grad()
def predict(run, loader, out_dir):
    """Write ``<out_dir>/<slice_id>.png`` for every B-scan of the loader's dataset with the
    RunContext's model.

    Logits are resized bilinearly to the B-scan's original size before the argmax (with
    ``--tta flip``, the argmax of the flip-averaged probabilities: :func:`class_scores`);
    the PNG holds INFO.json values (uint8, or uint16 if a value exceeds 255).
    """
    device, classes = run.runtime.device, run.spec.classes
    run.model.eval()
    dataset = loader.dataset
    values = torch.from_numpy(classes.index_to_value().astype(np.int32)).to(device)
    dtype = classes.index_to_value().dtype
    for batch in progress(loader, desc=f"predicting -> {out_dir.name}/", dynamic_ncols=True):
        indices = batch["index"].tolist()
        sizes = [dataset.original_size(index) for index in indices]
        scores, _ = class_scores(run, batch["image"].to(device, non_blocking=True), sizes,
                                 run.spec.task.tta)
        for score, index in zip(scores, indices):
            write_png(out_dir / f"{dataset.slices[index].slice_id}.png",
                      labels_of(score, values, dtype))


TTA_CHOICES = ("none", "flip")


def class_scores(run, batch, sizes, tta="none"):
    """Per image of ``batch`` (N, C, h, w, on the model's device), the (K, H, W) float32
    class scores at its original size ``sizes[i]``, and whether they are probabilities.

    tta "none": the logits resized bilinearly (not probabilities: the argmax of the logits
    is the prediction, as always). tta "flip": the softmax of the image's resized logits
    and the softmax of its horizontally flipped copy's resized logits, flipped back,
    averaged (probabilities, not logits, are averaged).
    """
    with run.precision.autocast():
        logits = run.model(batch)
    scores = [logits_at_size(logit, size) for logit, size in zip(logits.float(), sizes)]
    if tta == "none":
        return scores, False
    with run.precision.autocast():
        mirrored = run.model(torch.flip(batch, dims=(-1,)))
    return [(torch.softmax(score, dim=0)
             + torch.flip(torch.softmax(logits_at_size(flip, size), dim=0), dims=(-1,))) / 2
            for score, flip, size in zip(scores, mirrored.float(), sizes)], True


def logits_at_size(logit, size):
    """(K, h, w) logits at the input size -> (K, H, W) at a B-scan's original ``size``,
    bilinearly: logits can be interpolated, a label map cannot."""
    return F.interpolate(logit[None], size=tuple(size), mode="bilinear",
                         align_corners=False)[0]


def labels_of(logit, values, dtype):
    """(K, H, W) logits -> (H, W) numpy array of INFO.json values (``values``: (K,) int32
    tensor on the logits' device; ``dtype``: uint8 or uint16)."""
    return values[logit.argmax(dim=0)].cpu().numpy().astype(dtype)


# ============================================================================ test / infer
def test_or_infer(spec, runtime):
    """``--test``: metrics of the best checkpoint on the test split; with ``--infer_only``:
    write its predictions. ``--test_data_path`` points both at another dataset."""
    task, folder, log = spec.task, spec.folder, runtime.log
    best = folder.best_checkpoint
    if not best.is_file():
        raise UserError(f"no trained checkpoint: {best} not found; train this run first "
                        "(the same command without --test/--infer_only)")
    classes, dataset = spec.classes, spec.data.dataset
    target = open_dataset(task.test_data_path) if task.test_data_path else dataset
    split_dir = target.split_dir("test")
    external = target.root.resolve() != dataset.root.resolve()
    # Masks of another dataset are scored only if they use the training classes.
    same_classes = (target.class_table.values == classes.values
                    and target.class_table.labels == classes.labels)
    score = not task.infer_only and (not external or same_classes)
    if not task.infer_only and not score:
        raise UserError(f"--test_data_path {target.root}: its INFO.json classes differ from "
                        f"{dataset.name}'s; use --infer_only --test and score the "
                        f"predictions with run_seg_eval.py --external {target.name}")
    slices = find_split(split_dir, need_masks=score)
    if not score:  # predictions only: never read (or require) masks
        slices = [dataclasses.replace(s, mask=None) for s in slices]
    sizes = check_split(slices, classes if score else target.class_table,
                        workers=max(spec.loader.num_workers, 2))
    out_dir = folder.preds_dir(target.name if external else "")
    data = predictions.data_record(split_dir, {s.slice_id: s.bscan for s in slices},
                                   target.class_table.source)
    if task.infer_only and predictions.up_to_date(
            out_dir, best, [s.slice_id for s in slices], classes, data, task.tta):
        log(f">> {out_dir} already holds the predictions of {best.name}: skipping")
        return folder.path
    foreign = predictions.foreign_entries(out_dir) if task.infer_only else []
    if foreign:  # before the model is built: the folder is replaced whole
        shown = ", ".join(foreign[:3]) + (f" (+{len(foreign) - 3} more)" if len(foreign) > 3
                                          else "")
        raise UserError(f"{out_dir} holds {shown}, which inference did not write and "
                        "would delete (it replaces the folder whole); move them elsewhere "
                        "first (run_seg_predict.py -o is best given outside the run folder)")

    model = model_for(spec, runtime)
    run = RunContext(spec, runtime, model,
                     Precision(runtime.device, spec.precision, runtime.setup_line))
    test_set = SegmentationDataset(slices, classes, test_transform(spec.model),
                                   original_sizes=sizes)
    if task.infer_only:
        if runtime.dist.is_main:
            write_predictions(run, test_set, out_dir, data)
    else:
        score_best_checkpoint(run, test_set, target.root)
        if runtime.dist.is_main:
            write_text(folder.test_record(target.name), yaml_text(spec.options))
    distributed.barrier(runtime.dist)
    distributed.shutdown()
    return folder.path


def write_predictions(run, test_set, out_dir, data):
    """The best checkpoint's predictions of ``test_set`` into ``out_dir``, with the options
    and a manifest sealing them to the checkpoint and ``data`` (the B-scans predicted);
    written aside and swapped in whole, so a killed inference never leaves a mix.
    ``run``: the RunContext."""
    spec, log = run.spec, run.runtime.log
    best, classes = spec.folder.best_checkpoint, spec.classes
    epoch = load_for_inference(run.model, best, checkpoint_meta(spec, classes, run.model))
    tta = f", test-time augmentation {spec.task.tta}" if spec.task.tta != "none" else ""
    log(f">> {best.name} (epoch {epoch}) on {len(test_set)} B-scans of {data['split']}{tta}")
    earlier = (predictions.read_manifest(out_dir) or {}).get("data") or {}
    if earlier.get("split") and earlier["split"] != data["split"]:
        log(f">> note: {out_dir.name}/ held predictions of {earlier['split']}; replacing "
            f"them with predictions of {data['split']}")
    loader = make_loader(test_set, spec.loader, distributed.DistInfo(), train=False)
    with atomic_folder(out_dir) as staging:
        predict(run, loader, staging)
        write_text(staging / predictions.INFERENCE_RECORD, yaml_text(spec.options))
        predictions.write_manifest(staging, best, epoch, classes,
                                   [s.slice_id for s in test_set.slices], data,
                                   tta=spec.task.tta)
    log(f">> wrote {len(test_set)} predictions to {out_dir}")


def score_best_checkpoint(run, test_set, data_root):
    """Load ``checkpoint-best.pth`` from disk into the RunContext's model, score
    ``test_set`` and log the test line (replacing an earlier line of the same checkpoint
    and data)."""
    spec, runtime = run.spec, run.runtime
    folder, classes = spec.folder, test_set.class_table
    epoch = load_for_inference(run.model, folder.best_checkpoint,
                               checkpoint_meta(spec, classes, run.model))
    loader = make_loader(test_set, spec.loader, runtime.dist, train=False)
    step = run.batch_step(build_loss(spec.loop.loss, spec.data.ignore_index))
    stats = validate(step, loader, SplitScoring(classes, spec.data.ignore_index, desc="test"),
                     runtime.dist)
    if runtime.dist.is_main:
        entry = {"test_epoch": epoch, "test_data": str(data_root),
                 **{f"test/{k}": v for k, v in stats.items()}}
        earlier = [e for e in folder.read_log()
                   if not (e.get("test_epoch") == epoch and e.get("test_data") == str(data_root))]
        folder.write_log(earlier + [entry])
    runtime.log(f">> test of the best checkpoint (epoch {epoch}) on {len(test_set)} B-scans "
                f"of {data_root}: mIoU {100 * stats['mIoU']:.2f}  aAcc "
                f"{100 * stats['aAcc']:.2f}  mAcc {100 * stats['mAcc']:.2f}  loss "
                f"{stats['loss']:.4f}")
    return stats
