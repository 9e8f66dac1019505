"""Train a time-conditioned classifier of noisy LDM latents, for classifier guidance (ADM) of that LDM.

The latents are the LDM's own: images of --data_root encoded by its VAE, noised by its training schedule,
at its latent shape, for its classes (--ldm_checkpoint supplies all of these and the data's decoding
rule). The network is the UNet's encoder with ADM's attention pooling (core/guidance.py). Training runs
on train.py's loop: one process or many (accelerate launch / torchrun), EMA, resume, signals, and the
files checkpoint_best.pt (lowest held-out cross-entropy), checkpoint_epoch_<E>.pt, checkpoint_final.pt
and checkpoint_latest.pt. TensorBoard gets the held-out accuracy at fixed noise levels.

Single process:   python train_classifier.py --data_root DATA --ldm_checkpoint ckpts/checkpoint_best.pt
Several GPUs:     accelerate launch --multi_gpu train_classifier.py --data_root DATA --ldm_checkpoint ...
Guided sampling:  python inference.py --checkpoint ckpts/checkpoint_best.pt
                      --classifier ldm_classifier/checkpoint_best.pt --classifier_scale 3
"""

import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from diffusers import DDPMScheduler
from torch.utils.data import TensorDataset
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from core import cli, files, guidance, training
from core.errors import UserError, run_cli
from dataset import DATA_LAYOUT, ClassImageDataset, epoch_loader, find_class_images, load_class_data
from models import (
    CLASSIFIER_TYPE,
    EMA,
    FORMAT_VERSION,
    LatentCodec,
    check_classifier_fits,
    intensity_of,
    ldm_facts,
    load_checkpoint,
    load_classifier_checkpoint,
    load_vae,
    noise_for,
    plain,
)
from train import (
    add_checkpoint_flags,
    add_optimisation_flags,
    check_finite,
    encode_moments,
    log_step,
    optimization,
    optimizer_step,
    prune_periodic,
    restore_rng,
    resume_path,
    save_on_main,
    training_latents,
)

# Held-out accuracy is reported at these fractions of the schedule: t = 0 (clean) to T - 1 (pure noise).
EVAL_FRACTIONS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
# The flags that fix the network: a resumed run takes them from its checkpoint.
NETWORK_KEYS = ("base_channels", "time_dim", "depth", "channel_mult", "attn_resolutions")


def build_parser():
    parser = cli.Parser(description=__doc__, epilog=DATA_LAYOUT)
    add = parser.add_argument_group("data").add_argument
    add(
        "--data_root", required=True, help="folder of class sub-folders with the LDM's classes (layout below)"
    )
    add("--ldm_checkpoint", required=True, help="the LDM to guide: its VAE, schedule, latent shape, classes")
    add("--output_dir", default="./ldm_classifier", help="checkpoints and logs")
    add(
        "--vae_pretrained", help="another copy of the LDM's VAE (hub id or folder); default: the recorded one"
    )
    add("--val_fraction", type=cli.fraction, default=0.1, help="held-out share per class (checkpoint_best)")
    add("--no_flip", action="store_true", help="disable random horizontal flips")
    add("--cache_latents", action="store_true", help="encode the data once (both flips); no VAE in the loop")
    add("--num_workers", type=cli.nonnegative_int, default=4, help="data loader workers per process")

    # ADM's classifier is this encoder at the UNet's width; narrower ones train faster and guide well.
    add = parser.add_argument_group("model").add_argument
    add("--base_channels", type=cli.positive_int, default=64, help="width of the first encoder level")
    add("--channel_mult", type=cli.positive_int, nargs="+", help="width multiples per level (default: auto)")
    add("--depth", type=cli.positive_int, default=2, help="residual blocks per level")
    add("--time_dim", type=cli.positive_int, default=256, help="width of the timestep embedding")
    add("--attn_resolutions", type=cli.positive_int, nargs="+", help="latent sides with self-attention")
    add("--gradient_checkpointing", action="store_true", help="trade compute for memory")

    add_optimisation_flags(parser, batch_size=16, num_epochs=50, lr=3e-4, weight_decay=0.05, warmup=100)
    add_checkpoint_flags(parser.add_argument_group("checkpoints and validation").add_argument)
    return parser


