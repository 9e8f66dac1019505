"""FID, precision/recall (Kynkaanniemi et al., k=3), KID and Inception Score of generated images.

Built on torch-fidelity: its Inception-v3 (FID network, TF-exact resize) and VGG16 feature
extractors and its metric functions. This script adds folder/.npz inputs decoded by the project's
one image rule, mixed image sizes, per-class results, a real-feature cache keyed by the files'
paths, sizes and modification times, and separate weight files per network (checked to hold only
tensors before torch-fidelity reads them).

Data layout: --real and --gen are each either
  * a folder of images, searched recursively (png jpg jpeg bmp tif tiff webp, any case); with
    --per-class its first-level sub-folders are the classes (the samplers write
    <out>/<class_name>/000000.png). Each folder is decoded by one rule found by scanning it once:
    integer images are divided by 2^k - 1, k the bit depth of its largest value (at least 8; 16-bit
    PNGs of our samplers declare theirs), or --bit-depth; float images map --intensity-range onto
    [0, 1]. The result becomes 8-bit RGB, as the metric networks expect; or
  * an .npz file whose arr_0 is uint8 N x H x W x C (as the samplers and ADM write); an optional
    arr_1 holds integer labels and class_names their names (index = label). Labels without names
    are taken as the other side's sorted class folders, only when the class counts agree.

With no flags, the constants REAL_IMAGES_DIR, GEN_IMAGES_DIR and BATCH_SIZE at the top of this file
are used:  cd evaluation && python precision_recall.py
Prints the FINAL EVALUATION REPORT block; --json also writes counts, settings, versions and weights.
Exit code 0 on success, 1 if an asked metric failed, 2 for bad input.
"""

import argparse
import hashlib
import json
import os
import platform
import re
import socket
import struct
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch_fidelity
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor
from tqdm import tqdm

from core import files, images
from core.cli import (
    Parser,
    bit_depth,
    ensure_writable_dir,
    ensure_writable_file,
    finite_float,
    nonnegative_int,
    positive_int,
)
from core.errors import UserError, run_cli, warn

# Used when no flags are given (the seed's way); --real / --gen / --batch-size override them.
REAL_IMAGES_DIR = "/path/to/real/images"
GEN_IMAGES_DIR = "/path/to/generated/images"
BATCH_SIZE = 32

IMAGE_EXTENSIONS = images.IMAGE_EXTENSIONS
METRIC_ALIASES = {
    "fid": "fid",
    "precision/recall": "pr",
    "precision_recall": "pr",
    "precision": "pr",
    "recall": "pr",
    "pr": "pr",
    "prc": "pr",
    "kid": "kid",
    "isc": "isc",
    "is": "isc",
}
METRIC_ORDER = ("fid", "pr", "kid", "isc")
METRIC_TITLES = {"fid": "FID", "pr": "precision/recall", "kid": "KID", "isc": "IS"}
TORCH_FIDELITY_NAME = {"fid": "fid", "pr": "prc", "kid": "kid", "isc": "isc"}
NETWORKS = {
    "inception": {
        "extractor": "inception-v3-compat",
        "label": "InceptionV3",
        "url": URL_INCEPTION_V3,
        "flag": "--inception-weights",
        "dest": "inception_weights",
        "env": "EVAL_INCEPTION_WEIGHTS",
    },
    "vgg16": {
        "extractor": "vgg16",
        "label": "VGG16",
        "url": torchvision.models.VGG16_Weights.IMAGENET1K_V1.url,
        "flag": "--vgg-weights",
        "dest": "vgg_weights",
        "env": "EVAL_VGG16_WEIGHTS",
    },
}
# Part of the cache keys: change it with the decoding, so old cached features are not reused.
DECODING = (
    "core.images rule per side (integers / (2^bit_depth - 1), depth by one scan or --bit-depth; float by "
    "--intensity-range), alpha composited on black, palette expanded, gray repeated, round(x * 255) uint8 RGB"
)
LINE = "=" * 40

InputError = UserError  # this script's name for core's one-line error (exit code 2)


# ----------------------------------------------------------------------------- weights


def resolve_weights(network, given):
    """Local path of a network's weights (the flag, the env variable, or the library's standard file),
    checked to hold only tensors: torch-fidelity unpickles it with weights_only=False."""
    spec = NETWORKS[network]
    path = given or os.environ.get(spec["env"])
    if path:
        if not os.path.isfile(path):
            raise InputError(
                f"{spec['label']} weights file not found: {path} (given by {spec['flag']} / {spec['env']})"
            )
        weights = {"path": os.path.abspath(path), "source": "flag" if given else spec["env"], "url": None}
    else:
        cached = os.path.join(
            torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(spec["url"]).path)
        )
        if not os.path.isfile(cached):
            download_weights(spec, cached)
        weights = {"path": cached, "source": "download", "url": spec["url"]}
    files.load_weights_only(weights["path"], f"{spec['label']} weights file ({spec['flag']})")
    return weights


