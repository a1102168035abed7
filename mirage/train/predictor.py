"""Predict with a trained run from Python, without retyping its options.

    from mirage.train.predictor import load_run
    predictor = load_run("<output>/<version>/<dataset>/<run name>/", device="auto")
    labels = predictor.predict("scan_5.png")          # (H, W) INFO.json values, uint8/uint16
    probs = predictor.predict_probabilities(image)    # (K, H, W) float32 softmax
    predictor.classes.values, predictor.classes.labels
    flipped = load_run(run_dir, tta="flip")           # test-time flip (see class_scores)
    ensemble = load_run([run_a, run_b, run_c])        # probabilities averaged over runs

The run folder says everything: ``config.yaml`` (every option: weights file, model family,
input and patch size, normalisation, decoder, precision), ``checkpoint-best.pth`` (the
trained tensors and the classes they were trained with). The model is built and loaded as
``run_seg_tuning.py --infer_only --test`` builds it (mirage/train/inference.py), and a
B-scan is predicted as it predicts one: resized to the input size and normalised
(``test_transform``), the logits resized bilinearly to the B-scan's original size, then
the argmax as INFO.json values. The training dataset need not be present.

With ``tta="flip"`` each B-scan is also predicted left-right mirrored and the two
softmaxes averaged (mirage.train.inference.class_scores); an :class:`Ensemble` of runs
averages its runs' probabilities (each run's own, with its TTA), then takes the argmax.
One run without TTA predicts from its logits, exactly as before.
"""
import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch

from mirage import checkpoint_io
from mirage.data.classes import ClassTable, read_class_table
from mirage.errors import UserError
from mirage.fileio import file_sha256, read_gray
from mirage.run.spec import RunSpec, SpeedSpec
from mirage.train.build import model_for, test_transform
from mirage.train.checkpointing import checkpoint_meta, load_for_inference
from mirage.train.context import RunContext
from mirage.train.distributed import DistInfo
from mirage.train.inference import TTA_CHOICES, class_scores, labels_of
from mirage.train.precision import Precision
from mirage.train.runtime import Runtime, resolve_device

# Training reads an image file with OpenCV as 2-D gray, 8 or 16 bits as stored
# (mirage.fileio.read_gray); in-memory RGB arrays go through the same decoder.
_GRAY_ANY_DEPTH = cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH
_DECODE_THREADS = 4  # OpenCV releases the GIL while decoding


def _quiet(_message):
    """A log function that prints nothing (the predictor is a library call)."""


def checkpoint_classes(payload, checkpoint, options):
    """The ClassTable a checkpoint was trained with: its ``meta`` (or the first version's
    class lists); only checkpoints recording neither fall back to the dataset's INFO.json
    (``options``: the run's)."""
    entries = (payload.get("meta") or {}).get("classes")
    if entries is None and "class_values" in payload and "class_labels" in payload:
        entries = list(zip(payload["class_values"], payload["class_labels"]))
    if entries is None:
        info = options["mapping_fn"] or Path(str(options["data_path"])) / "INFO.json"
        return read_class_table(info)
    return ClassTable.from_entries(entries, f"{checkpoint} (the classes it was trained with)")


