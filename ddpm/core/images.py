"""One image-decoding rule for every folder: bit depth is a property of the data set, not of an image.

Integer images are divided by the data set's peak 2^k - 1, where k is found once by scanning the
whole set (the largest value rounded up to 2^k - 1, at least 8 bits) or given by --bit_depth.
Float ('F') images are mapped from a stated range (--intensity_range, default [0, 1]). The rule is
a plain dict, e.g. {"kind": "integer", "bit_depth": 12}, stored in every checkpoint; samples are
written back at the same depth (16-bit PNG for data deeper than 8 bits).
"""

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from .errors import UserError, warn
from .files import atomic_write

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # integer pixels wider than 8 bits
GRAY_MODES = ("1", "L", "LA", "La", "F", *WIDE_MODES)
DEPTH_TAG = "bit_depth"  # PNG text chunk with the significant bits of the samples we write
EIGHT_BIT = {"kind": "integer", "bit_depth": 8}  # the rule of checkpoints written before it was stored
MIXED_KINDS = "the data set mixes float ('F') and integer images: convert them to one kind"
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601-2, as PIL's 'L' conversion


def is_image_file(path):
    """True for a file with one of the known image extensions (any case)."""
    path = Path(path)
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def open_image(path):
    """Fully decode an image file; an unreadable or truncated one is a UserError naming it."""
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise UserError(f"cannot read image {path} ({error}): fix or remove the file") from None


def is_readable_image(path):
    """True when path decodes completely (used to redo truncated outputs of an interrupted run)."""
    try:
        open_image(path)
        return True
    except UserError:
        return False


def _is_gray(image):
    # A palette image is gray when every palette entry it uses has R = G = B (common for exported scans).
    if image.mode == "P":
        rgb = np.asarray(image.convert("RGB"))
        return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
    return image.mode in GRAY_MODES


def _bits(image):
    """Significant bits of one integer image: its largest value (or the depth it declares), >= 8."""
    # The tag we write into our own PNGs: a dark 12-bit sample (max value < 2048) must still read as
    # 12-bit, or re-training on generated samples would brighten them.
    declared = int(image.info.get(DEPTH_TAG, 0) or 0)
    if image.mode not in WIDE_MODES:
        return max(8, declared)
    # bit_length rounds the peak up to 2^k - 1: a 12-bit scanner's 4095 gives 12, a 16-bit 40000 gives 16.
    peak = int(np.asarray(image).max(initial=0))
    return max(8, peak.bit_length(), declared)


def _describe(path):
    image = open_image(path)
    kind = "float" if image.mode == "F" else "integer"
    return kind, (_bits(image) if kind == "integer" else None), _is_gray(image), image.mode in WIDE_MODES


def scan(paths, bit_depth=None, intensity_range=None):
    """Decode every image once: {"channels": 1 or 3, "intensity": the data set's rule}.

    Every file is read completely, so a truncated image stops the run before training starts.
    """
    paths = list(paths)
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:  # PIL decodes outside the GIL
        described = list(pool.map(_describe, paths))
    kinds = {kind for kind, *_ in described}
    if len(kinds) > 1:
        raise UserError(MIXED_KINDS)
    channels = 1 if all(gray for _, _, gray, _ in described) else 3
    if kinds == {"float"}:
        if bit_depth is not None:
            raise UserError("--bit_depth applies to integer images, these are float: use --intensity_range")
        return {"channels": channels, "intensity": float_rule(intensity_range)}
    # One depth for the whole set: the deepest image decides, so a dim image is never stretched.
    found = max((bits for _, bits, _, _ in described), default=8)
    if bit_depth is not None and found > bit_depth:
        warn(f"pixel values need {found} bits but --bit_depth is {bit_depth}: brighter values are clipped")
    depth = bit_depth or found
    # 8-bit files in a 16-bit set are divided by 65535 too and come out nearly black: worth a warning.
    wide = sum(w for *_, w in described)
    if depth > 8 and 0 < wide < len(described):
        warn(f"the data set mixes 8-bit and wider images: all are scaled as {depth}-bit data")
    return {"channels": channels, "intensity": {"kind": "integer", "bit_depth": int(depth)}}


def combine(scans):
    """One data set's scan from the scans of its parts (e.g. each process's share of the files)."""
    if len({found["intensity"]["kind"] for found in scans}) > 1:
        raise UserError(MIXED_KINDS)
    return {
        "channels": max(found["channels"] for found in scans),  # colour anywhere makes the set colour
        "intensity": max((found["intensity"] for found in scans), key=lambda rule: rule.get("bit_depth", 0)),
    }


def float_rule(intensity_range=None):
    """The rule of float images: values in [low, high] map onto [0, 1]."""
    low, high = (float(v) for v in (intensity_range or (0.0, 1.0)))
    if not high > low:
        raise UserError(f"--intensity_range needs low < high, got {low} {high}")
    return {"kind": "float", "range": [low, high]}


