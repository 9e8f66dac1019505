"""Train or fine-tune a diffusers AutoencoderKL on your own images, for domains the SD VAE does not fit.

Loss: L1 reconstruction + KL (weighted as in Stable Diffusion's autoencoder), plus an optional VGG16
perceptual term when its torchvision weights are available offline. Grayscale data is repeated to
the VAE's three channels, exactly as train.py does. Results are save_pretrained folders:
  OUTPUT_DIR/best   (lowest held-out reconstruction loss)  ->  train.py --vae_pretrained OUTPUT_DIR/best
  OUTPUT_DIR/final  (last epoch)
and OUTPUT_DIR/checkpoint_latest.pt to --resume. A VAE trained from scratch gets its scaling_factor
measured on the data (1 / std of the latents), so the LDM sees unit-variance latents.
"""

import math
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import gather_object, set_seed  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402
from diffusers.optimization import get_cosine_schedule_with_warmup  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dataset import DATA_LAYOUT, ClassImageDataset, detect_channels, find_class_images, split_holdout  # noqa: E402
from models import load_vae  # noqa: E402
from train import (
    StopSignal,
    epoch_order,
    ignore_interrupts,
    resolve_mixed_precision,
    rng_state,
    set_rng_state,
)  # noqa: E402
from utils import Parser, TrainingHalted, UserError, atomic_save, print_parameter_table, run_main  # noqa: E402


def parse_args(argv=None):
    parser = Parser(description=__doc__, epilog=DATA_LAYOUT)
    parser.add_argument("--data_root", required=True, help="folder of class sub-folders (layout below)")
    parser.add_argument(
        "--output_dir", default="./vae_checkpoints", help="output folder (default: %(default)s)"
    )
    parser.add_argument(
        "--image_size", type=int, default=256, help="training crop size (default: %(default)s)"
    )
    parser.add_argument(
        "--vae_pretrained",
        default=None,
        help="fine-tune this VAE (hub id or folder); default: train from scratch",
    )
    parser.add_argument(
        "--block_out_channels",
        type=int,
        nargs="+",
        default=[64, 128, 256, 256],
        help="encoder/decoder widths when training from scratch (default: %(default)s)",
    )
    parser.add_argument("--layers_per_block", type=int, default=2, help="from scratch (default: %(default)s)")
    parser.add_argument("--latent_channels", type=int, default=4, help="from scratch (default: %(default)s)")
    parser.add_argument("--norm_num_groups", type=int, default=32, help="from scratch (default: %(default)s)")
    parser.add_argument("--kl_weight", type=float, default=1e-6, help="KL weight (default: %(default)s)")
    parser.add_argument(
        "--perceptual_weight",
        type=float,
        default=0.0,
        help="VGG16 feature loss weight; needs torchvision's VGG16 weights (default: %(default)s)",
    )
    parser.add_argument("--batch_size", type=int, default=8, help="images per process (default: %(default)s)")
    parser.add_argument("--num_epochs", type=int, default=50, help="epochs (default: %(default)s)")
    parser.add_argument(
        "--learning_rate", type=float, default=1e-4, help="AdamW peak rate (default: %(default)s)"
    )
    parser.add_argument(
        "--lr_warmup_steps", type=int, default=200, help="warm-up steps (default: %(default)s)"
    )
    parser.add_argument(
        "--max_grad_norm", type=float, default=1.0, help="gradient clipping (default: %(default)s)"
    )
    parser.add_argument(
        "--val_fraction", type=float, default=0.1, help="held-out share (default: %(default)s)"
    )
    parser.add_argument(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        default="no",
        help="autocast on CUDA; fp32 on CPU (default: %(default)s)",
    )
    parser.add_argument("--num_workers", type=int, default=4, help="loader workers (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint_latest.pt")
    args = parser.parse_args(argv)
    for name in ("image_size", "batch_size", "num_epochs"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1 (got {getattr(args, name)})")
    return args


def build_vae(args):
    """The VAE to train: a pretrained one to fine-tune, or a fresh 3-channel AutoencoderKL."""
    if args.vae_pretrained:
        return load_vae(args.vae_pretrained).train().requires_grad_(True)
    levels = len(args.block_out_channels)
    if any(width % args.norm_num_groups for width in args.block_out_channels):
        raise UserError(f"--block_out_channels must be multiples of --norm_num_groups {args.norm_num_groups}")
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=args.latent_channels,
        block_out_channels=tuple(args.block_out_channels),
        layers_per_block=args.layers_per_block,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        norm_num_groups=args.norm_num_groups,
        sample_size=args.image_size,
    )


