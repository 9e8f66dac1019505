"""Train or fine-tune a diffusers AutoencoderKL on your own images, for domains the SD VAE does not fit.

Loss: L1 reconstruction + KL (weighted as in Stable Diffusion's autoencoder), plus an optional VGG16
perceptual term when its torchvision weights are available offline. Grayscale data is repeated to
the VAE's three channels, exactly as train.py does. Results are save_pretrained folders:
  OUTPUT_DIR/best   (lowest held-out reconstruction loss)  ->  train.py --vae_pretrained OUTPUT_DIR/best
  OUTPUT_DIR/final  (last epoch)
and OUTPUT_DIR/checkpoint_latest.pt to --resume. A VAE trained from scratch gets its scaling_factor
measured on the data (1 / std of the latents), so the LDM sees unit-variance latents.

Several processes: accelerate launch --num_processes N train_vae.py ... or torchrun --nproc_per_node N.
"""

import math
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from diffusers import AutoencoderKL
from diffusers.optimization import get_cosine_schedule_with_warmup
from torch.utils.data import DataLoader
from tqdm import tqdm

from core import checkpoints, cli, files, images, training
from core.errors import UserError, run_cli
from dataset import (
    DATA_LAYOUT,
    ClassImageDataset,
    add_intensity_args,
    check_intensity_args,
    data_rule,
    find_class_images,
    split_holdout,
)
from models import load_vae, plain
from train import epoch_order


def build_parser():
    parser = cli.Parser(description=__doc__, epilog=DATA_LAYOUT)
    parser.add_argument("--data_root", required=True, help="folder of class sub-folders (layout below)")
    parser.add_argument(
        "--output_dir", default="./vae_checkpoints", help="output folder (default: %(default)s)"
    )
    parser.add_argument(
        "--image_size", type=cli.positive_int, default=256, help="training crop size (default: %(default)s)"
    )
    parser.add_argument(
        "--vae_pretrained",
        default=None,
        help="fine-tune this VAE (hub id or folder); default: train from scratch",
    )
    parser.add_argument(
        "--block_out_channels",
        type=cli.positive_int,
        nargs="+",
        default=[64, 128, 256, 256],
        help="encoder/decoder widths when training from scratch (default: %(default)s)",
    )
    for name, default in (("layers_per_block", 2), ("latent_channels", 4), ("norm_num_groups", 32)):
        parser.add_argument(
            f"--{name}", type=cli.positive_int, default=default, help="from scratch (default: %(default)s)"
        )
    parser.add_argument(
        "--kl_weight", type=cli.nonnegative_float, default=1e-6, help="KL weight (default: %(default)s)"
    )
    parser.add_argument(
        "--perceptual_weight",
        type=cli.nonnegative_float,
        default=0.0,
        help="VGG16 feature loss weight; needs torchvision's VGG16 weights (default: %(default)s)",
    )
    parser.add_argument(
        "--batch_size", type=cli.positive_int, default=8, help="images per process (default: %(default)s)"
    )
    parser.add_argument(
        "--num_epochs", type=cli.positive_int, default=50, help="epochs (default: %(default)s)"
    )
    parser.add_argument(
        "--learning_rate",
        "--lr",
        type=cli.positive_float,
        default=1e-4,
        help="AdamW peak rate (default: %(default)s)",
    )
    parser.add_argument(
        "--lr_warmup_steps",
        type=cli.nonnegative_int,
        default=200,
        help="warm-up steps (default: %(default)s)",
    )
    parser.add_argument(
        "--max_grad_norm",
        type=cli.positive_float,
        default=1.0,
        help="gradient clipping (default: %(default)s)",
    )
    parser.add_argument(
        "--val_fraction", type=cli.fraction, default=0.1, help="held-out share (default: %(default)s)"
    )
    add_intensity_args(parser)
    parser.add_argument(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        default="no",
        help="autocast on CUDA; fp32 on CPU (default: %(default)s)",
    )
    parser.add_argument(
        "--num_workers", type=cli.nonnegative_int, default=4, help="loader workers (default: %(default)s)"
    )
    parser.add_argument(
        "--seed", type=cli.nonnegative_int, default=0, help="random seed (default: %(default)s)"
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="continue from a checkpoint path, or (no value / 'latest') OUTPUT_DIR/checkpoint_latest.pt",
    )
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_intensity_args(args)
    return args