def download_weights(spec, destination):
    """Fetch a standard weights file once, failing within seconds when the machine is offline."""
    name = os.path.basename(destination)
    hint = f"fetch {spec['url']} elsewhere and pass the file with {spec['flag']} PATH (or set {spec['env']})"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise InputError(
            f"offline (HF_HUB_OFFLINE is set) and {name} is not in {os.path.dirname(destination)}: {hint}"
        )
    hash_prefix = re.search(r"-([a-f0-9]{8,})\.", name)
    print(f"Downloading {spec['url']} -> {destination}", file=sys.stderr)
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(10)  # an unreachable host fails in seconds instead of hanging
    try:
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        torch.hub.download_url_to_file(spec["url"], destination, hash_prefix and hash_prefix.group(1))
    except (OSError, RuntimeError) as error:
        raise InputError(f"cannot download {name} ({error}): {hint}") from None
    finally:
        socket.setdefaulttimeout(previous_timeout)


def weights_identity(weights):
    """What the features depend on in a weights file: its path, size and modification time."""
    stat = os.stat(weights["path"])
    return [weights["path"], stat.st_size, stat.st_mtime_ns]


def build_extractor(network, weights, device):
    """torch-fidelity's extractor for `network` from a local file, with every layer a metric may use."""
    spec = NETWORKS[network]
    cls = FEATURE_EXTRACTORS_REGISTRY[spec["extractor"]]
    layers = sorted({cls.get_default_feature_layer_for_metric(m) for m in TORCH_FIDELITY_NAME.values()})
    try:
        extractor = create_feature_extractor(
            spec["extractor"],
            layers,
            cuda=False,
            feature_extractor_weights_path=weights["path"],
            verbose=False,
        )
    except Exception as error:  # any failure to read or fit the user's file is an input problem
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise InputError(
            f"{weights['path']} does not hold {spec['label']} weights for torch-fidelity's "
            f"{spec['extractor']} ({reason}); pass the right file with {spec['flag']}"
        ) from None
    return extractor.to(device)


# ----------------------------------------------------------------------------- inputs


def pil_to_rgb8(image, intensity):
    """Any PIL image as a uint8 (3, H, W) tensor under its set's rule, rounded as the samplers' .npz are."""
    pixels = torch.from_numpy(images.decode(image, intensity, 3)).permute(2, 0, 1)  # (3, H, W) in [0, 1]
    return torch.from_numpy(images.to_uint8_rgb(pixels[None])[0]).permute(2, 0, 1).contiguous()


class FolderImages(Dataset):
    """Image files as (index, uint8 (3, H, W) tensor), or (index, error message) for unreadable files."""

    def __init__(self, root, files, intensity):
        self.root, self.files, self.intensity = root, files, intensity

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        path = os.path.join(self.root, self.files[index])
        try:  # the scan read every file, but one may have changed since; the main process reports it
            return index, pil_to_rgb8(images.open_image(path), self.intensity)
        except UserError as error:
            return index, str(error)


class ArrayImages(Dataset):
    """Rows of a uint8 (N, H, W, C) array as (index, uint8 (3, H, W) tensor)."""

    def __init__(self, array):
        self.array = array

    def __len__(self):
        return len(self.array)

    def __getitem__(self, index):
        image = torch.from_numpy(np.array(self.array[index]))  # (H, W, C), copied out of the read-only map
        if image.shape[2] == 1:
            image = image.expand(-1, -1, 3)
        return index, image[:, :, :3].permute(2, 0, 1).contiguous()  # alpha dropped (ADM's layout)


@dataclass
class ImageSet:
    """One side of the comparison: image files under a folder, or the arr_0 array of an .npz file."""

    path: str
    files: list = None  # paths relative to `path` (folder input)
    array: np.ndarray = None  # (N, H, W, C) uint8 (npz input)
    classes: list = None  # per image: class name, bare npz label (int) or None
    total: int = 0  # images before --max-samples
    names: list = None  # class names, index = label: sorted class folders or the npz's class_names
    label_count: int = 0  # npz labels without names: largest label + 1 over all images
    indices: list = None  # positions drawn by --max-samples (None: all images)
    intensity: dict = None  # the decoding rule of the folder (core.images)

    def __post_init__(self):
        # Found on the whole set once; subsets keep them, so a random draw never renumbers the classes.
        if self.names is None and self.files is not None:
            self.names = sorted({c for c in self.classes or [] if c is not None})
        labels = [c for c in self.classes or [] if isinstance(c, int)]
        if labels and not self.label_count:
            self.label_count = max(labels) + 1

    def __len__(self):
        return len(self.files) if self.files is not None else len(self.array)

    def dataset(self):
        if self.files is None:
            return ArrayImages(self.array)
        return FolderImages(self.path, self.files, self.intensity)

    def subset(self, indices):
        """The images at `indices` (sorted), keeping the original total, class list and rule."""
        files = None if self.files is None else [self.files[i] for i in indices]
        array = None if self.array is None else self.array[indices]
        drawn = indices if self.indices is None else [self.indices[i] for i in indices]
        classes = [self.classes[i] for i in indices]
        return ImageSet(
            self.path, files, array, classes, self.total, self.names, self.label_count, drawn, self.intensity
        )

    def identity(self):
        """What its features depend on: every file's path, size and mtime (or the .npz file's and the
        rows drawn from it)."""
        if self.files is None:
            stat = os.stat(self.path)
            drawn = "all" if self.indices is None else digest(self.indices)
            return [os.path.realpath(self.path), stat.st_size, stat.st_mtime_ns, len(self.array), drawn]
        stats = [os.stat(os.path.join(self.path, f)) for f in self.files]
        return [os.path.realpath(self.path)] + [
            [f, s.st_size, s.st_mtime_ns] for f, s in zip(self.files, stats, strict=True)
        ]