class PerceptualLoss(torch.nn.Module):
    """Mean squared distance of VGG16 features (up to relu3_3) on ImageNet-normalised images."""

    def __init__(self):
        super().__init__()
        from torchvision.models import VGG16_Weights, vgg16

        try:
            self.features = (
                vgg16(weights=VGG16_Weights.IMAGENET1K_V1).features[:16].eval().requires_grad_(False)
            )
        except Exception as error:  # offline machines cannot fetch the weights
            raise UserError(
                f"--perceptual_weight needs torchvision's VGG16 weights, which could not be loaded "
                f"({type(error).__name__}); put them in the torch hub cache or use 0"
            ) from None
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def _features(self, images):
        return self.features(((images + 1) / 2 - self.mean) / self.std)

    def forward(self, x, y):
        return F.mse_loss(self._features(x), self._features(y))


def to_three(images):
    """Grayscale batches repeated to the VAE's three channels."""
    return images.repeat(1, 3 // images.shape[1], 1, 1)  # (N, 3, H, W)


def vae_loss(vae, images, kl_weight, perceptual, perceptual_weight):
    """(total, reconstruction) loss: L1 + KL per pixel, as in SD's autoencoder, + optional perceptual."""
    posterior = vae.encode(images).latent_dist
    reconstruction = vae.decode(posterior.sample()).sample
    rec = F.l1_loss(reconstruction.float(), images.float())
    kl = posterior.kl().mean() / images[0].numel()
    total = rec + kl_weight * kl
    if perceptual is not None:
        total = total + perceptual_weight * perceptual(reconstruction.float(), images.float())
    return total, rec


@torch.no_grad()
def validate(vae, loader, device):
    """Deterministic held-out L1 reconstruction through the posterior mean."""
    vae = vae.eval()
    total, count = 0.0, 0
    for images, _ in loader:
        images = to_three(images.to(device))
        reconstruction = vae.decode(vae.encode(images).latent_dist.mean).sample
        total += F.l1_loss(reconstruction.float(), images, reduction="sum").item() / images[0].numel()
        count += images.shape[0]
    vae.train()
    return total / max(count, 1)


@torch.no_grad()
def measure_scaling_factor(vae, loader, device, max_batches=32):
    """1 / std of the posterior-mean latents, the factor that makes them unit variance."""
    latents = [
        vae.encode(to_three(images.to(device))).latent_dist.mean.float().cpu()
        for _, (images, _) in zip(range(max_batches), loader, strict=False)
    ]
    return float(1.0 / torch.cat(latents).std().clamp_min(1e-6))


def save_folder(vae, folder):
    """save_pretrained into a fresh folder, swapped in so a crash never leaves half a VAE."""
    folder = Path(folder)
    staging = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    vae.save_pretrained(staging)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)


