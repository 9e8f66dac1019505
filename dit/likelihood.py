"""--likelihood: bits/dim of a folder of images under a continuous-time DiT, through the probability-flow ODE
with the Hutchinson trace estimator (core/sde_sampling.py), as score_sde reports likelihoods.

The DiT models VAE latents, so the figure is the density of the images' latents (the posterior mean),
per latent dimension: bits/dim of the latents, not of the pixels, and not comparable with pixel models.
"""

import math
import time

import torch

from core import sde_sampling, training
from core.errors import UserError
from dataset import ImageFolderDataset
from utils import encode


def likelihood_data(folder, config):
    """Images of folder/<class_name>/ under the checkpoint's decoding rule, labelled by its class names."""
    dataset = ImageFolderDataset(folder, config["image_size"])
    unknown = [name for name in dataset.class_names if name not in config["class_names"]]
    if unknown:
        raise UserError(
            f"--likelihood {folder}: class folder {unknown[0]!r} is not one of the checkpoint's classes "
            f"{config['class_names']}"
        )
    dataset.intensity = config["intensity"]
    labels = [config["class_names"].index(dataset.class_names[label]) for _, label in dataset.samples]
    return dataset, labels


def report_likelihood(args, model, vae, config, objective, accelerator):
    """Print the mean bits/dim of --likelihood's latents and its standard error; split over processes."""
    dataset, labels = likelihood_data(args.likelihood, config)
    start = time.perf_counter()
    sums = score_share(model, vae, dataset, labels, config, objective, args, accelerator)
    total, squares, count = training.sum_across(accelerator, *sums)
    seconds = time.perf_counter() - start
    if accelerator.is_main_process:
        mean = total / count
        # Standard error of the mean over images (the estimator's own noise is part of each image's value).
        spread = math.sqrt(max(squares / count - mean**2, 0.0) / max(count - 1, 1))
        print(
            f"bits/dim of the VAE latents (not of the pixels) of {int(count)} images in {args.likelihood}: "
            f"{mean:.4f} +- {spread:.4f} ({objective.name} objective, probability-flow ODE with RK45 "
            f"rtol {args.rtol:g} atol {args.atol:g}, Hutchinson estimator; {seconds:.1f} s)"
        )


def score_share(model, vae, dataset, labels, config, objective, args, accelerator):
    """(sum, sum of squares, count) of bits/dim over this process's strided share of the images."""
    indices = list(range(len(dataset)))[accelerator.process_index :: accelerator.num_processes]
    device, total, squares = accelerator.device, 0.0, 0.0
    for first in range(0, len(indices), args.batch_size):
        chunk = indices[first : first + args.batch_size]
        pixels = torch.stack([dataset[i][0] for i in chunk]).to(device)  # (B, 3, H, W)
        # The posterior mean: latents are continuous, so there is nothing to dequantise.
        latents, _ = encode(vae, pixels, config["latent_scale"])
        y = torch.tensor([labels[i] for i in chunk], device=device)
        # Seeded by the batch's first image: with --batch-size 1 no figure depends on the process count.
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + chunk[0])
        with accelerator.autocast():
            # bit_depth 1 adds no offset: the density of the latents themselves, in bits per dimension.
            bpd = sde_sampling.bits_per_dim(
                model, latents, objective, y, bit_depth=1, rtol=args.rtol, atol=args.atol, generator=generator
            )
        total, squares = total + bpd.sum().item(), squares + bpd.pow(2).sum().item()
    return total, squares, len(indices)
