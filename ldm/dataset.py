"""Class-folder image data for the LDM: discovery, the data set's decoding rule and the held-out split.

Pixels are decoded by the shared rule of core.images: the bit depth (or float range) is decided
once for the whole data set by a scan, never per image, and stored in every checkpoint.
"""

import random
from pathlib import Path

from torch.utils.data import Dataset
from torchvision.transforms import v2 as T

from core import cli, images
from core.errors import UserError, warn

DATA_LAYOUT = """expected data layout (one sub-folder per class; classes are the sorted folder names):
  data_root/
      class_name_1/  image1.png  image2.png ...
      class_name_2/  image1.png  ...
image types: png jpg jpeg bmp tif tiff webp (any case); grayscale, RGB, RGBA, palette, 16-bit and float.
integer images are scaled by the data set's bit depth (found by one scan, or --bit_depth), float
images from --intensity_range (default 0 1); the rule is stored in the checkpoint."""


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
        files = sorted(p for p in class_dir.iterdir() if images.is_image_file(p))
        if not files:
            raise UserError(
                f"class folder {class_dir} holds no images ({', '.join(images.IMAGE_EXTENSIONS)})"
            )
        samples += [(str(p), label) for p in files]
    return [d.name for d in class_dirs], samples


def add_intensity_args(parser):
    """--bit_depth and --intensity_range: overrides of the decoding rule the scan finds."""
    parser.add_argument(
        "--bit_depth",
        type=cli.bit_depth,
        default=None,
        help="bit depth of integer images, e.g. 12 for CT stored in 16-bit files "
        "(default: the data set's largest value rounded up to 2^k - 1)",
    )
    parser.add_argument(
        "--intensity_range",
        type=cli.finite_float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=None,
        help="value range of float ('F') images, mapped onto [0, 1] (default: 0 1)",
    )


def check_intensity_args(args):
    """A float range must be increasing, also when the data turns out to be integer."""
    if args.intensity_range is not None:
        images.float_rule(args.intensity_range)


def data_rule(paths, args, resumed=None):
    """Scan (and so verify) every image once; the decoding rule is the resumed checkpoint's if any.

    Returns {"channels": 1 or 3, "intensity": rule}."""
    found = images.scan(paths, args.bit_depth, args.intensity_range)
    if resumed is not None and resumed != found["intensity"]:
        warn(
            f"the data now scans as {images.describe(found['intensity'])}; keeping the resumed "
            f"checkpoint's rule ({images.describe(resumed)})"
        )
    return {"channels": found["channels"], "intensity": resumed or found["intensity"]}


class ClassImageDataset(Dataset):
    """(image in [-1, 1] of shape (C, H, W), label) pairs; flips are applied by the training loop."""

    def __init__(self, samples, image_size, channels, intensity):
        self.samples = samples
        self.channels = channels
        self.intensity = intensity
        self.transform = T.Compose(
            [
                T.Resize(image_size, antialias=True),
                T.CenterCrop(image_size),
                T.Normalize([0.5] * channels, [0.5] * channels),
            ]
        )

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        image = images.load(path, self.intensity, self.channels)  # (C, H, W) in [0, 1]
        return self.transform(image), label


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


def to_unit(batch):
    """(N, C, H, W) in [-1, 1] -> [0, 1], the range core.images writes."""
    return ((batch.float() + 1) / 2).clamp(0, 1)
