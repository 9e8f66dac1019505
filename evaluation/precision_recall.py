"""FID, precision/recall (Kynkaanniemi et al., k=3), KID and Inception Score of generated images.

Built on torch-fidelity: its Inception-v3 (FID network, TF-exact resize) and VGG16 feature
extractors, its metric functions and its file cache. This script adds folder/.npz inputs with
correct 8-bit RGB conversion, mixed image sizes, per-class results, a real-feature cache keyed by
the files' paths, sizes and modification times, and separate weight files per network.

Data layout: --real and --gen are each either
  * a folder of images, searched recursively (png jpg jpeg bmp tif tiff webp, any case); with
    --per-class its first-level sub-folders are the classes (the samplers write
    <out>/<class_name>/000000.png), or
  * an .npz file whose arr_0 is uint8 N x H x W x C (as DiT's and ADM's samplers write); an
    optional arr_1 holds integer labels, label i meaning the i-th sorted class folder of the other side.

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
from urllib.parse import urlparse

import numpy as np
import torch
import torch_fidelity
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.metric_fid import (
    KEY_METRIC_FID,
    fid_features_to_statistics,
    fid_featuresdict_to_statistics_cached,
    fid_statistics_to_metric,
)
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import cache_lookup_group_recompute_all_on_any_miss, create_feature_extractor
from tqdm import tqdm

# Used when no flags are given (the seed's way); --real / --gen / --batch-size override them.
REAL_IMAGES_DIR = "/path/to/real/images"
GEN_IMAGES_DIR = "/path/to/generated/images"
BATCH_SIZE = 32

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
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
# Part of the real-feature cache key: change it with the decoding, so old cached features are not reused.
DECODING = "8-bit RGB: 16/32-bit integers scaled by 1/257, gray replicated, alpha dropped, palette expanded"
LINE = "=" * 40


class InputError(Exception):
    """A problem with the user's input: reported as one line, exit code 2."""


# ----------------------------------------------------------------------------- weights


def resolve_weights(network, given):
    """Local path of a network's weights: the flag, the env variable, or the library's standard file."""
    spec = NETWORKS[network]
    path = given or os.environ.get(spec["env"])
    if path:
        if not os.path.isfile(path):
            raise InputError(
                f"{spec['label']} weights file not found: {path} (given by {spec['flag']} / {spec['env']})"
            )
        return {"path": os.path.abspath(path), "source": "flag" if given else spec["env"], "url": None}
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(spec["url"]).path))
    if not os.path.isfile(cached):
        download_weights(spec, cached)
    return {"path": cached, "source": "download", "url": spec["url"]}


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


def pil_to_rgb8(image):
    """Any PIL image as a uint8 (3, H, W) tensor; 16/32-bit integer images are scaled, not clipped."""
    if image.mode.startswith("I"):  # 'I;16*' (16-bit PNG/TIFF) and 'I': 0..65535 onto 0..255
        values = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    elif image.mode in ("P", "PA"):
        image = image.convert("RGBA")  # palettes may carry transparency; go through RGBA to expand it
    return torchvision.transforms.functional.pil_to_tensor(image.convert("RGB"))


class FolderImages(Dataset):
    """Image files as (index, uint8 (3, H, W) tensor), or (index, error message) for unreadable files."""

    def __init__(self, root, files):
        self.root, self.files = root, files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        path = os.path.join(self.root, self.files[index])
        try:
            with Image.open(path) as image:
                return index, pil_to_rgb8(image)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            return index, f"cannot read image {path}: {error}"


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
        return index, image[:, :, :3].permute(2, 0, 1).contiguous()  # alpha dropped, like the files