def digest(payload):
    """A short hash of a JSON-able value (cache names)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def open_image_set(path, role, constant):
    """Find the images of one side; raise InputError naming the path when there are none."""
    if not os.path.exists(path):
        raise InputError(
            f"{role} images not found: {path} (pass --{role} or edit {constant} at the top of {__file__})"
        )
    if os.path.isfile(path) and path.lower().endswith(".npz"):
        return load_npz(path)
    if not os.path.isdir(path):
        raise InputError(f"{role} input {path} is neither a folder of images nor an .npz file")
    files = list_images(path)
    if not files:
        what = "is empty" if not os.listdir(path) else "has no images"
        raise InputError(
            f"{role} folder {path} {what} (read: {' '.join(IMAGE_EXTENSIONS)}, searched recursively)"
        )
    classes = [f.split(os.sep)[0] if os.sep in f else None for f in files]
    return ImageSet(path, files=files, classes=classes, total=len(files))


def list_images(root):
    """Image files under root (recursively, hidden folders skipped), as sorted relative paths."""
    found = []
    for folder, subfolders, names in os.walk(root, followlinks=True):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        found += [os.path.join(folder, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(os.path.relpath(f, root) for f in found)


def open_npz(path):
    """np.load of an .npz archive that never unpickles (a lone .npy array is refused too)."""
    data = np.load(path, allow_pickle=False)
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError("it holds a single .npy array, not an .npz archive")
    return data


def load_npz(path):
    """arr_0 (uint8 N x H x W [x C]), optional arr_1 labels and class_names of an .npz file."""
    try:
        with open_npz(path) as data:
            if "arr_0" not in data.files:
                raise InputError(
                    f"{path} has no arr_0 (found: {', '.join(data.files)}); expected uint8 N x H x W x C"
                )
            labels = data["arr_1"] if "arr_1" in data.files else None
            names = data["class_names"] if "class_names" in data.files else None
        array = npz_member(path, "arr_0")
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as error:
        raise InputError(f"cannot read {path} as .npz: {error}") from None
    array = array[..., None] if array.ndim == 3 else array
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[3] not in (1, 3, 4) or len(array) == 0:
        raise InputError(
            f"{path}: arr_0 is {array.dtype} {tuple(array.shape)}; expected uint8 N x H x W x C, C 1/3/4"
        )
    valid_labels = (
        labels is not None
        and labels.shape == (len(array),)
        and np.issubdtype(labels.dtype, np.integer)
        and labels.min() >= 0
    )
    if not valid_labels:
        return ImageSet(path, array=array, classes=[None] * len(array), total=len(array))
    labels = [int(v) for v in labels]
    if names is None:
        return ImageSet(path, array=array, classes=labels, total=len(array))
    if names.ndim != 1 or names.dtype.kind not in "US" or max(labels) >= len(names):
        raise InputError(
            f"{path}: class_names must list a name (str) for every label 0..{max(labels)}, "
            f"got {names.dtype} {tuple(names.shape)}"
        )
    names = [str(n) for n in names]
    return ImageSet(path, array=array, classes=[names[v] for v in labels], total=len(array), names=names)


def npz_member(path, name):
    """An array of an .npz, memory-mapped when stored uncompressed (np.savez, as samplers write 50k
    images), so a large file is not read into memory; compressed members are read whole."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f"{name}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            with archive.open(info) as member:
                return np.lib.format.read_array(member)
    with open(path, "rb") as handle:
        handle.seek(info.header_offset + 26)  # file name and extra field lengths of the local header
        name_length, extra_length = struct.unpack("<HH", handle.read(4))
        handle.seek(name_length + extra_length, os.SEEK_CUR)
        version = np.lib.format.read_magic(handle)
        read_header = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }
        shape, fortran_order, dtype = read_header[version](handle)
        offset = handle.tell()
    order = "F" if fortran_order else "C"
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=offset, order=order)


def random_subset(image_set, max_samples, seed):
    """At most max_samples images, drawn without replacement (same seed and input -> same subset)."""
    if max_samples is None or len(image_set) <= max_samples:
        return image_set
    indices = np.sort(np.random.default_rng(seed).choice(len(image_set), max_samples, replace=False))
    return image_set.subset(indices.tolist())


