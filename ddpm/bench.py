"""Speed figures of the pixel-space DDPM on this machine, measured side by side in one run.

Prints training images/s, sampling images/s with DDPM-1000 and DDIM-50 and their ratio, the speed of
attention through scaled_dot_product_attention against a plain softmax(QK^T)V, and the continuous-time
samplers side by side (PC-1000, Euler-ODE-100, adaptive RK45, DPM-Solver++-20: images/s and NFE) on a vp
model trained briefly on scikit-learn's digits (or on --objective-ckpt, e.g. the demo's vp run), and DDIM-50
sampling with classifier guidance against without, as a ratio.
"""

import time

import torch
import torch.nn.functional as F

from classifier import EncoderClassifier
from core import cli, sde, sde_sampling
from core.errors import UserError, run_cli
from diffusion import Diffusion
from modules import SelfAttention, UNet_conditional, build_model
from utils import add_flag, load_checkpoint, pick_device

# The continuous-time samplers compared, each at its usual step count (rk45 chooses its own).
OBJECTIVE_SAMPLERS = (("pc", 1000), ("euler", 100), ("rk45", None), ("dpm++", 20))


def timed(fn, repeats):
    """Seconds per call of fn, after one warm-up call."""
    # The warm-up keeps one-time costs (lazy CUDA init, kernel choice, allocator growth) out of the mean.
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def sync():
    # CUDA kernels run asynchronously: without waiting, the clock would stop before the work is done.
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_training(model, diffusion, batch, size, device, repeats):
    """Training images/s of full optimizer steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, model.c_in, size, size, device=device)
    y = torch.randint(0, model.num_classes, (batch,), device=device)

    def step():
        t = diffusion.sample_timesteps(batch)
        noise = torch.randn_like(x)
        loss = F.mse_loss(model(diffusion.noise_images(x, t, noise), t, y), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return batch / timed(step, repeats)


def bench_sampling(model, diffusion, n, sampler, steps, classifier=None):
    """Sampling images/s with CFG (both halves in one batch), and classifier guidance if one is given."""
    labels = torch.arange(n, device=next(model.parameters()).device) % model.num_classes
    # No warm-up: main runs DDPM-1000 first, whose first of 1000 network calls absorbs the one-time costs.
    start = time.perf_counter()
    diffusion.sample(
        model, n, labels, cfg_scale=3, log_time=False, sampler=sampler, steps=steps, classifier=classifier
    )
    sync()
    return n / (time.perf_counter() - start)


def digits_batch(size, device):
    """scikit-learn's 1797 digits as (N, 1, size, size) in [-1, 1] and their labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError(
            "the objective benchmark trains on scikit-learn's digits: pip install scikit-learn"
        ) from None
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16 * 2 - 1  # 0..16 -> [-1, 1]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)  # 8x8 -> size x size
    return x.to(device), torch.tensor(digits.target, device=device)


