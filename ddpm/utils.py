"""Shared helpers of the DDPM scripts: command line, data, images, checkpoints, devices, errors."""

import os
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import Dataset

from modules import count_parameters

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
CHECKPOINT_FORMAT = "ddpm-checkpoint-v1"


class UserError(Exception):
    """A problem with the user's input or files, reported as one line with exit code 2."""


def run_cli(main):
    """Run main(); a UserError becomes one line on stderr and exit code 2 instead of a traceback."""
    try:
        return main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------- command line


def add_flag(parser, name, **kwargs):
    """Register --name with both spellings (--image-size and --image_size)."""
    dashed, underscored = "--" + name.replace("_", "-"), "--" + name.replace("-", "_")
    names = [dashed] if dashed == underscored else [dashed, underscored]
    parser.add_argument(*names, dest=name.replace("-", "_"), **kwargs)


def explicit_flags(parser, argv):
    """Destinations of the flags the user typed, so a resumed run can tell them from defaults."""
    given = {arg.split("=", 1)[0] for arg in argv if arg.startswith("--")}
    return {a.dest for a in parser._actions if given.intersection(a.option_strings)}


# ----------------------------------------------------------------------------- data


def list_images(folder):
    """Sorted image files directly inside folder (any case of the known extensions)."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)


def open_image(path):
    """Fully decode an image, turning any failure into a UserError naming the file."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(f"cannot read image {path} ({err}): fix or remove the file") from None


