"""LDM speed figures, measured side by side in one run (`make bench`).

1. training steps/s with the VAE in the loop vs with --cache_latents (same data, model, batch);
   each pair is measured in alternation, twice, keeping the best of each;
2. sampling images/s with DDIM-50 vs DPM-Solver++-20.
The model hub is unreachable here, so both use small locally built models with random weights:
the figures compare code paths, not trained-model quality.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from core.images import EIGHT_BIT
from dataset import ClassImageDataset, find_class_images
from models import (
    ClassConditionalUNet,
    ClassEmbedder,
    LatentCodec,
    build_unet,
    default_noise_scheduler,
    denoise,
    load_vae,
    make_sampler,
    noise_for,
    unet_settings,
)
from train import diffusion_loss, encode_moments, training_latents

WARMUP, ROUNDS = 1, 2


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--image-size", "--image_size", dest="image_size", type=int, default=64, help="pixels"
    )
    parser.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=8, help="images")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per measurement")
    return parser.parse_args()


def make_data(root, size, classes=2, per_class=16):
    """Random RGB images in class folders."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class_{c}" / f"{i:03d}.png")


def make_vae(folder, size):
    """A small SD-shaped VAE (4 levels: 8x downsampling, 4 latent channels) saved like a real one."""
    AutoencoderKL(
        block_out_channels=(16, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=16,
        layers_per_block=1,
        sample_size=size,
    ).save_pretrained(folder)


def steps_per_second(model, optimizer, codec, loader, cached, scheduler, steps):
    """Optimizer steps per second over `steps` timed steps (after WARMUP untimed ones)."""
    batches = forever(loader)
    for step in range(WARMUP + steps):
        if step == WARMUP:
            start = time.perf_counter()
        inputs, labels = next(batches)
        latents = training_latents(inputs, codec, cached, flip=True)
        loss = diffusion_loss(model, scheduler, latents, labels, 0.1, model.class_embedder.num_classes)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps / (time.perf_counter() - start)


def images_per_second(model, codec, scheduler_config, sampler_name, steps, latent_size, num_images=4):
    """Generated (decoded) images per second for one sampler."""
    sampler = make_sampler(sampler_name, scheduler_config)
    noise = noise_for(0, 0, range(num_images), (codec.latent_channels, latent_size, latent_size))
    labels = torch.zeros(num_images, dtype=torch.long)
    start = time.perf_counter()
    codec.decode(denoise(model, sampler, noise, labels, 3.0, steps))
    return num_images / (time.perf_counter() - start)


def forever(loader):
    """Batches of a loader, epoch after epoch."""
    while True:
        yield from loader


def loader(dataset, batch):
    return DataLoader(dataset, batch_size=batch, shuffle=True)


def best_of(first, second, rounds=ROUNDS):
    """Best (highest) rate of each of two measurements, taken in alternation."""
    results = [(first(), second()) for _ in range(rounds)]
    return max(r[0] for r in results), max(r[1] for r in results)


def main():
    args = parse_args()
    size, batch = args.image_size, args.batch_size
    torch.manual_seed(0)
    print("LDM benchmark (CPU here; the model hub is unreachable, so models are small, local and random):")
    with tempfile.TemporaryDirectory() as tmp:
        make_data(Path(tmp) / "data", size)
        make_vae(Path(tmp) / "vae", size)
        codec = LatentCodec(load_vae(str(Path(tmp) / "vae")), 3)
        _, samples = find_class_images(Path(tmp) / "data")
        images = ClassImageDataset(samples, size, 3, EIGHT_BIT)
        labels = torch.tensor([label for _, label in samples])
        cached = TensorDataset(encode_moments(codec, images, batch, "cpu", True), labels)
        latent_size = size // codec.downsample
        unet = build_unet(unet_settings("tiny"), codec.latent_channels, latent_size)
        model = ClassConditionalUNet(unet, ClassEmbedder(2, unet.config.cross_attention_dim))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        scheduler = default_noise_scheduler(1000, "scaled_linear", "epsilon")
        print(
            f"  data: {len(samples)} images {size}px, batch {batch}; UNet preset 'tiny' "
            f"({sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M params); VAE 8x downsampling"
        )
        # Alternate the two variants and keep each one's best round, so load spikes hit both alike.
        plain, fast = best_of(
            lambda: steps_per_second(
                model, optimizer, codec, loader(images, batch), False, scheduler, args.steps
            ),
            lambda: steps_per_second(
                model, optimizer, codec, loader(cached, batch), True, scheduler, args.steps
            ),
        )
    print(f"  training  VAE in loop : {plain:7.2f} steps/s")
    print(f"  training  cached      : {fast:7.2f} steps/s   -> cache_latents speed-up x{fast / plain:.2f}")

    model.eval()
    ddim, dpm = best_of(
        lambda: images_per_second(model, codec, scheduler.config, "ddim", 50, latent_size),
        lambda: images_per_second(model, codec, scheduler.config, "dpmsolver++", 20, latent_size),
    )
    print(f"  sampling  DDIM-50     : {ddim:7.2f} images/s")
    print(f"  sampling  DPM++-20    : {dpm:7.2f} images/s   -> DPM-Solver++-20 speed-up x{dpm / ddim:.2f}")


if __name__ == "__main__":
    main()
