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
from accelerate.utils import broadcast_object_list, set_seed
from diffusers import UNet2DConditionModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from core import checkpoints, cli, files, images, inception, training
from core.errors import UserError, run_cli
from dataset import (
    DATA_LAYOUT,
    ClassImageDataset,
    add_intensity_args,
    check_intensity_args,
    epoch_loader,
    load_class_data,
    to_unit,
)
from models import (
    BETA_SCHEDULES,
    DEFAULT_VAE,
    EMA,
    FORMAT_VERSION,
    PREDICTION_TYPES,
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


def add_optimisation_flags(parser, batch_size, num_epochs, lr, weight_decay, warmup):
    """The optimisation group, also train_classifier.py's (with its own defaults)."""
    # --batch_size is per process: one optimizer step sees batch_size x processes x accumulation images.
    add = parser.add_argument_group("optimisation").add_argument
    add("--batch_size", type=cli.positive_int, default=batch_size, help="images per process per step")
    add("--num_epochs", type=cli.positive_int, default=num_epochs, help="training epochs")
    add("--learning_rate", "--lr", type=cli.positive_float, default=lr, help="AdamW peak learning rate")
    add("--weight_decay", type=cli.nonnegative_float, default=weight_decay, help="AdamW weight decay")
    add("--lr_warmup_steps", type=cli.nonnegative_int, default=warmup, help="warm-up, in optimizer steps")
    add("--gradient_accumulation_steps", type=cli.positive_int, default=1, help="micro-batches per step")
    add("--max_grad_norm", type=cli.positive_float, default=1.0, help="gradient clipping norm")
    add("--ema_decay", type=cli.fraction, default=0.9999, help="EMA decay, in [0, 1)")
    add("--mixed_precision", choices=cli.MIXED_PRECISION, default="no", help="autocast on CUDA; fp32 on CPU")
    add("--seed", type=cli.nonnegative_int, default=0, help="random seed")


def add_checkpoint_flags(add):
    """--save_every, --checkpoints_total_limit, --resume and --val_every, also train_classifier.py's."""
    add("--save_every", type=cli.positive_int, default=10, help="checkpoint_epoch_<E>.pt every N epochs")
    add("--checkpoints_total_limit", type=cli.positive_int, help="keep the newest N periodic files")
    add("--resume", nargs="?", const="latest", help="a checkpoint, or (no value) OUTPUT_DIR's latest one")
    add("--val_every", type=cli.positive_int, default=1, help="validate every N epochs")


def build_parser():
    # cli.Parser takes every flag as --snake_case and --kebab-case and shows each default in --help;
    # the groups follow a run: data, model, optimisation, then what is saved along the way.
    parser = cli.Parser(description=__doc__, epilog=DATA_LAYOUT)
    add = parser.add_argument_group("data").add_argument
    add("--data_root", required=True, help="folder of class sub-folders (layout below)")
    add("--output_dir", default="./ldm_checkpoints", help="checkpoints, samples and logs")
    add("--image_size", type=cli.positive_int, default=256, help="training resolution in pixels")
    add("--image_channels", type=int, choices=[1, 3], help="default: 1 if every image is grayscale, else 3")
    add_intensity_args(add)
    add("--val_fraction", type=cli.fraction, default=0.1, help="held-out share per class (checkpoint_best)")
    add("--no_flip", action="store_true", help="disable random horizontal flips")
    add("--cache_latents", action="store_true", help="encode the data once (both flips); no VAE in the loop")
    add("--num_workers", type=cli.nonnegative_int, default=4, help="data loader workers per process")

    # --unet_preset sets widths, depth, heads, token width and groups; each of the five flags after it
    # overrides its one part (models.unet_settings).
    add = parser.add_argument_group("model").add_argument
    add("--vae_pretrained", default=DEFAULT_VAE, help="frozen AutoencoderKL: hub id or local folder")
    add("--unet_preset", choices=sorted(UNET_PRESETS), default="base", help="UNet size preset")
    add("--block_out_channels", type=cli.positive_int, nargs="+", help="UNet widths per level, e.g. 128 256")
    add("--layers_per_block", type=cli.positive_int, help="ResNet layers per UNet level")
    add("--attention_heads", type=cli.positive_int, help="attention heads per block")
    add("--cross_attention_dim", type=cli.positive_int, help="width of the class token")
    add("--norm_num_groups", type=cli.positive_int, help="GroupNorm groups in the UNet")
    add("--prediction_type", choices=PREDICTION_TYPES, default="epsilon", help="UNet target")
    add("--num_train_timesteps", type=cli.positive_int, default=1000, help="diffusion steps")
    add("--beta_schedule", choices=BETA_SCHEDULES, default="scaled_linear", help="noise schedule")
    add("--cfg_dropout", type=cli.unit_interval, default=0.1, help="null-class probability, for guidance")
    add("--gradient_checkpointing", action="store_true", help="trade compute for UNet memory")
    add("--compile", action="store_true", help="torch.compile the UNet")

    add_optimisation_flags(parser, batch_size=8, num_epochs=200, lr=1e-4, weight_decay=1e-2, warmup=500)

    # Validation and sample grids use the EMA weights with fixed noise, so epochs compare like with like.
    add = parser.add_argument_group("checkpoints, validation and samples").add_argument
    add_checkpoint_flags(add)
    add("--val_timesteps", type=cli.positive_int, default=4, help="fixed timesteps per held-out image")
    add("--sample_every", type=cli.positive_int, default=10, help="save an EMA sample grid every N epochs")
    add("--sample_steps", type=cli.positive_int, default=50, help="DDIM steps for sample grids")
    add("--sample_cfg_scale", type=cli.nonnegative_float, default=3.0, help="guidance for sample grids")
    add("--grid_samples_per_class", type=cli.positive_int, default=4, help="grid columns")
    inception.add_eval_flags(parser.add_argument_group("in-training FID / KID"), unit="epochs")
    return parser


def parse_args(argv=None):
    args = check_intensity_args(build_parser().parse_args(argv))
    # The Inception file is found (or refused offline) before any data is read.
    inception.check_eval_flags(args.eval_every, args.best_by, 2)  # held-out images: counted with the data
    if args.eval_every:
        args.eval_inception_weights = inception.weights_path(args.eval_inception_weights)
    return args


@torch.no_grad()
def encode_moments(codec, dataset, batch_size, device, flips):
    """Latent mean/std of every image (and of its mirror when flips are on): (N, F, 2, c, h, w)."""
    # Mean and std rather than one drawn latent: the cached run still draws a fresh posterior sample
    # every epoch. The mirror is encoded, not flipped in latent space: VAE latents are not equivariant.
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
    # One coin per image even with --no_flip, so the random stream (and a resume) does not depend on it.
    mirror = torch.rand(inputs.shape[0], device=inputs.device) < (0.5 if flip else 0.0)
    if cached:  # inputs: (N, F, 2, c, h, w) moments of the image and, with flips, of its mirror
        view = inputs[torch.arange(inputs.shape[0]), mirror.long()]  # (N, 2, c, h, w)
        return sample_latent(view[:, 0], view[:, 1])
    # Uncached: the (mirrored) images are encoded on the fly, a VAE forward pass per step.
    images = torch.where(mirror[:, None, None, None], inputs.flip(-1), inputs)
    return sample_latent(*codec.moments(images))


def diffusion_loss(model, noise_scheduler, latents, labels, cfg_dropout, null_class):
    """MSE between the UNet output and its target at random timesteps, with label dropout."""
    # The simple objective of Ho et al. 2020 (eq. 14): a uniform timestep and fresh Gaussian noise per image.
    noise = torch.randn_like(latents)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
    )
    # Classifier-free guidance training (Ho & Salimans): a share of the labels becomes the null class,
    # so one network learns the conditional and the unconditional model at once.
    drop = torch.rand(labels.shape, device=labels.device) < cfg_dropout
    labels = torch.where(drop, torch.full_like(labels, null_class), labels)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction = model(noisy, timesteps, labels)
    # The error in fp32: under autocast the output is 16-bit, and small squared residuals underflow.
    return F.mse_loss(
        prediction.float(), diffusion_target(noise_scheduler, latents, noise, timesteps).float()
    )


