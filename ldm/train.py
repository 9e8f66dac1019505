"""Train a class-conditional latent diffusion model (UNet2DConditionModel on frozen AutoencoderKL latents).

Single process:   python train.py --data_root DATA --output_dir ./ldm_checkpoints
Several GPUs:     accelerate launch --multi_gpu train.py --data_root DATA ...
                  torchrun --nproc_per_node=4 train.py --data_root DATA ...
"""

import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from diffusers import UNet2DConditionModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid, save_image
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
    to_unit,
)
from models import (
    DEFAULT_VAE,
    EMA,
    FORMAT_VERSION,
    UNET_PRESETS,
    ClassConditionalUNet,
    ClassEmbedder,
    LatentCodec,
    build_unet,
    default_noise_scheduler,
    denoise,
    load_checkpoint,
    load_vae,
    make_sampler,
    noise_for,
    plain,
    sample_latent,
    unet_settings,
)

# Settings that fix the model and data shapes: taken from the checkpoint when resuming.
ARCHITECTURE_KEYS = (
    "image_size",
    "image_channels",
    "prediction_type",
    "num_train_timesteps",
    "beta_schedule",
)


def build_parser():
    parser = cli.Parser(description=__doc__, epilog=DATA_LAYOUT)
    data = parser.add_argument_group("data")
    data.add_argument("--data_root", required=True, help="folder of class sub-folders (layout below)")
    data.add_argument(
        "--output_dir",
        default="./ldm_checkpoints",
        help="checkpoints, samples and logs (default: %(default)s)",
    )
    data.add_argument(
        "--image_size",
        type=cli.positive_int,
        default=256,
        help="training resolution in pixels (default: %(default)s)",
    )
    data.add_argument(
        "--image_channels",
        type=int,
        choices=[1, 3],
        default=None,
        help="1 or 3; default: 1 if every image is grayscale, else 3",
    )
    add_intensity_args(data)
    data.add_argument(
        "--val_fraction",
        type=cli.fraction,
        default=0.1,
        help="held-out share per class for validation and checkpoint_best (default: %(default)s)",
    )
    data.add_argument("--no_flip", action="store_true", help="disable random horizontal flips")
    data.add_argument(
        "--cache_latents",
        action="store_true",
        help="encode the data set once (both flips) and train without the VAE in the loop",
    )
    data.add_argument(
        "--num_workers",
        type=cli.nonnegative_int,
        default=4,
        help="data loader workers per process (default: %(default)s)",
    )

    model = parser.add_argument_group("model")
    model.add_argument(
        "--vae_pretrained",
        default=DEFAULT_VAE,
        help="frozen AutoencoderKL: hub id or local save_pretrained folder (default: %(default)s)",
    )
    model.add_argument(
        "--unet_preset",
        choices=sorted(UNET_PRESETS),
        default="base",
        help="UNet size preset (default: %(default)s); the flags below override its parts",
    )
    model.add_argument(
        "--block_out_channels",
        type=cli.positive_int,
        nargs="+",
        default=None,
        help="UNet widths per level, e.g. 128 256 512 512",
    )
    model.add_argument(
        "--layers_per_block", type=cli.positive_int, default=None, help="ResNet layers per UNet level"
    )
    model.add_argument(
        "--attention_heads", type=cli.positive_int, default=None, help="attention heads per block"
    )
    model.add_argument(
        "--cross_attention_dim", type=cli.positive_int, default=None, help="width of the class token"
    )
    model.add_argument(
        "--norm_num_groups", type=cli.positive_int, default=None, help="GroupNorm groups in the UNet"
    )
    model.add_argument(
        "--prediction_type",
        choices=["epsilon", "v_prediction"],
        default="epsilon",
        help="UNet target (default: %(default)s)",
    )
    model.add_argument(
        "--num_train_timesteps",
        type=cli.positive_int,
        default=1000,
        help="diffusion steps (default: %(default)s)",
    )
    model.add_argument(
        "--beta_schedule",
        choices=["scaled_linear", "linear", "squaredcos_cap_v2"],
        default="scaled_linear",
        help="noise schedule (default: %(default)s)",
    )
    model.add_argument(
        "--cfg_dropout",
        type=cli.unit_interval,
        default=0.1,
        help="per-sample probability of the null class, for guidance (default: %(default)s)",
    )
    model.add_argument("--gradient_checkpointing", action="store_true", help="trade compute for UNet memory")
    model.add_argument("--compile", action="store_true", help="torch.compile the UNet")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument(
        "--batch_size",
        type=cli.positive_int,
        default=8,
        help="images per process per step (default: %(default)s)",
    )
    optim.add_argument(
        "--num_epochs", type=cli.positive_int, default=200, help="training epochs (default: %(default)s)"
    )
    optim.add_argument(
        "--learning_rate",
        "--lr",
        type=cli.positive_float,
        default=1e-4,
        help="AdamW peak learning rate (default: %(default)s)",
    )
    optim.add_argument(
        "--weight_decay",
        type=cli.nonnegative_float,
        default=1e-2,
        help="AdamW weight decay (default: %(default)s)",
    )
    optim.add_argument(
        "--lr_warmup_steps",
        type=cli.nonnegative_int,
        default=500,
        help="linear warm-up before the cosine decay, in optimizer steps (default: %(default)s)",
    )
    optim.add_argument(
        "--gradient_accumulation_steps",
        type=cli.positive_int,
        default=1,
        help="micro-batches per optimizer step (default: %(default)s)",
    )
    optim.add_argument(
        "--max_grad_norm",
        type=cli.positive_float,
        default=1.0,
        help="gradient clipping norm (default: %(default)s)",
    )
    optim.add_argument(
        "--ema_decay", type=cli.fraction, default=0.9999, help="EMA decay, in [0, 1) (default: %(default)s)"
    )
    optim.add_argument(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        default="no",
        help="autocast precision on CUDA; CPU runs fall back to fp32 (default: %(default)s)",
    )
    optim.add_argument(
        "--seed", type=cli.nonnegative_int, default=0, help="random seed (default: %(default)s)"
    )

    run = parser.add_argument_group("checkpoints, validation and samples")
    run.add_argument(
        "--save_every",
        type=cli.positive_int,
        default=10,
        help="write checkpoint_epoch_<E>.pt every N epochs (default: %(default)s)",
    )
    run.add_argument(
        "--checkpoints_total_limit",
        type=cli.positive_int,
        default=None,
        help="keep only the newest N periodic checkpoints (default: keep all)",
    )
    run.add_argument(
        "--val_every", type=cli.positive_int, default=1, help="validate every N epochs (default: %(default)s)"
    )
    run.add_argument(
        "--val_timesteps",
        type=cli.positive_int,
        default=4,
        help="fixed timesteps per validation image (default: %(default)s)",
    )
    run.add_argument(
        "--sample_every",
        type=cli.positive_int,
        default=10,
        help="save an EMA sample grid every N epochs (default: %(default)s)",
    )
    run.add_argument(
        "--sample_steps",
        type=cli.positive_int,
        default=50,
        help="DDIM steps for sample grids (default: %(default)s)",
    )
    run.add_argument(
        "--sample_cfg_scale",
        type=cli.nonnegative_float,
        default=3.0,
        help="guidance for sample grids (default: %(default)s)",
    )
    run.add_argument(
        "--grid_samples_per_class",
        type=cli.positive_int,
        default=4,
        help="grid columns (default: %(default)s)",
    )
    run.add_argument(
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


def epoch_order(num_items, epoch, seed, accelerator):
    """This process's shard of the epoch's shuffled indices (same order on resume)."""
    sampler = DistributedSampler(
        range(num_items),
        num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
        shuffle=True,
        seed=seed,
    )
    sampler.set_epoch(epoch)
    return list(sampler)


@torch.no_grad()
def encode_moments(codec, dataset, batch_size, device, flips):
    """Latent mean/std of every image (and of its mirror when flips are on): (N, F, 2, c, h, w)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    moments = []
    for batch, _ in tqdm(loader, desc="encoding latents", leave=False, disable=len(loader) < 2):
        batch = batch.to(device)
        views = [batch, batch.flip(-1)] if flips else [batch]
        moments.append(torch.stack([torch.stack(codec.moments(v), 1) for v in views], 1).cpu())
    return torch.cat(moments)


def training_latents(batch, codec, cached, flip):
    """Sampled scaled latents (N, c, h, w) of a batch, with random horizontal flips."""
    inputs = batch.to(codec.vae.device)
    mirror = torch.rand(inputs.shape[0], device=inputs.device) < (0.5 if flip else 0.0)
    if cached:  # inputs: (N, F, 2, c, h, w) moments of the image and, with flips, of its mirror
        view = inputs[torch.arange(inputs.shape[0]), mirror.long()]  # (N, 2, c, h, w)
        return sample_latent(view[:, 0], view[:, 1])
    images = torch.where(mirror[:, None, None, None], inputs.flip(-1), inputs)
    return sample_latent(*codec.moments(images))


def diffusion_loss(model, noise_scheduler, latents, labels, cfg_dropout, null_class):
    """MSE between the UNet output and its target at random timesteps, with label dropout."""
    noise = torch.randn_like(latents)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
    )
    drop = torch.rand(labels.shape, device=labels.device) < cfg_dropout
    labels = torch.where(drop, torch.full_like(labels, null_class), labels)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction = model(noisy, timesteps, labels)
    return F.mse_loss(
        prediction.float(), diffusion_target(noise_scheduler, latents, noise, timesteps).float()
    )


def diffusion_target(noise_scheduler, latents, noise, timesteps):
    """Noise for epsilon-prediction, velocity for v-prediction."""
    if noise_scheduler.config.prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    return noise


@torch.no_grad()
def validation_loss(model, noise_scheduler, latents, labels, seed, num_timesteps, batch_size, shard=(0, 1)):
    """Deterministic held-out loss: fixed, evenly spread timesteps and per-image fixed noise.

    Returns (sum of per-image losses, image count) over this process's shard (rank, world)."""
    device = next(model.parameters()).device
    total_steps = noise_scheduler.config.num_train_timesteps
    steps = ((torch.arange(num_timesteps) + 0.5) * total_steps / num_timesteps).long().to(device)  # (K,)
    indices = list(range(shard[0], len(latents), shard[1]))
    loss_sum = torch.zeros((), device=device)
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        x0 = latents[chunk].to(device).repeat_interleave(num_timesteps, 0)  # (B*K, c, h, w)
        noise = torch.cat([noise_for(seed, i, range(num_timesteps), latents.shape[1:]) for i in chunk]).to(
            device
        )
        t = steps.repeat(len(chunk))
        y = labels[chunk].to(device).repeat_interleave(num_timesteps)
        prediction = model(noise_scheduler.add_noise(x0, noise, t), t, y).float()
        target = diffusion_target(noise_scheduler, x0, noise, t).float()
        loss_sum += F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3)).sum() / num_timesteps
    return loss_sum, len(indices)