def vp_model(args, device):
    """The --objective-ckpt model, else a small vp UNet trained for --objective-steps on the digits."""
    if args.objective_ckpt:
        ckpt = load_checkpoint(args.objective_ckpt)
        objective = sde.objective_of(ckpt.get("config", {}))
        if objective is None or objective.is_flow:
            raise UserError(f"--objective-ckpt {args.objective_ckpt} is not a vp, subvp or ve model")
        model = build_model(ckpt["model_config"])
        model.load_state_dict(ckpt["model"])
        return model.to(device).eval(), objective, "its checkpoint"
    objective = sde.Objective.from_config({"objective": "vp"})
    # Tiny, to train fast on a CPU, but trained: adaptive RK45's NFE depends on the field it integrates.
    model = UNet_conditional(c_in=1, c_out=1, num_classes=10, img_size=16, base_channels=16, time_dim=64)
    model = model.to(device)
    x, y = digits_batch(16, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator(device).manual_seed(0)
    for _ in range(args.objective_steps):
        pick = torch.randint(0, len(x), (64,), generator=gen, device=device)
        # Label dropout to the null class (10) trains the unconditional half that guidance needs.
        labels = torch.where(torch.rand(64, generator=gen, device=device) < 0.1, 10, y[pick])
        loss = objective.loss(model, x[pick], labels, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval(), objective, f"{args.objective_steps} steps on the digits"


def bench_objective_samplers(model, objective, n):
    """{sampler: (images/s, NFE)} of the continuous-time samplers with CFG 3 on one batch."""
    device = next(model.parameters()).device
    labels = torch.arange(n, device=device) % model.num_classes
    null = model.null_labels(n, device)
    shape = (n, model.c_in, model.img_size, model.img_size)
    results = {}
    for method, steps in OBJECTIVE_SAMPLERS:
        # The same CPU-seeded prior batch for every sampler and on every device, so only the sampler differs.
        gen = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        # rtol = atol = 1e-5 (used by rk45 only) are the tolerances of Song et al.'s score-SDE ODE sampler.
        _, nfe = sde_sampling.sample(
            model, objective, shape, steps, method, labels, null, 3.0, rtol=1e-5, atol=1e-5, generator=gen
        )
        sync()
        results[method] = (n / (time.perf_counter() - start), nfe)
    return results


def plain_attention(attn, x):
    """The same attention block with softmax(QK^T / sqrt(d)) V written out."""
    n, c, h, w = x.shape
    qkv = attn.qkv(attn.norm(x)).reshape(n, 3, attn.num_heads, c // attn.num_heads, h * w)
    q, k, v = qkv.transpose(-1, -2).unbind(1)  # (N, heads, HW, d)
    weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)  # (N, heads, HW, HW)
    return x + attn.proj((weights @ v).transpose(-1, -2).reshape(n, c, h, w))


@torch.no_grad()
def bench_attention(device, channels, side, batch, repeats):
    """Seconds per forward of SDPA and plain attention, and their largest difference."""
    attn = SelfAttention(channels).to(device).eval()
    x = torch.randn(batch, channels, side, side, device=device)
    # The difference shows both paths do the same work (float rounding only), so the timing is fair.
    diff = (attn(x) - plain_attention(attn, x)).abs().max().item()
    return timed(lambda: attn(x), repeats), timed(lambda: plain_attention(attn, x), repeats), diff


def main():
    parser = cli.Parser(description=__doc__)
    for name, default, help_text in (
        ("image_size", 16, "pixels (multiple of 8, >= 16)"),
        ("base_channels", 16, "UNet width (even)"),
        ("batch_size", 32, "training batch"),
        ("num_samples", 4, "sampling batch"),
        ("objective_steps", 300, "training steps of the vp model of the sampler comparison"),
    ):
        add_flag(parser, name, type=cli.positive_int, default=default, help=help_text)
    add_flag(parser, "objective_ckpt", help="a vp / subvp / ve checkpoint for the sampler comparison")
    args = parser.parse_args()
    device = pick_device()
    torch.manual_seed(0)
    size = args.image_size
    # The sinusoidal time embedding has base_channels dimensions, half sin and half cos: an odd width fails.
    if args.base_channels % 2:
        raise UserError(f"--base-channels must be even, got {args.base_channels}")
    try:
        model = UNet_conditional(
            c_in=1, c_out=1, num_classes=10, img_size=size, base_channels=args.base_channels
        )
    except ValueError as err:
        raise UserError(f"{err} (--image-size)") from None
    model = model.to(device)
    diffusion = Diffusion(img_size=size, device=device)
    print(
        f"DDPM benchmark on {device} ({torch.get_num_threads()} threads): UNet_conditional {size}x{size}x1, "
        f"width {args.base_channels}, {sum(p.numel() for p in model.parameters()):,} parameters"
    )
    train_ips = bench_training(model, diffusion, args.batch_size, size, device, repeats=5)
    print(f"training:             {train_ips:9.1f} images/s (batch {args.batch_size}, fp32)")
    ddpm_ips = bench_sampling(model, diffusion, args.num_samples, "ddpm", 1000)
    ddim_ips = bench_sampling(model, diffusion, args.num_samples, "ddim", 50)
    print(f"sampling DDPM-1000:   {ddpm_ips:9.3f} images/s (batch {args.num_samples}, CFG 3)")
    print(f"sampling DDIM-50:     {ddim_ips:9.3f} images/s (batch {args.num_samples}, CFG 3)")
    print(f"DDIM-50 / DDPM-1000:  {ddim_ips / ddpm_ips:9.1f}x faster")
    # A classifier of the UNet's width and ADM's default depth: one forward and backward more per step.
    classifier = EncoderClassifier(c_in=1, img_size=size, base_channels=args.base_channels, num_classes=10)
    guided_ips = bench_sampling(model, diffusion, args.num_samples, "ddim", 50, classifier.to(device).eval())
    print(f"DDIM-50 guided:       {guided_ips:9.3f} images/s (classifier guidance scale 1, and CFG 3)")
    print(f"guided / unguided:    {guided_ips / ddim_ips:9.2f}x")
    # 128 channels (4 heads of 32) over 16x16 = 256 tokens, a mid-resolution UNet level's attention.
    sdpa_s, plain_s, diff = bench_attention(device, channels=128, side=16, batch=16, repeats=20)
    print(f"attention SDPA:       {1000 * sdpa_s:9.2f} ms per forward (16 x 128 ch x 16x16 tokens)")
    print(f"attention plain:      {1000 * plain_s:9.2f} ms per forward (max difference {diff:.1e})")
    print(f"plain / SDPA:         {plain_s / sdpa_s:9.2f}x")
    model, objective, source = vp_model(args, device)
    print(
        f"continuous-time samplers on a {objective.name} model ({source}), batch {args.num_samples}, CFG 3:"
    )
    results = bench_objective_samplers(model, objective, args.num_samples)
    slowest = min(ips for ips, _ in results.values())
    for method, steps in OBJECTIVE_SAMPLERS:
        ips, nfe = results[method]
        name = f"{method.upper()}-{steps}" if steps else "RK45 (adaptive)"
        print(f"  {name:18s} {ips:9.3f} images/s, NFE {nfe:5d}, {ips / slowest:6.1f}x the slowest")


if __name__ == "__main__":
    run_cli(main)