def diffusion_target(noise_scheduler, latents, noise, timesteps):
    """Noise for epsilon-prediction, velocity for v-prediction."""
    # v = sqrt(abar_t) * noise - sqrt(1 - abar_t) * x0 (Salimans & Ho 2022), computed by the scheduler.
    if noise_scheduler.config.prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    return noise


@torch.no_grad()
def validation_loss(model, noise_scheduler, latents, labels, seed, num_timesteps, batch_size, shard=(0, 1)):
    """Deterministic held-out loss: fixed, evenly spread timesteps and per-image fixed noise.

    Returns (sum of per-image losses, image count) over this process's shard (rank, world)."""
    device = next(model.parameters()).device
    # K timesteps at the centres of K equal bins of [0, T), and noise fixed per image and timestep:
    # the figure changes only when the weights do, which is what checkpoint_best compares.
    total_steps = noise_scheduler.config.num_train_timesteps
    steps = ((torch.arange(num_timesteps) + 0.5) * total_steps / num_timesteps).long().to(device)  # (K,)
    # Sums of per-image means: processes add sums and counts, so the mean is exact for any shard sizes.
    indices = list(range(shard[0], len(latents), shard[1]))
    loss_sum = torch.zeros((), device=device)
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        x0 = latents[chunk].to(device).repeat_interleave(num_timesteps, 0)  # (B*K, c, h, w)
        noise = torch.cat([noise_for(seed, i, range(num_timesteps), latents.shape[1:]) for i in chunk]).to(
            device
        )
        # Image-major rows, K per image: timesteps cycle and labels repeat, matching x0 and noise above.
        t = steps.repeat(len(chunk))
        y = labels[chunk].to(device).repeat_interleave(num_timesteps)
        prediction = model(noise_scheduler.add_noise(x0, noise, t), t, y).float()
        target = diffusion_target(noise_scheduler, x0, noise, t).float()
        # Mean over pixels, then over the K timesteps: one figure per image, added to the running sum.
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
    class_names, train_samples, val_samples, data = load_class_data(args, resume)
    inception.check_eval_flags(args.eval_every, args.best_by, len(val_samples))
    args.image_channels = args.image_channels or data["channels"]  # a resumed run has the checkpoint's
    intensity = data["intensity"]

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
    optimizer, lr_scheduler, batches_per_epoch = optimization(args, model, train_set, accelerator)
    # The EMA copy is taken first: it stays a plain module that is never compiled or wrapped by DDP.
    if args.compile:
        model.unet.compile()
    model, optimizer = accelerator.prepare(model, optimizer)
    ema.model.to(device)
    set_seed(args.seed + accelerator.process_index)  # different noise and flips per process

    # progress is the loop's position; saved in every checkpoint, it lets a resume continue mid-epoch.
    progress = dict(epoch=0, step_in_epoch=0, global_step=0, best_val_loss=float("inf"), val_history=[])
    if resume is not None:  # weights, EMA, optimizer, schedule, RNG and position in the epoch
        progress = restore_training_state(resume, accelerator, model, ema, optimizer, lr_scheduler)
    progress.setdefault("eval_history", [])  # FID / KID of earlier evaluations (older files have none)
    # Only the main process writes logs; elsewhere writer is None and logging is skipped.
    writer = SummaryWriter(str(output_dir / "logs")) if accelerator.is_main_process else None
    run = Run(accelerator, model, ema, optimizer, lr_scheduler, noise_scheduler, codec, config,
              class_names, intensity, output_dir, writer, args, progress)  # fmt: skip
    if args.eval_every and accelerator.is_main_process:  # the main process alone samples and scores
        run.fid = FIDEval(
            run, ClassImageDataset(val_samples, args.image_size, args.image_channels, intensity)
        )

    # The loop: an epoch at a time; a signal saves checkpoint_latest.pt and exits 128 + signal.
    stop = training.StopSignal("checkpoint_latest.pt")
    for epoch in range(progress["epoch"], args.num_epochs):
        signum = train_epoch(run, train_set, epoch, batches_per_epoch, stop)
        if signum:
            stop_on_signal(run, signum)
        end_of_epoch(run, epoch + 1, val_latents, val_labels)
    if writer is not None:
        writer.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()


