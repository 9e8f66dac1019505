"""Mask faithfulness: Dice and IoU between input masks and Otsu-segmented generated images.

Rule: the mask's foreground is every pixel with a non-zero label in the mask exactly as the model is
given it (dataset.conditioning: shorter side resized nearest-neighbour to the image size, then
centre-cropped; mostly transparent pixels are background). The generated image is decoded under the
data set's rule, converted to grayscale and split by Otsu's threshold; pixels above it are foreground
(below it with --foreground dark). Masks without foreground are skipped.

    python mask_metrics.py --mask_folder masks/ --generated_folder generated/
pairs generated/<mask_stem>_<k>.png (and generated/<class>/<mask_stem>_<k>.png; .tif for float data)
with masks/<mask_stem>.*
"""

import re
from pathlib import Path

import numpy as np

from core import cli, images
from core.datasets import list_images
from core.errors import UserError, run_cli
from core.images import open_image
from dataset import conditioning

GENERATED_NAME = re.compile(r"(.+)_(\d+)")  # <mask_stem>_<k>
FOREGROUND = ("bright", "dark")  # the masked structure is brighter or darker than the rest


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


def segment(gray, foreground="bright"):
    """Boolean foreground of a grayscale image (H, W) in [0, 1] by Otsu's threshold on 256 levels."""
    levels = np.rint(np.clip(gray, 0, 1) * 255).astype(np.uint8)
    above = levels > otsu_threshold(levels)
    return above if foreground == "bright" else ~above


def mask_foreground(mask, size, channels=1):
    """Boolean (size, size) foreground of a mask (PIL): non-zero labels of what the model is given."""
    return (conditioning(mask, channels, 1, size).amax(dim=0) > 0).numpy()


def dice_iou(truth, pred):
    """Dice and IoU of two boolean arrays (truth non-empty)."""
    overlap = np.logical_and(truth, pred).sum()
    union = np.logical_or(truth, pred).sum()
    return 2 * overlap / (truth.sum() + pred.sum()), overlap / union


def score(mask, image, foreground="bright", intensity=images.EIGHT_BIT, mask_channels=1):
    """(Dice, IoU) of a generated image (PIL) against its mask (PIL); None for a mask without foreground."""
    gray = images.decode(image, intensity, 1)[..., 0]  # (H, W) in [0, 1]
    if gray.shape[0] != gray.shape[1]:
        raise UserError(f"generated images are square, this one is {image.width}x{image.height}")
    truth = mask_foreground(mask, gray.shape[0], mask_channels)
    if not truth.any():
        return None
    return dice_iou(truth, segment(gray, foreground))


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
    """The mask stem of a generated file named <mask_stem>_<k>.<ext>, or None for any other name."""
    match = GENERATED_NAME.fullmatch(generated.stem)
    return match.group(1) if match else None


def evaluate_folders(mask_folder, generated_folder, foreground="bright", mask_channels=1):
    """Scores for every generated image (searched recursively) whose mask is in mask_folder."""
    if not Path(mask_folder).is_dir() or not Path(generated_folder).is_dir():
        raise UserError(
            f"--mask_folder {mask_folder} and --generated_folder {generated_folder} must be folders"
        )
    masks = {p.stem: p for p in list_images(mask_folder)}
    found = Path(generated_folder).rglob("*")
    generated = sorted(p for p in found if images.is_image_file(p) and mask_stem(p) in masks)
    if not generated:
        raise UserError(
            f"no image in {generated_folder} is named <mask_stem>_<k>.png after a mask in {mask_folder}"
        )
    rule = images.scan(generated)["intensity"]  # the generated set's depth (inference.py records it)
    scores = [
        score(open_image(masks[mask_stem(p)]), open_image(p), foreground, rule, mask_channels)
        for p in generated
    ]
    return [s for s in scores if s is not None]


def build_parser():
    p = cli.Parser(description=__doc__)
    add = p.add_argument
    add("--mask_folder", required=True, help="folder of the input masks")
    add("--generated_folder", required=True, help="folder written by inference.py")
    add("--foreground", default="bright", choices=FOREGROUND, help="masked side of the Otsu threshold")
    add("--mask_channels", type=int, default=1, choices=(1, 3), help="mask channels of the ControlNet")
    return p


def main():
    args = build_parser().parse_args()
    scores = evaluate_folders(args.mask_folder, args.generated_folder, args.foreground, args.mask_channels)
    print(summary(scores))


if __name__ == "__main__":
    run_cli(main)
