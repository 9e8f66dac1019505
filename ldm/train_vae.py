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

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from diffusers import AutoencoderKL
from diffusers.optimization import get_cosine_schedule_with_warmup
from torch.utils.data import DataLoader
from tqdm import tqdm

import dataset
from core import cli, files, images, training
from core.errors import UserError, run_cli
from models import load_vae, plain
from train import restore_rng, resume_path, save_on_main

# The shape of a VAE trained from scratch (ignored when fine-tuning): four levels downsample 8x, as in
# Stable Diffusion's autoencoder, at half its widths.
NEW_VAE = dict(
    block_out_channels=[64, 128, 256, 256], layers_per_block=2, latent_channels=4, norm_num_groups=32
)


def build_parser():
    parser = cli.Parser(description=__doc__, epilog=dataset.DATA_LAYOUT)
    add = parser.add_argument
    add("--data_root", required=True, help="folder of class sub-folders (layout below)")
    add("--output_dir", default="./vae_checkpoints", help="output folder")
    add("--image_size", type=cli.positive_int, default=256, help="training crop size")
    add("--vae_pretrained", help="fine-tune this VAE (hub id or folder); default: train a new one")
    # These four shape a new VAE only (defaults: NEW_VAE); a fine-tuned or resumed one keeps its own.
    add("--block_out_channels", type=cli.positive_int, nargs="+", help="encoder/decoder widths of a new VAE")
    add("--layers_per_block", type=cli.positive_int, help="ResNet layers per level of a new VAE")
    add("--latent_channels", type=cli.positive_int, help="latent channels of a new VAE")
    add("--norm_num_groups", type=cli.positive_int, help="GroupNorm groups of a new VAE")
    parser.set_defaults(**NEW_VAE)
    # 1e-6 is the KL weight of SD's KL-f8 autoencoder: a light pull on the latents; reconstruction dominates.
    add("--kl_weight", type=cli.nonnegative_float, default=1e-6, help="KL weight")
    add("--perceptual_weight", type=cli.nonnegative_float, default=0.0, help="VGG16 feature loss weight")
    add("--batch_size", type=cli.positive_int, default=8, help="images per process")
    add("--num_epochs", type=cli.positive_int, default=50, help="epochs")
    add("--learning_rate", "--lr", type=cli.positive_float, default=1e-4, help="AdamW peak rate")
    add("--lr_warmup_steps", type=cli.nonnegative_int, default=200, help="warm-up steps")
    add("--max_grad_norm", type=cli.positive_float, default=1.0, help="gradient clipping")
    add("--val_fraction", type=cli.fraction, default=0.1, help="held-out share")
    dataset.add_intensity_args(add)
    add("--mixed_precision", choices=cli.MIXED_PRECISION, default="no", help="autocast on CUDA; fp32 on CPU")
    add("--num_workers", type=cli.nonnegative_int, default=4, help="data loader workers per process")
    add("--seed", type=cli.nonnegative_int, default=0, help="random seed")
    add("--resume", nargs="?", const="latest", help="a checkpoint, or (no value) OUTPUT_DIR's latest one")
    return parser


def parse_args(argv=None):
    return dataset.check_intensity_args(build_parser().parse_args(argv))


def build_vae(args, resume):
    """The VAE to train: the resumed one's architecture, a pretrained one to fine-tune, or a fresh one."""
    # A resumed run rebuilds the architecture it saved (restore loads the weights); a VAE to fine-tune
    # arrives frozen from load_vae, the way train.py uses it, and is unfrozen here.
    if resume is not None and resume.get("vae_config"):
        return AutoencoderKL.from_config(resume["vae_config"])
    if args.vae_pretrained:
        return load_vae(args.vae_pretrained).train().requires_grad_(True)
    levels = len(args.block_out_channels)
    if any(width % args.norm_num_groups for width in args.block_out_channels):
        raise UserError(f"--block_out_channels must be multiples of --norm_num_groups {args.norm_num_groups}")
    # Three image channels, like the SD VAE: grayscale data is repeated (to_three), so train.py's
    # LatentCodec treats this VAE exactly like a downloaded one.
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
        # A sampled latent, not the mean: the decoder learns to take the draws train.py's sample_latent makes.
        posterior = self.vae.encode(images).latent_dist
        return self.vae.decode(posterior.sample()).sample, posterior.kl()  # (N, 3, H, W), (N,)