def stop_on_signal(run, signum):
    """Save checkpoint_latest.pt after a signal and exit 128 + signal."""
    # Stopped between optimizer steps: only latest is written (the epoch is unfinished, so there is no
    # best or periodic file), and the exit code is 128 + signal, as for a killed shell command.
    save_checkpoints(run, ["checkpoint_latest.pt"])
    if run.accelerator.is_main_process:
        print(f"stopped by signal {signum}; resume with --resume {run.output_dir / 'checkpoint_latest.pt'}")
    sys.exit(128 + signum)


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


def optimization(args, model, train_set, accelerator):
    """AdamW, its cosine schedule with warm-up (in optimizer steps) and the batches per epoch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    batches_per_epoch = len(epoch_loader(train_set, args, 0, accelerator))  # this process's share
    # The schedule counts optimizer steps, which accumulation makes fewer than batches.
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
    # Held-out latents are the posterior means of the unflipped images: fixed targets, encoded once.
    val_set = ClassImageDataset(val_samples, args.image_size, args.image_channels, intensity)
    val_latents = (
        encode_moments(codec, val_set, args.batch_size, device, False)[:, 0, 0] if val_samples else None
    )
    return train_set, val_latents, torch.tensor([label for _, label in val_samples])


def find_resume(args, output_dir):
    """The checkpoint to resume from, or None; refuses to overwrite another run's files.

    A resumed run takes its architecture (and, unless one is given, its VAE) from the checkpoint.
    """
    path = resume_path(args, output_dir)
    if path is None:
        return None
    resume = load_checkpoint(path, flag="--resume")
    # Only what fixes the shapes is taken over; epochs, rates and intervals may change on resume.
    for key in ARCHITECTURE_KEYS:
        setattr(args, key, resume["config"][key])
    if args.vae_pretrained == DEFAULT_VAE:  # a VAE given on the command line wins (e.g. a moved folder)
        args.vae_pretrained = resume["config"]["vae_pretrained"]
    return resume


def resume_path(args, output_dir):
    """The checkpoint --resume names, or None; a fresh run refuses a folder that holds another run."""
    latest = output_dir / "checkpoint_latest.pt"
    if args.resume is None and latest.exists():
        raise UserError(
            f"--output_dir {output_dir} already holds a run; pass --resume to continue it "
            "or choose another --output_dir"
        )
    if args.resume is None:
        return None
    return latest if args.resume == "latest" else Path(args.resume)


def build_model(args, codec, num_classes, resume):
    """Class-conditional UNet sized from the flags (or the resumed checkpoint's config)."""
    latent_size = args.image_size // codec.downsample
    # A resumed UNet is rebuilt from its stored diffusers config, so later changes to the presets
    # never alter a run in progress.
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
    # Every UNet level but the last halves the latents: the image must divide by all the halvings.
    multiple = codec.downsample * 2 ** (len(unet.config.block_out_channels) - 1)
    if args.image_size % multiple:
        raise UserError(
            f"--image_size {args.image_size} must be a multiple of {multiple} "
            f"(VAE downsampling x UNet levels)"
        )
    return ClassConditionalUNet(unet, ClassEmbedder(num_classes, unet.config.cross_attention_dim))


def run_config(args, codec, model):
    """The full run configuration stored in every checkpoint."""
    # plain() leaves dicts, lists and scalars only, which torch.load(weights_only=True) accepts.
    config = dict(vars(args))
    config.update(codec.config())
    config["latent_size"] = args.image_size // codec.downsample
    config["num_classes"] = model.class_embedder.num_classes
    return plain(config)


def restore_training_state(ckpt, accelerator, model, ema, optimizer, lr_scheduler):
    """Load weights, optimizer, schedules and RNG streams; returns the saved progress counters."""
    # Into the plain modules: checkpoint_state saved them unwrapped, without DDP's 'module.' prefix.
    model = accelerator.unwrap_model(model)
    model.unet.load_state_dict(ckpt["unet"])
    model.class_embedder.load_state_dict(ckpt["class_embedder"])
    ema.model.unet.load_state_dict(ckpt["ema_unet"])
    ema.model.class_embedder.load_state_dict(ckpt["ema_class_embedder"])
    # The EMA's update count too: it fixes where the decay warm-up stands.
    ema.load_state_dict(ckpt["ema"])
    optimizer.load_state_dict(ckpt["optimizer"])
    lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
    # Only fp16 on CUDA has a grad scaler; checkpoints of bf16 or CPU runs store None.
    if accelerator.scaler is not None and ckpt.get("scaler"):
        accelerator.scaler.load_state_dict(ckpt["scaler"])
    restore_rng(ckpt, accelerator)
    return dict(ckpt["progress"])


def restore_rng(ckpt, accelerator):
    """This process's saved random streams, when the checkpoint has one per process as now."""
    # Streams belong to ranks: with another process count there is no faithful way to map them over.
    if len(ckpt["rng"]) == accelerator.num_processes:
        checkpoints.set_rng_state(ckpt["rng"][accelerator.process_index])
    elif accelerator.is_main_process:
        print("note: process count changed since the checkpoint; random streams are re-seeded")


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
    fid: object = None  # FIDEval on the main process with --eval_every, else None


def train_epoch(run, train_set, epoch, batches_per_epoch, stop):
    """One epoch (or its remainder after a resume); returns a signal number when asked to stop."""
    accelerator, args, progress = run.accelerator, run.args, run.progress
    model = run.model
    # A resumed epoch continues after its last optimizer step; epoch_loader keeps the same order.
    skip = progress["step_in_epoch"] if progress["epoch"] == epoch else 0  # batches trained before a stop
    loader = epoch_loader(train_set, args, epoch, accelerator, skip)
    accum = args.gradient_accumulation_steps
    # The loss and images since the last log line, for its mean loss and throughput.
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
            # A group is complete: step, then record the position that a checkpoint taken now resumes from.
            grad_norm = optimizer_step(run)
            progress.update(epoch=epoch, step_in_epoch=index + 1, global_step=progress["global_step"] + 1)
            log_step(run, window, grad_norm, bar)
            signum = stop.agreed(accelerator)  # the same answer on every process: all stop together
            if signum:
                return signum
    # The epoch is done: a resume from here starts the next epoch at its first batch.
    progress.update(epoch=epoch + 1, step_in_epoch=0)
    return 0


def backward_micro_batch(run, inputs, labels, epoch, group_size):
    """Gradients of one micro-batch, scaled by its accumulation group's size; returns the mean loss."""
    accelerator, args = run.accelerator, run.args
    # Latents are drawn outside autocast, so the frozen VAE encodes in its own precision.
    latents = training_latents(inputs, run.codec, args.cache_latents, not args.no_flip)
    # The null class is ClassEmbedder's extra row, index len(class_names).
    with accelerator.autocast():
        loss = diffusion_loss(
            run.model,
            run.noise_scheduler,
            latents,
            labels.to(latents.device),
            args.cfg_dropout,
            len(run.class_names),
        )
    # Checked before backward: a non-finite loss never reaches the weights or the EMA.
    mean_loss = check_finite(accelerator, loss, epoch, run.progress)
    accelerator.backward(loss / group_size)
    return mean_loss


def optimizer_step(run):
    """Clip, step optimizer and LR schedule, update the EMA; returns the gradient norm."""
    accelerator, model, optimizer = run.accelerator, run.model, run.optimizer
    # accelerate unscales fp16 gradients before clipping, so --max_grad_norm means the same in any precision.
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), run.args.max_grad_norm)
    optimizer.step()
    run.lr_scheduler.step()
    # None rather than zeros: the next backward writes fresh gradients instead of adding to zero tensors.
    optimizer.zero_grad(set_to_none=True)
    run.ema.update(accelerator.unwrap_model(model))  # the EMA follows the plain module, not DDP
    return grad_norm