def load_run(run_dir, device="auto", weights=None, batch_size=None, tta="none"):
    """The :class:`Predictor` of a trained run directory (a list or tuple of run
    directories: their :class:`Ensemble`, see :func:`load_runs`).

    device: "auto" (CUDA if present), "cpu", "cuda" or "cuda:N"; the run's own --device is
    not used. weights: the foundation model's weights file when it moved since training
    (default: the path in config.yaml); its SHA-256 must be the one the checkpoint
    records. batch_size: B-scans per forward pass (default: the run's --batch_size).
    tta: "none" or "flip" (each B-scan and its mirror image, probabilities averaged).
    Mixed precision is the run's (--fp16/--amp_dtype, CUDA only); on CUDA, cuDNN
    autotuning is switched on for the process, as inference does.

    The run is read back as ``--run_dir RUN --infer_only --test`` reads it
    (``RunSpec.from_run_dir``, the same checks) and its model built by the same code
    (``model_for``), without the dataset: the classes come from the checkpoint.
    """
    if isinstance(run_dir, (list, tuple)):
        return load_runs(run_dir, device, weights, batch_size, tta)
    if tta not in TTA_CHOICES:
        raise UserError(f"tta {tta!r}: not supported; use one of {', '.join(TTA_CHOICES)}")
    overrides = {"device": str(device)}
    if weights is not None:
        if not Path(weights).is_file():
            raise UserError(f"weights file {weights} (given) not found; pass the file the "
                            "run was trained on (weights=... in Python, --weights with "
                            "run_seg_predict.py)")
        overrides["weights"] = str(weights)
    spec = RunSpec.from_run_dir(Path(run_dir).expanduser(), overrides, need_data=False)
    best = spec.folder.best_checkpoint
    if not best.is_file():
        raise UserError(f"no trained checkpoint: {best} not found; train this run first")
    payload = checkpoint_io.load_file(best, what="checkpoint")
    classes = checkpoint_classes(payload, best, spec.options)
    runtime = Runtime(resolve_device(spec.runtime.device, DistInfo()), DistInfo(), _quiet)
    # Compiling is left out (minutes); the other speed options change the arithmetic's
    # order, so they are applied as inference applies them.
    model = model_for(dataclasses.replace(spec, speed=SpeedSpec()), runtime,
                      classes.num_classes)
    epoch = load_for_inference(model, best, checkpoint_meta(spec, classes, model), payload)
    model.eval()
    precision = Precision(runtime.device, spec.precision, _quiet)
    return Predictor(RunContext(spec, runtime, model, precision), classes,
                     batch_size or spec.loader.batch_size, epoch, tta)


def load_runs(run_dirs, device="auto", weights=None, batch_size=None, tta="none"):
    """The :class:`Ensemble` of trained runs (e.g. the seeds of one model), each loaded
    by :func:`load_run` with these arguments. Runs whose class tables or input sizes
    differ are refused, naming the difference."""
    run_dirs = list(run_dirs)
    if not run_dirs:
        raise UserError("an ensemble needs at least one run directory")
    return Ensemble([load_run(Path(run_dir), device, weights, batch_size, tta)
                     for run_dir in run_dirs])


def check_ensemble(members):
    """Refuse predictors that cannot be averaged: other classes or input sizes."""
    first = members[0]
    for other in members[1:]:
        mine, theirs = first.classes.entries(), other.classes.entries()
        where = f"cannot ensemble {first.run_dir} and {other.run_dir}"
        if mine != theirs:
            at = next(i for i in range(max(len(mine), len(theirs)))
                      if i >= len(mine) or i >= len(theirs) or mine[i] != theirs[i])
            shown = [tuple(e[at]) if at < len(e) else "no class" for e in (mine, theirs)]
            raise UserError(f"{where}: their class tables differ (class {at}: {shown[0]} "
                            f"vs {shown[1]})")
        sizes = [tuple(p.spec.model.input_size) for p in (first, other)]
        if sizes[0] != sizes[1]:
            raise UserError(f"{where}: their input sizes differ ({sizes[0][0]}x"
                            f"{sizes[0][1]} vs {sizes[1][0]}x{sizes[1][1]})")


