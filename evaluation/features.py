"""Feature extraction of both sides, mixed image sizes batched by size, and the real-feature cache
(keyed by the files' paths, sizes and modification times, the network, its weights and the decoding)."""

import os
import sys
import time
import zipfile

import numpy as np
import torch
import torch_fidelity
from torch.utils.data import DataLoader
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from tqdm import tqdm

from core import files
from core.errors import UserError
from inputs import DECODING, damaged_cache, digest, open_npz
from weights import NETWORKS, weights_identity


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
                raise UserError(errors[0])
            for index, batch in groups:  # (B,), (B, 3, H, W) uint8
                features = extractor(batch.to(args.device, non_blocking=True))  # tuple of (B, D)
                sizes = torch.tensor(batch.shape[2:]).expand(len(index), 2)
                chunks.append([f.cpu() for f in features] + [sizes])
                indices.append(index)
                progress.update(len(index))
    # Rows come out grouped by image size; the indices put them back in the set's order, which per-class
    # slicing and the cache rely on.
    order = torch.argsort(torch.cat(indices))
    return {name: torch.cat([c[j] for c in chunks])[order] for j, name in enumerate(names)}


def real_cache_name(image_set, network, weights, layers=None):
    """Cache entry name of the real features: a hash of images, rule, extractor, weights, preprocessing and
    the layers stored (an entry written before sFID's layer existed is not taken for one holding it)."""
    payload = {
        "layers": layers,
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


def timed_extract(image_set, side, network, extractor, args, log):
    """extract_features of one side, with its count and seconds logged under log['extracted']."""
    start = time.perf_counter()
    label = NETWORKS[network]["label"]
    features = extract_features(image_set, extractor, args, f"{side} features ({label})")
    log["extracted"][side][network] = {"images": len(image_set), "seconds": time.perf_counter() - start}
    return features


def real_features(real, network, extractor, weights, args, log):
    """The real side's features for one network, from the cache when it holds them."""
    # Only the real side is cached: it is the set reused across checkpoints, each generated set is new.
    # A cache hit is logged as 0 images extracted.
    log["extracted"]["real"][network] = {"images": 0, "seconds": 0.0}
    names = list(extractor.get_requested_features_list()) + ["image_sizes"]
    path = None
    if not args.no_cache:
        path = os.path.join(args.cache_dir, f"{real_cache_name(real, network, weights, names)}.npz")
    if path and os.path.exists(path):
        features = read_cached_features(path, names, len(real))
        print(
            f"Real {NETWORKS[network]['label']} features loaded from the cache in {args.cache_dir}",
            file=sys.stderr,
        )
        return features
    features = timed_extract(real, "real", network, extractor, args, log)
    if path:
        files.atomic_write(path, lambda tmp: write_arrays(tmp, features))
    return features


def features_of_both(real, gen, network, extractor, weights, args, log):
    """Real features (from the cache when it holds them) and generated features for one network."""
    real_side = real_features(real, network, extractor, weights, args, log)
    return real_side, timed_extract(gen, "gen", network, extractor, args, log)


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