def default_channel_mult(latent_size):
    """Up to four levels (ADM's widths 1, 2, 4, 4), halving while the lowest level stays at least 4x4."""
    levels = 1
    while levels < 4 and latent_size % 2**levels == 0 and latent_size // 2**levels >= 4:
        levels += 1
    return [1, 2, 4, 4][:levels]


def classifier_config(args, facts):
    """EncoderClassifier arguments for the LDM's latents and the network flags."""
    config = dict(
        c_in=facts["latent_channels"],
        img_size=facts["latent_size"],
        base_channels=args.base_channels,
        time_dim=args.time_dim,
        depth=args.depth,
        attn_resolutions=args.attn_resolutions,
        num_classes=len(facts["class_names"]),
        channel_mult=args.channel_mult or default_channel_mult(facts["latent_size"]),
    )
    try:  # built once here, so that a bad size or attention level is one line naming the flag's value
        return guidance.EncoderClassifier(**config).config
    except ValueError as error:
        raise UserError(f"{error} (--channel_mult / --attn_resolutions)") from None


def eval_timesteps(num_train_timesteps):
    return sorted({round(f * (num_train_timesteps - 1)) for f in EVAL_FRACTIONS})


@torch.no_grad()
def heldout_sums(classifier, noise_scheduler, latents, labels, seed, batch_size, shard):
    """This process's share (rank, world) of the held-out images, scored at every evaluation timestep
    with noise fixed per image and timestep: (cross-entropy sum, hits per timestep...), image count."""
    device = next(classifier.parameters()).device
    levels = eval_timesteps(noise_scheduler.config.num_train_timesteps)
    indices = list(range(shard[0], len(latents), shard[1]))
    sums = torch.zeros(1 + len(levels), device=device)
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        x0, y = latents[chunk].to(device), labels[chunk].to(device)
        for k, level in enumerate(levels):
            noise = torch.cat([noise_for(seed, i, [k], latents.shape[1:]) for i in chunk]).to(device)
            t = torch.full((len(chunk),), level, device=device, dtype=torch.long)
            logits = classifier(noise_scheduler.add_noise(x0, noise, t), t).float()
            # The loss is the mean over the levels, so that it is on the scale of one cross-entropy.
            sums[0] += F.cross_entropy(logits, y, reduction="sum") / len(levels)
            sums[1 + k] += (logits.argmax(1) == y).sum()
    return sums, len(indices)


