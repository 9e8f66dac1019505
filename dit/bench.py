"""Training speed of DiT-S/2 on 256 px images (32 x 32 latents), measured side by side in one run:
scaled_dot_product_attention vs plain softmax attention, with and without --cache-latents.

Each step is train.py's own step (VAE encoding unless cached, hybrid loss, AdamW, EMA). The VAE has the
Stable Diffusion VAE's architecture with random weights unless --vae names a local diffusers folder.

    cd dit && ../.venv/bin/python bench.py
"""

import torch

from core import cli, training
from core.errors import run_cli
from diffusion import create_diffusion
from models import DiT_models
from train import latent_batch, train_step
from utils import accelerator_for, load_vae

SD_VAE = dict(  # architecture of stabilityai/sd-vae-ft-ema / -mse
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    sample_size=256,
)


def build_parser():
    parser = cli.Parser(description=__doc__)
    add = parser.add_argument
    add("--batch_size", type=cli.positive_int, help="images per step (default: 1 on CPU, 32 on CUDA)")
    add("--steps", type=cli.positive_int, help="timed steps per setting (default: 2 on CPU, 20 on CUDA)")
    add("--vae", help="local diffusers VAE folder (default: random SD-VAE weights)")
    return parser


def time_steps(model, vae, diffusion, batch, cached, steps, accelerator):
    """Steps per second of the training step (one untimed warm-up step first)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    ema = training.EMA(model, 0.9999)
    net, optimizer = accelerator.prepare(model, optimizer)
    generator = torch.Generator(accelerator.device).manual_seed(0)
    batch = [b.to(accelerator.device) for b in batch]
    for i in range(steps + 1):
        if i == 1:
            timer = training.Timer(accelerator.device)
        x0, y = latent_batch(batch, vae, 0.18215, cached, generator)
        train_step(net, diffusion, optimizer, x0, y, 0.1, generator, accelerator)
        ema.update(model)
    return steps / timer.elapsed()


def main():
    args = build_parser().parse_args()
    with accelerator_for("bf16" if torch.cuda.is_available() else "no") as accelerator:
        bench(args, accelerator)


def bench(args, accelerator):
    device = accelerator.device
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
                model, vae, diffusion, batches[cached], cached, steps, accelerator
            )
            name = "cached latents" if cached else "VAE every step"
            print(f"  {attention:<6} {name:<16} {speeds[attention, cached]:8.3f} steps/s")
    for cached in (True, False):
        ratio = speeds["sdpa", cached] / speeds["plain", cached]
        print(f"SDPA / plain attention ({'cached' if cached else 'uncached'}): {ratio:.2f}x")
    print(f"--cache-latents / VAE every step (SDPA): {speeds['sdpa', True] / speeds['sdpa', False]:.2f}x")


if __name__ == "__main__":
    run_cli(main)
