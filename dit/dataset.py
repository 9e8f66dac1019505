"""Class-conditional image folders: root/<class_name>/*.png, classes are the sorted folder names."""

import os

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from utils import UserError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def find_images(root):
    """(path, label) pairs and sorted class names of root/<class_name>/<image>."""
    if not os.path.isdir(root):
        raise UserError(f"data folder not found: {root} (expected {root}/<class_name>/<image files>)")
    class_names = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    if not class_names:
        raise UserError(f"no class folders in {root}: put images in {root}/<class_name>/")
    samples = []
    for label, name in enumerate(class_names):
        folder = os.path.join(root, name)
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(EXTENSIONS))
        if not files:
            raise UserError(f"class folder {folder} has no images ({' '.join(EXTENSIONS)})")
        samples += [(os.path.join(folder, f), label) for f in files]
    return samples, class_names


def image_mode(paths):
    """'L' when every image is grayscale, else 'RGB'; also checks that every file opens as an image."""
    grayscale = True
    for path in paths:
        try:
            with Image.open(path) as image:
                grayscale &= image.mode in GRAYSCALE_MODES
        except (OSError, ValueError):
            raise UserError(f"cannot read image {path}: remove or replace the file") from None
    return "L" if grayscale else "RGB"


def load_rgb(path):
    """Any image (grayscale, 16-bit, palette, RGBA) as 8-bit RGB; alpha is dropped."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode.startswith("I") or image.mode == "F":
                array = np.asarray(image, dtype=np.float64)
                # 16-bit data spans 0..65535; scale it into 8 bits instead of clipping it to white.
                image = Image.fromarray(
                    np.clip(array / 257 if array.max() > 255 else array, 0, 255).astype(np.uint8)
                )
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError):
        raise UserError(
            f"cannot read image {path} (truncated or corrupt): remove or replace the file"
        ) from None


class ImageFolderDataset(Dataset):
    """Center-cropped images scaled to [-1, 1]; flips are applied by the training loop."""

    def __init__(self, root, image_size):
        self.samples, self.class_names = find_images(root)
        self.mode = image_mode(path for path, _ in self.samples)
        self.transform = transforms.Compose(
            [
                transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.CenterCrop(image_size),
                transforms.ToTensor(),
                transforms.Normalize([0.5] * 3, [0.5] * 3),
            ]
        )

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        return self.transform(load_rgb(path)), label
