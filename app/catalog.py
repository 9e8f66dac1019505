"""The checkpoints under --checkpoints: which files there are, which kind each is, and safe paths to them.

A file's kind is read from the checkpoint itself (torch.load(weights_only=True), never a pickle of code):
its "format" tag and, for the pixel DDPM, the objective in its stored config. Anything else is listed as
unsupported with the reason, so one odd file never takes the server down.
"""

import os
import re
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
# The other folders' samplers, default first (ldm/models.py SAMPLERS with inference.py's default ddim,
# controlnet/models.py SCHEDULERS with its default unipc), and their inference.py default steps.
LDM_SAMPLERS, LDM_STEPS = ("ddim", "dpmsolver++", "unipc"), 50
CONTROLNET_SAMPLERS, CONTROLNET_STEPS = ("unipc", "dpm++", "ddim"), 25
# dit/sample.py's default steps per sampler (DDPM_STEPS of dit/diffusion/objectives.py, the others
# core/sde_sampling.DEFAULT_STEPS; rk45 adapts) and its schedule's length.
DIT_STEPS = {"ddpm": 250, "ddim": 250, "pc": 1000, "euler": 100, "heun": 50, "rk45": None, "dpm++": 20}
DIT_MAX_STEPS = 1000
DIT_HUB_VAES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}  # dit --vae names
NOT_SERVED = {
    "vae": "a VAE of ldm/train_vae.py, not a generator",
    "ldm-classifier": "a latent classifier of ldm/train_classifier.py (a sampling guide), not a generator",
}
BARE_DIT_PROBLEM = "a DiT-like state_dict without its x_embedder, pos_embed and y_embedder tables"
# Keys of an entry that only the server uses (pairing a ControlNet with its LDM); /models leaves them out.
PRIVATE = ("ldm_facts", "recorded_ldm", "vae_recorded")


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
        # ddpm's default steps: the whole schedule for ddpm and pc (1000), the sampler's own for the others.
        "default_steps": {"ddpm": config.get("noise_steps") or 1000, "pc": 1000},
        "image_size": arch.get("img_size", config.get("image_size")),
        "channels": arch.get("c_in", config.get("channels")),
        "intensity": intensity,
    }


def rule_of(ckpt):
    """The training data's intensity rule (8-bit for files written before it was stored)."""
    return ckpt.get("intensity") or {"kind": "integer", "bit_depth": 8}


def names_of(classes, count):
    return list(classes or []) or [str(i) for i in range(count or 0)]


def describe_dit(ckpt):
    """/models' entry of a dit/train.py checkpoint (see dit/sample.py load_model)."""
    config = ckpt.get("config") or {}
    objective = config.get("objective") or "ddpm"
    if objective not in OBJECTIVES:
        return {"supported": False, "reason": f"dit checkpoint of unknown objective {objective!r}"}
    samplers = {"ddpm": DISCRETE_SAMPLERS, "flow": FLOW_SAMPLERS}.get(objective, SDE_SAMPLERS)
    classes = names_of(config.get("class_names"), config.get("num_classes"))
    vae = config.get("vae") or "ema"  # sample.py's rule: the training VAE, else ema
    return {
        "supported": True,
        "kind": "dit",
        "objective": objective,
        "conditional": bool(classes),
        "class_names": classes,
        "samplers": list(samplers),
        "default_steps": {name: DIT_STEPS[name] for name in samplers},
        "max_steps": DIT_MAX_STEPS,
        "image_size": config.get("image_size"),
        # dit/utils.py data_rule: the stored channel count, else gray only for an "L" image mode.
        "channels": ckpt.get("channels") or (1 if config.get("image_mode") == "L" else 3),
        "intensity": rule_of(ckpt),
        "vae_recorded": DIT_HUB_VAES.get(vae, vae),
    }