def check_finite(accelerator, loss, epoch, progress):
    """Mean loss over processes; stops every process together when any loss is not finite."""
    # gather rather than reduce: the message then shows which process diverged.
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
    # window['loss'] is the mean over this step's micro-batches and processes (see train_epoch).
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
    # Validated every --val_every epochs and after the last one; only a strictly lower loss is a new best.
    if val_latents is not None and (epochs_done % args.val_every == 0 or last):
        val_loss = evaluate(run, val_latents, val_labels)
        progress["val_history"].append([epochs_done, val_loss])
        if val_loss < progress["best_val_loss"]:
            progress["best_val_loss"] = val_loss
            names.append("checkpoint_best.pt")
    elif val_latents is None and last:
        names.append("checkpoint_best.pt")  # no held-out images: the final weights are the best we know
    fid_best = False
    if args.eval_every and epochs_done % args.eval_every == 0:
        improved = run.fid.improved(epochs_done) if run.fid is not None else False
        fid_best = broadcast_object_list([improved])[0]  # the main process's verdict, on every process
    if args.best_by == "fid":  # checkpoint_best.pt is then the lowest-FID model, not the lowest-loss one
        names = [name for name in names if name != "checkpoint_best.pt"] + ["checkpoint_best.pt"] * fid_best
    if epochs_done % args.save_every == 0:
        names.append(f"checkpoint_epoch_{epochs_done}.pt")
    if last:
        names.append("checkpoint_final.pt")
    # Grids come from the main process alone; the others wait for it at the checkpoint barrier.
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
    # One all-reduce of (sum, count): the mean over every held-out image, however they were shared out.
    total = accelerator.reduce(
        torch.stack([loss_sum, torch.tensor(float(count), device=loss_sum.device)]), "sum"
    )
    val_loss = (total[0] / total[1]).item()
    if run.writer is not None:
        run.writer.add_scalar("val/loss", val_loss, run.progress["global_step"])
        print(f"validation loss (EMA, fixed noise): {val_loss:.5f}", flush=True)
    return val_loss


