"""Image/mask pairs as the ControlNet sees them: labels / K, joint resize and flip, the two layouts.

Pairing by stem or prefix and decoding a mask to labels are the shared core's (core/masks.py).
"""

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from core import images
from core.errors import UserError
from core.images import open_image
from core.masks import find_pairs, mask_array, warn_faint


def label_tensor(img, channels):
    """PIL mask -> float labels (channels, H, W)."""
    return torch.from_numpy(mask_array(img, channels)).permute(2, 0, 1).float()


def scale_mask(labels, max_value):
    """Labels 0..K -> conditioning labels / K in [0, 1] (clipped), so no label map is near-black."""
    return (labels.float() / max_value).clamp(0, 1)


def load_pair(image_path, mask_path, image_channels, mask_channels, intensity):
    """(C, H, W) image in [0, 1] under the data set's rule and (Cm, H, W) float labels at the image's size.

    A mask of another size is resized to the image (nearest), before the pair is resized and cropped together.
    """
    image = tv_tensors.Image(images.load(image_path, intensity, image_channels))
    mask = tv_tensors.Mask(label_tensor(open_image(mask_path), mask_channels))
    if mask.shape[-2:] != image.shape[-2:]:
        mask = TF.resize(mask, list(image.shape[-2:]))
    return image, mask


def resize_crop(size):
    """Shorter side to `size` then centre crop; tv_tensors.Mask inputs are resized nearest-neighbour."""
    return v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])


def conditioning(mask, channels, max_value, size):
    """What the model is given for a mask (PIL): (Cm, size, size) labels / K after resize_crop.

    Inference conditions on it and the mask metrics score against it, so a generation that follows
    the mask exactly scores Dice 1 whatever the mask's shape.
    """
    labels = resize_crop(size)(tv_tensors.Mask(label_tensor(mask, channels)))
    return scale_mask(labels, max_value).as_subclass(torch.Tensor)


def load_mask(path, channels, max_value, size):
    """A conditioning mask for inference: (Cm, size, size) in [0, 1]."""
    cond = conditioning(open_image(path), channels, max_value, size)
    if 0 < cond.max() < 0.1:
        warn_faint([path], max_value)
    return cond


class MaskPairDataset(Dataset):
    """Image/mask pairs, optionally with class labels; flips are a function of (seed, epoch, index)."""

    def __init__(
        self, samples, image_size, image_channels, mask_channels, mask_max_value, flip, seed, intensity
    ):
        self.samples = samples  # list of (image_path, mask_path, label)
        self.transform = resize_crop(image_size)
        self.image_channels, self.mask_channels, self.intensity = image_channels, mask_channels, intensity
        self.mask_max_value, self.flip, self.seed = mask_max_value, flip, seed
        self.epoch = 0

    def set_epoch(self, epoch):
        """Choose the epoch whose flips __getitem__ draws (reproducible across workers and resumes)."""
        self.epoch = epoch

    def __len__(self):
        return len(self.samples)

    def should_flip(self, index):
        """Deterministic coin for (seed, epoch, index), independent of the global RNG."""
        return self.flip and np.random.default_rng((self.seed, self.epoch, index)).random() < 0.5

    def __getitem__(self, index):
        image_path, mask_path, label = self.samples[index]
        image, mask = self.transform(
            *load_pair(image_path, mask_path, self.image_channels, self.mask_channels, self.intensity)
        )
        if self.should_flip(index):
            image, mask = TF.horizontal_flip(image), TF.horizontal_flip(mask)
        return {
            "pixel_values": image.as_subclass(torch.Tensor) * 2 - 1,  # (C, H, W) in [-1, 1]
            "conditioning": scale_mask(mask.as_subclass(torch.Tensor), self.mask_max_value),  # (Cm, H, W)
            "label": label,
            "index": index,
        }


def collect_samples(args, class_names, verbose=True):
    """List (image, mask, label) triples from the flat or the per-class layout."""
    root = Path(args.data_root)
    if not root.is_dir():
        raise UserError(f"--data_root {root} does not exist; see --help for the expected data layout")
    if not args.use_class_labels:
        pairs = find_pairs(
            root / args.images_folder, root / args.masks_folder, args.image_prefix, args.mask_prefix, verbose
        )
        return [(img, mask, len(class_names)) for img, mask in pairs]
    return collect_class_samples(root, args, class_names, verbose)


def collect_class_samples(root, args, class_names, verbose):
    """Per-class layout root/<class>/<images_folder> + <masks_folder>; labels follow the LDM's class names."""
    folders = sorted(p for p in root.iterdir() if (p / args.images_folder).is_dir())
    if not folders:
        raise UserError(f"--use_class_labels: no {root}/<class>/{args.images_folder} folders found")
    samples = []
    for folder in folders:
        if folder.name not in class_names:
            raise UserError(f"class folder {folder} is not one of the LDM's classes {class_names}")
        label = class_names.index(folder.name)
        pairs = find_pairs(
            folder / args.images_folder,
            folder / args.masks_folder,
            args.image_prefix,
            args.mask_prefix,
            verbose,
        )
        samples += [(img, mask, label) for img, mask in pairs]
    return samples