def describe(intensity):
    """A short human description of a rule, for logs."""
    if intensity["kind"] == "float":
        low, high = intensity["range"]
        return f"float images, [{low:g}, {high:g}] -> [0, 1]"
    depth = intensity["bit_depth"]
    return f"{depth}-bit integer images, values / {2**depth - 1}"


def decode(image, intensity, channels):
    """A PIL image as float32 (H, W, channels) in [0, 1] under the data set's rule.

    Palette images are expanded, alpha is composited on black (the usual background of medical
    and masked images), gray is repeated for 3 channels and colour weighted for 1.
    """
    # Bring every PIL mode to one of L / LA / RGB / RGBA / F / 16-bit before any arithmetic.
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode == "PA":
        image = image.convert("RGBA")
    elif image.mode not in ("L", "LA", "RGB", "RGBA", "F", *WIDE_MODES):
        image = image.convert("RGB" if image.mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX") else "L")
    alpha = None
    if image.mode in ("LA", "RGBA"):
        alpha = np.asarray(image.getchannel("A"), dtype=np.float32)[..., None] / 255.0
        image = image.convert(image.mode[:-1])
    # The data set's rule, never this image's own maximum: the same pixel value means the same
    # intensity in every image of the set.
    array = np.asarray(image).astype(np.float32)
    if image.mode == "F":
        low, high = intensity.get("range", (0.0, 1.0))
        array = (array - low) / (high - low)
    else:
        array = array / float(2 ** intensity.get("bit_depth", 8) - 1)
    array = np.clip(array, 0.0, 1.0)
    if array.ndim == 2:
        array = array[..., None]  # (H, W, 1)
    if alpha is not None:
        array = array * alpha
    # The set's channel count wins: a stray RGB file in a gray set becomes gray, and vice versa.
    if channels == 1 and array.shape[2] == 3:
        array = (array @ LUMA)[..., None]
    elif channels == 3 and array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array, dtype=np.float32)


def load(path, intensity, channels):
    """Image file -> float32 tensor (channels, H, W) in [0, 1] under the data set's rule."""
    return torch.from_numpy(decode(open_image(path), intensity, channels)).permute(2, 0, 1)


def suffix(intensity):
    """File suffix of samples: PNG up to 16 bits, TIFF for float and 32-bit integer data."""
    if intensity["kind"] == "float" or intensity.get("bit_depth", 8) > 16:
        return ".tif"
    return ".png"


def encode(sample, intensity):
    """(C, H, W) values in [0, 1] -> PIL image at the data set's depth.

    PIL cannot write colour images deeper than 8 bits, so those are written as 8-bit RGB.
    """
    if isinstance(sample, torch.Tensor):
        sample = sample.detach().float().cpu().numpy()
    array = np.clip(np.asarray(sample, dtype=np.float32), 0.0, 1.0).transpose(1, 2, 0)  # (H, W, C)
    depth = intensity.get("bit_depth", 8) if intensity["kind"] == "integer" else None
    # Round to the nearest level (np.rint), not down: decode(encode(x)) then returns x exactly.
    if array.shape[2] == 3 or (depth is not None and depth <= 8):
        peak = 2 ** min(depth or 8, 8) - 1
        pixels = np.rint(array * peak).astype(np.uint8)
        return Image.fromarray(pixels[..., 0] if array.shape[2] == 1 else pixels)
    if depth is None:
        low, high = intensity["range"]
        return Image.fromarray((low + array[..., 0] * (high - low)).astype(np.float32), "F")
    peak = 2**depth - 1
    # uint16 becomes PIL mode I;16 (a 16-bit PNG); deeper data needs 32-bit 'I', written as TIFF.
    if depth <= 16:
        return Image.fromarray(np.rint(array[..., 0] * peak).astype(np.uint16))
    return Image.fromarray(np.rint(array[..., 0].astype(np.float64) * peak).astype(np.int32), "I")


def save(sample, path, intensity):
    """Write one sample atomically (a crash never leaves a truncated file at path)."""
    image = encode(sample, intensity)
    path = Path(path)
    kind = Image.registered_extensions()[path.suffix.lower()]
    options = {}
    if kind == "PNG":
        # Tag the depth actually stored (colour stays 8-bit), so a scan of dark samples reads it back.
        depth = intensity.get("bit_depth", 8)
        options["pnginfo"] = PngImagePlugin.PngInfo()
        options["pnginfo"].add_text(DEPTH_TAG, str(depth if image.mode == "I;16" else min(depth, 8)))
    atomic_write(path, lambda tmp: image.save(tmp, format=kind, **options))


def to_uint8_rgb(samples):
    """(N, C, H, W) values in [0, 1] -> (N, H, W, 3) uint8, the ADM evaluator's .npz layout."""
    # Inception-based metrics expect 8-bit RGB: gray is repeated, deeper data is quantised here only.
    samples = samples.detach().float().clamp(0, 1).cpu()
    if samples.shape[1] == 1:
        samples = samples.repeat(1, 3, 1, 1)
    return (samples * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
