"""Weights and checkpoint files: safe loading and atomic saving of ``.pth`` / ``.safetensors``.

Loading never executes code from the file: ``torch.load(weights_only=True)``, with only
``argparse.Namespace`` and ``pathlib`` paths allow-listed (MIRAGE checkpoints keep their
training arguments in a Namespace). A file whose pickle asks for anything else is
"refused"; one that is no torch.save file at all (judged by its first bytes first), or a
damaged or truncated one, is reported as such. Saving writes a temporary file and renames
it, so a run killed mid-save leaves every earlier checkpoint intact.
"""
import argparse
import contextlib
import pathlib
import pickle
import re
import shutil
import tarfile
import zipfile
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
    # Judge the bytes first: garbage must not reach torch's unpickler, whose refusals
    # would then read as if the file asked to run code.
    unreadable = _not_a_checkpoint(path)
    if unreadable:
        raise _damaged(what, path, unreadable)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file
        forbidden = _forbidden_global(err)
        if forbidden:
            raise UserError(f"{what} {path}: refused: loading it would run arbitrary code "
                            f"({forbidden}); re-save its tensors with torch.save(state_dict)"
                            ) from None
        raise _damaged(what, path, f"{type(err).__name__}: {_what_failed(err)}") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path}: expected a dict of tensors, found "
                        f"{type(data).__name__}")
    return data


def _what_failed(err):
    """The line of torch's message that says what went wrong: its first, or for the
    weights-only unpickler the one after its preamble about weights_only."""
    text = str(err).split("WeightsUnpickler error:", 1)[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else "the file ends early"


def _damaged(what, path, reason):
    return UserError(f"{what} {path}: not a PyTorch checkpoint, or a damaged or truncated "
                     f"one ({reason}); save or download it again")


# torch.save writes a zip archive (since PyTorch 1.6), or in the legacy format a pickle
# that starts with this magic number (after the protocol and, from protocol 4, a frame).
_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_ZIP_HEAD = b"PK\x03\x04"


def _not_a_checkpoint(path):
    """Why the file cannot be a torch.save file, judged by its bytes; "" if it may be one."""
    with open(path, "rb") as handle:
        head = handle.read(32)
    if not head:
        return "the file is empty"
    if head.startswith(_ZIP_HEAD):
        # zipfile looks for the directory at the end: a cut-off copy has none
        return "" if zipfile.is_zipfile(path) else "a zip archive whose end is missing"
    if head[:1] == b"\x80" and _LEGACY_MAGIC in head or tarfile.is_tarfile(path):
        return ""  # legacy torch.save; a tar archive: PyTorch before 0.4
    if head[:1] == b"\x80":
        return "a Python pickle, but not one written by torch.save"
    return f"neither a zip archive nor a torch.save pickle; it starts with {head[:12]!r}"


# The weights-only unpickler's words for a pickle that asks for code it does not allow:
# a global (class or function) off the allow-list, or a call or build of one.
_FORBIDDEN = re.compile(r"GLOBAL (\S+)|reduce for unrecognized function (\S+)"
                        r"|Can only (?:build|create new object).* got (.+)")


def _forbidden_global(err):
    """"asks for X" when ``err`` is torch's refusal of a code-running pickle, else ""."""
    if not isinstance(err, pickle.UnpicklingError):
        return ""  # a damaged zip or a pickle cut short
    match = _FORBIDDEN.search(str(err))
    if not match:
        return ""  # e.g. "Unsupported operand": bytes that are no pickle instruction
    name = next(group for group in match.groups() if group).rstrip(".")
    return f"its pickle asks for {name}, which is not on the allow-list"


def save(path, payload):
    """``torch.save(payload)`` to ``path`` atomically; a full disk is a UserError.

    Saved through an open file: given a path, torch names the records inside the archive
    after the file, here a random temporary name, so the same payload would give other
    bytes (and another SHA-256, which names a weights file in a run's identity) each time.
    """
    path = Path(path)
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            torch.save(payload, handle)
    except (RuntimeError, OSError) as err:  # torch reports a failed write as a RuntimeError
        raise disk_error(path, err) from None


def disk_error(path, err):
    """A one-line UserError for a write that failed: full disk, or not writable."""
    folder = Path(path).parent
    with contextlib.suppress(OSError):
        if shutil.disk_usage(folder).free < (64 << 20):
            return UserError(f"no space left on {folder} while writing {Path(path).name}; "
                             "free some space (e.g. delete old runs) and resume")
    return UserError(f"cannot write {path}: {str(err).strip().splitlines()[0]}")