def describe_bare_dit(state):
    """/models' entry of a bare DiT state_dict, such as an official file of dit/download.py. dit/sample.py
    reads the variant from the shapes (and refuses one that matches none); the image size shown is the one
    of the 8x-downsampling SD VAE that the official files were trained with."""
    try:
        tokens, patch = state["pos_embed"].shape[1], state["x_embedder.proj.weight"].shape[-1]
        classes = state["y_embedder.embedding_table.weight"].shape[0] - 1  # minus the null-class row
    except (KeyError, AttributeError, IndexError):
        return {"supported": False, "reason": BARE_DIT_PROBLEM}
    config = {"num_classes": classes, "image_size": round(tokens**0.5) * patch * 8, "vae": "ema"}
    return describe_dit({"config": config})


def describe_latent(ckpt, kind):
    """/models' entry of an ldm/train.py or a controlnet/train.py checkpoint (diffusers UNet and VAE)."""
    config = ckpt.get("config") or {}
    needed = ("unet_config", "scheduler_config", "class_names", "config")
    needed += ("controlnet_config", "ldm_config") if kind == "controlnet" else ()
    missing = [key for key in needed if key not in ckpt]
    if missing:
        return {
            "supported": False,
            "reason": f"a {kind} checkpoint without {missing}: re-save it with {kind}/",
        }
    samplers, steps = (
        (CONTROLNET_SAMPLERS, CONTROLNET_STEPS) if kind == "controlnet" else (LDM_SAMPLERS, LDM_STEPS)
    )
    classes = list(ckpt["class_names"])
    entry = {
        "supported": True,
        "kind": kind,
        # A ControlNet without a class follows the mask alone (the null-class token).
        "conditional": bool(classes),
        "class_names": classes,
        "samplers": list(samplers),
        "default_steps": dict.fromkeys(samplers, steps),
        "max_steps": ckpt["scheduler_config"].get("num_train_timesteps"),
        "image_size": config.get("image_size"),
        "channels": config.get("image_channels"),
        "intensity": rule_of(ckpt),
        "vae_recorded": config.get("vae_pretrained"),
        # What ties a ControlNet to its LDM: the UNet it was copied from and that LDM's run config.
        "ldm_facts": (ckpt["unet_config"], ckpt["ldm_config"] if kind == "controlnet" else config),
    }
    if kind == "controlnet":
        entry.update(needs_mask=True, mask_channels=config.get("mask_channels", 1))
        entry["recorded_ldm"] = config.get("ldm_checkpoint")
    return entry


def describe(path):
    """The /models entry of one file: kind, classes, samplers, size and channels; or supported False
    with the reason. What depends on other files (the VAE, a ControlNet's LDM) is added by Catalog."""
    try:
        # mmap: the tensors are not read, only the small dicts around them (zip-format files only).
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:  # any unreadable file is listed, not raised: the server must keep serving
        first = (str(error).strip().splitlines() or [""])[0]
        reason = f"not loadable with torch.load(weights_only=True): {type(error).__name__} {first}"
        return {"supported": False, "reason": reason.strip()}
    if not isinstance(ckpt, dict):
        return {"supported": False, "reason": "not a checkpoint dict of this project"}
    fmt, model_type = ckpt.get("format"), ckpt.get("model_type")
    if fmt == "ddpm-checkpoint-v1":
        return describe_ddpm(ckpt)
    if model_type == "dit":
        if not isinstance(ckpt.get("ema"), dict) or not ckpt["ema"]:
            return {"supported": False, "reason": "a dit checkpoint without weights (no 'ema' state_dict)"}
        return describe_dit(ckpt)
    if model_type in ("ldm", "controlnet"):
        return describe_latent(ckpt, model_type)
    if model_type in NOT_SERVED:
        return {"supported": False, "reason": NOT_SERVED[model_type]}
    if fmt in KNOWN_OTHER:
        return {"supported": False, "reason": KNOWN_OTHER[fmt]}
    if "pos_embed" in ckpt and "x_embedder.proj.weight" in ckpt:
        return describe_bare_dit(ckpt)
    if fmt is None:
        return {"supported": False, "reason": "no format tag: a bare state_dict or a file of another project"}
    return {"supported": False, "reason": f"format {fmt!r} is not supported by the app yet"}


def hub_id(spec):
    """Whether a VAE name is a hub id (exactly org/name), not a path: ldm/models.py looks_like_path's rule."""
    return not spec.startswith((".", "~", "/")) and re.fullmatch(r"[\w.-]+/[\w.-]+", spec) is not None