def main():
    args = parse_args()
    accelerator = training.make_accelerator(args.mixed_precision)  # gloo on CPU, NCCL on CUDA
    device = accelerator.device
    output_dir = cli.ensure_writable_dir(args.output_dir, "--output_dir")
    if accelerator.is_main_process:
        files.clean_temporaries(output_dir)  # left by a run killed while saving

    resume = find_resume(args, output_dir)  # with it, the architecture comes from the checkpoint

    # Data: one scan decides the data set's bit depth; the held-out split is fixed by the seed.
    class_names, train_samples, val_samples, intensity = load_data(args, resume)

    # Model: a class-conditional UNet on the frozen VAE's latents, identical on every process.
    codec = LatentCodec(load_vae(args.vae_pretrained).to(device), args.image_channels)
    set_seed(args.seed)  # identical initial weights (and so EMA) on every process
    model = build_model(args, codec, len(class_names), resume)
    if args.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    noise_scheduler = default_noise_scheduler(
        args.num_train_timesteps, args.beta_schedule, args.prediction_type
    )
    config = run_config(args, codec, model)
    if accelerator.is_main_process:
        describe(
            args, accelerator, codec, model, config, class_names, (train_samples, val_samples), intensity
        )
    train_set, val_latents, val_labels = datasets(args, codec, train_samples, val_samples, intensity, device)

    # Optimisation: AdamW on a cosine schedule over all epochs; the EMA stays outside DDP.
    ema = EMA(model, args.ema_decay)
    optimizer, lr_scheduler, batches_per_epoch = optimization(args, model, len(train_set), accelerator)
    if args.compile:
        model.unet.compile()
    model, optimizer = accelerator.prepare(model, optimizer)
    ema.model.to(device)
    set_seed(args.seed + accelerator.process_index)  # different noise and flips per process

    progress = dict(epoch=0, step_in_epoch=0, global_step=0, best_val_loss=float("inf"), val_history=[])
    if resume is not None:  # weights, EMA, optimizer, schedule, RNG and position in the epoch
        progress = restore_training_state(resume, accelerator, model, ema, optimizer, lr_scheduler)
    writer = SummaryWriter(str(output_dir / "logs")) if accelerator.is_main_process else None
    run = Run(accelerator, model, ema, optimizer, lr_scheduler, noise_scheduler, codec, config,
              class_names, intensity, output_dir, writer, args, progress)  # fmt: skip

    # The loop: an epoch at a time; a signal saves checkpoint_latest.pt and exits 128 + signal.
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