class FIDEval:
    """In-training FID and KID (core/inception.py) of --eval_samples EMA images, drawn like the grids (DDIM,
    --sample_steps, --sample_cfg_scale; classes in turn, the same noise each time), against the held-out
    images; the scores go to TensorBoard and progress["eval_history"]."""

    def __init__(self, run, val_set):
        def reference():  # read only when the output folder has no cached features for these images
            for first in range(0, len(val_set), 32):
                yield to_unit(
                    torch.stack([val_set[i][0] for i in range(first, min(first + 32, len(val_set)))])
                )

        names = [str(path) for path, _ in val_set.samples]
        device, cache = run.accelerator.device, run.output_dir / "fid_reference.pt"
        self.run = run
        self.metrics = inception.TrainingEval(
            run.args.eval_inception_weights, device, (names, reference()), cache
        )

    @torch.no_grad()
    def batch(self, n, first):
        run, args = self.run, self.run.args
        side = run.config["latent_size"]
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + first)
        noise = torch.randn(n, run.codec.latent_channels, side, side, generator=generator)
        device = run.accelerator.device
        labels = (torch.arange(first, first + n) % len(run.class_names)).to(device)
        sampler = make_sampler("ddim", run.noise_scheduler.config)
        with run.accelerator.autocast():
            latents = denoise(
                run.ema.model, sampler, noise.to(device), labels, args.sample_cfg_scale, args.sample_steps
            )
        return to_unit(run.codec.decode(latents))

    def improved(self, epochs_done):
        """Score the EMA weights, log the scores, and say whether the FID is the best so far."""
        history, step = self.run.progress["eval_history"], self.run.progress["global_step"]
        best = min((entry["fid"] for entry in history), default=math.inf)
        scores = self.metrics.score(self.batch, self.run.args.eval_samples, self.run.args.seed)
        history.append({"epoch": epochs_done, "step": step, **scores})
        self.run.writer.add_scalar("eval/fid", scores["fid"], step)
        self.run.writer.add_scalar("eval/kid", scores["kid"], step)
        counts = f"{len(self.metrics.reference)} held-out images, {self.run.args.eval_samples} samples"
        kid = f"KID {scores['kid']:.5f} +- {scores['kid_std']:.5f}"
        print(f"FID (EMA, {counts}): {scores['fid']:.3f} (best so far {best:.3f}), {kid}", flush=True)
        return scores["fid"] < best