# ----------------------------------------------------------------------------- inputs
def as_gray(image):
    """A B-scan as training reads it: (H, W) uint8/uint16.

    image: a file path (read by mirage.fileio.read_gray), a 2-D uint8/uint16 array, or an
    (H, W, 3) RGB or (H, W, 4) RGBA uint8/uint16 array, turned to gray exactly as training
    reads an RGB(A) PNG (OpenCV's PNG decoder: alpha dropped; it rounds differently from
    cv2.cvtColor). Other arrays (float, other shapes) are refused: training reads 8- or
    16-bit images, and a float array's scale is unknown.
    """
    if isinstance(image, (str, os.PathLike)):
        return read_gray(image)
    if not isinstance(image, np.ndarray) or image.dtype not in (np.uint8, np.uint16) \
            or not (image.ndim == 2 or _is_colour(image)) \
            or min(image.shape[:2], default=0) < 1:
        what = (f"array of shape {image.shape} and type {image.dtype}"
                if isinstance(image, np.ndarray) else type(image).__name__)
        raise UserError(f"cannot predict a {what}; give a file path, a 2-D uint8/uint16 "
                        "B-scan or an (H, W, 3) RGB / (H, W, 4) RGBA uint8/uint16 array")
    if image.ndim == 2:
        return np.ascontiguousarray(image)  # OpenCV refuses some strided views
    order = [2, 1, 0, 3][:image.shape[2]]  # RGB(A) -> OpenCV's BGR(A)
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(image[..., order]))
    if not ok:
        raise UserError(f"OpenCV could not encode the {image.shape} colour array")
    return cv2.imdecode(encoded, _GRAY_ANY_DEPTH)


def _is_colour(image):
    """An (H, W, 3) RGB or (H, W, 4) RGBA array: one image, never a stack of 3 or 4
    columns wide B-scans."""
    return image.ndim == 3 and image.shape[2] in (3, 4)


def _as_list(images):
    """(list of single images, how the result is returned: 'one', 'stack' or 'list')."""
    if isinstance(images, (str, os.PathLike)):
        return [images], "one"
    if isinstance(images, np.ndarray):
        if images.ndim == 2 or _is_colour(images):
            return [images], "one"
        if images.ndim in (3, 4):  # (N, H, W) gray or (N, H, W, 3|4) RGB(A)
            return list(images), "stack"
    if isinstance(images, (list, tuple)):
        return list(images), "list"
    return [images], "one"  # as_gray names what it cannot read


def _shaped(results, how):
    """The results as the input was given: one array, a stacked array or a list."""
    if how == "one":
        return results[0]
    return np.stack(results) if how == "stack" and results else results