def decoding_rule(image_set, args):
    """The decoding rule of one side from one scan of all its files (remembered in the cache while they
    are unchanged, since a scan decodes every image); .npz arrays are 8-bit."""
    if image_set.files is None:
        return images.EIGHT_BIT
    paths = [os.path.join(image_set.path, f) for f in image_set.files]
    if args.no_cache:
        return images.scan(paths, args.bit_depth, args.intensity_range)["intensity"]
    key = [image_set.identity(), args.bit_depth, args.intensity_range, DECODING]
    path = os.path.join(args.cache_dir, f"scan-{digest(key)}.json")
    if os.path.exists(path):
        return read_cached_rule(path)
    rule = images.scan(paths, args.bit_depth, args.intensity_range)["intensity"]
    files.atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(rule)))
    return rule


def damaged_cache(path, reason):
    """The error for a cache file this script did not write (it is refused, never unpickled)."""
    return InputError(
        f"cache file {path} was not written by this script ({reason}): delete it, or pass --no-cache"
    )


def read_cached_rule(path):
    """A decoding rule saved by an earlier scan, checked field by field (JSON never runs code)."""
    try:
        rule = json.loads(Path(path).read_text())
        if rule["kind"] == "float":
            return images.float_rule(rule["range"])
        depth = rule["bit_depth"]
        if rule["kind"] == "integer" and type(depth) is int and 1 <= depth <= 32:
            return {"kind": "integer", "bit_depth": depth}
        reason = f"unknown rule {rule}"
    except (OSError, ValueError, KeyError, TypeError, UserError) as error:
        reason = f"{type(error).__name__}: {str(error)[:100]}"
    raise damaged_cache(path, reason)


def class_names(own, other):
    """Class name of each image of `own`: folder names and named npz labels as they are; bare npz
    labels as the other side's names (index = label), refused when the class counts differ."""
    if not any(isinstance(c, int) for c in own.classes):
        return own.classes
    if not other.names:  # no names on the other side either: the numbers are the names
        return [None if c is None else str(c) for c in own.classes]
    if own.label_count != len(other.names):
        raise InputError(
            f"--per-class: {own.path} has labels 0..{own.label_count - 1} but no class_names, and "
            f"{other.path} has {len(other.names)} classes, so which label is which class is ambiguous: "
            "write class_names (index = label) into the .npz, as the samplers do"
        )
    warn(
        f"{own.path} has no class_names: taking label i as the i-th of the {len(other.names)} sorted "
        f"classes of {other.path}"
    )
    return [None if c is None else other.names[c] for c in own.classes]


def match_classes(real, gen):
    """{class name: (real indices, gen indices)} for the classes found on both sides."""
    real_names, gen_names = class_names(real, gen), class_names(gen, real)
    real_set, gen_set = set(real_names) - {None}, set(gen_names) - {None}
    if not real_set & gen_set:
        raise InputError(
            f"--per-class: no class sub-folders (or npz labels) common to {real.path} and {gen.path} "
            f"(real: {sorted(real_set)[:10]}, gen: {sorted(gen_set)[:10]})"
        )
    if real_set ^ gen_set:
        print(
            f"Per-class: skipping classes found on one side only: {sorted(real_set ^ gen_set)}",
            file=sys.stderr,
        )

    def indices(names, wanted):
        return torch.tensor([i for i, n in enumerate(names) if n == wanted])

    return {c: (indices(real_names, c), indices(gen_names, c)) for c in sorted(real_set & gen_set)}


# ----------------------------------------------------------------------------- features


def collate_by_size(items):
    """Stack a batch in groups of equal image size (mixed sizes cannot share a tensor), keeping indices."""
    errors = [image for _, image in items if isinstance(image, str)]
    groups = {}
    for index, image in items:
        if not isinstance(image, str):
            groups.setdefault(tuple(image.shape), []).append((index, image))
    stacked = [(torch.tensor([i for i, _ in g]), torch.stack([x for _, x in g])) for g in groups.values()]
    return errors, stacked


def extract_features(image_set, extractor, args, desc):
    """{layer: (N, D) float32, 'image_sizes': (N, 2)} for every image, in the set's order."""
    loader = DataLoader(
        image_set.dataset(),
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        collate_fn=collate_by_size,
        pin_memory=args.device.type == "cuda",
    )
    names = list(extractor.get_requested_features_list()) + ["image_sizes"]
    indices, chunks = [], []
    with torch.no_grad(), tqdm(total=len(image_set), desc=desc, unit="img", file=sys.stderr) as progress:
        for errors, groups in loader:
            if errors:
                raise InputError(errors[0])
            for index, batch in groups:  # (B,), (B, 3, H, W) uint8
                features = extractor(batch.to(args.device, non_blocking=True))  # tuple of (B, D)
                sizes = torch.tensor(batch.shape[2:]).expand(len(index), 2)
                chunks.append([f.cpu() for f in features] + [sizes])
                indices.append(index)
                progress.update(len(index))
    order = torch.argsort(torch.cat(indices))
    return {name: torch.cat([c[j] for c in chunks])[order] for j, name in enumerate(names)}


