"""Mask faithfulness: Dice and IoU between input masks and Otsu-segmented generated images.

Rule: the mask's foreground is every pixel with a non-zero label (resized nearest-neighbour to the
generated image). The generated image is converted to grayscale and split by Otsu's threshold; pixels
above it are foreground (below it with --foreground dark). Masks without foreground are skipped.

    python mask_metrics.py --mask_folder masks/ --generated_folder generated/
pairs generated/<mask_stem>_<k>.png (and generated/<class>/<mask_stem>_<k>.png) with masks/<mask_stem>.*
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from utils import Parser, UserError, list_images, open_image, run_cli  # noqa: E402


def otsu_threshold(gray):
    """Otsu's threshold of a uint8 image: the level maximising the between-class variance."""
    hist = np.bincount(gray.ravel(), minlength=256).astype(np.float64)
    weight_low = np.cumsum(hist)  # pixels at or below each level
    weight_high = weight_low[-1] - weight_low
    mass_low = np.cumsum(hist * np.arange(256))
    mean_low = mass_low / np.maximum(weight_low, 1)
    mean_high = (mass_low[-1] - mass_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return int(np.argmax(between))


def segment(image, foreground="bright"):
    """Boolean foreground of a generated image (PIL) by Otsu's threshold on its grayscale."""
    gray = np.asarray(image.convert("L"))
    above = gray > otsu_threshold(gray)
    return above if foreground == "bright" else ~above


def mask_foreground(mask, size):
    """Boolean foreground (non-zero labels) of a mask image, resized nearest-neighbour to (W, H)."""
    labels = np.asarray(mask.resize(size, Image.NEAREST) if mask.size != size else mask)
    return labels.reshape(labels.shape[0], labels.shape[1], -1).any(axis=2)


def dice_iou(truth, pred):
    """Dice and IoU of two boolean arrays (truth non-empty)."""
    overlap = np.logical_and(truth, pred).sum()
    union = np.logical_or(truth, pred).sum()
    return 2 * overlap / (truth.sum() + pred.sum()), overlap / union


def score(mask, image, foreground="bright"):
    """(Dice, IoU) of one generated image against its mask, or None for a mask without foreground."""
    truth = mask_foreground(mask, image.size)
    if not truth.any():
        return None
    return dice_iou(truth, segment(image, foreground))


def summary(scores):
    """One line with mean and standard deviation of Dice and IoU."""
    if not scores:
        return "mask faithfulness: no mask with foreground to score"
    dice, iou = np.array(scores).T
    return (
        f"mask faithfulness over {len(scores)} images: Dice {dice.mean():.4f} +- {dice.std():.4f}, "
        f"IoU {iou.mean():.4f} +- {iou.std():.4f}"
    )


def mask_stem(generated):
    """The mask stem of a generated file named <mask_stem>_<k>.png."""
    return generated.stem.rsplit("_", 1)[0]


def evaluate_folders(mask_folder, generated_folder, foreground="bright"):
    """Scores for every generated image (searched recursively) whose mask is in mask_folder."""
    if not Path(mask_folder).is_dir() or not Path(generated_folder).is_dir():
        raise UserError(
            f"--mask_folder {mask_folder} and --generated_folder {generated_folder} must be folders"
        )
    masks = {p.stem: p for p in list_images(mask_folder)}
    found = Path(generated_folder).rglob("*.png")
    generated = sorted(p for p in found if mask_stem(p) in masks and "comparison" not in p.parent.name)
    if not generated:
        raise UserError(
            f"no image in {generated_folder} is named <mask_stem>_<k>.png after a mask in {mask_folder}"
        )
    scores = (score(open_image(masks[mask_stem(p)]), open_image(p), foreground) for p in generated)
    return [s for s in scores if s is not None]


def main():
    p = Parser(description=__doc__)
    p.add_argument("--mask_folder", required=True, help="folder of the input masks")
    p.add_argument("--generated_folder", required=True, help="folder written by inference.py")
    p.add_argument(
        "--foreground",
        default="bright",
        choices=("bright", "dark"),
        help="which side of the Otsu threshold is the masked structure (default: bright)",
    )
    args = p.parse_args()
    print(summary(evaluate_folders(args.mask_folder, args.generated_folder, args.foreground)))


if __name__ == "__main__":
    run_cli(main)
