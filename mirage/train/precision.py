"""Mixed precision: autocast and gradient scaling on CUDA, float32 elsewhere."""
import contextlib

import torch

from mirage.errors import UserError


class Precision:
    """Autocast + gradient scaling on CUDA: float16 with a gradient scaler, or bfloat16
    (float32's range, so no scaler); float32 on the CPU and when the PrecisionSpec
    (mirage.run.spec) has ``mixed`` off.
    """

    def __init__(self, device, spec, log):
        cuda = device.type == "cuda"
        wanted = torch.bfloat16 if spec.dtype == "bf16" else torch.float16
        self.dtype = wanted if cuda and spec.mixed else None
        if self.dtype == torch.bfloat16 and not _bf16_supported(device):
            raise UserError(f"--amp_dtype bf16: {torch.cuda.get_device_name(device)} has no "
                            "bfloat16 support; use --amp_dtype fp16")
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)
        if not cuda and spec.mixed:
            log(">> note: mixed precision is CUDA-only; running in float32 on the CPU")

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss, optimizer, clip_grad, params):
        self.scaler.scale(loss).backward()
        if clip_grad is not None:
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, clip_grad)
        self.scaler.step(optimizer)
        self.scaler.update()


def _bf16_supported(device):
    try:  # emulated bfloat16 (pre-Ampere) would be slower than float16
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # older PyTorch: no emulation argument
        return torch.cuda.is_bf16_supported()