def main():
    args = parse_args()
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(args.mixed_precision), cpu=not torch.cuda.is_available()
    )
    output_dir = Path(args.output_dir)
    latest = output_dir / "checkpoint_latest.pt"
    if latest.exists() and not args.resume:
        raise UserError(
            f"--output_dir {output_dir} already holds a VAE run; pass --resume or choose another folder"
        )
    if args.resume and not latest.exists():
        raise UserError(f"--resume: {latest} not found")
    _, samples = find_class_images(args.data_root)
    channels = detect_channels([path for path, _ in samples])
    train_samples, val_samples = split_holdout(samples, args.val_fraction, args.seed)
    set_seed(args.seed)
    vae = build_vae(args)
    perceptual = PerceptualLoss().to(accelerator.device) if args.perceptual_weight > 0 else None
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        print_parameter_table({"vae": vae})
        print(
            f"images: {len(train_samples)} train / {len(val_samples)} val, {channels} channel(s), "
            f"{args.image_size}px, device {accelerator.device}",
            flush=True,
        )

    train_set = ClassImageDataset(train_samples, args.image_size, channels)
    val_loader = DataLoader(
        ClassImageDataset(val_samples or train_samples, args.image_size, channels), batch_size=args.batch_size
    )
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.learning_rate)
    steps_per_epoch = math.ceil(len(epoch_order(len(train_set), 0, args.seed, accelerator)) / args.batch_size)
    lr_scheduler = get_cosine_schedule_with_warmup(
        optimizer, args.lr_warmup_steps, steps_per_epoch * args.num_epochs
    )
    vae, optimizer = accelerator.prepare(vae, optimizer)
    set_seed(args.seed + accelerator.process_index)
    state = {"epoch": 0, "best": float("inf")}
    if args.resume:
        state = restore(latest, accelerator, vae, optimizer, lr_scheduler)
    stop = StopSignal()
    for epoch in range(state["epoch"], args.num_epochs):
        signum = train_epoch(
            args, accelerator, vae, optimizer, lr_scheduler, train_set, perceptual, epoch, stop
        )
        if signum:  # an interrupted epoch restarts from its beginning on --resume
            sys.exit(128 + signum)
        val = validate(accelerator.unwrap_model(vae), val_loader, accelerator.device)
        state = {"epoch": epoch + 1, "best": min(state["best"], val)}
        if accelerator.is_main_process:
            print(f"epoch {epoch + 1}: held-out L1 {val:.5f} (best {state['best']:.5f})", flush=True)
            if val <= state["best"]:
                finalise(accelerator.unwrap_model(vae), args, output_dir / "best", val_loader)
        save_state(latest, accelerator, vae, optimizer, lr_scheduler, state)
    if accelerator.is_main_process:
        finalise(accelerator.unwrap_model(vae), args, output_dir / "final", val_loader)
        print(f"done: use --vae_pretrained {output_dir / 'best'} with train.py")
    accelerator.wait_for_everyone()


def train_epoch(args, accelerator, vae, optimizer, lr_scheduler, train_set, perceptual, epoch, stop):
    """One epoch of VAE updates; returns a signal number when asked to stop."""
    order = epoch_order(len(train_set), epoch, args.seed, accelerator)
    loader = DataLoader(
        train_set,
        batch_size=args.batch_size,
        sampler=order,
        num_workers=args.num_workers,
        generator=torch.Generator().manual_seed(args.seed + epoch),
        worker_init_fn=ignore_interrupts,
    )
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.num_epochs}", disable=not accelerator.is_main_process)
    for images, _ in bar:
        images = to_three(images.to(accelerator.device))
        with accelerator.autocast():
            loss, rec = vae_loss(vae, images, args.kl_weight, perceptual, args.perceptual_weight)
        if not torch.isfinite(accelerator.gather(loss.detach().reshape(1))).all():
            raise TrainingHalted(f"VAE loss became non-finite in epoch {epoch + 1}; lower --learning_rate")
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(vae.parameters(), args.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(l1=f"{rec.item():.4f}")
        signum = stop.agreed(accelerator)
        if signum:
            return signum
    return 0


def finalise(vae, args, folder, loader):
    """Save a usable VAE folder; a VAE trained from scratch gets its measured scaling factor."""
    if not args.vae_pretrained:
        factor = measure_scaling_factor(vae, loader, next(vae.parameters()).device)
        vae.register_to_config(scaling_factor=factor)
    save_folder(vae, folder)


def save_state(path, accelerator, vae, optimizer, lr_scheduler, state):
    """Resume state at an epoch boundary (collective: every process calls it)."""
    rng = gather_object([rng_state()]) if accelerator.num_processes > 1 else [rng_state()]
    if accelerator.is_main_process:
        atomic_save(
            {
                "model_type": "vae",
                "vae": accelerator.unwrap_model(vae).state_dict(),
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict(),
                "progress": state,
                "rng": rng,
            },
            path,
        )
    accelerator.wait_for_everyone()


def restore(path, accelerator, vae, optimizer, lr_scheduler):
    """Load what save_state wrote; returns the progress counters."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("model_type") != "vae":
        raise UserError(f"{path} is not a train_vae.py checkpoint")
    accelerator.unwrap_model(vae).load_state_dict(ckpt["vae"])
    optimizer.load_state_dict(ckpt["optimizer"])
    lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
    if len(ckpt["rng"]) == accelerator.num_processes:
        set_rng_state(ckpt["rng"][accelerator.process_index])
    return dict(ckpt["progress"])


if __name__ == "__main__":
    run_main(main)
