"""Image/mask pairs: pairing by stem or prefix, the decoding rule, mask labels, joint resize and flip."""

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from core import images
from core.images import WIDE_MODES
from utils import UserError, list_images, open_image


def pair_key(path, prefix):
    """The stem of path without its prefix, or None when a prefix is required but missing."""
    stem = path.stem
    if prefix and not stem.startswith(prefix):
        return None
    return stem[len(prefix) :]


def index_by_key(files, prefix, folder):
    """{key: file}; two files with one key (e.g. 001.png and 001.jpg) are ambiguous."""
    table = {}
    for path in files:
        key = pair_key(path, prefix)
        if key is None:
            continue
        if key in table:
            raise UserError(f"{table[key].name} and {path.name} in {folder} pair with the same key '{key}'")
        table[key] = path
    return table


def describe_unpaired(kind, files, limit=10):
    """One report line listing unpaired files (the first `limit` of them)."""
    names = ", ".join(p.name for p in files[:limit])
    more = f" and {len(files) - limit} more" if len(files) > limit else ""
    return f"  unpaired {kind} ({len(files)}): {names}{more}"


def find_pairs(images_dir, masks_dir, image_prefix="", mask_prefix="", verbose=True):
    """Pair images with masks by key (stem minus prefix); report and list unpaired files."""
    for folder in (images_dir, masks_dir):
        if not Path(folder).is_dir():
            raise UserError(f"folder {folder} does not exist; see --help for the expected data layout")
    image_files, mask_files = list_images(images_dir), list_images(masks_dir)
    image_by_key = index_by_key(image_files, image_prefix, images_dir)
    mask_by_key = index_by_key(mask_files, mask_prefix, masks_dir)
    keys = sorted(image_by_key.keys() & mask_by_key.keys())
    if not keys:
        raise UserError(
            f"no image in {images_dir} ({len(image_files)} files) pairs with a mask in {masks_dir} "
            f"({len(mask_files)} files); masks need the image's stem, or set --image_prefix/--mask_prefix "
            f"(now '{image_prefix}'/'{mask_prefix}')"
        )
    paired = {image_by_key[k] for k in keys} | {mask_by_key[k] for k in keys}
    if verbose:
        print(f"Paired {len(keys)} images with masks in {images_dir}")
        for kind, files in (("images", image_files), ("masks", mask_files)):
            unpaired = [p for p in files if p not in paired]
            if unpaired:
                print(describe_unpaired(kind, unpaired))
    return [(image_by_key[k], mask_by_key[k]) for k in keys]


def mask_alpha(img):
    """The alpha channel (H, W) of a mask with transparency, else None."""
    if img.mode in ("LA", "RGBA"):
        return np.asarray(img.getchannel("A"))
    if img.mode == "P" and "transparency" in img.info:
        return np.asarray(img.convert("RGBA").getchannel("A"))
    return None


def mask_array(img, channels):
    """PIL mask -> integer label array (H, W, channels).

    Palette masks keep their indices as labels and float masks are rounded to labels. Alpha is not a
    label: it only says where the mask is, so mostly transparent pixels (alpha < 128) are background.
    """
    if img.mode in WIDE_MODES or img.mode == "F" or (img.mode == "P" and channels == 1):
        labels = np.rint(np.asarray(img, dtype=np.float64)).astype(np.int64)
        labels = np.repeat(labels[..., None], channels, axis=2)
    else:
        labels = np.asarray(img.convert("RGB" if channels == 3 else "L")).astype(np.int64)
        labels = labels[..., None] if channels == 1 else labels
    alpha = mask_alpha(img)
    if alpha is not None:
        labels[alpha < 128] = 0
    return labels


def label_tensor(img, channels):
    """PIL mask -> float labels (channels, H, W)."""
    return torch.from_numpy(mask_array(img, channels)).permute(2, 0, 1).float()


def scan_mask_max(mask_paths, channels, max_value=None, verbose=True):
    """Decode every mask once (so a broken one stops the run before training) and return the mask scale K.

    K is max_value when given, else the largest label over all masks: the divisor that gives label
    maps full contrast.
    """
    maxima = [int(mask_array(open_image(p), channels).max(initial=0)) for p in mask_paths]
    top = max_value or max([*maxima, 1])
    if verbose:
        warn_faint([p for p, m in zip(mask_paths, maxima, strict=True) if 0 < m * 10 < top], top)
    return top


def warn_faint(paths, max_value):
    """Masks whose labels stay below a tenth of K would reach the model nearly black: say so."""
    if paths:
        names = ", ".join(Path(p).name for p in paths[:10]) + (" ..." if len(paths) > 10 else "")
        print(
            f"warning: {len(paths)} masks have values far below the mask scale K={max_value} and will look "
            f"almost black to the model ({names}); store them on one scale or set --mask_max_value"
        )


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


def split_indices(count, val_fraction, seed):
    """Deterministic train/validation split; at least one of each when there are two or more samples."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(max(round(count * val_fraction), 1 if val_fraction > 0 else 0), count - 1)
    return sorted(order[n_val:]), sorted(order[:n_val])