class PerceptualLoss(torch.nn.Module):
    """Mean squared distance of VGG16 features (up to relu3_3) on ImageNet-normalised images."""

    def __init__(self):
        super().__init__()
        from torchvision.models import VGG16_Weights, vgg16  # only when asked: it needs a download

        # The first 16 layers end at relu3_3: edges and textures, not ImageNet's class features.
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
        # [-1, 1] -> [0, 1] -> ImageNet statistics, the input VGG16 was trained on.
        return self.features(((images + 1) / 2 - self.mean) / self.std)

    def forward(self, x, y):
        return F.mse_loss(self._features(x), self._features(y))


def to_three(images):
    """Grayscale batches repeated to the VAE's three channels."""
    return images.repeat(1, 3 // images.shape[1], 1, 1)  # (N, 3, H, W)


def vae_loss(model, images, kl_weight, perceptual, perceptual_weight):
    """(total, reconstruction) loss: L1 + KL per pixel, as in SD's autoencoder, + optional perceptual."""
    reconstruction, kl = model(images)
    # SD's autoencoder weighs a per-image KL sum against a per-image L1 sum; here the L1 is a per-pixel
    # mean, so the KL (summed over latents) is divided by the pixels per image and --kl_weight keeps
    # SD's meaning. Losses in fp32: under autocast the decoder output is 16-bit.
    rec = F.l1_loss(reconstruction.float(), images.float())
    total = rec + kl_weight * kl.mean() / images[0].numel()
    if perceptual is not None:
        total = total + perceptual_weight * perceptual(reconstruction.float(), images.float())
    return total, rec


@torch.no_grad()
def validate(vae, loader, device):
    """Deterministic held-out L1 reconstruction through the posterior mean."""
    # Through the posterior mean rather than a sample: the figure depends on the weights alone, so the
    # best folder is chosen on them and not on the luck of a draw.
    vae = vae.eval()
    total, count = 0.0, 0
    for batch, _ in loader:
        batch = to_three(batch.to(device))
        reconstruction = vae.decode(vae.encode(batch).latent_dist.mean).sample
        # Sums of per-image means over the count: a short last batch weighs what its images weigh.
        total += F.l1_loss(reconstruction.float(), batch, reduction="sum").item() / batch[0].numel()
        count += batch.shape[0]
    vae.train()
    return total / max(count, 1)


@torch.no_grad()
def measure_scaling_factor(vae, loader, device, max_batches=32):
    """1 / std of the posterior-mean latents, the factor that makes them unit variance."""
    # Latent diffusion (Rombach et al.) scales latents to unit variance so that the noise schedule fits
    # them; a few batches estimate the std well enough.
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
    # The old folder is replaced only once the new one is complete; a staging folder left by a crash
    # is removed by the next run (clean_stale_files).
    shutil.rmtree(staging, ignore_errors=True)
    vae.save_pretrained(staging)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)


def clean_stale_files(output_dir):
    """Remove what a run killed while saving left behind: temporary files and staging folders."""
    files.clean_temporaries(output_dir)
    for name in ("best", "final"):
        shutil.rmtree(staging_folder(output_dir / name), ignore_errors=True)


