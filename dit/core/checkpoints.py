"""Checkpoint files: atomic saves, weights_only loads, RNG capture, periodic pruning, resume lookup.

Every checkpoint is one .pt file of tensors and plain Python values, so torch.load(weights_only=True)
reads it. Each folder names its files as the seed does; the policy is the same everywhere: a latest
file after every save, periodic files kept up to --checkpoints_total_limit, a best one chosen on
held-out data and a final one.
"""

import random
import re
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .files import atomic_save, load_weights_only


def save(state, path):
    """Write state to path atomically (a crash or full disk never leaves a broken file there)."""
    atomic_save(state, path)


def load(path, what="checkpoint"):
    """Load a checkpoint with weights_only=True; anything unsafe or broken is one UserError."""
    return load_weights_only(path, what)


def rng_state(generator=None):
    """Every random state of this process as weights_only-loadable values."""
    # numpy's state holds a uint32 array that weights_only cannot unpickle: stored as an int64 tensor.
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if generator is not None:
        # A loader's own generator decides the shuffle order: without it a resumed epoch would differ.
        state["generator"] = generator.get_state()
    return state


# random.setstate wants nested tuples; a checkpoint round trip may hand back lists.
def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def set_rng_state(state, generator=None):
    """Restore what rng_state() captured; also reads the numpy keys as a list (older checkpoints)."""
    random.setstate(_as_tuple(state["python"]))
    name, keys, *rest = state["numpy"]
    keys = keys.numpy() if torch.is_tensor(keys) else np.asarray(keys)
    np.random.set_state((name, keys.astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    # A checkpoint written on a GPU still resumes on a CPU-only machine; only the CUDA part is lost.
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


# The step or epoch in a periodic file's name (checkpoint-1200.pt -> 1200): -1 when there is none.
def _number(path):
    found = re.findall(r"\d+", path.stem)
    return int(found[-1]) if found else -1


def periodic(folder, pattern):
    """The files matching pattern in folder, oldest first by the number in their names."""
    # By number, not by name: checkpoint-900 is older than checkpoint-1200.
    return sorted(Path(folder).glob(pattern), key=lambda p: (_number(p), p.name))


def prune(folder, pattern, keep):
    """Delete all but the newest `keep` periodic checkpoints (keep None or 0 keeps every one)."""
    if not keep:
        return []
    # Called after the new file is safely written, so a crash in between never leaves fewer than keep.
    old = periodic(folder, pattern)[:-keep]
    for path in old:
        path.unlink(missing_ok=True)
    return old


def find_resume(path, latest, pattern=None, flag="--resume"):
    """The checkpoint --resume means: a file as given, or a run folder's latest (else newest periodic)."""
    path = Path(path)
    if path.is_file():
        return path
    # A run folder: the latest file is written after every save; periodic ones are the fallback when a
    # user deleted it or the run was stopped before its first latest save.
    if path.is_dir():
        if (path / latest).is_file():
            return path / latest
        found = periodic(path, pattern) if pattern else []
        if found:
            return found[-1]
        raise UserError(f"{flag} {path} holds no {latest}: pass the checkpoint file or its run folder")
    raise UserError(f"{flag} {path} does not exist: pass a checkpoint file or a run folder")


def plain(value):
    """A copy of value with only plain types (paths to str, tuples to lists) for a checkpoint's config."""
    # weights_only loads refuse Path, Namespace and numpy scalars: everything else becomes a string.
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
