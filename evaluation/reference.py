"""--write-reference: an image folder (or .npz) as a reference batch of ADM's evaluator.

openai/guided-diffusion's evaluations/evaluator.py reads `arr_0` (uint8 N x H x W x 3) of both batches and,
when the reference batch holds `mu`, takes its FID statistics from `mu` / `sigma` (pool_3) and its sFID
statistics from `mu_s` / `sigma_s` (mixed_6/conv[..., :7], flattened in height, width, channel order)
instead of recomputing them; its precision/recall always uses the pool_3 features of arr_0. So
`python evaluator.py OUT.npz samples.npz` runs on the user's own data.
"""

import sys

import numpy as np
import torch

from core import files
from core.errors import UserError
from features import real_features
from weights import SFID_LAYER, build_extractor


def collect_images(image_set):
    """Every image of the set as one uint8 N x H x W x 3 array (one size needed), decoded by its rule."""
    dataset = image_set.dataset()
    first = None
    array = None
    for index in range(len(dataset)):
        _, image = dataset[index]
        if isinstance(image, str):  # an unreadable file, as the feature loader reports it
            raise UserError(image)
        if array is None:
            first = tuple(image.shape[1:])
            array = np.empty((len(dataset), *first, 3), np.uint8)
        elif tuple(image.shape[1:]) != first:
            # An N x H x W x 3 array holds one size; resizing here would change the images the statistics
            # describe, so the user resizes them first.
            name = image_set.files[index] if image_set.files else f"row {index}"
            raise UserError(
                f"--write-reference needs images of one size: {name} is {image.shape[1]}x{image.shape[2]}, "
                f"the first is {first[0]}x{first[1]}; resize them to one size first"
            )
        array[index] = image.permute(1, 2, 0).numpy()
    return array


def statistics(features):
    """ADM's FIDStatistics: mean and covariance (np.cov, rowvar=False) of float features, in float64."""
    features = features.to(torch.float64).numpy()
    return features.mean(axis=0), np.cov(features, rowvar=False)


def write_reference(path, real, weights, args, log):
    """Write arr_0, mu, sigma, mu_s, sigma_s of the real set to `path` (atomically)."""
    array = collect_images(real)  # before the extraction, so a mixed-size folder fails at once
    extractor = build_extractor("inception", weights, args.device)
    features = real_features(real, "inception", extractor, weights, args, log)
    mu, sigma = statistics(features["2048"])
    mu_s, sigma_s = statistics(features[SFID_LAYER])

    def save(tmp):
        with open(tmp, "wb") as handle:  # a handle: np.savez would append .npz to a temporary name
            # Uncompressed, as ADM's batches: its evaluator and inputs.py stream arr_0 from the file.
            np.savez(handle, arr_0=array, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)

    files.atomic_write(path, save)
    print(
        f"Wrote {path}: arr_0 {tuple(array.shape)} uint8, mu/sigma of {mu.shape[0]}, "
        f"mu_s/sigma_s of {mu_s.shape[0]} features",
        file=sys.stderr,
    )
    return {"arr_0": array.shape, "mu": mu.shape, "mu_s": mu_s.shape}
