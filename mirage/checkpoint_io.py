"""Weights and checkpoint files: safe loading and atomic saving of ``.pth`` / ``.safetensors``.

Loading never executes code from the file: ``torch.load(weights_only=True)``, with only
``argparse.Namespace`` and ``pathlib`` paths allow-listed (MIRAGE checkpoints keep their
training arguments in a Namespace). Saving writes a temporary file and renames it, so a
run killed mid-save leaves every earlier checkpoint intact.
"""
import argparse
import contextlib
import pathlib
import pickle
import shutil
from pathlib import Path

import torch

from mirage.errors import UserError
from mirage.fileio import atomic_path

SAFE_GLOBALS = [argparse.Namespace, pathlib.PosixPath, pathlib.WindowsPath,
                pathlib.PurePosixPath, pathlib.PureWindowsPath]


def load_file(path, what="--weights"):
    """Load a ``.pth``/``.pt`` (torch.save) or ``.safetensors`` file as a dict, on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path}: file not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file as load_safetensors
        try:
            return load_safetensors(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise UserError(f"{what} {path}: not a readable safetensors file ({err})") from None
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()
        detail = next((line for line in reason if "GLOBAL" in line or "Unsupported" in line),
                      reason[0] if reason else "")
        raise UserError(f"{what} {path}: refused, loading it would run arbitrary code "
                        f"({detail.strip()}); re-save its tensors with torch.save(state_dict)"
                        ) from None
    except Exception as err:  # torch raises many types for garbage; all mean the same
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise UserError(f"{what} {path}: not a PyTorch checkpoint "
                        f"({type(err).__name__}: {first})") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path}: expected a dict of tensors, found "
                        f"{type(data).__name__}")
    return data


def save(path, payload):
    """``torch.save(payload)`` to ``path`` atomically; a full disk is a UserError."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
    except RuntimeError as err:  # torch reports a failed write as a RuntimeError
        raise disk_error(path, err) from None


def disk_error(path, err):
    """A one-line UserError for a write that failed: full disk, or not writable."""
    folder = Path(path).parent
    with contextlib.suppress(OSError):
        if shutil.disk_usage(folder).free < (64 << 20):
            return UserError(f"no space left on {folder} while writing {Path(path).name}; "
                             "free some space (e.g. delete old runs) and resume")
    return UserError(f"cannot write {path}: {str(err).strip().splitlines()[0]}")