def load_data(args, resume):
    """Class names, training and held-out (path, label) lists and the data's decoding rule."""
    class_names, samples = find_class_images(args.data_root)
    if resume is not None and resume["class_names"] != class_names:
        raise UserError(
            f"--data_root classes {class_names} differ from the resumed checkpoint's "
            f"{resume['class_names']}; resume with the same data"
        )
    data = data_rule([path for path, _ in samples], args, resume and resume.get("intensity"))
    if args.image_channels is None:
        args.image_channels = data["channels"]
    train_samples, val_samples = split_holdout(samples, args.val_fraction, args.seed)
    return class_names, train_samples, val_samples, data["intensity"]


def describe(args, accelerator, codec, model, config, class_names, splits, intensity):
    """The parameter table and one line of what this run trains on (main process)."""
    components = {"vae": codec.vae, "unet": model.unet, "class_embedder": model.class_embedder}
    print(training.parameter_table(components), flush=True)
    side = config["latent_size"]
    print(
        f"classes: {len(class_names)} | train images: {len(splits[0])} | val images: {len(splits[1])} | "
        f"image {args.image_size}px x {args.image_channels} ch, {images.describe(intensity)} | latents "
        f"{codec.latent_channels}x{side}x{side} | device {accelerator.device} "
        f"| processes {accelerator.num_processes} | precision {accelerator.mixed_precision}",
        flush=True,
    )


