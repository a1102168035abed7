"""Training protocols and the speed options that keep their maths.

Protocols (``--tuning``; docs/segmentation_tuning.md, "Protocols and speed options"), set
up on the model by :func:`mirage.train.build.apply_protocol`:

- **frozen** (the paper's, the default): the transformer blocks are frozen; the patch
  projector, the global tokens and the decoder train, so every step runs the encoder
  forward *and* backward (the gradient reaches the projector through the frozen blocks).
- **fully_frozen** / **linear_probe**: the whole backbone is frozen and runs without a
  graph (``SegmentationModel.freeze_backbone`` in mirage/models/segmentation_model.py);
  the backward pass stops at the decoder (the ``linear`` one for the probe). With
  ``--feature_cache`` (mirage/train/feature_cache.py) the backbone runs once per training
  view instead of once per epoch.
- **lora**: frozen blocks with low-rank adapters (mirage/models/lora.py) that train.
- **full**: every encoder tensor trains, with layer-wise LR decay (mirage/train/optim.py).

Speed options (same maths, less time or memory), applied by :func:`apply_speed_options`
and :func:`make_optimizer`: fused attention (checked), channels-last decoders, fused AdamW
and cuDNN autotuning on CUDA, ``--grad_checkpointing``, ``--compile``. Mixed precision and
the loop without host syncs are in mirage/train/precision.py (``Precision``) and
mirage/train/loop.py (``train_one_epoch``).
"""
import torch
from torch.utils.data import Dataset

from mirage.models.backbones import fused_attention_layers
from mirage.train.optim import build_optimizer


# ----------------------------------------------------------------------------- data
class RandomFlipViews(Dataset):
    """``--aug_name flip``: the wrapped dataset's (resized) item, flipped left-right with
    probability 0.5. ``item["flipped"]`` says which of the two views it is, so that the
    feature cache can hold both. Other attributes (``slices``, ``class_table``, ...) are
    the wrapped dataset's."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getattr__(self, name):
        if name == "dataset":  # not set yet (unpickling in a worker): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index):
        item = dict(self.dataset[index])
        # torch's RNG: DataLoader seeds it per worker (numpy's global one is not).
        flipped = bool(torch.rand(()) < 0.5)
        if flipped:
            item["image"] = item["image"].flip(-1)
            if "mask" in item:
                item["mask"] = item["mask"].flip(-1)
        item["flipped"] = flipped
        return item


def training_views(dataset, aug_name):
    """The training dataset as ``--aug_name`` asks; 'flip' wraps it in
    :class:`RandomFlipViews` (its transform only resizes)."""
    return RandomFlipViews(dataset) if aug_name == "flip" else dataset


# ----------------------------------------------------------------------------- model
def apply_speed_options(model, speed, device, log, compile_backend="inductor"):
    """Channels-last decoder, and the SpeedSpec's ``--grad_checkpointing`` and
    ``--compile``; logs one line saying what is on. ``model`` is a SegmentationModel
    already on ``device``."""
    fused, total = fused_attention_layers(model.backbone)
    notes = [f"fused attention in {fused}/{total} attention layers"
             + ("" if fused == total else " (is TIMM_FUSED_ATTN=0 set?)")]
    # NHWC convolutions (cuDNN's; oneDNN's on the CPU, where the depthwise convolutions'
    # backward is much faster) and the permutes inside the ConvNeXt blocks become free.
    model.decoder.to(memory_format=torch.channels_last)
    notes.append("channels-last decoder")
    if device.type == "cuda":
        # The input size is fixed: autotune each convolution once, keep the fastest.
        torch.backends.cudnn.benchmark = True
        notes.append("cuDNN autotuning")
    if speed.grad_checkpointing:
        if model.backbone_frozen:
            log(">> note: --grad_checkpointing has no effect with a fully frozen backbone "
                "(--tuning fully_frozen or linear_probe: no graph runs through it)")
        elif model.set_grad_checkpointing(True):
            notes.append("gradient checkpointing of the encoder blocks")
        else:
            log(f">> note: --grad_checkpointing: {type(model.backbone).__name__} has no "
                "checkpointing switch; its activations are stored as usual")
    if speed.compile:
        model.compile_parts(lambda fn, name: CompileOrEager(fn, name, log, compile_backend))
        notes.append("torch.compile of encoder and decoder (the first steps compile"
                     + (", minutes on a CPU)" if device.type == "cpu" else ")"))
    log(">> speed: " + ", ".join(notes))
    return model


def make_optimizer(groups, optim, device):
    """The OptimSpec's optimiser as mirage.train.optim.build_optimizer builds it; on CUDA,
    Adam/AdamW are the fused implementations (one kernel for all parameters, and no host
    sync in the gradient scaler's step)."""
    if device.type == "cuda" and optim.name in ("adamw", "adam"):
        cls = torch.optim.AdamW if optim.name == "adamw" else torch.optim.Adam
        return cls(groups, lr=optim.lr, eps=optim.eps, betas=tuple(optim.betas), fused=True)
    return build_optimizer(groups, optim)


class CompileOrEager:
    """``torch.compile(fn)``; if running the compiled version fails where ``fn`` itself
    works (no C++ compiler or Triton, an unsupported operation), one notice and ``fn``
    from then on. An error that ``fn`` raises too is the model's own and propagates."""

    def __init__(self, fn, name, log, backend="inductor"):
        self.eager, self.name, self.log = fn, name, log
        self.compiled = torch.compile(fn, backend=backend) if hasattr(torch, "compile") \
            else None
        if self.compiled is None:
            log(f">> note: --compile: this PyTorch has no torch.compile; the {name} runs "
                "eagerly")

    def __call__(self, *args, **kwargs):
        if self.compiled is None:
            return self.eager(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 -- any compiler failure means: run eagerly
            result = self.eager(*args, **kwargs)  # the model's own errors raise here
            self.compiled = None
            lines = str(err).strip().splitlines()
            self.log(f">> note: --compile: the {self.name} could not be compiled "
                     f"({type(err).__name__}: {lines[0][:160] if lines else ''}); it runs "
                     "eagerly")
            return result
