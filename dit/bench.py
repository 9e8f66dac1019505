"""Training speed of DiT-S/2 on 256 px images (32 x 32 latents), measured side by side in one run:
scaled_dot_product_attention vs plain softmax attention, with and without --cache-latents.

Each step is train.py's own step (VAE encoding unless cached, hybrid loss, AdamW, EMA). The VAE has the
Stable Diffusion VAE's architecture with random weights unless --vae names a local diffusers folder.

    cd dit && ../.venv/bin/python bench.py
"""

import argparse
import os
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from core.cli import Parser, positive_int  # noqa: E402
from diffusion import create_diffusion  # noqa: E402
from models import DiT_models  # noqa: E402
from train import latent_batch, train_step, update_ema  # noqa: E402
from utils import add_flag, load_vae, run_cli  # noqa: E402

SD_VAE = dict(  # architecture of stabilityai/sd-vae-ft-ema / -mse
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    sample_size=256,
)


def parse_args():
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flag(
        parser,
        "--batch-size",
        type=positive_int,
        default=None,
        help="images per step (default: 1 on CPU, 32 on CUDA)",
    )
    add_flag(
        parser,
        "--steps",
        type=positive_int,
        default=None,
        help="timed steps per setting (default: 2 on CPU, 20 on CUDA)",
    )
    add_flag(
        parser, "--vae", default=None, help="local diffusers VAE folder (default: random SD-VAE weights)"
    )
    return parser.parse_args()


def time_steps(model, vae, diffusion, batch, cached, steps, device):
    """Steps per second of the training step (one untimed warm-up step first)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    ema = DiT_models["DiT-S/2"](input_size=32, num_classes=8).to(device).requires_grad_(False)
    settings = SimpleNamespace(class_dropout_prob=0.1, precision="bf16" if device.type == "cuda" else "fp32")
    generator = torch.Generator(device).manual_seed(0)
    for i in range(steps + 1):
        if i == 1:
            synchronize(device)
            start = time.perf_counter()
        x0, y = latent_batch(batch, vae, 0.18215, cached, generator, device)
        train_step(model, diffusion, optimizer, x0, y, model.null_class, settings, generator, device)
        update_ema(ema, model, 0.9999)
    synchronize(device)
    return steps / (time.perf_counter() - start)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    n = args.batch_size or (32 if device.type == "cuda" else 1)
    steps = args.steps or (20 if device.type == "cuda" else 2)
    if args.vae:
        vae = load_vae(args.vae, device)
    else:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL(**SD_VAE).to(device).eval().requires_grad_(False)
    diffusion = create_diffusion()
    labels = torch.randint(0, 8, (n,))
    batches = {
        False: (torch.rand(n, 3, 256, 256) * 2 - 1, labels),  # images, encoded every step
        True: (torch.randn(n, 2, 4, 32, 32), torch.rand(n, 2, 4, 32, 32) * 0.1, labels),  # cached mean, std
    }
    print(f"DiT-S/2, 256 px (32x32 latents), batch {n}, {steps} timed steps per setting, {device}")
    speeds = {}
    for cached in (True, False):
        for attention in ("sdpa", "plain"):
            torch.manual_seed(0)
            model = (
                DiT_models["DiT-S/2"](input_size=32, num_classes=8, attention=attention).to(device).train()
            )
            speeds[attention, cached] = time_steps(
                model, vae, diffusion, batches[cached], cached, steps, device
            )
            name = "cached latents" if cached else "VAE every step"
            print(f"  {attention:<6} {name:<16} {speeds[attention, cached]:8.3f} steps/s")
    for cached in (True, False):
        ratio = speeds["sdpa", cached] / speeds["plain", cached]
        print(f"SDPA / plain attention ({'cached' if cached else 'uncached'}): {ratio:.2f}x")
    print(f"--cache-latents / VAE every step (SDPA): {speeds['sdpa', True] / speeds['sdpa', False]:.2f}x")


if __name__ == "__main__":
    run_cli(main)
