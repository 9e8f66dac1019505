"""--likelihood: bits/dim of a folder of images under a continuous-time DiT, through the probability-flow ODE
with the Hutchinson trace estimator (core/sde_sampling.py), as score_sde reports likelihoods.

The DiT models VAE latents, so the figure is the density of the images' latents (the posterior mean),
per latent dimension: bits/dim of the latents, not of the pixels, and not comparable with pixel models.
"""

import time

import torch

from core import sde_cli, sde_sampling
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
    device = accelerator.device

    def score(indices, generator):
        pixels = torch.stack([dataset[i][0] for i in indices]).to(device)  # (B, 3, H, W)
        # The posterior mean: latents are continuous, so there is nothing to dequantise.
        latents, _ = encode(vae, pixels, config["latent_scale"])
        y = torch.tensor([labels[i] for i in indices], device=device)
        with accelerator.autocast():
            # bit_depth 1 adds no offset: the density of the latents themselves, in bits per dimension.
            return sde_sampling.bits_per_dim(
                model, latents, objective, y, bit_depth=1, rtol=args.rtol, atol=args.atol, generator=generator
            )

    start = time.perf_counter()
    mean, spread, count = sde_cli.likelihood(accelerator, len(dataset), args.batch_size, args.seed, score)
    seconds = time.perf_counter() - start
    if accelerator.is_main_process:
        print(
            f"bits/dim of the VAE latents (not of the pixels) of {count} images in {args.likelihood}: "
            f"{mean:.4f} +- {spread:.4f} ({objective.name} objective, probability-flow ODE with RK45 "
            f"rtol {args.rtol:g} atol {args.atol:g}, Hutchinson estimator; {seconds:.1f} s)"
        )