@dataclass
class ImageSet:
    """One side of the comparison: image files under a folder, or the arr_0 array of an .npz file."""

    path: str
    files: list = None  # paths relative to `path` (folder input)
    array: np.ndarray = None  # (N, H, W, C) uint8 (npz input)
    classes: list = None  # per image: class folder name, npz label (int) or None
    total: int = 0  # images before --max-samples

    def __len__(self):
        return len(self.files) if self.files is not None else len(self.array)

    def dataset(self):
        return FolderImages(self.path, self.files) if self.files is not None else ArrayImages(self.array)

    def subset(self, indices):
        """The images at `indices` (sorted), keeping the original total."""
        files = None if self.files is None else [self.files[i] for i in indices]
        array = None if self.array is None else self.array[indices]
        return ImageSet(self.path, files, array, [self.classes[i] for i in indices], self.total)

    def identity(self):
        """What its features depend on: every file's path, size and mtime (or the .npz file's)."""
        if self.files is None:
            stat = os.stat(self.path)
            return [os.path.realpath(self.path), stat.st_size, stat.st_mtime_ns, len(self.array)]
        stats = [os.stat(os.path.join(self.path, f)) for f in self.files]
        return [os.path.realpath(self.path)] + [
            [f, s.st_size, s.st_mtime_ns] for f, s in zip(self.files, stats, strict=True)
        ]


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


def load_npz(path):
    """arr_0 (uint8 N x H x W [x C]) and optional arr_1 labels of an .npz file."""
    try:
        with np.load(path) as data:
            if "arr_0" not in data.files:
                raise InputError(
                    f"{path} has no arr_0 (found: {', '.join(data.files)}); expected uint8 N x H x W x C"
                )
            labels = data["arr_1"] if "arr_1" in data.files else None
        array = npz_member(path, "arr_0")
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as error:
        raise InputError(f"cannot read {path} as .npz: {error}") from None
    array = array[..., None] if array.ndim == 3 else array
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[3] not in (1, 3, 4) or len(array) == 0:
        raise InputError(
            f"{path}: arr_0 is {array.dtype} {tuple(array.shape)}; expected uint8 N x H x W x C, C 1/3/4"
        )
    valid_labels = (
        labels is not None and labels.shape == (len(array),) and np.issubdtype(labels.dtype, np.integer)
    )
    classes = [int(v) for v in labels] if valid_labels else [None] * len(array)
    return ImageSet(path, array=array, classes=classes, total=len(array))


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


def class_names(own, other):
    """Class name of each image: folder names as they are, npz labels via the other side's sorted names."""
    other_names = sorted({c for c in other if isinstance(c, str)})

    def name(key):
        if isinstance(key, int) and other_names:
            return other_names[key] if 0 <= key < len(other_names) else f"label {key}"
        return None if key is None else str(key)

    return [name(c) for c in own]


def match_classes(real, gen):
    """{class name: (real indices, gen indices)} for the classes found on both sides."""
    real_names, gen_names = class_names(real.classes, gen.classes), class_names(gen.classes, real.classes)
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
            for index, images in groups:  # (B,), (B, 3, H, W) uint8
                features = extractor(images.to(args.device, non_blocking=True))  # tuple of (B, D)
                sizes = torch.tensor(images.shape[2:]).expand(len(index), 2)
                chunks.append([f.cpu() for f in features] + [sizes])
                indices.append(index)
                progress.update(len(index))
    order = torch.argsort(torch.cat(indices))
    return {name: torch.cat([c[j] for c in chunks])[order] for j, name in enumerate(names)}


def real_cache_name(image_set, network, weights):
    """Cache entry name for the real features: a hash of files, extractor, weights and preprocessing."""
    payload = {
        "input": image_set.identity(),
        "extractor": NETWORKS[network]["extractor"],
        "weights": weights_identity(weights),
        "preprocessing": [DECODING, resize_protocol(network)],
        "torch_fidelity": torch_fidelity.__version__,
    }
    return "real-" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


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
    if args.no_cache:
        real_features, cache_name = extract(real, "real"), None
    else:
        cache_name = real_cache_name(real, network, weights)
        prefix = f"{cache_name}-{extractor.get_name()}-features-"
        items = list(extractor.get_requested_features_list()) + ["image_sizes"]
        real_features = cache_lookup_group_recompute_all_on_any_miss(
            prefix, items, lambda: extract(real, "real"), cache=True, cache_root=args.cache_dir, verbose=False
        )
        if log["extracted"]["real"][network]["images"] == 0:
            print(f"Real {label} features loaded from the cache in {args.cache_dir}", file=sys.stderr)
    return real_features, extract(gen, "gen"), cache_name


# ----------------------------------------------------------------------------- metrics


def layer_for(metric, network):
    """torch-fidelity's default feature layer of `metric` for the network."""
    cls = FEATURE_EXTRACTORS_REGISTRY[NETWORKS[network]["extractor"]]
    return cls.get_default_feature_layer_for_metric(TORCH_FIDELITY_NAME[metric])