def main():
    args = build_parser().parse_args()
    accelerator = training.make_accelerator(args.mixed_precision)
    device = accelerator.device
    ldm = load_checkpoint(args.ldm_checkpoint, flag="--ldm_checkpoint")
    facts = ldm_facts(ldm)
    check_classes(args.data_root, facts["class_names"])
    output_dir = cli.ensure_writable_dir(args.output_dir, "--output_dir")
    if accelerator.is_main_process:
        files.clean_temporaries(output_dir)
    resume = find_resume(args, output_dir, ldm)

    # The data as the LDM saw it: its image size, channels and decoding rule (a scan that finds another
    # rule warns and keeps the LDM's), split by the seed.
    ldm_config = ldm["config"]
    args.bit_depth, args.intensity_range = None, None  # no overrides: the LDM's rule is the one
    _, train_samples, val_samples, _ = load_class_data(args, {"intensity": intensity_of(ldm)})
    intensity, channels, size = intensity_of(ldm), ldm_config["image_channels"], ldm_config["image_size"]
    codec = LatentCodec(load_vae(args.vae_pretrained or ldm_config["vae_pretrained"]).to(device), channels)
    shape = (codec.latent_channels, size // codec.downsample)
    if shape != (facts["latent_channels"], facts["latent_size"]):
        raise UserError(
            f"--vae_pretrained {args.vae_pretrained} gives {shape[0]}x{shape[1]} latents, but the LDM's are "
            f"{facts['latent_channels']}x{facts['latent_size']}: pass the LDM's VAE"
        )
    noise_scheduler = DDPMScheduler.from_config(ldm["scheduler_config"])

    config = resume["classifier_config"] if resume else classifier_config(args, facts)
    set_seed(args.seed)  # identical initial weights (and so EMA) on every process
    classifier = guidance.EncoderClassifier(**config)
    if args.gradient_checkpointing:
        classifier.set_grad_checkpointing()
    run_settings = plain({**vars(args), **codec.config(), "image_size": size, "image_channels": channels})
    if accelerator.is_main_process:
        print(training.parameter_table({"vae": codec.vae, "classifier": classifier}), flush=True)
        side = facts["latent_size"]
        print(
            f"classes: {len(facts['class_names'])} | train images: {len(train_samples)} | val images: "
            f"{len(val_samples)} | latents {facts['latent_channels']}x{side}x{side} | levels "
            f"{config['channel_mult']} | device {device} | processes {accelerator.num_processes}",
            flush=True,
        )
    train_set, val_latents, val_labels = latent_sets(
        args, codec, (train_samples, val_samples), (size, channels, intensity), device
    )

    ema = EMA(classifier, args.ema_decay)
    optimizer, lr_scheduler, batches_per_epoch = optimization(args, classifier, train_set, accelerator)
    classifier, optimizer = accelerator.prepare(classifier, optimizer)
    ema.model.to(device)
    set_seed(args.seed + accelerator.process_index)  # different noise and flips per process

    progress = dict(epoch=0, step_in_epoch=0, global_step=0, best_val_loss=float("inf"), val_history=[])
    if resume is not None:
        progress = restore(resume, accelerator, classifier, ema, optimizer, lr_scheduler)
    writer = SummaryWriter(str(output_dir / "logs")) if accelerator.is_main_process else None
    run = Run(accelerator, classifier, ema, optimizer, lr_scheduler, noise_scheduler, codec, config, facts,
              run_settings, output_dir, writer, args, progress)  # fmt: skip

    stop = training.StopSignal("checkpoint_latest.pt")
    for epoch in range(progress["epoch"], args.num_epochs):
        signum = train_epoch(run, train_set, epoch, batches_per_epoch, stop)
        if signum:
            save_checkpoints(run, ["checkpoint_latest.pt"])
            if accelerator.is_main_process:
                print(
                    f"stopped by signal {signum}; resume with --resume {output_dir / 'checkpoint_latest.pt'}"
                )
            sys.exit(128 + signum)
        end_of_epoch(run, epoch + 1, val_latents, val_labels)
    if writer is not None:
        writer.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()


def check_classes(data_root, class_names):
    """The data's class folders must be the LDM's: the classifier's label i is the LDM's class i."""
    found, _ = find_class_images(data_root)
    if found != class_names:
        raise UserError(
            f"the class folders of --data_root {data_root} are {found}, but the LDM's classes are "
            f"{class_names}: train on the LDM's class folders"
        )


def find_resume(args, output_dir, ldm):
    """The checkpoint to resume from (None for a fresh run); it must belong to the same LDM."""
    path = resume_path(args, output_dir)
    if path is None:
        return None
    resume = load_classifier_checkpoint(path, flag="--resume")
    check_classifier_fits(resume, ldm, path, flag="--resume")
    for key in NETWORK_KEYS:  # the network is the checkpoint's; typed width or depth flags are ignored
        setattr(args, key, resume["classifier_config"][key])
    return resume


def latent_sets(args, codec, splits, image_rule, device):
    """The training set (images, or cached latent moments) and the held-out latents (posterior means) of
    the (train, val) samples, read at image_rule = (size, channels, intensity)."""
    (train_samples, val_samples), (size, channels, intensity) = splits, image_rule
    train_set = ClassImageDataset(train_samples, size, channels, intensity)
    labels = torch.tensor([label for _, label in train_samples])
    if args.cache_latents:
        train_set = TensorDataset(
            encode_moments(codec, train_set, args.batch_size, device, not args.no_flip), labels
        )
    val_set = ClassImageDataset(val_samples, size, channels, intensity)
    val_latents = (
        encode_moments(codec, val_set, args.batch_size, device, False)[:, 0, 0] if val_samples else None
    )
    return train_set, val_latents, torch.tensor([label for _, label in val_samples])


def restore(ckpt, accelerator, classifier, ema, optimizer, lr_scheduler):
    """Weights, EMA, optimizer, schedule, loss scale and RNG streams; returns the saved progress."""
    accelerator.unwrap_model(classifier).load_state_dict(ckpt["classifier"])
    ema.model.load_state_dict(ckpt["ema_classifier"])
    ema.load_state_dict(ckpt["ema"])
    optimizer.load_state_dict(ckpt["optimizer"])
    lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
    if accelerator.scaler is not None and ckpt.get("scaler"):
        accelerator.scaler.load_state_dict(ckpt["scaler"])
    restore_rng(ckpt, accelerator)
    return dict(ckpt["progress"])


@dataclass
class Run:
    """What one classifier run holds; the attribute names are train.py's, whose log_step and
    optimizer_step read them."""

    accelerator: object
    model: object  # the classifier, prepared (DDP-wrapped when several processes run)
    ema: EMA
    optimizer: object
    lr_scheduler: object
    noise_scheduler: object
    codec: LatentCodec
    classifier_config: dict
    ldm: dict  # models.ldm_facts of the LDM it guides
    config: dict
    output_dir: Path
    writer: object
    args: object
    progress: dict
    accuracy: dict = None  # {timestep: held-out accuracy} of the last validation


def train_epoch(run, train_set, epoch, batches_per_epoch, stop):
    """One epoch (or its remainder after a resume); returns a signal number when asked to stop."""
    accelerator, args, progress = run.accelerator, run.args, run.progress
    skip = progress["step_in_epoch"] if progress["epoch"] == epoch else 0
    loader = epoch_loader(train_set, args, epoch, accelerator, skip)
    accum = args.gradient_accumulation_steps
    window = {"loss": 0.0, "images": 0, "start": time.perf_counter()}
    desc = f"epoch {epoch + 1}/{args.num_epochs}"
    with tqdm(
        total=batches_per_epoch, initial=skip, desc=desc, disable=not accelerator.is_main_process
    ) as bar:
        for index, (inputs, labels) in enumerate(loader, start=skip):
            # Accumulation as in train.py: all-reduce on a group's last micro-batch, loss scaled by its size.
            group_end = (index + 1) % accum == 0 or index + 1 == batches_per_epoch
            group_size = min(accum, batches_per_epoch - (index // accum) * accum)
            with nullcontext() if group_end else accelerator.no_sync(run.model):
                window["loss"] += backward_micro_batch(run, inputs, labels, epoch, group_size) / group_size
            window["images"] += inputs.shape[0] * accelerator.num_processes
            bar.update(1)
            if not group_end:
                continue
            grad_norm = optimizer_step(run)  # train.py's: clip, AdamW and LR steps, EMA update
            progress.update(epoch=epoch, step_in_epoch=index + 1, global_step=progress["global_step"] + 1)
            log_step(run, window, grad_norm, bar)
            signum = stop.agreed(accelerator)
            if signum:
                return signum
    progress.update(epoch=epoch + 1, step_in_epoch=0)
    return 0


def backward_micro_batch(run, inputs, labels, epoch, group_size):
    """Cross-entropy of the classifier on latents noised to uniform timesteps; backward; the mean loss."""
    latents = training_latents(inputs, run.codec, run.args.cache_latents, not run.args.no_flip)
    labels = labels.to(latents.device)
    t = torch.randint(
        0, run.noise_scheduler.config.num_train_timesteps, (len(labels),), device=latents.device
    )
    noisy = run.noise_scheduler.add_noise(latents, torch.randn_like(latents), t)
    with run.accelerator.autocast():
        loss = F.cross_entropy(run.model(noisy, t).float(), labels)
    mean_loss = check_finite(run.accelerator, loss, epoch, run.progress)
    run.accelerator.backward(loss / group_size)
    return mean_loss


def end_of_epoch(run, epochs_done, val_latents, val_labels):
    """Validate, then write best / periodic / final checkpoints and latest (last, as in train.py)."""
    args, progress = run.args, run.progress
    last = epochs_done == args.num_epochs
    names = []
    if val_latents is not None and (epochs_done % args.val_every == 0 or last):
        val_loss = evaluate(run, val_latents, val_labels)
        progress["val_history"].append([epochs_done, val_loss])
        if val_loss < progress["best_val_loss"]:
            progress["best_val_loss"] = val_loss
            names.append("checkpoint_best.pt")
    elif val_latents is None and last:
        names.append("checkpoint_best.pt")  # no held-out images: the final weights are the best we know
    if epochs_done % args.save_every == 0:
        names.append(f"checkpoint_epoch_{epochs_done}.pt")
    if last:
        names.append("checkpoint_final.pt")
    save_checkpoints(run, [*names, "checkpoint_latest.pt"])
    if run.accelerator.is_main_process:
        prune_periodic(run.output_dir, args.checkpoints_total_limit)


def evaluate(run, val_latents, val_labels):
    """Held-out cross-entropy and accuracy per noise level of the EMA weights, shared out over processes."""
    accelerator = run.accelerator
    sums, count = heldout_sums(
        run.ema.model,
        run.noise_scheduler,
        val_latents,
        val_labels,
        run.args.seed,
        run.args.batch_size,
        (accelerator.process_index, accelerator.num_processes),
    )
    total = accelerator.reduce(torch.cat([sums, torch.tensor([float(count)], device=sums.device)]), "sum")
    val_loss, hits, images = total[0].item() / total[-1].item(), total[1:-1], total[-1].item()
    levels = eval_timesteps(run.noise_scheduler.config.num_train_timesteps)
    run.accuracy = {t: hit.item() / images for t, hit in zip(levels, hits, strict=True)}
    if run.writer is not None:
        step = run.progress["global_step"]
        run.writer.add_scalar("val/loss", val_loss, step)
        for t, accuracy in run.accuracy.items():
            run.writer.add_scalar(f"val/accuracy_t{t:04d}", accuracy, step)
        shown = ", ".join(f"t={t} {a:.1%}" for t, a in run.accuracy.items())
        print(
            f"held-out cross-entropy (EMA, fixed noise): {val_loss:.4f} | accuracy by timestep: {shown}",
            flush=True,
        )
    return val_loss


def save_checkpoints(run, names):
    """Write one checkpoint under each name (collective: every process must call it)."""
    save_on_main(run.accelerator, lambda rng: checkpoint_state(run, rng), [run.output_dir / n for n in names])


def checkpoint_state(run, rng):
    """Everything needed to guide sampling (the classifier and the LDM it fits) or to resume bit for bit."""
    accelerator, ema = run.accelerator, run.ema
    return {
        "model_type": CLASSIFIER_TYPE,
        "format_version": FORMAT_VERSION,
        "classifier_config": dict(run.classifier_config),
        "classifier": accelerator.unwrap_model(run.model).state_dict(),
        "ema_classifier": ema.model.state_dict(),
        "class_names": list(run.ldm["class_names"]),
        "ldm": dict(run.ldm),
        "heldout_accuracy": {str(t): a for t, a in (run.accuracy or {}).items()},
        "scheduler_config": plain(run.noise_scheduler.config),
        "config": run.config,
        "optimizer": run.optimizer.state_dict(),
        "lr_scheduler": run.lr_scheduler.state_dict(),
        "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
        "ema": ema.state_dict(),
        "progress": dict(run.progress),
        "epoch": run.progress["epoch"],
        "global_step": run.progress["global_step"],
        "best_val_loss": run.progress["best_val_loss"],
        "rng": rng,
    }


if __name__ == "__main__":
    run_cli(main)
