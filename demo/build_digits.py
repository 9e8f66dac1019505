"""Build scikit-learn's 1797 handwritten 8x8 digits as grayscale PNG class folders 0..9."""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def digit_images(size):
    """The digits as uint8 (N, size, size) arrays, upscaled smoothly from 8x8, and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)  # values 0..16 -> 0..255
    upscaled = [np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC)) for img in pixels]
    return np.stack(upscaled), digits.target


def digit_features(images):
    """Undo digit_images: uint8 (N, size, size) images -> (N, 64) features on the 8x8 digits' 0..16 scale.

    Each 8x8 pixel is the mean of the block it was upscaled into (area downsampling), so real digits come
    back close to scikit-learn's own features and generated ones can be scored by a classifier of those.
    """
    small = [
        np.asarray(Image.fromarray(np.asarray(img, dtype=np.float32)).resize((8, 8), Image.BOX))
        for img in images
    ]
    return np.stack(small).reshape(len(small), 64) * (16.0 / 255.0)


def build_digits(out_dir, size=16, limit=None):
    """Write out_dir/<digit>/<index:04d>.png; returns the number of images written."""
    if size < 8:
        raise ValueError(f"image size {size} is below the digits' native 8 px")
    images, labels = digit_images(size)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    out_dir = Path(out_dir)
    for index, (img, label) in enumerate(zip(images, labels, strict=True)):
        folder = out_dir / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(folder / f"{index:04d}.png")
    return len(images)


def main():
    formatter = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--out-dir", "--out_dir", default="demo_output/digits", help="where class folders go")
    parser.add_argument("--size", type=int, default=16, help="side of the upscaled square images in pixels")
    parser.add_argument("--limit", type=int, default=None, help="write only the first N digits")
    args = parser.parse_args()
    print(f"wrote {build_digits(args.out_dir, args.size, args.limit)} images to {args.out_dir}")


if __name__ == "__main__":
    main()