def metric_values(metric, real, gen, network, args, real_fid_stats=None):
    """One metric from features, through torch-fidelity's metric functions."""
    layer = layer_for(metric, network)
    if metric == "fid":
        real_stats = real_fid_stats or fid_features_to_statistics(real[layer])
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


def compute_metrics(metrics, real, gen, network, args, real_fid_stats=None):
    """(values, failures) of several metrics; a failure is recorded and reported, never hidden."""
    values, failures = {}, {}
    for metric in metrics:
        try:
            result = metric_values(metric, real, gen, network, args, real_fid_stats)
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
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".{os.path.basename(path)}.tmp")
    with open(temporary, "w") as handle:
        json.dump(result, handle, indent=2)
    os.replace(temporary, path)


# ----------------------------------------------------------------------------- command line


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (plus exit code 2), not the whole usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


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


def positive_int(text):
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def default_cache_dir():
    """$EVAL_CACHE_DIR, else torch-fidelity's own default ($TORCH_HOME/fidelity_cache)."""
    return os.environ.get("EVAL_CACHE_DIR") or os.path.join(
        os.path.dirname(torch.hub.get_dir()), "fidelity_cache"
    )


def parse_args(argv=None):
    parser = OneLineErrorParser(
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
        type=int,
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
        type=int,
        default=2020,
        help="seed of --max-samples subsets, KID subsets and IS splits (default 2020)",
    )
    add(
        "--json",
        default=None,
        help="write every metric, count, setting, version and weight file to this path",
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
        help="real-feature cache (default: %(default)s)",
    )
    add("--no-cache", "--no_cache", action="store_true", help="neither read nor write the real-feature cache")
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
    return parser.parse_args(argv)


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
    """Both image sets, subset and checked for the asked metrics, with per-class index pairs."""
    real = random_subset(open_image_set(args.real, "real", "REAL_IMAGES_DIR"), args.max_samples, args.seed)
    gen = random_subset(open_image_set(args.gen, "gen", "GEN_IMAGES_DIR"), args.max_samples, args.seed)
    check_counts(args.metrics, len(real), len(gen), args, "overall")
    classes = match_classes(real, gen) if args.per_class else {}
    for name, (real_index, gen_index) in classes.items():
        check_counts(args.metrics, len(real_index), len(gen_index), args, f"class {name}")
    print(f"Real: {len(real)} of {real.total} images in {args.real}", file=sys.stderr)
    print(f"Gen:  {len(gen)} of {gen.total} images in {args.gen}", file=sys.stderr)
    return real, gen, classes


def networks_used(args):
    """The networks the asked metrics need, Inception first."""
    return list(dict.fromkeys(network_of(m, args) for m in args.metrics))


def cached_real_fid_statistics(real_features, cache_name, extractor, network, args):
    """FID mean and covariance of the real set, from the cache when it holds them."""
    if cache_name is None:
        return None
    layer = layer_for("fid", network)
    return fid_featuresdict_to_statistics_cached(
        real_features, cache_name, extractor, layer, cache_root=args.cache_dir, verbose=False
    )


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
        real_features, gen_features, cache_name = features_of_both(
            real, gen, network, extractor, weights[network], args, log
        )
        stats = (
            cached_real_fid_statistics(real_features, cache_name, extractor, network, args)
            if "fid" in metrics
            else None
        )
        values, failures = compute_metrics(metrics, real_features, gen_features, network, args, stats)
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


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        args.device = select_device(args.device)
        titles = ", ".join(METRIC_TITLES[m] for m in args.metrics)
        print(
            f"Metrics {titles} on {args.device}, batch size {args.batch_size}, {args.num_workers} workers",
            file=sys.stderr,
        )
        real, gen, classes = load_inputs(args)
        weights = {n: resolve_weights(n, getattr(args, NETWORKS[n]["dest"])) for n in networks_used(args)}
        result, log = evaluate(args, real, gen, classes, weights)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    result.update(describe(args, real, gen, weights, log, time.perf_counter() - start))
    print_report(result, args.metrics, args)
    if args.json:
        write_json(args.json, result)
        print(f"Wrote {args.json}", file=sys.stderr)
    failed = bool(result["failures"]) or any(e["failures"] for e in result["per_class"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