# ----------------------------------------------------------------------------- logits
class Predictor:
    """A trained run's model, ready to predict B-scans (see :func:`load_run`).

    classes: the ClassTable (``values``: the INFO.json pixel values, ``labels``).
    run_dir, epoch: where it comes from and the epoch of its checkpoint-best.pth.
    spec: the RunSpec it was rebuilt from.
    """

    def __init__(self, run, classes, batch_size, epoch, tta="none"):
        """``run``: the RunContext of the loaded model; ``classes``: its checkpoint's."""
        self.run, self.tta = run, tta
        self.spec, self.model, self.classes = run.spec, run.model, classes
        self.transform = test_transform(run.spec.model)
        self.device, self.precision = run.runtime.device, run.precision
        self.batch_size = max(1, batch_size)
        self.run_dir, self.epoch = run.spec.folder.path, epoch
        self._values = torch.from_numpy(classes.index_to_value().astype(np.int32)).to(
            self.device)
        self._dtype = classes.index_to_value().dtype
        # of the checkpoint as loaded (a later checkpoint-best.pth is another model)
        self.checkpoint_sha256 = file_sha256(run.spec.folder.best_checkpoint)

    def __repr__(self):
        return (f"Predictor({str(self.run_dir)!r}, epoch {self.epoch}, "
                f"{self.classes.num_classes} classes, {self.device}, tta {self.tta})")

    def describe(self):
        """One line: the run, its checkpoint's epoch and the TTA."""
        tta = f", tta {self.tta}" if self.tta != "none" else ""
        return f"{self.run_dir.name} (checkpoint of epoch {self.epoch}{tta})"

    def record(self):
        """What predicts, for a prediction record: ``{"runs": [{run_dir, checkpoint,
        checkpoint_sha256, epoch}], "tta": ...}``."""
        best = self.spec.folder.best_checkpoint
        return {"runs": [{"run_dir": str(Path(self.run_dir).resolve()),
                          "checkpoint": best.name,
                          "checkpoint_sha256": self.checkpoint_sha256,
                          "epoch": self.epoch}], "tta": self.tta}

    def predict(self, images):
        """Labels of one B-scan or a batch.

        images: a path, a 2-D uint8/uint16 array or an (H, W, 3) RGB / (H, W, 4) RGBA
        array -> (H, W) uint8/uint16 INFO.json values at the image's size; a list of them
        -> a list; an (N, H, W) or (N, H, W, 3|4) array -> (N, H, W).
        """
        items, how = _as_list(images)
        return _shaped([labels for labels, _ in self.iter_predictions(items)], how)

    def predict_probabilities(self, images, dtype=np.float32):
        """Softmax of one B-scan or a batch at the original size: (K, H, W) ``dtype``
        (float32 or float16) per image, class k being ``classes.values[k]``; batches as
        :meth:`predict`."""
        items, how = _as_list(images)
        return _shaped([probs for _, probs in self.iter_predictions(items, True, dtype)],
                       how)

    @torch.no_grad()
    def iter_predictions(self, images, probabilities=False, dtype=np.float32):
        """Yield ``(labels (H, W), probabilities (K, H, W) or None)`` for each image of the
        iterable ``images`` (paths or arrays, see :func:`as_gray`), in order, running the
        model on ``batch_size`` of them at a time."""
        images = iter(images)
        with ThreadPoolExecutor(max_workers=_DECODE_THREADS) as pool:
            while True:
                chunk = [image for _, image in zip(range(self.batch_size), images)]
                if not chunk:
                    return
                grays = list(pool.map(as_gray, chunk))
                scores, are_probabilities = self._scores(grays)
                for score in scores:
                    labels = labels_of(score, self._values, self._dtype)
                    if probabilities and not are_probabilities:
                        score = torch.softmax(score, dim=0)
                    yield labels, (score.cpu().numpy().astype(dtype) if probabilities
                                   else None)

    def _scores(self, grays):
        """(K, H, W) float32 scores at each (H, W) B-scan's size and whether they are
        probabilities: the logits, or with TTA the averaged probabilities
        (mirage.train.inference.class_scores)."""
        batch = torch.stack([torch.from_numpy(self.transform(gray)[0]) for gray in grays])
        return class_scores(self.run, batch.to(self.device, non_blocking=True),
                            [gray.shape for gray in grays], self.tta)


class Ensemble(Predictor):
    """Predictors of several runs whose probabilities are averaged (see
    :func:`load_runs`): each run's softmax (with its TTA, flip-averaged), summed over the
    runs and divided by their number, then the argmax. Every run predicts the same
    ``batch_size`` B-scans at a time, so memory holds one batch's probabilities.

    members: the Predictors; classes, device, tta: theirs (the first's); batch_size: the
    smallest of theirs. An ensemble of one run predicts exactly as that run.
    """

    def __init__(self, members):  # pylint: disable=super-init-not-called
        check_ensemble(members)
        self.members = list(members)
        first = self.members[0]
        self.classes, self.device, self.tta = first.classes, first.device, first.tta
        self.batch_size = min(m.batch_size for m in self.members)
        self._values, self._dtype = first._values, first._dtype

    def __repr__(self):
        return f"Ensemble({[str(m.run_dir) for m in self.members]!r}, tta {self.tta})"

    def describe(self):
        names = ", ".join(m.describe() for m in self.members)
        return f"ensemble of {len(self.members)} runs: {names}"

    def record(self):
        return {"runs": [entry for m in self.members for entry in m.record()["runs"]],
                "tta": self.tta}

    def _scores(self, grays):
        """The runs' probabilities averaged (one run: its own scores, unchanged)."""
        if len(self.members) == 1:
            return self.members[0]._scores(grays)
        total = None
        for member in self.members:
            scores, are_probabilities = member._scores(grays)
            probs = scores if are_probabilities else [torch.softmax(s, dim=0) for s in scores]
            total = probs if total is None else [t + p for t, p in zip(total, probs)]
        return [t / len(self.members) for t in total], True