def find_resume(args, output_dir):
    """The train_vae.py checkpoint to continue from, or None; refuses to overwrite another run."""
    path = resume_path(args, output_dir)
    if path is None:
        return None
    # Its own type check: an LDM checkpoint passed here would otherwise fail later, on a missing key.
    if not path.is_file():
        raise UserError(f"--resume: {path} not found")
    ckpt = files.load_weights_only(path, "--resume checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("model_type") != "vae":
        raise UserError(f"--resume {path} is not a train_vae.py checkpoint")
    return ckpt


def main():
    args = parse_args()
    accelerator = training.make_accelerator(args.mixed_precision)  # gloo on CPU, NCCL on CUDA
    output_dir = cli.ensure_writable_dir(args.output_dir, "--output_dir")
    if accelerator.is_main_process:
        clean_stale_files(output_dir)  # left by a run killed while saving
    resume = find_resume(args, output_dir)

    # Data: the same classes, scan and held-out split as train.py; a resumed run keeps its data rule.
    _, train_samples, val_samples, data = dataset.load_class_data(args, resume)
    channels = resume.get("channels", data["channels"]) if resume else data["channels"]
    data = {"intensity": data["intensity"], "channels": channels}
    train_set, val_loader = datasets(args, train_samples, val_samples, data)

    # Model: the VAE (identical on every process) inside the module DDP wraps, and the perceptual net.
    set_seed(args.seed)
    vae = build_vae(args, resume)
    perceptual = PerceptualLoss().to(accelerator.device) if args.perceptual_weight > 0 else None
    if accelerator.is_main_process:
        describe(args, accelerator, vae, (train_samples, val_samples), data)

    # Optimisation: AdamW on a cosine schedule over all epochs.
    optimizer, lr_scheduler = optimization(args, vae, train_set, accelerator)
    model, optimizer = accelerator.prepare(Reconstruction(vae), optimizer)
    vae = accelerator.unwrap_model(model).vae  # the bare VAE, for validation and saving
    set_seed(args.seed + accelerator.process_index)  # different latent samples per process
    # epoch counts finished epochs (where a resume starts); best is the lowest held-out L1 so far.
    progress = {"epoch": 0, "best": float("inf")}
    if resume is not None:
        progress = restore(resume, vae, optimizer, lr_scheduler, accelerator)
    run = Run(accelerator, model, vae, optimizer, lr_scheduler, perceptual, output_dir, data, args, progress)

    # The loop: an epoch at a time; checkpoint_latest.pt is written at every epoch's end.
    stop = training.StopSignal("checkpoint_latest.pt")
    for epoch in range(progress["epoch"], args.num_epochs):
        signum = train_epoch(run, train_set, epoch, stop)
        if signum:  # an interrupted epoch restarts from its beginning on --resume
            sys.exit(128 + signum)
        end_of_epoch(run, epoch + 1, val_loader)
    if accelerator.is_main_process:
        # final is written by the main process alone; the barrier below holds the others until it is saved.
        finalise(vae, args, output_dir / "final", val_loader)
        print(f"done: use --vae_pretrained {output_dir / 'best'} with train.py")
    accelerator.wait_for_everyone()
    accelerator.end_training()


def describe(args, accelerator, vae, splits, data):
    """The parameter table and one line of what this run trains on (main process)."""
    print(training.parameter_table({"vae": vae}), flush=True)
    print(
        f"images: {len(splits[0])} train / {len(splits[1])} val, {data['channels']} channel(s), "
        f"{images.describe(data['intensity'])}, {args.image_size}px, device {accelerator.device}, "
        f"processes {accelerator.num_processes}",
        flush=True,
    )


def datasets(args, train_samples, val_samples, data):
    """The training set and a loader of the held-out images."""
    train_set = dataset.ClassImageDataset(train_samples, args.image_size, data["channels"], data["intensity"])
    # Without held-out images the training set stands in, for the best folder and the scaling factor.
    val_set = dataset.ClassImageDataset(
        val_samples or train_samples, args.image_size, data["channels"], data["intensity"]
    )
    return train_set, DataLoader(val_set, batch_size=args.batch_size)


def optimization(args, vae, train_set, accelerator):
    """AdamW (torch's default weight decay) and its cosine schedule with warm-up, in steps."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.learning_rate)
    # No accumulation in this script: each batch is one optimizer step of the schedule.
    steps_per_epoch = len(dataset.epoch_loader(train_set, args, 0, accelerator))
    lr_scheduler = get_cosine_schedule_with_warmup(
        optimizer, args.lr_warmup_steps, steps_per_epoch * args.num_epochs
    )
    return optimizer, lr_scheduler


@dataclass
class Run:
    """What one VAE run holds, passed to the loop's steps; progress is saved with every checkpoint."""

    accelerator: object
    model: Reconstruction  # prepared (DDP-wrapped when several processes run)
    vae: AutoencoderKL  # the bare VAE inside it
    optimizer: object
    lr_scheduler: object
    perceptual: object  # PerceptualLoss, or None without --perceptual_weight
    output_dir: Path
    data: dict  # the data rule and channel count, stored in checkpoints
    args: object
    progress: dict


def train_epoch(run, train_set, epoch, stop):
    """One epoch of VAE updates; returns a signal number when asked to stop."""
    accelerator, args, optimizer = run.accelerator, run.args, run.optimizer
    loader = dataset.epoch_loader(train_set, args, epoch, accelerator)
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.num_epochs}", disable=not accelerator.is_main_process)
    # Each process draws its own posterior samples (seeded per rank in main); DDP averages the gradients.
    for batch, _ in bar:
        batch = to_three(batch.to(accelerator.device))
        with accelerator.autocast():
            loss, rec = vae_loss(run.model, batch, args.kl_weight, run.perceptual, args.perceptual_weight)
        # Checked on every process together: one rank stopping alone would leave the others waiting.
        if not torch.isfinite(accelerator.gather(loss.detach().reshape(1))).all():
            raise training.TrainingHalted(
                f"VAE loss became non-finite in epoch {epoch + 1}; lower --learning_rate"
            )
        # One optimizer step per batch; accelerate unscales fp16 gradients before the clipping.
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(run.model.parameters(), args.max_grad_norm)
        optimizer.step()
        run.lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(l1=f"{rec.item():.4f}")
        signum = stop.agreed(accelerator)  # the same answer on every process: all stop together
        if signum:
            return signum
    return 0


