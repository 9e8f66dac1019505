"""Shared helpers of the DDPM scripts: command line, data, images, checkpoints, devices, errors."""

import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from core import images
from core.errors import UserError, run_cli, warn  # noqa: F401 (run_cli: the scripts import it from here)
from core.files import load_weights_only
from modules import count_parameters

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


def add_flag(parser, name, *aliases, dest=None, **kwargs):
    """Register --name and its aliases, each in both spellings (--image-size and --image_size).

    name is the folder-wide vocabulary's flag; aliases keep the seed's spellings; dest defaults to name.
    """
    names = []
    for flag in (name, *aliases):
        names += dict.fromkeys(["--" + flag.replace("_", "-"), "--" + flag.replace("-", "_")])
    if kwargs.get("action") is None and "metavar" not in kwargs:
        kwargs["metavar"] = name.upper().replace("-", "_")
    parser.add_argument(*dict.fromkeys(names), dest=dest or name.replace("-", "_"), **kwargs)


# ----------------------------------------------------------------------------- data


def list_images(folder):
    """Sorted image files directly inside folder (any case of the known extensions)."""
    return sorted(p for p in Path(folder).iterdir() if images.is_image_file(p))


def scan_dataset(root, conditional):
    """Files, labels and class names of root/<class_name>/* (conditional) or all images under root."""
    root = Path(root)
    extensions = " ".join(images.IMAGE_EXTENSIONS)
    if not root.is_dir():
        layout = data_layout() if conditional else "any folder of images, sub-folders included"
        raise UserError(f"dataset folder {root} does not exist: pass --data_root (layout: {layout})")
    if not conditional:
        files = sorted(p for p in root.rglob("*") if images.is_image_file(p))
        if not files:
            raise UserError(f"no images ({extensions}) found under {root}")
        return files, [0] * len(files), []
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise UserError(
            f"no class folders in {root}: expected {root}/<class_name>/<image> (layout: {data_layout()})"
        )
    files, labels = [], []
    for label, folder in enumerate(class_dirs):
        found = list_images(folder)
        if not found:
            raise UserError(f"class folder {folder} has no images ({extensions}): add some or remove it")
        files += found
        labels += [label] * len(found)
    return files, labels, [p.name for p in class_dirs]


def data_layout():
    """One-line description of the expected data layout, for help texts and errors."""
    return (
        "data_root/<class_name>/<image>.png|jpg|jpeg|bmp|tif|tiff|webp; classes are the sorted folder names"
    )


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
        return x.clamp(0, 1) * 2 - 1, self.labels[index]


# ----------------------------------------------------------------------------- images


def to_uint8(x):
    """Model-space images in [-1, 1] to uint8 in [0, 255]: (N, C, H, W)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_unit(x):
    """Model-space images in [-1, 1] to float32 in [0, 1]: (N, C, H, W)."""
    return ((x.clamp(-1, 1) + 1) / 2).float()


def make_image_grid(batch, nrow):
    """Tile (N, C, H, W) images in [0, 1] into one (C, H', W') grid, keeping 1-channel images gray."""
    from torchvision.utils import make_grid

    return make_grid(batch.float(), nrow=nrow, padding=2, pad_value=0)[: batch.shape[1]]


def save_grid(batch, nrow, path, intensity):
    """Write a grid of images in [0, 1]; returns the grid.

    It is written at the data set's depth when path has that rule's suffix (a .png grid of float data,
    which PNG cannot hold, is written as 8 bits).
    """
    grid = make_image_grid(batch, nrow)
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
    ckpt = load_weights_only(path)
    if not isinstance(ckpt, dict) or not ckpt:
        raise UserError(f"checkpoint {path} holds no state_dict or DDPM checkpoint")
    other = other_model(ckpt)
    if other is not None:
        what, resume_with, sample_with = OTHER_MODELS[other]
        script = resume_with if flag == "--resume" else sample_with
        raise UserError(f"{path} is {what}, not a DDPM one: use it with {script}")
    return ckpt


def other_model(ckpt):
    """The OTHER_MODELS key of a loaded file written by another folder, else None."""
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


def rng_states():
    """Python, NumPy, torch and CUDA random states as weights_only-loadable values."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_states(states):
    """Restore what rng_states() returned."""
    random.setstate(states["python"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def prune_checkpoints(folder, pattern, keep):
    """Delete all but the newest `keep` periodic checkpoints matching pattern (None keeps all)."""
    if keep is None:
        return
    for old in sorted(Path(folder).glob(pattern))[:-keep]:
        old.unlink()


# ----------------------------------------------------------------------------- devices


class DistContext:
    """Rank, world size and device of this process; a single process when not launched as several.

    The process group comes from accelerate's PartialState, the multi-process stack of every folder:
    torchrun and accelerate launch alike, NCCL on CUDA, gloo on CPU (also with --device cpu).
    """

    def __init__(self, distributed, device=None):
        self.distributed = distributed and int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.state = None
        if self.distributed:
            from accelerate import PartialState

            cpu = device == "cpu" or not torch.cuda.is_available()
            self.state = PartialState(cpu=cpu)
        self.rank = self.state.process_index if self.state else 0
        self.world_size = self.state.num_processes if self.state else 1
        self.device = pick_device(device, self.state.local_process_index if self.state else 0)

    @property
    def is_main(self):
        return self.rank == 0

    def barrier(self):
        if self.state:
            self.state.wait_for_everyone()

    def all_reduce_sum(self, tensor):
        """Sum a tensor over ranks (identity on one process)."""
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def close(self):
        if self.state:
            self.state.destroy_process_group()


def pick_device(name=None, local_rank=0):
    """The requested device, else this rank's GPU when there is one, else the CPU."""
    if name in (None, "", "auto"):
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} was requested but CUDA is not available: use --device cpu or auto")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def enable_tf32():
    """Use TF32 tensor cores for float32 matmuls and convolutions on Ampere and newer GPUs."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def autocast_dtype(device, precision):
    """The autocast dtype for --mixed_precision on this device; None means plain fp32.

    precision is no / fp16 / bf16 / auto (bf16 if the GPU has it, else fp16); "fp32" (= no) is what
    checkpoints written before the shared vocabulary hold.
    """
    if device.type != "cuda":
        if precision in ("bf16", "fp16"):
            warn(f"--mixed_precision {precision} needs CUDA; training in fp32 on CPU")
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None, "fp32": None}[precision]


def print_parameter_table(components):
    """Print total / trainable / frozen parameters for each named module."""
    print(f"{'component':<16}{'total':>14}{'trainable':>14}{'frozen':>14}")
    for name, module in components.items():
        c = count_parameters(module)
        print(f"{name:<16}{c['total']:>14,}{c['trainable']:>14,}{c['frozen']:>14,}")


def print_timing(count, steps, seconds, batches):
    """Print images, steps, total s, s/image, ms/step (one denoising step of one batch) and images/s."""
    ms_step = 1000.0 * seconds / max(1, steps * batches)
    per_image = seconds / max(1, count)
    print(
        f"sampling: {count} images, {steps} steps, {seconds:.2f} s total, {per_image:.4f} s/image, "
        f"{ms_step:.2f} ms/step, {count / max(seconds, 1e-9):.2f} images/s"
    )
