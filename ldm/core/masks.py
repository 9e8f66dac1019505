"""Segmentation masks: pairing images with masks by file name, and decoding a mask to integer labels.

Model-independent (numpy and PIL only), so every folder that reads image/mask pairs pairs them and
decodes palette, 16-bit, float and transparent masks by one rule.
"""

from pathlib import Path

import numpy as np

from .datasets import list_images
from .errors import UserError
from .images import WIDE_MODES, open_image

# --------------------------------------------------------------------------- pairing


def pair_key(path, prefix=""):
    """The stem of path without its prefix, or None when a prefix is required but missing."""
    # Extensions never take part: image 001.png pairs with mask 001.tif, or mask_001.png with a prefix.
    stem = Path(path).stem
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
    """[(image, mask)] paired by key (stem minus prefix), sorted by key; unpaired files are listed."""
    for folder in (images_dir, masks_dir):
        if not Path(folder).is_dir():
            raise UserError(f"folder {folder} does not exist; see --help for the expected data layout")
    image_files, mask_files = list_images(images_dir), list_images(masks_dir)
    image_by_key = index_by_key(image_files, image_prefix, images_dir)
    mask_by_key = index_by_key(mask_files, mask_prefix, masks_dir)
    # Sorted keys give the same pair order on every machine and process, which the held-out split needs.
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
        for kind, found in (("images", image_files), ("masks", mask_files)):
            unpaired = [p for p in found if p not in paired]
            if unpaired:
                print(describe_unpaired(kind, unpaired))
    return [(image_by_key[k], mask_by_key[k]) for k in keys]


# --------------------------------------------------------------------------- decoding


def mask_alpha(img):
    """The alpha channel (H, W) of a mask with transparency, else None."""
    if img.mode in ("LA", "RGBA"):
        return np.asarray(img.getchannel("A"))
    if img.mode == "P" and "transparency" in img.info:
        return np.asarray(img.convert("RGBA").getchannel("A"))
    return None


def mask_array(img, channels=1):
    """PIL mask -> integer label array (H, W, channels).

    Palette masks keep their indices as labels, 16-bit masks their values, and float masks are
    rounded to labels. Alpha is not a label: it only says where the mask is, so mostly transparent
    pixels (alpha < 128) are background.
    """
    # Labels are read as stored, never through the image rule: palette index 3 is class 3, whatever
    # colour the palette gives it, and a 16-bit label 300 stays 300.
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


# --------------------------------------------------------------------------- mask scale


def scan_mask_max(mask_paths, channels=1, max_value=None, verbose=True):
    """Decode every mask once (a broken one stops the run before training) and return the mask scale K.

    K is max_value when given, else the largest label over all masks: the divisor that gives label
    maps full contrast.
    """
    # One K for the whole set (like an image set's bit depth): label 2 means the same in every mask.
    maxima = [int(mask_array(open_image(p), channels).max(initial=0)) for p in mask_paths]
    top = max_value or max([*maxima, 1])
    if verbose:
        warn_faint([p for p, m in zip(mask_paths, maxima, strict=True) if 0 < m * 10 < top], top)
    return top


def warn_faint(paths, max_value):
    """Masks whose labels stay below a tenth of K would reach a model nearly black: say so."""
    if paths:
        names = ", ".join(Path(p).name for p in paths[:10]) + (" ..." if len(paths) > 10 else "")
        print(
            f"warning: {len(paths)} masks have values far below the mask scale K={max_value} and will look "
            f"almost black to the model ({names}); store them on one scale or set --mask_max_value"
        )