def end_of_epoch(run, epochs_done, val_loader):
    """Validate, save the best folder when it improved, then the resume state."""
    accelerator, progress = run.accelerator, run.progress
    # Each process validates the whole held-out set (not a shard), so all agree on best without a reduce.
    val = validate(run.vae, val_loader, accelerator.device)
    progress.update(epoch=epochs_done, best=min(progress["best"], val))
    if accelerator.is_main_process:
        print(f"epoch {epochs_done}: held-out L1 {val:.5f} (best {progress['best']:.5f})", flush=True)
        # best was just updated with val: equal means this epoch is the new (or a tied) best.
        if val <= progress["best"]:
            finalise(run.vae, run.args, run.output_dir / "best", val_loader)
    # latest last: a run killed before it resumes from the previous epoch and writes best again
    save_on_main(
        accelerator, lambda rng: checkpoint_state(run, rng), [run.output_dir / "checkpoint_latest.pt"]
    )


def finalise(vae, args, folder, loader):
    """Save a usable VAE folder; a VAE trained from scratch gets its measured scaling factor."""
    # A fine-tuned VAE keeps the scaling factor it came with; a new one has none worth keeping.
    if not args.vae_pretrained:
        factor = measure_scaling_factor(vae, loader, next(vae.parameters()).device)
        vae.register_to_config(scaling_factor=factor)
    save_folder(vae, folder)


def checkpoint_state(run, rng):
    """The resume state at an epoch boundary, with the data rule."""
    # The data rule and channel count travel along, so a resumed run decodes the images as before.
    return {
        "model_type": "vae",
        "vae_config": plain(run.vae.config),
        "vae": run.vae.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "lr_scheduler": run.lr_scheduler.state_dict(),
        "progress": dict(run.progress),
        "rng": rng,
        **run.data,
    }


def restore(ckpt, vae, optimizer, lr_scheduler, accelerator):
    """Load what checkpoint_state wrote; returns the progress counters."""
    # Checkpoints without a vae_config got their VAE from the flags, which may have changed since.
    try:
        vae.load_state_dict(ckpt["vae"])
    except RuntimeError:
        raise UserError(
            "--resume checkpoint does not fit the VAE built from the flags: "
            "resume with the flags it was trained with"
        ) from None
    # AdamW's moments and the schedule's position continue where the run stopped.
    optimizer.load_state_dict(ckpt["optimizer"])
    lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
    restore_rng(ckpt, accelerator)
    return dict(ckpt["progress"])


if __name__ == "__main__":
    run_cli(main)