def real_cache_name(image_set, network, weights):
    """Cache entry name of the real features: a hash of images, rule, extractor, weights, preprocessing."""
    payload = {
        "input": image_set.identity(),
        "intensity": image_set.intensity,
        "extractor": NETWORKS[network]["extractor"],
        "weights": weights_identity(weights),
        "preprocessing": [DECODING, resize_protocol(network)],
        "torch_fidelity": torch_fidelity.__version__,
    }
    return f"real-{digest(payload)}"


def resize_protocol(network):
    """How torch-fidelity's extractor resizes every image (from its own size, no crop)."""
    size = FEATURE_EXTRACTORS_REGISTRY[NETWORKS[network]["extractor"]].INPUT_IMAGE_SIZE
    return f"torch-fidelity TF1.x-compatible bilinear resize (align_corners=False) to {size}x{size}, no crop"


def features_of_both(real, gen, network, extractor, weights, args, log):
    """Real features (from the cache when it holds them) and generated features for one network."""
    label = NETWORKS[network]["label"]

    def extract(image_set, side):
        start = time.perf_counter()
        features = extract_features(image_set, extractor, args, f"{side} features ({label})")
        log["extracted"][side][network] = {"images": len(image_set), "seconds": time.perf_counter() - start}
        return features

    log["extracted"]["real"][network] = {"images": 0, "seconds": 0.0}
    names = list(extractor.get_requested_features_list()) + ["image_sizes"]
    path = None
    if not args.no_cache:
        path = os.path.join(args.cache_dir, f"{real_cache_name(real, network, weights)}.npz")
    if path and os.path.exists(path):
        real_features = read_cached_features(path, names, len(real))
        print(f"Real {label} features loaded from the cache in {args.cache_dir}", file=sys.stderr)
    else:
        real_features = extract(real, "real")
        if path:
            files.atomic_write(path, lambda tmp: write_arrays(tmp, real_features))
    return real_features, extract(gen, "gen")


def write_arrays(path, tensors):
    """An .npz of plain arrays (read back without unpickling)."""
    with open(path, "wb") as handle:  # a handle, since np.savez would append .npz to a path
        np.savez(handle, **{name: tensor.numpy() for name, tensor in tensors.items()})


def read_cached_features(path, names, count):
    """Features an earlier run saved; a file that is not such an .npz is refused, never unpickled."""
    try:
        with open_npz(path) as data:
            features = {name: torch.from_numpy(data[name]) for name in names}
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, EOFError) as error:
        raise damaged_cache(path, f"{type(error).__name__}: {str(error)[:100]}") from None
    if any(len(f) != count for f in features.values()):
        raise damaged_cache(path, f"it does not hold {count} rows per feature")
    return features


# ----------------------------------------------------------------------------- metrics


def layer_for(metric, network):
    """torch-fidelity's default feature layer of `metric` for the network."""
    cls = FEATURE_EXTRACTORS_REGISTRY[NETWORKS[network]["extractor"]]
    return cls.get_default_feature_layer_for_metric(TORCH_FIDELITY_NAME[metric])


def metric_values(metric, real, gen, network, args):
    """One metric from features, through torch-fidelity's metric functions."""
    layer = layer_for(metric, network)
    if metric == "fid":
        real_stats = fid_features_to_statistics(real[layer])
        fid = fid_statistics_to_metric(real_stats, fid_features_to_statistics(gen[layer]), False)
        return {"fid": fid[KEY_METRIC_FID]}
    if metric == "pr":
        # Generated first (torch-fidelity's input1); part-wise distances keep 50k x 50k within a few GB.
        prc = prc_features_to_metric(
            gen[layer].to(args.device),
            real[layer].to(args.device),
            prc_neighborhood=args.pr_k,
            prc_batch_size=args.pr_chunk_size,
            save_cpu_ram=True,
            verbose=False,
        )
        return {
            "precision": prc[KEY_METRIC_PRECISION],
            "recall": prc[KEY_METRIC_RECALL],
            "f_score": prc["f_score"],
        }
    if metric == "kid":
        kid = kid_features_to_metric(
            gen[layer],
            real[layer],
            kid_subsets=args.kid_subsets,
            kid_subset_size=args.kid_subset_size,
            rng_seed=args.seed,
            verbose=False,
        )
        return {"kid_mean": kid[KEY_METRIC_KID_MEAN], "kid_std": kid[KEY_METRIC_KID_STD]}
    isc = isc_features_to_metric(gen[layer], args.isc_splits, True, args.seed)
    return {"isc_mean": isc[KEY_METRIC_ISC_MEAN], "isc_std": isc[KEY_METRIC_ISC_STD]}