def build_vae(args, resume):
    """The VAE to train: the resumed one's architecture, a pretrained one to fine-tune, or a fresh one."""
    if resume is not None and resume.get("vae_config"):
        return AutoencoderKL.from_config(resume["vae_config"])
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


class Reconstruction(torch.nn.Module):
    """encode -> sample -> decode as one forward: DDP synchronises gradients only of what runs through
    its wrapper's forward, so the training step must not call vae.encode / vae.decode directly."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, images):
        posterior = self.vae.encode(images).latent_dist
        return self.vae.decode(posterior.sample()).sample, posterior.kl()  # (N, 3, H, W), (N,)


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


def vae_loss(model, images, kl_weight, perceptual, perceptual_weight):
    """(total, reconstruction) loss: L1 + KL per pixel, as in SD's autoencoder, + optional perceptual."""
    reconstruction, kl = model(images)
    rec = F.l1_loss(reconstruction.float(), images.float())
    total = rec + kl_weight * kl.mean() / images[0].numel()
    if perceptual is not None:
        total = total + perceptual_weight * perceptual(reconstruction.float(), images.float())
    return total, rec


@torch.no_grad()
def validate(vae, loader, device):
    """Deterministic held-out L1 reconstruction through the posterior mean."""
    vae = vae.eval()
    total, count = 0.0, 0
    for batch, _ in loader:
        batch = to_three(batch.to(device))
        reconstruction = vae.decode(vae.encode(batch).latent_dist.mean).sample
        total += F.l1_loss(reconstruction.float(), batch, reduction="sum").item() / batch[0].numel()
        count += batch.shape[0]
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


def staging_folder(folder):
    """Where save_folder writes before swapping the result in."""
    return folder.with_name(f".{folder.name}.tmp")


def save_folder(vae, folder):
    """save_pretrained into a fresh folder, swapped in so a crash never leaves half a VAE."""
    folder = Path(folder)
    staging = staging_folder(folder)
    shutil.rmtree(staging, ignore_errors=True)
    vae.save_pretrained(staging)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)


def clean_stale_files(output_dir):
    """Remove what a run killed while saving left behind: temporary files and staging folders."""
    files.clean_temporaries(output_dir)
    for name in ("best", "final"):
        shutil.rmtree(staging_folder(output_dir / name), ignore_errors=True)


