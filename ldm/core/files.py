"""Files written so that a crash never leaves a broken one, and loaded without running pickled code."""

import os
import re
from pathlib import Path

import torch

from .errors import UserError

TEMP_MARK = ".tmp-"  # temporaries are hidden files named .<name>.tmp-<pid>
STALE = re.compile(r"^\..+\.tmp-?\d+$")  # also the '.<name>.tmp<pid>' of older versions


def atomic_write(path, write):
    """Call write(tmp) on a temporary file in path's folder, then move it onto path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save(obj, path):
    """torch.save through a temporary file, so path is never half written."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def clean_temporaries(folder):
    """Delete temporaries that a killed run left in folder; returns how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    stale = [p for p in folder.iterdir() if STALE.match(p.name) and p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def load_weights_only(path, what="checkpoint"):
    """torch.load with weights_only=True on the CPU; anything else (pickled code, garbage) is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unpickling failure: not a plain-tensor file
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(error))
        reason = (
            f"it holds a pickled {found.group(1)}; only tensors and plain values are loaded (nothing ran)"
            if found
            else "it is not a PyTorch file of tensors (corrupt, truncated or another format)"
        )
        raise UserError(f"cannot load {what} {path} safely: {reason}") from None
