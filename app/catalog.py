"""The checkpoints under --checkpoints: which files there are, which kind each is, and safe paths to them.

A file's kind is read from the checkpoint itself (torch.load(weights_only=True), never a pickle of code):
its "format" tag and, for the pixel DDPM, the objective in its stored config. Anything else is listed as
unsupported with the reason, so one odd file never takes the server down.
"""

import os
import zipfile
from pathlib import Path

import torch

SUFFIXES = (".pt", ".pth", ".ckpt")
# The samplers each objective accepts, default first: the rule of core/sde_cli.sampling_plan, which the
# ddpm worker applies again (the list here is what /models shows and what a request is checked against).
DISCRETE_SAMPLERS = ("ddpm", "ddim")
SDE_SAMPLERS = ("pc", "euler", "heun", "rk45", "dpm++")
FLOW_SAMPLERS = ("euler", "heun", "rk45")
OBJECTIVES = ("ddpm", "vp", "subvp", "ve", "flow")
# Formats of this project's other files, named so that the reason they are refused is clear.
KNOWN_OTHER = {"ddpm-classifier-v1": "a ddpm classifier (a guide for sampling), not a generator"}
# model_type of the other folders' checkpoints (see dit/utils.py OTHER_MODELS): recognised, not served yet.
NOT_YET = {
    "dit": "a dit/ checkpoint: the app does not serve DiT models yet",
    "ldm": "an ldm/ checkpoint: the app does not serve LDM models yet",
    "controlnet": "a controlnet/ checkpoint: the app does not serve ControlNet models yet",
    "vae": "a VAE of ldm/train_vae.py, not a generator",
}


class Refused(Exception):
    """A request for a path that is not a checkpoint under --checkpoints (a 4xx, never a crash)."""


def inside(root, path):
    """Whether path, after following every link, lies under root (also resolved)."""
    try:
        return Path(os.path.realpath(path)).is_relative_to(Path(os.path.realpath(root)))
    except (OSError, ValueError):
        return False


def safe_path(root, name):
    """The file of a model name (a path relative to root), or Refused: no absolute path, no '..', and no
    link that points outside root."""
    if not isinstance(name, str) or not name:
        raise Refused("model must be a checkpoint name as /models lists it")
    relative = Path(name)
    if relative.is_absolute() or name.startswith(("/", "\\")):
        raise Refused(f"model {name!r} is an absolute path: give a name relative to --checkpoints")
    if ".." in relative.parts:
        raise Refused(f"model {name!r} contains '..': only checkpoints under --checkpoints are served")
    path = Path(root) / relative
    if not inside(root, path):
        raise Refused(f"model {name!r} points outside --checkpoints")
    if not path.is_file():
        raise Refused(f"model {name!r} is not a checkpoint under --checkpoints (see /models)")
    return path


def describe_ddpm(ckpt):
    """/models' entry of a pixel-DDPM checkpoint (any objective), or a reason it is unsupported."""
    config = ckpt.get("config") or {}
    arch = ckpt.get("model_config") or {}
    objective = config.get("objective", "ddpm")
    if objective not in OBJECTIVES:
        return {"supported": False, "reason": f"ddpm checkpoint of unknown objective {objective!r}"}
    samplers = {"ddpm": DISCRETE_SAMPLERS, "flow": FLOW_SAMPLERS}.get(objective, SDE_SAMPLERS)
    classes = list(ckpt.get("class_names") or [])
    if arch.get("num_classes") and not classes:
        classes = [str(i) for i in range(arch["num_classes"])]
    intensity = ckpt.get("intensity") or {"kind": "integer", "bit_depth": 8}
    return {
        "supported": True,
        "kind": "ddpm",
        "objective": objective,
        "conditional": bool(arch.get("num_classes")),
        "class_names": classes,
        "samplers": list(samplers),
        "max_steps": config.get("noise_steps") if objective == "ddpm" else None,
        "image_size": arch.get("img_size", config.get("image_size")),
        "channels": arch.get("c_in", config.get("channels")),
        "intensity": intensity,
    }


def describe(path):
    """The /models entry of one file: kind, classes, samplers, size and channels; or supported False
    with the reason."""
    try:
        # mmap: the tensors are not read, only the small dicts around them (zip-format files only).
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:  # any unreadable file is listed, not raised: the server must keep serving
        first = (str(error).strip().splitlines() or [""])[0]
        reason = f"not loadable with torch.load(weights_only=True): {type(error).__name__} {first}"
        return {"supported": False, "reason": reason.strip()}
    if not isinstance(ckpt, dict):
        return {"supported": False, "reason": "not a checkpoint dict of this project"}
    fmt = ckpt.get("format")
    if fmt == "ddpm-checkpoint-v1":
        return describe_ddpm(ckpt)
    if ckpt.get("model_type") in NOT_YET:
        return {"supported": False, "reason": NOT_YET[ckpt["model_type"]]}
    if fmt in KNOWN_OTHER:
        return {"supported": False, "reason": KNOWN_OTHER[fmt]}
    if fmt is None:
        return {"supported": False, "reason": "no format tag: a bare state_dict or a file of another project"}
    return {"supported": False, "reason": f"format {fmt!r} is not supported by the app yet"}


class Catalog:
    """The checkpoints under root, each described once per (size, mtime) so /models stays cheap."""

    def __init__(self, root):
        self.root = Path(root)
        self.cache = {}

    def files(self):
        """Names (relative to root, '/'-separated) of the checkpoint files; links to folders not followed."""
        found = []
        for folder, dirs, names in os.walk(self.root):
            dirs.sort()
            for name in sorted(names):
                if name.endswith(SUFFIXES):
                    found.append((Path(folder) / name).relative_to(self.root).as_posix())
        return found

    def entry(self, name):
        path = self.root / name
        if not inside(self.root, path):
            return {"name": name, "supported": False, "reason": "a link that points outside --checkpoints"}
        try:
            stat = path.stat()
        except OSError as error:
            return {"name": name, "supported": False, "reason": f"cannot be read: {error.strerror}"}
        key = (name, stat.st_size, stat.st_mtime_ns)
        if key not in self.cache:
            self.cache[key] = {"name": name, **describe(path)}
        return self.cache[key]

    def models(self):
        return [self.entry(name) for name in self.files()]
