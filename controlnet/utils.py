"""Small shared helpers: user errors, command-line spelling, atomic saves, image files."""

import argparse
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class UserError(Exception):
    """A problem with the user's input: reported as one line on stderr, exit code 2."""


def one_line_warning(message, category, filename, lineno, line=None):
    """Warnings as one 'warning: ...' line, without Python's source-location line."""
    return f"warning: {message}\n"


def run_cli(main):
    """Run main(), turning a UserError into one clear stderr line and exit code 2."""
    warnings.formatwarning = one_line_warning
    try:
        main()
    except UserError as err:
        # a DataLoader worker re-raises with its traceback in the message: keep the original line only
        message = str(err).strip().splitlines()[-1].split("UserError: ", 1)[-1]
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


class Parser(argparse.ArgumentParser):
    """ArgumentParser that accepts `--flag_name` and `--flag-name` for every multi-word flag."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(allow_abbrev=False, **kwargs)

    def add_argument(self, *names, **kwargs):
        spellings = list(names)
        for name in names:
            if name.startswith("--") and "_" in name:
                spellings.append(name.replace("_", "-"))
        return super().add_argument(*spellings, **kwargs)

    def error(self, message):
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def list_images(folder):
    """Sorted image files (any supported extension, any case) directly inside folder."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def check_headers(paths):
    """Fail early on files that are not images at all (full decoding happens when they are used)."""
    for path in paths:
        try:
            with Image.open(path):
                pass
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read image {path} ({err}); replace or remove the file") from None


def open_image(path):
    """Open an image fully, raising UserError for unreadable or truncated files."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(f"cannot read image {path} ({err}); replace or remove the file") from None


def atomic_torch_save(obj, path):
    """Write a .pt file through a temporary file in the same folder, so the target is never half-written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, expected_type, flag):
    """Load a project checkpoint and check its model_type, with user-level errors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path} does not exist; give the path of a .pt checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"{flag} {path} is not a readable checkpoint ({type(err).__name__})") from None
    found = ckpt.get("model_type") if isinstance(ckpt, dict) else None
    if found != expected_type:
        writer = "ldm/train.py" if expected_type == "ldm" else "controlnet/train.py"
        raise UserError(
            f"{flag} {path} is a {found or 'non-project'} checkpoint, not of type '{expected_type}'; "
            f"pass a checkpoint written by {writer}"
        )
    return ckpt


def to_uint8(images):
    """(N, C, H, W) floats in [-1, 1] -> (N, H, W, C) uint8 array."""
    images = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


def save_png(array, path):
    """Save an (H, W, C) uint8 array as PNG in grayscale (C=1) or RGB (C=3) mode."""
    array = array[..., 0] if array.shape[-1] == 1 else array
    Image.fromarray(np.ascontiguousarray(array)).save(path)