def compute_metrics(metrics, real, gen, network, args):
    """(values, failures) of several metrics; a failure is recorded and reported, never hidden."""
    values, failures = {}, {}
    for metric in metrics:
        try:
            result = metric_values(metric, real, gen, network, args)
        except Exception as error:  # reported in the output and the exit code
            failures[metric] = f"{type(error).__name__}: {error}"
            continue
        if all(np.isfinite(v) for v in result.values()):
            values.update(result)
        else:
            failures[metric] = f"non-finite result {result}"
    return values, failures


def network_of(metric, args):
    """Which network's features a metric uses."""
    return "vgg16" if metric == "pr" and args.pr_features == "vgg16" else "inception"


def minimum_counts(metric, args):
    """(fewest real images, fewest generated images, why) a metric needs."""
    return {
        "fid": (2, 2, "FID needs at least 2 images per side for a covariance"),
        "pr": (
            args.pr_k + 1,
            args.pr_k + 1,
            f"precision/recall with k={args.pr_k} needs k+1 images per side",
        ),
        "kid": (
            args.kid_subset_size,
            args.kid_subset_size,
            f"KID needs --kid-subset-size={args.kid_subset_size} images per side (pass a smaller one)",
        ),
        "isc": (0, args.isc_splits, f"IS needs --isc-splits={args.isc_splits} generated images"),
    }[metric]


def check_counts(metrics, n_real, n_gen, args, where):
    """Raise InputError before any feature extraction if a side has too few images for a metric."""
    for metric in metrics:
        need_real, need_gen, why = minimum_counts(metric, args)
        if n_real < need_real or n_gen < need_gen:
            raise InputError(f"{where}: {n_real} real and {n_gen} generated images, but {why}")


# ----------------------------------------------------------------------------- report


def metric_lines(values, failures, metrics, args):
    """Report lines in the seed's format ('FID (InceptionV3):     12.3456')."""
    lines = []
    for metric in metrics:
        label = NETWORKS[network_of(metric, args)]["label"]
        rows = {
            "fid": [(f"FID ({label}):", "fid", None)],
            "pr": [(f"Precision ({label}):", "precision", None), (f"Recall ({label}):", "recall", None)],
            "kid": [(f"KID ({label}):", "kid_mean", "kid_std")],
            "isc": [(f"IS ({label}):", "isc_mean", "isc_std")],
        }[metric]
        for title, key, spread in rows:
            if metric in failures:
                lines.append(f"{title + ' ':<23}FAILED ({failures[metric]})")
            else:
                digits = 6 if metric == "kid" else 4
                text = f"{values[key]:.{digits}f}" + (f" ± {values[spread]:.{digits}f}" if spread else "")
                lines.append(f"{title + ' ':<23}{text}")
    return lines


def print_report(result, metrics, args):
    """The FINAL EVALUATION REPORT block on stdout, then per-class blocks when asked."""
    lines = [LINE, "FINAL EVALUATION REPORT", f"Real Data: {args.real}", f"Gen Data:  {args.gen}", LINE]
    lines += metric_lines(result["metrics"], result["failures"], metrics, args)
    lines.append(LINE)
    for name, entry in result.get("per_class", {}).items():
        lines.append(f"Class {name} (real {entry['counts']['real']}, gen {entry['counts']['gen']})")
        lines += ["  " + line for line in metric_lines(entry["metrics"], entry["failures"], metrics, args)]
    if result.get("per_class"):
        lines.append(LINE)
    print("\n".join(lines), flush=True)


def library_versions():
    """Versions of everything that changes the numbers."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "torch_fidelity": torch_fidelity.__version__,
        "numpy": np.__version__,
        "pillow": Image.__version__,
    }


def size_histogram(sizes):
    """{'HxW': count} of an (N, 2) tensor of image sizes."""
    found, counts = torch.unique(sizes, dim=0, return_counts=True)
    return {f"{h}x{w}": int(c) for (h, w), c in zip(found.tolist(), counts.tolist(), strict=True)}


def write_json(path, result):
    """Write the full result atomically (a crash never leaves half a file)."""
    files.atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))


# ----------------------------------------------------------------------------- command line


def parse_metrics(text):
    """'fid,precision/recall kid' -> ['fid', 'pr', 'kid'] in report order."""
    asked = [m.strip().lower() for m in re.split(r"[,\s]+", text) if m.strip()]
    unknown = [m for m in asked if m not in METRIC_ALIASES]
    if unknown or not asked:
        raise argparse.ArgumentTypeError(
            f"unknown metric(s) {unknown}; choose from fid, precision/recall, kid, isc"
        )
    chosen = {METRIC_ALIASES[m] for m in asked}
    return [m for m in METRIC_ORDER if m in chosen]


def seed(text):
    """argparse type: a seed that numpy and torch-fidelity accept (0 <= seed < 2^32)."""
    value = nonnegative_int(text)
    if value >= 2**32:
        raise argparse.ArgumentTypeError(f"must be below 2^32, got {text}")
    return value


def default_cache_dir():
    """$EVAL_CACHE_DIR, else torch-fidelity's own default ($TORCH_HOME/fidelity_cache)."""
    return os.environ.get("EVAL_CACHE_DIR") or os.path.join(
        os.path.dirname(torch.hub.get_dir()), "fidelity_cache"
    )


