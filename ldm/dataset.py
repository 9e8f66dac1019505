"""Class-folder image data for the LDM: discovery, robust loading, held-out split and image saving."""

import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile
from torch.utils.data import Dataset
from torchvision.transforms import v2 as T

from utils import UserError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
DATA_LAYOUT = """expected data layout (one sub-folder per class; classes are the sorted folder names):
  data_root/
      class_name_1/  image1.png  image2.png ...
      class_name_2/  image1.png  ...
image types: png jpg jpeg bmp tif tiff webp (any case); grayscale, RGB, RGBA, palette and 16-bit."""

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail loudly, not train as grey pixels


def is_image(path):
    """True for files with a supported image extension (any case)."""
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def find_class_images(root):
    """Sorted class names and (path, label) pairs of `root/<class_name>/*`."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--data_root {root} is not a folder; point it at a folder of class sub-folders")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise UserError(f"--data_root {root} has no class sub-folders; put images in {root}/<class_name>/")
    samples = []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.iterdir() if is_image(p))
        if not files:
            raise UserError(
                f"class folder {class_dir} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        samples += [(str(p), label) for p in files]
    return [d.name for d in class_dirs], samples


def open_image(path):
    """Open an image file, failing with a user error that names it when it is unreadable."""
    try:
        image = Image.open(path)
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise UserError(f"cannot read image {path} ({error}); fix or remove the file") from None
    return image


def is_grayscale(path):
    """True when the file's pixel mode is single-channel (read from the header only)."""
    try:
        with Image.open(path) as image:
            image.verify()
            return image.mode in GRAYSCALE_MODES
    except (OSError, ValueError, SyntaxError) as error:
        raise UserError(f"cannot read image {path} ({error}); fix or remove the file") from None


def detect_channels(paths):
    """1 when every image is grayscale, else 3: the model's channels follow the data."""
    return 1 if all(is_grayscale(p) for p in paths) else 3


def to_mode(image, channels):
    """Convert any PIL image (16-bit, float, palette, alpha) to 8-bit 'L' or 'RGB'."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        # Composite on black: the usual background of medical and masked images.
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    return image.convert("L" if channels == 1 else "RGB")


class ClassImageDataset(Dataset):
    """(image in [-1, 1] of shape (C, H, W), label) pairs; flips are applied by the training loop."""

    def __init__(self, samples, image_size, channels):
        self.samples = samples
        self.channels = channels
        self.transform = T.Compose(
            [
                T.ToImage(),
                T.Resize(image_size, antialias=True),
                T.CenterCrop(image_size),
                T.ToDtype(torch.float32, scale=True),
                T.Normalize([0.5] * channels, [0.5] * channels),
            ]
        )

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        return self.transform(to_mode(open_image(path), self.channels)), label


def split_holdout(samples, val_fraction, seed):
    """Deterministic per-class split into (train, val); every class keeps at least one training image."""
    by_class = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    train, val = [], []
    for label in sorted(by_class):
        items = list(by_class[label])
        random.Random(seed + label).shuffle(items)
        n_val = min(len(items) - 1, max(1, round(len(items) * val_fraction))) if val_fraction > 0 else 0
        val += items[:n_val]
        train += items[n_val:]
    return train, val


def to_uint8(images):
    """(N, C, H, W) in [-1, 1] -> numpy uint8 (N, H, W, C)."""
    images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


def save_png(array, path):
    """Save one uint8 (H, W, C) array as PNG in the data's mode (L for 1 channel, RGB for 3)."""
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(path)


def load_png(path, channels):
    """Read a saved sample back as uint8 (H, W, C)."""
    array = np.asarray(to_mode(open_image(path), channels))
    return array[..., None] if array.ndim == 2 else array