def load_resume(args, latest):
    """The checkpoint to continue from; refuses anything but a train_vae.py checkpoint of plain tensors."""
    path = latest if args.resume == "latest" else Path(args.resume)
    if not path.is_file():
        raise UserError(f"--resume: {path} not found")
    ckpt = files.load_weights_only(path, "--resume checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("model_type") != "vae":
        raise UserError(f"--resume {path} is not a train_vae.py checkpoint")
    return ckpt


def main():
    args = parse_args()
    accelerator = training.make_accelerator(args.mixed_precision)
    output_dir = cli.ensure_writable_dir(args.output_dir, "--output_dir")
    if accelerator.is_main_process:
        clean_stale_files(output_dir)
    latest = output_dir / "checkpoint_latest.pt"
    if latest.exists() and args.resume is None:
        raise UserError(
            f"--output_dir {output_dir} already holds a VAE run; pass --resume or choose another folder"
        )
    resume = load_resume(args, latest) if args.resume else None
    _, samples = find_class_images(args.data_root)
    data = data_rule([path for path, _ in samples], args, resume and resume.get("intensity"))
    channels = resume.get("channels", data["channels"]) if resume else data["channels"]
    intensity = data["intensity"]
    train_samples, val_samples = split_holdout(samples, args.val_fraction, args.seed)
    set_seed(args.seed)
    vae = build_vae(args, resume)
    perceptual = PerceptualLoss().to(accelerator.device) if args.perceptual_weight > 0 else None
    if accelerator.is_main_process:
        print(training.parameter_table({"vae": vae}), flush=True)
        print(
            f"images: {len(train_samples)} train / {len(val_samples)} val, {channels} channel(s), "
            f"{images.describe(intensity)}, {args.image_size}px, device {accelerator.device}, "
            f"processes {accelerator.num_processes}",
            flush=True,
        )

    train_set = ClassImageDataset(train_samples, args.image_size, channels, intensity)
    val_loader = DataLoader(
        ClassImageDataset(val_samples or train_samples, args.image_size, channels, intensity),
        batch_size=args.batch_size,
    )
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.learning_rate)
    steps_per_epoch = math.ceil(len(epoch_order(len(train_set), 0, args.seed, accelerator)) / args.batch_size)
    lr_scheduler = get_cosine_schedule_with_warmup(
        optimizer, args.lr_warmup_steps, steps_per_epoch * args.num_epochs
    )
    model, optimizer = accelerator.prepare(Reconstruction(vae), optimizer)
    vae = accelerator.unwrap_model(model).vae  # the bare VAE, for validation and saving
    set_seed(args.seed + accelerator.process_index)
    state = {"epoch": 0, "best": float("inf")}
    if resume is not None:
        state = restore(resume, vae, optimizer, lr_scheduler, accelerator)
    stop = training.StopSignal("checkpoint_latest.pt")
    for epoch in range(state["epoch"], args.num_epochs):
        signum = train_epoch(
            args, accelerator, model, optimizer, lr_scheduler, train_set, perceptual, epoch, stop
        )
        if signum:  # an interrupted epoch restarts from its beginning on --resume
            sys.exit(128 + signum)
        val = validate(vae, val_loader, accelerator.device)
        state = {"epoch": epoch + 1, "best": min(state["best"], val)}
        if accelerator.is_main_process:
            print(f"epoch {epoch + 1}: held-out L1 {val:.5f} (best {state['best']:.5f})", flush=True)
            if val <= state["best"]:
                finalise(vae, args, output_dir / "best", val_loader)
        # latest last: a run killed before it resumes from the previous epoch and writes best again
        save_state(
            latest,
            accelerator,
            vae,
            optimizer,
            lr_scheduler,
            state,
            {"intensity": intensity, "channels": channels},
        )
    if accelerator.is_main_process:
        finalise(vae, args, output_dir / "final", val_loader)
        print(f"done: use --vae_pretrained {output_dir / 'best'} with train.py")
    accelerator.wait_for_everyone()


def train_epoch(args, accelerator, model, optimizer, lr_scheduler, train_set, perceptual, epoch, stop):
    """One epoch of VAE updates; returns a signal number when asked to stop."""
    order = epoch_order(len(train_set), epoch, args.seed, accelerator)
    loader = DataLoader(
        train_set,
        batch_size=args.batch_size,
        sampler=order,
        num_workers=args.num_workers,
        generator=torch.Generator().manual_seed(args.seed + epoch),
        worker_init_fn=training.ignore_sigint,
    )
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.num_epochs}", disable=not accelerator.is_main_process)
    for batch, _ in bar:
        batch = to_three(batch.to(accelerator.device))
        with accelerator.autocast():
            loss, rec = vae_loss(model, batch, args.kl_weight, perceptual, args.perceptual_weight)
        if not torch.isfinite(accelerator.gather(loss.detach().reshape(1))).all():
            raise training.TrainingHalted(
                f"VAE loss became non-finite in epoch {epoch + 1}; lower --learning_rate"
            )
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
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


def save_state(path, accelerator, vae, optimizer, lr_scheduler, state, data):
    """Resume state at an epoch boundary, with the data rule (collective: every process calls it)."""
    rng = training.rng_states(accelerator)  # one entry per process
    if accelerator.is_main_process:
        checkpoint = {
            "model_type": "vae",
            "vae_config": plain(vae.config),
            "vae": vae.state_dict(),
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
            "progress": state,
            "rng": rng,
            **data,
        }
        files.atomic_save(checkpoint, path)
    accelerator.wait_for_everyone()


def restore(ckpt, vae, optimizer, lr_scheduler, accelerator):
    """Load what save_state wrote; returns the progress counters."""
    try:
        vae.load_state_dict(ckpt["vae"])
    except RuntimeError:
        raise UserError(
            "--resume checkpoint does not fit the VAE built from the flags: "
            "resume with the flags it was trained with"
        ) from None
    optimizer.load_state_dict(ckpt["optimizer"])
    lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
    if len(ckpt["rng"]) == accelerator.num_processes:
        checkpoints.set_rng_state(ckpt["rng"][accelerator.process_index])
    return dict(ckpt["progress"])


if __name__ == "__main__":
    run_cli(main)