def build_parser():
    parser = Parser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add(
        "--real",
        default=REAL_IMAGES_DIR,
        help="real images: folder (recursive) or .npz (default: REAL_IMAGES_DIR)",
    )
    add(
        "--gen",
        default=GEN_IMAGES_DIR,
        help="generated images: folder (recursive) or .npz (default: GEN_IMAGES_DIR)",
    )
    add(
        "--metrics",
        type=parse_metrics,
        default=parse_metrics("fid,precision/recall"),
        help="comma-separated: fid, precision/recall (alias pr), kid, isc (default: fid,precision/recall)",
    )
    add(
        "--batch-size",
        "--batch_size",
        type=positive_int,
        default=BATCH_SIZE,
        help="images per batch (default: 32)",
    )
    add(
        "--device",
        default=None,
        help="torch device, e.g. cuda, cuda:1, cpu (default: cuda when available, else cpu)",
    )
    add(
        "--num-workers",
        "--num_workers",
        type=nonnegative_int,
        default=min(8, os.cpu_count() or 1),
        help="DataLoader worker processes decoding images (default: min(8, CPU count))",
    )
    add(
        "--max-samples",
        "--max_samples",
        type=positive_int,
        default=None,
        help="random subset of N images per side",
    )
    add(
        "--seed",
        type=seed,
        default=2020,
        help="seed of --max-samples subsets, KID subsets and IS splits (default 2020)",
    )
    add(
        "--json",
        default=None,
        help="write every metric, count, setting, version and weight file to this file (checked first)",
    )
    add(
        "--per-class",
        "--per_class",
        action="store_true",
        help="also report every metric per class sub-folder",
    )
    add(
        "--cache-dir",
        "--cache_dir",
        default=default_cache_dir(),
        help="cache of real features and of folder scans (default: %(default)s)",
    )
    add("--no-cache", "--no_cache", action="store_true", help="neither read nor write the cache")
    add(
        "--bit-depth",
        "--bit_depth",
        type=bit_depth,
        default=None,
        help="bit depth of integer images, e.g. 12 for CT stored in 16-bit files (default: found per side "
        "by one scan: the largest value rounded up to 2^k - 1, or the depth our 16-bit PNGs declare)",
    )
    add(
        "--intensity-range",
        "--intensity_range",
        type=finite_float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=None,
        help="values of float ('F') images that map onto black and white (default: 0 1)",
    )
    add(
        "--inception-weights",
        "--inception_weights",
        default=None,
        help="local torch-fidelity Inception file (weights-inception-2015-12-05-6726825d.pth), offline use "
        "(or env EVAL_INCEPTION_WEIGHTS; default: downloaded once into the torch hub folder)",
    )
    add(
        "--vgg-weights",
        "--vgg_weights",
        default=None,
        help="local torchvision VGG16 file (vgg16-397923af.pth), offline use "
        "(or env EVAL_VGG16_WEIGHTS; default: downloaded once into the torch hub folder)",
    )
    add(
        "--pr-features",
        "--pr_features",
        choices=("vgg16", "inception"),
        default="vgg16",
        help="precision/recall features: vgg16 fc2 (Kynkaanniemi et al.; default) or inception pool3 (ADM)",
    )
    add(
        "--pr-k",
        "--pr_k",
        type=positive_int,
        default=3,
        help="k nearest neighbours of precision/recall (default 3)",
    )
    add(
        "--pr-chunk-size",
        "--pr_chunk_size",
        type=positive_int,
        default=1000,
        help="rows per distance block; peak memory about 20 x chunk x N bytes (default 1000: ~1 GB at N=50k)",
    )
    add(
        "--kid-subset-size",
        "--kid_subset_size",
        type=positive_int,
        default=1000,
        help="KID subset size (default 1000)",
    )
    add(
        "--kid-subsets",
        "--kid_subsets",
        type=positive_int,
        default=100,
        help="number of KID subsets (default 100)",
    )
    add(
        "--isc-splits",
        "--isc_splits",
        type=positive_int,
        default=10,
        help="Inception Score splits (default 10)",
    )
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.intensity_range and not args.intensity_range[0] < args.intensity_range[1]:
        parser.error(
            f"--intensity-range needs LOW < HIGH, got {args.intensity_range[0]} {args.intensity_range[1]}"
        )
    return args