def optimization(args, model, num_train, accelerator):
    """AdamW, its cosine schedule with warm-up (in optimizer steps) and the batches per epoch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    batches_per_epoch = math.ceil(len(epoch_order(num_train, 0, args.seed, accelerator)) / args.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    lr_scheduler = get_cosine_schedule_with_warmup(
        optimizer, args.lr_warmup_steps, steps_per_epoch * args.num_epochs
    )
    return optimizer, lr_scheduler, batches_per_epoch


def datasets(args, codec, train_samples, val_samples, intensity, device):
    """The training set (images, or their cached latent moments) and the held-out latents and labels."""
    train_set = ClassImageDataset(train_samples, args.image_size, args.image_channels, intensity)
    labels = torch.tensor([label for _, label in train_samples])
    if args.cache_latents:  # both flips, mean and std: sampling the posterior each epoch stays exact
        train_set = TensorDataset(
            encode_moments(codec, train_set, args.batch_size, device, not args.no_flip), labels
        )
    val_set = ClassImageDataset(val_samples, args.image_size, args.image_channels, intensity)
    val_latents = (
        encode_moments(codec, val_set, args.batch_size, device, False)[:, 0, 0] if val_samples else None
    )
    return train_set, val_latents, torch.tensor([label for _, label in val_samples])


def find_resume(args, output_dir):
    """The checkpoint to resume from, or None; refuses to overwrite another run's files.

    A resumed run takes its architecture (and, unless one is given, its VAE) from the checkpoint.
    """
    if args.resume is None:
        if (output_dir / "checkpoint_latest.pt").exists():
            raise UserError(
                f"--output_dir {output_dir} already holds a run; pass --resume to continue it "
                "or choose another --output_dir"
            )
        return None
    path = output_dir / "checkpoint_latest.pt" if args.resume == "latest" else Path(args.resume)
    resume = load_checkpoint(path, flag="--resume")
    for key in ARCHITECTURE_KEYS:
        setattr(args, key, resume["config"][key])
    if args.vae_pretrained == DEFAULT_VAE:  # a VAE given on the command line wins (e.g. a moved folder)
        args.vae_pretrained = resume["config"]["vae_pretrained"]
    return resume


def build_model(args, codec, num_classes, resume):
    """Class-conditional UNet sized from the flags (or the resumed checkpoint's config)."""
    latent_size = args.image_size // codec.downsample
    if resume is not None:
        unet = UNet2DConditionModel.from_config(resume["unet_config"])
    else:
        settings = unet_settings(
            args.unet_preset,
            args.block_out_channels,
            args.layers_per_block,
            args.attention_heads,
            args.cross_attention_dim,
            args.norm_num_groups,
        )
        unet = build_unet(settings, codec.latent_channels, latent_size)
    multiple = codec.downsample * 2 ** (len(unet.config.block_out_channels) - 1)
    if args.image_size % multiple:
        raise UserError(
            f"--image_size {args.image_size} must be a multiple of {multiple} "
            f"(VAE downsampling x UNet levels)"
        )
    return ClassConditionalUNet(unet, ClassEmbedder(num_classes, unet.config.cross_attention_dim))


def run_config(args, codec, model):
    """The full run configuration stored in every checkpoint."""
    config = dict(vars(args))
    config.update(codec.config())
    config["latent_size"] = args.image_size // codec.downsample
    config["num_classes"] = model.class_embedder.num_classes
    return plain(config)


def restore_training_state(ckpt, accelerator, model, ema, optimizer, lr_scheduler):
    """Load weights, optimizer, schedules and RNG streams; returns the saved progress counters."""
    model = accelerator.unwrap_model(model)
    model.unet.load_state_dict(ckpt["unet"])
    model.class_embedder.load_state_dict(ckpt["class_embedder"])
    ema.model.unet.load_state_dict(ckpt["ema_unet"])
    ema.model.class_embedder.load_state_dict(ckpt["ema_class_embedder"])
    ema.load_state_dict(ckpt["ema"])
    optimizer.load_state_dict(ckpt["optimizer"])
    lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
    if accelerator.scaler is not None and ckpt.get("scaler"):
        accelerator.scaler.load_state_dict(ckpt["scaler"])
    if len(ckpt["rng"]) == accelerator.num_processes:
        checkpoints.set_rng_state(ckpt["rng"][accelerator.process_index])
    elif accelerator.is_main_process:
        print("note: process count changed since the checkpoint; random streams are re-seeded")
    return dict(ckpt["progress"])


@dataclass
class Run:
    """What one training run holds, passed to the loop's steps; progress is saved with every checkpoint."""

    accelerator: object
    model: object  # prepared (DDP-wrapped when several processes run)
    ema: EMA
    optimizer: object
    lr_scheduler: object
    noise_scheduler: object
    codec: LatentCodec
    config: dict
    class_names: list
    intensity: dict
    output_dir: Path
    writer: object  # TensorBoard on the main process, None elsewhere
    args: object
    progress: dict


def train_epoch(run, train_set, epoch, batches_per_epoch, stop):
    """One epoch (or its remainder after a resume); returns a signal number when asked to stop."""
    accelerator, args, progress = run.accelerator, run.args, run.progress
    model = run.model
    # The epoch's order is a function of (seed, epoch) alone, so a resumed run skips exactly the
    # batches it had trained and sees the rest in the same order.
    skip = progress["step_in_epoch"] if progress["epoch"] == epoch else 0
    order = epoch_order(len(train_set), epoch, args.seed, accelerator)[skip * args.batch_size :]
    loader = DataLoader(
        train_set,
        batch_size=args.batch_size,
        sampler=order,
        num_workers=args.num_workers,
        generator=torch.Generator().manual_seed(args.seed + epoch),
        pin_memory=accelerator.device.type == "cuda",
        worker_init_fn=training.ignore_sigint,
    )
    accum = args.gradient_accumulation_steps
    window = {"loss": 0.0, "images": 0, "start": time.perf_counter()}
    desc = f"epoch {epoch + 1}/{args.num_epochs}"
    with tqdm(
        total=batches_per_epoch, initial=skip, desc=desc, disable=not accelerator.is_main_process
    ) as bar:
        for index, (inputs, labels) in enumerate(loader, start=skip):
            # Gradient accumulation: DDP's all-reduce runs only on the last micro-batch of a group,
            # and the epoch's last group may be shorter, so each loss is scaled by its own group size.
            group_end = (index + 1) % accum == 0 or index + 1 == batches_per_epoch
            group_size = min(accum, batches_per_epoch - (index // accum) * accum)
            with nullcontext() if group_end else accelerator.no_sync(model):
                window["loss"] += backward_micro_batch(run, inputs, labels, epoch, group_size) / group_size
            window["images"] += inputs.shape[0] * accelerator.num_processes
            bar.update(1)
            if not group_end:
                continue
            grad_norm = optimizer_step(run)
            progress.update(epoch=epoch, step_in_epoch=index + 1, global_step=progress["global_step"] + 1)
            log_step(run, window, grad_norm, bar)
            signum = stop.agreed(accelerator)  # the same answer on every process: all stop together
            if signum:
                return signum
    progress.update(epoch=epoch + 1, step_in_epoch=0)
    return 0


def backward_micro_batch(run, inputs, labels, epoch, group_size):
    """Gradients of one micro-batch, scaled by its accumulation group's size; returns the mean loss."""
    accelerator, args = run.accelerator, run.args
    latents = training_latents(inputs, run.codec, args.cache_latents, not args.no_flip)
    with accelerator.autocast():
        loss = diffusion_loss(
            run.model,
            run.noise_scheduler,
            latents,
            labels.to(latents.device),
            args.cfg_dropout,
            len(run.class_names),
        )
    mean_loss = check_finite(accelerator, loss, epoch, run.progress)
    accelerator.backward(loss / group_size)
    return mean_loss


def optimizer_step(run):
    """Clip, step optimizer and LR schedule, update the EMA; returns the gradient norm."""
    accelerator, model, optimizer = run.accelerator, run.model, run.optimizer
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), run.args.max_grad_norm)
    optimizer.step()
    run.lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    run.ema.update(accelerator.unwrap_model(model))  # the EMA follows the plain module, not DDP
    return grad_norm


def check_finite(accelerator, loss, epoch, progress):
    """Mean loss over processes; stops every process together when any loss is not finite."""
    losses = accelerator.gather(loss.detach().float().reshape(1))
    if not torch.isfinite(losses).all():
        raise training.TrainingHalted(
            f"loss became non-finite ({losses.tolist()}) in epoch {epoch + 1} "
            f"after step {progress['global_step']}; "
            "the last good checkpoint is kept; lower --learning_rate or use --mixed_precision bf16"
        )
    return losses.mean().item()


def log_step(run, window, grad_norm, bar):
    """Loss, learning rate, grad norm and throughput to tqdm and TensorBoard (main process)."""
    writer, step = run.writer, run.progress["global_step"]
    lr = run.lr_scheduler.get_last_lr()[0]
    bar.set_postfix(loss=f"{window['loss']:.4f}", lr=f"{lr:.2e}")
    if writer is not None:
        elapsed = max(time.perf_counter() - window["start"], 1e-9)
        writer.add_scalar("train/loss", window["loss"], step)
        writer.add_scalar("train/lr", lr, step)
        writer.add_scalar("train/grad_norm", float(grad_norm), step)
        writer.add_scalar("train/images_per_sec", window["images"] / elapsed, step)
    window.update(loss=0.0, images=0, start=time.perf_counter())


def end_of_epoch(run, epochs_done, val_latents, val_labels):
    """Validate, draw sample grids and write best / periodic / final checkpoints, then latest.

    latest comes last: a run killed in between resumes from the previous latest and redoes the
    epoch, writing the others again."""
    accelerator, args, progress = run.accelerator, run.args, run.progress
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
    if epochs_done % args.sample_every == 0 and accelerator.is_main_process:
        save_sample_grid(run, epochs_done)
    save_checkpoints(run, [*names, "checkpoint_latest.pt"])
    if accelerator.is_main_process:
        prune_periodic(run.output_dir, args.checkpoints_total_limit)


def evaluate(run, val_latents, val_labels):
    """Deterministic validation loss of the EMA weights, shared out over processes."""
    accelerator, args = run.accelerator, run.args
    loss_sum, count = validation_loss(
        run.ema.model,
        run.noise_scheduler,
        val_latents,
        val_labels,
        args.seed,
        args.val_timesteps,
        args.batch_size,
        (accelerator.process_index, accelerator.num_processes),
    )
    total = accelerator.reduce(
        torch.stack([loss_sum, torch.tensor(float(count), device=loss_sum.device)]), "sum"
    )
    val_loss = (total[0] / total[1]).item()
    if run.writer is not None:
        run.writer.add_scalar("val/loss", val_loss, run.progress["global_step"])
        print(f"validation loss (EMA, fixed noise): {val_loss:.5f}", flush=True)
    return val_loss


@torch.no_grad()
def save_sample_grid(run, epochs_done):
    """EMA samples from fixed noise, one row per class, to disk and TensorBoard."""
    args, codec, device = run.args, run.codec, run.accelerator.device
    classes = range(min(len(run.class_names), 16))
    shape = (codec.latent_channels, run.config["latent_size"], run.config["latent_size"])
    noise = torch.cat([noise_for(args.seed, c, range(args.grid_samples_per_class), shape) for c in classes])
    labels = torch.tensor(classes, device=device).repeat_interleave(args.grid_samples_per_class)
    sampler = make_sampler("ddim", run.noise_scheduler.config)
    with run.accelerator.autocast():
        latents = denoise(
            run.ema.model, sampler, noise.to(device), labels, args.sample_cfg_scale, args.sample_steps
        )
    grid = make_grid(to_unit(codec.decode(latents)), nrow=args.grid_samples_per_class)
    (run.output_dir / "samples").mkdir(exist_ok=True)
    save_image(grid, run.output_dir / "samples" / f"epoch_{epochs_done:04d}.png")
    run.writer.add_image("samples/ema", grid, run.progress["global_step"])


def save_checkpoints(run, names):
    """Write one checkpoint under each name (collective: every process must call it)."""
    accelerator = run.accelerator
    rng = training.rng_states(accelerator)  # one entry per process
    if accelerator.is_main_process:
        state = checkpoint_state(run, rng)
        for name in names:
            files.atomic_save(state, run.output_dir / name)
    accelerator.wait_for_everyone()


def checkpoint_state(run, rng):
    """Everything needed to sample, to build a ControlNet on, or to resume bit for bit."""
    accelerator, ema = run.accelerator, run.ema
    model = accelerator.unwrap_model(run.model)
    return {
        "model_type": "ldm",
        "format_version": FORMAT_VERSION,
        "unet_config": plain(model.unet.config),
        "unet": model.unet.state_dict(),
        "ema_unet": ema.model.unet.state_dict(),
        "class_embedder": model.class_embedder.state_dict(),
        "ema_class_embedder": ema.model.class_embedder.state_dict(),
        "class_names": list(run.class_names),
        "intensity": run.intensity,
        "channels": run.config["image_channels"],
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


def prune_periodic(output_dir, limit):
    """Keep only the newest `limit` checkpoint_epoch_<E>.pt files."""
    if limit is None:
        return
    periodic = sorted(output_dir.glob("checkpoint_epoch_*.pt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    for path in periodic[:-limit]:
        path.unlink()


if __name__ == "__main__":
    run_cli(main)