@torch.no_grad()
def save_sample_grid(run, epochs_done):
    """EMA samples from fixed noise, one row per class, to disk and TensorBoard."""
    args, codec, device = run.args, run.codec, run.accelerator.device
    # A row per class (16 at most, so grids stay readable), from noise fixed by seed, class and column:
    # the grids of successive epochs show the same samples improving.
    classes = range(min(len(run.class_names), 16))
    shape = (codec.latent_channels, run.config["latent_size"], run.config["latent_size"])
    noise = torch.cat([noise_for(args.seed, c, range(args.grid_samples_per_class), shape) for c in classes])
    labels = torch.tensor(classes, device=device).repeat_interleave(args.grid_samples_per_class)
    # A separate DDIM scheduler (Song et al. 2021): its set_timesteps leaves the training one untouched.
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
    save_on_main(run.accelerator, lambda rng: checkpoint_state(run, rng), [run.output_dir / n for n in names])


def save_on_main(accelerator, make_state, paths):
    """Write make_state(rng) atomically to each path (collective: every process must call it)."""
    # Every process's random state is gathered first, so that a resume gives each rank its own stream.
    rng = training.rng_states(accelerator)
    if accelerator.is_main_process:
        # Built once, written under every name: the best, periodic and latest files of an epoch are identical.
        state = make_state(rng)
        for path in paths:
            files.atomic_save(state, path)
    accelerator.wait_for_everyone()


def checkpoint_state(run, rng):
    """Everything needed to sample, to build a ControlNet on, or to resume bit for bit."""
    accelerator, ema = run.accelerator, run.ema
    model = accelerator.unwrap_model(run.model)
    # The unet_config and weights alone rebuild the UNet (ControlNet reads them); epoch, global_step and
    # best_val_loss repeat progress at the top level, where the README's checkpoint contract puts them.
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
        # Resume state: optimizer moments, LR schedule, fp16 loss scale and EMA counters.
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
    # By epoch number, not by name: checkpoint_epoch_10 sorts before checkpoint_epoch_9 as text.
    periodic = sorted(output_dir.glob("checkpoint_epoch_*.pt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    for path in periodic[:-limit]:
        path.unlink()


if __name__ == "__main__":
    run_cli(main)