def select_device(name):
    """The torch device to run on; CUDA when available unless told otherwise."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:
        raise InputError(f"--device {name}: {error}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
        # TF32 would shift the features away from the reference fp32 numbers the tables report.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return device


def load_inputs(args):
    """Both image sets, subset and checked for the asked metrics, with per-class index pairs; each
    folder is scanned once (all of it, also under --max-samples) for its decoding rule."""
    found = {
        "real": open_image_set(args.real, "real", "REAL_IMAGES_DIR"),
        "gen": open_image_set(args.gen, "gen", "GEN_IMAGES_DIR"),
    }
    real, gen = (random_subset(found[side], args.max_samples, args.seed) for side in ("real", "gen"))
    check_counts(args.metrics, len(real), len(gen), args, "overall")
    classes = match_classes(real, gen) if args.per_class else {}
    for name, (real_index, gen_index) in classes.items():
        check_counts(args.metrics, len(real_index), len(gen_index), args, f"class {name}")
    real.intensity, gen.intensity = decoding_rule(found["real"], args), decoding_rule(found["gen"], args)
    for title, chosen, place in (("Real:", real, args.real), ("Gen: ", gen, args.gen)):
        rule = images.describe(chosen.intensity)
        print(f"{title} {len(chosen)} of {chosen.total} images in {place} ({rule})", file=sys.stderr)
    return real, gen, classes


def networks_used(args):
    """The networks the asked metrics need, Inception first."""
    return list(dict.fromkeys(network_of(m, args) for m in args.metrics))


def per_class_metrics(result, metrics, classes, real_features, gen_features, network, args):
    """Add each class's metrics (features sliced by class, no re-extraction) to result['per_class']."""
    for name, (real_index, gen_index) in classes.items():
        counts = {"real": len(real_index), "gen": len(gen_index)}
        entry = result["per_class"].setdefault(name, {"counts": counts, "metrics": {}, "failures": {}})
        real_part = {k: v[real_index] for k, v in real_features.items()}
        gen_part = {k: v[gen_index] for k, v in gen_features.items()}
        values, failures = compute_metrics(metrics, real_part, gen_part, network, args)
        entry["metrics"].update(values)
        entry["failures"].update(failures)


def evaluate(args, real, gen, classes, weights):
    """All asked metrics, network by network (each network loads its own weights file)."""
    result = {"metrics": {}, "failures": {}, "per_class": {}, "image_sizes": {}}
    log = {"extracted": {"real": {}, "gen": {}}}
    for network in networks_used(args):
        metrics = [m for m in args.metrics if network_of(m, args) == network]
        extractor = build_extractor(network, weights[network], args.device)
        real_features, gen_features = features_of_both(
            real, gen, network, extractor, weights[network], args, log
        )
        values, failures = compute_metrics(metrics, real_features, gen_features, network, args)
        result["metrics"].update(values)
        result["failures"].update(failures)
        per_class_metrics(result, metrics, classes, real_features, gen_features, network, args)
        result["image_sizes"] = {
            "real": size_histogram(real_features["image_sizes"]),
            "gen": size_histogram(gen_features["image_sizes"]),
        }
    return result, log


def describe(args, real, gen, weights, log, seconds):
    """Everything but the metric values that a reader of the numbers needs to reproduce them."""
    used = networks_used(args)
    settings = {k: (str(v) if isinstance(v, torch.device) else v) for k, v in vars(args).items()}
    return {
        "real": os.path.abspath(args.real),
        "gen": os.path.abspath(args.gen),
        "counts": {"real": len(real), "gen": len(gen), "real_total": real.total, "gen_total": gen.total},
        "features": {
            m: f"{NETWORKS[network_of(m, args)]['extractor']}:{layer_for(m, network_of(m, args))}"
            for m in args.metrics
        },
        "preprocessing": {
            "decoding": DECODING,
            "intensity": {"real": real.intensity, "gen": gen.intensity},
            "resize": {NETWORKS[n]["extractor"]: resize_protocol(n) for n in used},
        },
        "weights": {
            NETWORKS[n]["extractor"]: {**weights[n], "bytes": os.path.getsize(weights[n]["path"])}
            for n in used
        },
        "cache": {"enabled": not args.no_cache, "dir": args.cache_dir, "extracted": log["extracted"]},
        "settings": settings,
        "versions": library_versions(),
        "seconds": seconds,
    }


def check_outputs(args):
    """Fail on an unwritable --json or cache folder before any image is read."""
    if args.json:
        ensure_writable_file(args.json, "--json")
    if not args.no_cache:
        ensure_writable_dir(args.cache_dir, "--cache-dir")


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    check_outputs(args)
    args.device = select_device(args.device)
    titles = ", ".join(METRIC_TITLES[m] for m in args.metrics)
    print(
        f"Metrics {titles} on {args.device}, batch size {args.batch_size}, {args.num_workers} workers",
        file=sys.stderr,
    )
    real, gen, classes = load_inputs(args)
    weights = {n: resolve_weights(n, getattr(args, NETWORKS[n]["dest"])) for n in networks_used(args)}
    result, log = evaluate(args, real, gen, classes, weights)
    result.update(describe(args, real, gen, weights, log, time.perf_counter() - start))
    print_report(result, args.metrics, args)
    if args.json:
        write_json(args.json, result)
        print(f"Wrote {args.json}", file=sys.stderr)
    failed = bool(result["failures"]) or any(e["failures"] for e in result["per_class"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
