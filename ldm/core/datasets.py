"""Finding the images of a data set: class folders (root/<class_name>/*) or any folder of images."""

from pathlib import Path

from . import images
from .errors import UserError

EXTENSIONS = " ".join(images.IMAGE_EXTENSIONS)
CLASS_LAYOUT = """expected data layout (one sub-folder per class; classes are the sorted folder names):
  data_root/
      class_name_1/  image1.png  image2.png ...
      class_name_2/  image1.png  ...
image types: png jpg jpeg bmp tif tiff webp (any case); grayscale, RGB, RGBA, palette, 16-bit and float.
integer images are scaled by the data set's bit depth (found by one scan, or --bit_depth), float
images from --intensity_range (default 0 1); the rule is stored in the checkpoint."""


def list_images(folder, recursive=False):
    """Sorted image files in folder (sub-folders too if recursive), any case of the known extensions."""
    found = Path(folder).rglob("*") if recursive else Path(folder).iterdir()
    return sorted(p for p in found if images.is_image_file(p))


def class_folders(root, flag="--data_root"):
    """(class_names, files, labels) of root/<class_name>/<image>; classes are the sorted folder names."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{flag} {root} is not a folder: point it at a folder of class sub-folders")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise UserError(f"{flag} {root} has no class sub-folders: put the images in {root}/<class_name>/")
    files, labels = [], []
    for label, folder in enumerate(class_dirs):
        found = list_images(folder)
        if not found:
            raise UserError(f"class folder {folder} holds no images ({EXTENSIONS}): add some or remove it")
        files += found
        labels += [label] * len(found)
    return [d.name for d in class_dirs], files, labels


def image_folder(root, flag="--data_root"):
    """Every image under root, sub-folders included (unconditional data)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{flag} {root} is not a folder: point it at a folder of images")
    files = list_images(root, recursive=True)
    if not files:
        raise UserError(f"{flag} {root} holds no images ({EXTENSIONS})")
    return files
