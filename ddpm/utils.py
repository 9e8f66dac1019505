"""Shared helpers of the DDPM scripts: command line, data, images, checkpoints, devices, errors."""

import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from core import cli, datasets, images, training
from core.errors import UserError, run_cli  # noqa: F401 (run_cli: the scripts import it from here)
from core.files import load_weights_only

CHECKPOINT_FORMAT = "ddpm-checkpoint-v1"
# Checkpoints of the other folders: what they are, the script that resumes them and the one that samples.
OTHER_MODELS = {
    "ldm": ("an LDM checkpoint", "ldm/train.py --resume", "ldm/inference.py"),
    "controlnet": ("a ControlNet checkpoint", "controlnet/train.py --resume", "controlnet/inference.py"),
    "vae": ("a VAE checkpoint of ldm/train_vae.py", "ldm/train_vae.py --resume", "ldm/train_vae.py --resume"),
    "dit": ("a DiT checkpoint", "dit/train.py --resume", "dit/sample.py"),
}
DIT_KEY = "x_embedder.proj.weight"  # in official DiT files and in the "model" of dit/train.py checkpoints


# ----------------------------------------------------------------------------- command line


def add_flag(parser, name, *aliases, **kwargs):
    """Register --name and its aliases, each in both spellings (--image-size and --image_size).

    name is the shared vocabulary's flag, an alias the original script's; the dest is the last name given,
    so the original's (the config key in every checkpoint written so far).
    """
    # Dict keys keep the order and drop repeats: a one-word flag has a single spelling.
    names = []
    for flag in (name, *aliases):
        names += dict.fromkeys(["--" + flag.replace("_", "-"), "--" + flag.replace("-", "_")])
    if kwargs.get("action") is None and "metavar" not in kwargs:
        kwargs["metavar"] = name.upper().replace("-", "_")
    kwargs.setdefault("dest", (aliases or [name])[-1].replace("-", "_"))
    parser.add_argument(*dict.fromkeys(names), **kwargs)


# ----------------------------------------------------------------------------- data


def scan_dataset(root, conditional):
    """Files, labels and class names of root/<class_name>/* (conditional) or all images under root."""
    # The shared scan of every folder: the same layout rules and the same error lines as ldm/ and dit/.
    if conditional:
        class_names, files, labels = datasets.class_folders(root)
        return files, labels, class_names
    files = datasets.image_folder(root)
    return files, [0] * len(files), []


class ImageDataset(Dataset):
    """Images decoded by the data set's intensity rule, resized and centre-cropped to [-1, 1], with labels."""

    def __init__(self, files, labels, image_size, channels, intensity):
        self.files, self.labels = list(files), list(labels)
        self.image_size, self.channels, self.intensity = image_size, channels, intensity

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        from torchvision.transforms import functional as TF  # on first use: input errors stay fast

        x = images.load(self.files[index], self.intensity, self.channels)  # (C, H, W) in [0, 1]
        # Resizing the float tensor keeps every grey level of 12- and 16-bit data (PIL would need 8 bits).
        x = TF.resize(x, self.image_size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        x = TF.center_crop(x, self.image_size)
        # Bicubic overshoots slightly at edges; clamping keeps the model's inputs inside [-1, 1].
        return x.clamp(0, 1) * 2 - 1, self.labels[index]


# ----------------------------------------------------------------------------- images


def to_uint8(x):
    """Model-space images in [-1, 1] to uint8 in [0, 255]: (N, C, H, W)."""
    # Rounded, not truncated, so that a value maps to its nearest grey level.
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_unit(x):
    """Model-space images in [-1, 1] to float32 in [0, 1]: (N, C, H, W)."""
    return ((x.clamp(-1, 1) + 1) / 2).float()


def save_grid(batch, nrow, path, intensity):
    """Write a grid of images in [0, 1]; returns the grid.

    It is written at the data set's depth when path has that rule's suffix (a .png grid of float data,
    which PNG cannot hold, is written as 8 bits).
    """
    grid = training.make_grid(batch, nrow)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    at_depth = path.suffix.lower() == images.suffix(intensity)
    images.save(grid, path, intensity if at_depth else images.EIGHT_BIT)
    return grid


# ----------------------------------------------------------------------------- checkpoints


def cpu_state(state_dict):
    """Detached CPU copies of a state_dict's tensors, so the file loads on any machine."""
    return {k: v.detach().cpu().clone() for k, v in state_dict.items()}


def load_checkpoint(path, flag="--ckpt"):
    """Load a .pt file safely (weights_only); a missing, unsafe or foreign file is a UserError."""
    path = Path(path)
    if not path.is_file():
        if flag == "--resume":
            raise UserError(
                f"resume file {path} does not exist: pass --resume <path to a ckpt.pt written by training>, "
                "or --resume alone for <workdir>/models/<run-name>/ckpt.pt"
            )
        raise UserError(f"checkpoint {path} does not exist: pass {flag} with a file written by training")
    ckpt = load_weights_only(path)  # an unreadable or pickled-object file is a UserError there
    if not isinstance(ckpt, dict) or not ckpt:
        raise UserError(f"checkpoint {path} holds no state_dict or DDPM checkpoint")
    # Other folders' files would fail later with a key error; naming them tells the user which script to use.
    other = other_model(ckpt)
    if other is not None:
        what, resume_with, sample_with = OTHER_MODELS[other]
        script = resume_with if flag == "--resume" else sample_with
        raise UserError(f"{path} is {what}, not a DDPM one: use it with {script}")
    return ckpt


def other_model(ckpt):
    """The OTHER_MODELS key of a loaded file written by another folder, else None."""
    # Files of this project say what they are; official DiT files are recognised by their weights alone.
    if ckpt.get("model_type") in OTHER_MODELS:
        return ckpt["model_type"]
    weights = ckpt["model"] if isinstance(ckpt.get("model"), dict) else ckpt
    return "dit" if DIT_KEY in weights else None


def is_full_checkpoint(ckpt):
    """Whether a loaded dict is a checkpoint of this project (rather than a bare state_dict)."""
    return ckpt.get("format") == CHECKPOINT_FORMAT


def intensity_of(ckpt):
    """The intensity rule a checkpoint was trained with; 8-bit for files written before it was stored."""
    return ckpt.get("intensity") or images.EIGHT_BIT


# ----------------------------------------------------------------------------- devices


def pick_device(name=None):
    """The requested device, else the GPU when there is one, else the CPU."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)  # "cuda" without an index is the current GPU, set per process by accelerate
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} was requested but CUDA is not available: use --device cpu or auto")
    return device


def make_accelerator(device, precision="no"):
    """The Accelerator of a run: one process under python, one per GPU under torchrun / accelerate launch."""
    device = pick_device(device)
    if device.type == "cuda" and device.index is not None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        torch.cuda.set_device(device)  # --device cuda:N; launchers give each process its own GPU instead
    # Checkpoints written before the shared vocabulary spell the precision "fp32".
    return training.make_accelerator(cli.mixed_precision(precision), device=device.type)
