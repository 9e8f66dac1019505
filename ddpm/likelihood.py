"""--likelihood: bits/dim of a folder of images under a continuous-time model, as score_sde reports them.

Each image is read under the checkpoint's intensity rule, dequantised (uniform noise over its grey level)
and integrated through the probability-flow ODE with the Hutchinson trace estimator (core/sde_sampling.py).
The figure is per pixel and channel at the data's bit depth: 8-bit CIFAR-10 numbers compare directly.
"""

import time

import torch

from core import datasets, sde_cli, sde_sampling
from utils import ImageDataset, UserError, make_accelerator


def labelled_files(folder, class_names, conditional):
    """(files, labels) of the folder: class folders named as the checkpoint's classes, or any images."""
    if not conditional:  # an unconditional model scores every image, sub-folders included
        files = datasets.image_folder(folder, "--likelihood")
        return files, [0] * len(files)
    names, files, labels = datasets.class_folders(folder, "--likelihood")
    unknown = [name for name in names if name not in class_names]
    if unknown:
        raise UserError(
            f"--likelihood {folder}: class folder {unknown[0]!r} is not one of the checkpoint's classes "
            f"{class_names}"
        )
    # The model's label is the checkpoint's index of the folder's name, whatever else the folder holds.
    return files, [class_names.index(names[label]) for label in labels]


def report(args, model, class_names, intensity, objective):
    """Print the mean bits/dim of --likelihood's images and its standard error; split over processes."""
    if intensity["kind"] != "integer":
        # Bits per grey level need a finite number of levels; float data has none.
        raise UserError(f"--likelihood needs integer images, but {args.ckpt} was trained on float images")
    conditional = model.num_classes is not None
    files, labels = labelled_files(args.likelihood, class_names, conditional)
    data = ImageDataset(files, labels, model.img_size, model.c_in, intensity)
    bit_depth = intensity["bit_depth"]

    def score(indices, generator):
        batch = [data[i] for i in indices]
        x = torch.stack([image for image, _ in batch]).to(accelerator.device)
        y = torch.tensor([label for _, label in batch], device=x.device) if conditional else None
        x = sde_sampling.dequantize(x, bit_depth, generator)  # uniform noise over each grey level
        tolerances = dict(rtol=args.rtol, atol=args.atol)
        return sde_sampling.bits_per_dim(model, x, objective, y, bit_depth, generator=generator, **tolerances)

    accelerator = make_accelerator(args.device)
    try:
        model = model.to(accelerator.device).eval()
        start = time.perf_counter()
        mean, spread, count = sde_cli.likelihood(accelerator, len(data), args.batch_size, args.seed, score)
        seconds = time.perf_counter() - start
    finally:
        accelerator.end_training()
    if accelerator.is_main_process:
        print(
            f"bits/dim of {count} images in {args.likelihood}: {mean:.4f} +- {spread:.4f} "
            f"({objective.name} objective, {bit_depth}-bit data, probability-flow ODE with RK45 "
            f"rtol {args.rtol:g} atol {args.atol:g}, Hutchinson estimator; {seconds:.1f} s)"
        )