def to_mode(img, channels):
    """Convert any PIL image (16-bit, palette, alpha, ...) to 8-bit L (1 channel) or RGB (3 channels)."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        scale = 65535.0 if img.mode != "F" or arr.max() > 1.0 else 1.0  # 16-bit -> 8-bit, floats in [0, 1]
        img = Image.fromarray(np.clip(arr / scale * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA")
    return img.convert("L" if channels == 1 else "RGB")


def image_channels(img):
    """1 for grayscale images, 3 for colour ones."""
    if img.mode == "P":
        palette = np.asarray(img.convert("RGB"))
        return (
            1
            if (palette[..., 0] == palette[..., 1]).all() and (palette[..., 1] == palette[..., 2]).all()
            else 3
        )
    return 1 if img.mode in GRAY_MODES else 3


def scan_dataset(root, conditional):
    """Files, labels and class names of root/<class_name>/* (conditional) or all images under root."""
    root = Path(root)
    if not root.is_dir():
        layout = data_layout() if conditional else "any folder of images, sub-folders included"
        raise UserError(f"dataset folder {root} does not exist: pass --dataset-path (layout: {layout})")
    if not conditional:
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
        if not files:
            raise UserError(f"no images ({' '.join(IMG_EXTENSIONS)}) found under {root}")
        return files, [0] * len(files), []
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise UserError(
            f"no class folders in {root}: expected {root}/<class_name>/<image> (layout: {data_layout()})"
        )
    files, labels = [], []
    for label, folder in enumerate(class_dirs):
        images = list_images(folder)
        if not images:
            raise UserError(
                f"class folder {folder} has no images ({' '.join(IMG_EXTENSIONS)}): add some or remove it"
            )
        files += images
        labels += [label] * len(images)
    return files, labels, [p.name for p in class_dirs]


def data_layout():
    """One-line description of the expected data layout, for help texts and errors."""
    return (
        "data_root/<class_name>/<image>.png|jpg|jpeg|bmp|tif|tiff|webp; classes are the sorted folder names"
    )


def detect_channels(files):
    """Decode every file once (so a broken image fails now, not mid-training) and return 1 or 3 channels."""
    return max(image_channels(open_image(f)) for f in files)


class ImageDataset(Dataset):
    """Images resized and centre-cropped to a square, scaled to [-1, 1], with their class index."""

    def __init__(self, files, labels, image_size, channels):
        from torchvision import transforms  # imported on first use: start-up and input errors stay fast

        self.files, self.labels, self.channels = list(files), list(labels), channels
        self.transform = transforms.Compose(
            [
                transforms.Resize(
                    image_size, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True
                ),
                transforms.CenterCrop(image_size),
                transforms.ToTensor(),
                transforms.Normalize([0.5] * channels, [0.5] * channels),
            ]
        )

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        img = to_mode(open_image(self.files[index]), self.channels)
        return self.transform(img), self.labels[index]


# ----------------------------------------------------------------------------- images


def to_uint8(x):
    """Model-space images in [-1, 1] to uint8 in [0, 255]: (N, C, H, W)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_pil(image):
    """A uint8 (C, H, W) tensor as a PIL image in L or RGB mode."""
    arr = image.permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)


def save_image(image, path):
    """Save a uint8 (C, H, W) tensor as PNG via a temporary file, so no half-written image is left."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    to_pil(image).save(tmp, format="PNG")
    os.replace(tmp, path)


def make_uint8_grid(images, nrow):
    """Tile uint8 (N, C, H, W) images into one (C, H', W') uint8 grid, keeping 1-channel images gray."""
    from torchvision.utils import make_grid

    grid = make_grid(images.float(), nrow=nrow, padding=2, pad_value=0)
    return grid[: images.shape[1]].to(torch.uint8)


# ----------------------------------------------------------------------------- checkpoints


def atomic_save(obj, path):
    """torch.save through a temporary file in the same folder, then os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def cpu_state(state_dict):
    """Detached CPU copies of a state_dict's tensors, so the file loads on any machine."""
    return {k: v.detach().cpu().clone() for k, v in state_dict.items()}


def load_checkpoint(path):
    """Load a .pt file with weights_only=True; a missing or foreign file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: pass --ckpt with a file written by training")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling failure means the file is not one of ours
        raise UserError(
            f"cannot load checkpoint {path} ({type(err).__name__}): it is not a PyTorch checkpoint"
        ) from None
    if not isinstance(ckpt, dict) or not ckpt:
        raise UserError(f"checkpoint {path} holds no state_dict or DDPM checkpoint")
    return ckpt


def is_full_checkpoint(ckpt):
    """Whether a loaded dict is a checkpoint of this project (rather than a bare state_dict)."""
    return ckpt.get("format") == CHECKPOINT_FORMAT


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
    """Delete all but the newest `keep` periodic checkpoints matching pattern."""
    if keep is None or keep <= 0:
        return
    for old in sorted(Path(folder).glob(pattern))[:-keep]:
        old.unlink()


# ----------------------------------------------------------------------------- devices


class DistContext:
    """Rank, world size and device of this process; a single process when not under torchrun."""

    def __init__(self, distributed, device=None):
        self.distributed = distributed and int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.rank = int(os.environ.get("RANK", "0")) if self.distributed else 0
        self.world_size = int(os.environ.get("WORLD_SIZE", "1")) if self.distributed else 1
        local_rank = int(os.environ.get("LOCAL_RANK", "0")) if self.distributed else 0
        self.device = pick_device(device, local_rank)
        if self.distributed:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def is_main(self):
        return self.rank == 0

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, tensor):
        """Sum a tensor over ranks (identity on one process)."""
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def close(self):
        if self.distributed:
            dist.destroy_process_group()


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
    """The autocast dtype for --precision on this device; None means plain fp32."""
    if device.type != "cuda":
        if precision in ("bf16", "fp16"):
            print(f"warning: --precision {precision} needs CUDA; running in fp32 on the CPU", file=sys.stderr)
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def print_parameter_table(components):
    """Print total / trainable / frozen parameters for each named module."""
    print(f"{'component':<16}{'total':>14}{'trainable':>14}{'frozen':>14}")
    for name, module in components.items():
        c = count_parameters(module)
        print(f"{name:<16}{c['total']:>14,}{c['trainable']:>14,}{c['frozen']:>14,}")


def print_timing(images, steps, seconds, batches):
    """Print images, steps, total s, s/image, ms/step (one denoising step of one batch) and images/s."""
    ms_step = 1000.0 * seconds / max(1, steps * batches)
    per_image = seconds / max(1, images)
    print(
        f"sampling: {images} images, {steps} steps, {seconds:.2f} s total, {per_image:.4f} s/image, "
        f"{ms_step:.2f} ms/step, {images / max(seconds, 1e-9):.2f} images/s"
    )