def vae_problem(spec):
    """Why the VAE a checkpoint names cannot be loaded here (None when it can): a local diffusers folder,
    or a hub id that is cached or (online) downloadable."""
    if not spec:
        return "its config names no VAE"
    if Path(spec).expanduser().is_dir():
        folder = Path(spec).expanduser()
        if (folder / "config.json").is_file() or (folder / "vae" / "config.json").is_file():
            return None
        return f"its VAE folder {spec} holds no config.json (not a diffusers AutoencoderKL folder)"
    if not hub_id(spec):
        return f"its VAE folder {spec} does not exist on this machine"
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(spec, "config.json"), str):
        return None
    if constants.HF_HUB_OFFLINE:
        return f"its VAE {spec!r} is a Hugging Face hub id, not in the local cache, and the hub is offline"
    return None  # downloaded by the worker on first use; a failure then is the job's 400


class Catalog:
    """The checkpoints under root, each file described once per (size, mtime) so /models stays cheap; what
    depends on other files (the VAE to load, a ControlNet's LDM) is looked up again at each call."""

    def __init__(self, root, vae=None):
        self.root, self.vae = Path(root), vae  # vae: --vae, the folder for models whose own VAE is missing
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

    def described(self, name):
        """The file's own facts (cached), without what depends on other files."""
        path = self.root / name
        if not inside(self.root, path):
            return {"name": name, "supported": False, "reason": "a link that points outside --checkpoints"}
        try:
            stat = path.stat()
        except OSError as error:
            return {"name": name, "supported": False, "reason": f"cannot be read: {error.strerror}"}
        key = (name, stat.st_size, stat.st_mtime_ns)
        if key not in self.cache:
            self.cache[key] = {"name": name, "needs_mask": False, **describe(path)}
        return self.cache[key]

    def entry(self, name):
        """The file's entry as the server uses it: with "vae" (what the worker loads) and, for a ControlNet,
        "ldm" (its LDM's name under root), or supported False with the reason either is missing."""
        entry = dict(self.described(name))
        if not entry["supported"]:
            return entry
        if entry["kind"] == "controlnet":
            entry["ldm"] = self.ldm_of(entry)
            if entry["ldm"] is None:
                recorded = entry["recorded_ldm"]
                reason = (
                    f"its LDM ({recorded}, recorded at training) is not under --checkpoints: copy that LDM"
                )
                return {**entry, "supported": False, "reason": reason + " checkpoint there"}
        if "vae_recorded" in entry:
            problem = vae_problem(entry["vae_recorded"])
            if problem is None or self.vae:
                entry["vae"] = entry["vae_recorded"] if problem is None else str(self.vae)
            else:
                reason = (
                    f"{problem}: start the server with --vae DIR (a local diffusers AutoencoderKL folder)"
                )
                return {**entry, "supported": False, "reason": reason}
        return entry

    def ldm_of(self, controlnet):
        """Name of the ControlNet's LDM under root: the recorded path when it lies inside root, else an LDM
        of the same run (same UNet and config), the one whose path ends most like the recorded one."""
        recorded, root = controlnet["recorded_ldm"] or "", os.path.realpath(self.root)
        if recorded and inside(root, recorded) and Path(recorded).is_file():
            name = Path(os.path.realpath(recorded)).relative_to(root).as_posix()
            if self.described(name).get("kind") == "ldm":
                return name
        tail = Path(recorded).parts[::-1]

        def likeness(name):  # how many trailing path parts it shares with the recorded path
            shared = 0
            for mine, theirs in zip(Path(name).parts[::-1], tail, strict=False):  # from the file name up
                if mine != theirs:
                    break
                shared += 1
            return shared

        same_run = [
            name
            for name in self.files()
            if self.described(name).get("kind") == "ldm"
            and self.described(name)["ldm_facts"] == controlnet["ldm_facts"]
        ]
        return max(same_run, key=likeness, default=None)  # max keeps the first of equals (sorted names)

    def models(self):
        """/models' list: every file's entry without the server's private keys."""
        return [{k: v for k, v in self.entry(n).items() if k not in PRIVATE} for n in self.files()]
