"""LDM speed figures, measured side by side in one run (`make bench`).

1. training steps/s with the VAE in the loop vs with --cache_latents (same data, model, batch);
   each pair is measured in alternation, twice, keeping the best of each;
2. sampling images/s with DDIM-50 vs DPM-Solver++-20;
3. sampling images/s with DDIM-50 and classifier guidance (a latent classifier of train_classifier.py's
   default width and depth) vs without, both with CFG 3.
The model hub is unreachable here, so both use small locally built models with random weights:
the figures compare code paths, not trained-model quality.
"""

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

import train
import train_classifier
import train_vae
from core import cli
from core.guidance import EncoderClassifier
from core.images import EIGHT_BIT
from dataset import ClassImageDataset, find_class_images
from models import LatentCodec, default_noise_scheduler, denoise, load_vae, make_sampler, noise_for

# One untimed step before each measurement (allocation, lazy initialisation); two rounds of each pair.
WARMUP, ROUNDS = 1, 2


def parse_args():
    parser = cli.Parser(description=__doc__)
    parser.add_argument("--image_size", type=cli.positive_int, default=64, help="pixels")
    parser.add_argument("--batch_size", type=cli.positive_int, default=8, help="images per step")
    parser.add_argument("--steps", type=cli.positive_int, default=5, help="timed steps per measurement")
    return parser.parse_args()


def make_data(root, size, classes=2, per_class=16):
    """Random RGB images in class folders."""
    # Random pixels are enough: the speed of a step does not depend on the image content.
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class_{c}" / f"{i:03d}.png")


def make_vae(folder, size):
    """A small SD-shaped VAE (4 levels: 8x downsampling, 4 latent channels), built as train_vae.py builds
    a new one and saved like a real one."""
    # Four levels, as in the SD VAE, so the latents have the real 8x downsampling at a fraction of its width.
    flags = "--block_out_channels 16 32 32 32 --layers_per_block 1 --norm_num_groups 16".split()
    args = train_vae.parse_args(["--data_root", str(folder), "--image_size", str(size), *flags])
    train_vae.build_vae(args, resume=None).save_pretrained(folder)


def make_model(size, codec):
    """The class-conditional UNet (tiny preset, 2 classes) and noise schedule train.py builds."""
    args = train.parse_args(["--data_root", ".", "--image_size", str(size), "--unet_preset", "tiny"])
    scheduler = default_noise_scheduler(args.num_train_timesteps, args.beta_schedule, args.prediction_type)
    return train.build_model(args, codec, 2, resume=None), scheduler


def steps_per_second(model, optimizer, codec, loader, cached, scheduler, steps):
    """Optimizer steps per second over `steps` timed steps (after WARMUP untimed ones)."""
    # The step is train.py's own (latents, loss, backward, AdamW) without DDP or accumulation.
    batches = forever(loader)
    for step in range(WARMUP + steps):
        if step == WARMUP:
            start = time.perf_counter()
        inputs, labels = next(batches)
        latents = train.training_latents(inputs, codec, cached, flip=True)
        # 0.1 is train.py's default --cfg_dropout, so the timed step includes the label dropout.
        loss = train.diffusion_loss(model, scheduler, latents, labels, 0.1, model.class_embedder.num_classes)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps / (time.perf_counter() - start)


def images_per_second(
    model, codec, scheduler_config, sampler_name, steps, latent_size, num_images=4, classifier=None
):
    """Generated (decoded) images per second for one sampler, guided by a classifier if one is given."""
    sampler = make_sampler(sampler_name, scheduler_config)
    noise = noise_for(0, 0, range(num_images), (codec.latent_channels, latent_size, latent_size))
    labels = torch.zeros(num_images, dtype=torch.long)
    # Timed up to decoded images: a user waits for pictures, not latents.
    start = time.perf_counter()
    codec.decode(denoise(model, sampler, noise, labels, 3.0, steps, classifier, 1.0))
    return num_images / (time.perf_counter() - start)


def forever(loader):
    """Batches of a loader, epoch after epoch."""
    while True:
        yield from loader


def loader(dataset, batch):
    return DataLoader(dataset, batch_size=batch, shuffle=True)


def best_of(first, second, rounds=ROUNDS):
    """Best (highest) rate of each of two measurements, taken in alternation."""
    # The best rather than the mean: the fastest round is the one least disturbed by other work.
    results = [(first(), second()) for _ in range(rounds)]
    return max(r[0] for r in results), max(r[1] for r in results)


def main():
    args = parse_args()
    size, batch = args.image_size, args.batch_size
    # Fixed seed: weights and batch order repeat, so two bench runs time the same computation.
    torch.manual_seed(0)
    print("LDM benchmark (CPU here; the model hub is unreachable, so models are small, local and random):")
    with tempfile.TemporaryDirectory() as tmp:
        make_data(Path(tmp) / "data", size)
        make_vae(Path(tmp) / "vae", size)
        # Through load_vae, the path train.py takes for --vae_pretrained FOLDER.
        codec = LatentCodec(load_vae(str(Path(tmp) / "vae")), 3)
        _, samples = find_class_images(Path(tmp) / "data")
        images = ClassImageDataset(samples, size, 3, EIGHT_BIT)
        labels = torch.tensor([label for _, label in samples])
        # Encoded once before timing, as --cache_latents does before its first epoch.
        cached = TensorDataset(train.encode_moments(codec, images, batch, "cpu", True), labels)
        latent_size = size // codec.downsample
        # One model and optimizer for both variants: only where the latents come from differs.
        model, scheduler = make_model(size, codec)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        print(
            f"  data: {len(samples)} images {size}px, batch {batch}; UNet preset 'tiny' "
            f"({sum(p.numel() for p in model.unet.parameters()) / 1e6:.1f}M params); VAE 8x downsampling"
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

    # Same model and noise for both samplers; the ratio is the gain of fewer, costlier solver steps.
    model.eval()
    ddim, dpm = best_of(
        lambda: images_per_second(model, codec, scheduler.config, "ddim", 50, latent_size),
        lambda: images_per_second(model, codec, scheduler.config, "dpmsolver++", 20, latent_size),
    )
    print(f"  sampling  DDIM-50     : {ddim:7.2f} images/s")
    print(f"  sampling  DPM++-20    : {dpm:7.2f} images/s   -> DPM-Solver++-20 speed-up x{dpm / ddim:.2f}")

    # train_classifier.py's defaults for these latents: one classifier forward and backward more per step.
    parser_args = train_classifier.build_parser().parse_args(["--data_root", ".", "--ldm_checkpoint", "."])
    facts = {"latent_channels": codec.latent_channels, "latent_size": latent_size, "class_names": ["a", "b"]}
    classifier = EncoderClassifier(**train_classifier.classifier_config(parser_args, facts)).eval()
    unguided, guided = best_of(
        lambda: images_per_second(model, codec, scheduler.config, "ddim", 50, latent_size),
        lambda: images_per_second(
            model, codec, scheduler.config, "ddim", 50, latent_size, classifier=classifier
        ),
    )
    ratio = guided / unguided
    print(f"  sampling  DDIM-50 + CG: {guided:7.2f} images/s   -> classifier guidance speed x{ratio:.2f}")


if __name__ == "__main__":
    main()
