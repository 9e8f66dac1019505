"""Train a class-conditional DiT in the latent space of a frozen VAE.

Runs as `python train.py ...`, under `torchrun` or under `accelerate launch` (one process per GPU; gloo
on CPU). Data layout: DATA/<class_name>/<images>; classes are the sorted folder names.
"""

import contextlib
import glob
import hashlib
import io
import json
import logging
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import broadcast_object_list, gather_object
from torch.utils.data import DataLoader, Sampler, Subset, TensorDataset
from tqdm.auto import tqdm

from core import checkpoints, cli, files, images, inception, sde, sde_sampling, training
from core.errors import UserError, run_cli, warn
from dataset import ImageFolderDataset
from diffusion import classifier_free_guidance, create_diffusion
from diffusion.objectives import add_objective_flags, check_resume, model_keys
from models import POSITION_EMBEDDINGS
from utils import (
    accelerator_for,
    add_architecture_flags,
    architecture,
    build_dit,
    encode,
    images_from_latents,
    latent_size,
    load_checkpoint,
    load_vae,
    other_model,
    vae_downsample,
)

NUMBERED = "[0-9]" * 7 + ".pt"  # RESULTS/NNN-<model>/checkpoints/NNNNNNN.pt, as the original DiT names them
GRID_IMAGES, GRID_STEPS, GRID_CFG = 16, 50, 4.0
POS_HELP = "sincos: the published fixed table; rope: 2-D rotary embeddings (samples at other sizes)"
LOW_HIGH = dict(type=cli.finite_float, nargs=2, metavar=("LOW", "HIGH"))  # --intensity-range's value pair
# Checkpoints written before the shared flag vocabulary store their flags under the seed's names.
SEED_NAMES = {
    "data_path": "data_root", "epochs": "num_epochs", "max_steps": "max_train_steps", "lr": "learning_rate",
    "class_dropout_prob": "cfg_dropout", "global_seed": "seed", "ckpt_every": "save_every",
    "precision": "mixed_precision", "grad_checkpointing": "gradient_checkpointing",
}  # fmt: skip


def build_parser():
    parser = cli.Parser(
        description=__doc__,
        epilog="Data layout: DATA/<class_name>/*.{png,jpg,jpeg,bmp,tif,tiff,webp}; grayscale data is "
        "trained through the RGB VAE and sampled back as grayscale. Integer images are scaled by the data "
        "set's bit depth (one scan: the largest value rounded up to 2^k - 1), float images by "
        "--intensity-range; the rule is stored in the checkpoint and samples are written at that depth. "
        "--mixed-precision fp32 means no; auto picks bf16 where the GPU has it; the CPU always runs fp32.",
    )
    add = parser.add_argument
    add_architecture_flags(parser, "DiT-B/2")
    add_objective_flags(parser)
    add("--pos_embed", default="sincos", choices=POSITION_EMBEDDINGS, help=POS_HELP)
    add("--data_root", "--data_path", help="folder with one sub-folder of images per class (required)")
    add("--results_dir", default="results", help="runs go to RESULTS/NNN-<model>/")
    add("--image_size", type=cli.positive_int, default=256, help="image side, a multiple of 8 x patch size")
    add("--num_classes", type=cli.positive_int, help="label-table size (default: number of class folders)")
    add("--global_batch_size", type=cli.positive_int, default=256, help="batch size over all processes")
    add("--num_epochs", "--epochs", type=cli.positive_int, default=1400, help="training epochs")
    add("--max_train_steps", "--max_steps", type=cli.positive_int, help="stop after N steps (default: none)")
    add("--learning_rate", "--lr", type=cli.positive_float, default=1e-4, help="constant AdamW learning rate")
    add("--ema_decay", type=cli.fraction, default=0.9999, help="EMA decay per step, in [0, 1)")
    add("--cfg_dropout", "--class_dropout_prob", type=cli.fraction, default=0.1, help="label dropout for CFG")
    add("--vae", default="ema", help="'ema', 'mse' (stabilityai/sd-vae-ft-*) or a local diffusers folder")
    add("--bit_depth", type=cli.bit_depth, help="integer images' bit depth, e.g. 12 (default: scan the data)")
    add("--intensity_range", **LOW_HIGH, help="range of float ('F') images mapped onto [0, 1] (default: 0 1)")
    add("--seed", "--global_seed", type=int, default=0, help="random seed")
    add("--num_workers", type=cli.nonnegative_int, default=4, help="data loader workers per process")
    add("--log_every", type=cli.positive_int, default=100, help="log the loss every N steps")
    add("--save_every", "--ckpt_every", type=cli.positive_int, default=50000, help="checkpoint every N steps")
    add("--checkpoints_total_limit", type=cli.positive_int, help="keep N newest checkpoints (default: all)")
    add("--sample_every", type=cli.nonnegative_int, default=10000, help="EMA grid every N steps, 0 = never")
    add("--mixed_precision", "--precision", type=cli.mixed_precision, default="auto", help="no, fp16 or bf16")
    add("--cache_latents", action="store_true", help="encode the data once (both flips, mean and std)")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--gradient_checkpointing", "--grad_checkpointing", action="store_true", help="recompute activations")
    add("--val_fraction", "--val_split", type=cli.fraction, default=0.0, help="held-out share, picks best.pt")
    inception.add_eval_flags(parser, unit="steps")
    add("--resume", help="checkpoint file, or a run folder (resumes its newest checkpoint)")
    return parser


def parse_args(argv=None):
    """Flags and the checkpoint to resume; with --resume, flags not typed keep the resumed run's values."""
    parser = build_parser()
    args = parser.parse_args(argv)
    typed = cli.explicit_flags(parser, sys.argv[1:] if argv is None else argv)
    resume = None
    if args.resume:
        path = find_checkpoint(args.resume)
        resume = load_resume(path)
        dests = {action.dest for action in parser._actions} - {"resume"}
        saved = {SEED_NAMES.get(k, k): v for k, v in resume["args"].items()}
        parser.set_defaults(**{k: v for k, v in saved.items() if k in dests})
        args = parser.parse_args(argv)
        args.resume = str(path)
        check_resume(resume["config"], args, typed, path)
    sde.objective_of(vars(args))  # e.g. --beta-max with ddpm: one line now, before any data is read
    if args.intensity_range and not args.intensity_range[0] < args.intensity_range[1]:
        parser.error(f"--intensity-range needs LOW < HIGH, got {' '.join(map(str, args.intensity_range))}")
    if args.data_root is None:
        raise UserError("--data-path is required: a folder with one sub-folder of images per class")
    inception.check_eval_flags(args.eval_every, args.best_by, 2)  # held-out images: counted with the data
    if args.eval_every:  # the Inception file is found (or refused offline) before any data is read
        args.eval_inception_weights = inception.weights_path(args.eval_inception_weights)
    if resume:
        cli.check_creatable_dir(Path(args.resume).absolute().parent.parent / "checkpoints", "--resume")
    else:
        cli.check_creatable_dir(args.results_dir, "--results-dir")
    return args, resume


def find_checkpoint(path):
    """The file --resume means: the path itself, or the newest numbered checkpoint of a run folder."""
    if os.path.isdir(path):
        found = checkpoints.periodic(Path(path) / "checkpoints", NUMBERED)
        if not found:
            raise UserError(
                f"--resume {path} holds no checkpoints/NNNNNNN.pt: pass a checkpoint or run folder"
            )
        return found[-1]
    if not os.path.isfile(path):
        raise UserError(f"--resume {path} does not exist: pass a checkpoint file or a run folder")
    return Path(path)


def load_resume(path):
    """A train.py checkpoint; files of the project's other trainers and official ones are user errors."""
    ckpt = load_checkpoint(path, "--resume checkpoint")
    what = other_model(ckpt)
    if what:
        raise UserError(
            f"--resume {path} is {what}, not a DiT checkpoint: resume that run with its own trainer, "
            "or pass a dit/train.py run folder or checkpoint"
        )
    if not isinstance(ckpt, dict) or not {"config", "args", "model", "ema"} <= ckpt.keys():
        raise UserError(
            f"--resume {path} is not a checkpoint of dit/train.py (no config): it cannot be resumed; "
            "pass a file from RESULTS/NNN-<model>/checkpoints"
        )
    return ckpt


# --------------------------------------------------------------------------- data


def prepare_data(args, resume, accelerator):
    """Data set, VAE, model config and the data's decoding rule.

    The cheap checks (classes, VAE, sizes) come before the scan that decodes every image, and all of
    them before the run folder exists, so a run that fails on its input leaves nothing behind.
    """
    saved = resume["config"] if resume else None
    dataset = ImageFolderDataset(args.data_root, saved["image_size"] if saved else args.image_size)
    vae = load_vae(args.vae, accelerator.device)
    if saved and saved["class_names"] != dataset.class_names:
        raise UserError(
            f"--data-path classes {dataset.class_names} differ from the checkpoint's {saved['class_names']}"
        )
    config = saved or model_config(args, dataset, vae)
    heldout = training.split_heldout(len(dataset), args.val_fraction, args.seed)[1]
    inception.check_eval_flags(args.eval_every, args.best_by, len(heldout))
    rule = data_rule(dataset, args, resume, accelerator)
    dataset.intensity = rule["intensity"]
    return dataset, vae, config, rule


def model_config(args, dataset, vae):
    """Architecture, class and VAE facts, saved with every checkpoint (a resumed run keeps its own)."""
    arch = architecture(args.model, {k: getattr(args, k) for k in ("depth", "hidden_size", "num_heads")})
    num_classes = args.num_classes or len(dataset.class_names)
    if num_classes < len(dataset.class_names):
        raise UserError(
            f"--num-classes {num_classes} is less than the {len(dataset.class_names)} class folders "
            f"in {args.data_root}"
        )
    head_dim = arch["hidden_size"] // arch["num_heads"]
    if args.pos_embed == "rope" and head_dim % 4:
        raise UserError(f"--pos-embed rope needs a head size (hidden / heads) divisible by 4, not {head_dim}")
    downsample = vae_downsample(vae)
    return dict(
        model=args.model,
        **arch,
        **model_keys(args),
        image_size=args.image_size,
        num_classes=num_classes,
        input_size=latent_size(args.image_size, downsample, arch["patch_size"]),
        in_channels=vae.config.latent_channels,
        vae=args.vae,
        vae_downsample=downsample,
        latent_scale=float(vae.config.scaling_factor),
        class_names=dataset.class_names,
        num_timesteps=1000,
    )


def data_rule(dataset, args, resume, accelerator):
    """{"channels", "intensity"} of the data set, found before any training by decoding every file once.

    Each process scans its share of the files; the main process alone prints the scan's warnings, since
    its share, every world-th file, shows what the set mixes. A resumed run keeps the rule it was trained
    with (a checkpoint written before rules were stored takes the scan's).
    """
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = None
    if dataset.samples[rank::world]:
        quiet = (
            contextlib.nullcontext()
            if accelerator.is_main_process
            else contextlib.redirect_stderr(io.StringIO())
        )
        try:
            with quiet:
                mine = dataset.scan(args.bit_depth, args.intensity_range, rank, world)
        except UserError as error:  # every process must stop with it, not wait for the others forever
            mine = {"error": str(error)}
    scans = [scan for scan in gather_object([mine]) if scan is not None]
    for scan in scans:
        if "error" in scan:
            raise UserError(scan["error"])
    found = images.combine(scans)
    if resume and "intensity" in resume:
        kept = {"channels": resume["channels"], "intensity": resume["intensity"]}
        if kept != found and accelerator.is_main_process:
            warn(
                f"the data now scans as {found['channels']}-channel {images.describe(found['intensity'])}, "
                f"the checkpoint was trained on {kept['channels']}-channel "
                f"{images.describe(kept['intensity'])}: keeping the checkpoint's rule"
            )
        return kept
    return found


class EpochShuffle(Sampler):
    """A shuffle that depends only on the seed and the epoch, so a resumed run sees the same batches."""

    def __init__(self, size, seed):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self):
        return self.size


def make_loader(data, args, world):
    """Per-process batches of the global batch; accelerate.prepare shards them over the processes."""
    sampler, generator = EpochShuffle(len(data), args.seed), torch.Generator().manual_seed(args.seed)
    return DataLoader(data, args.global_batch_size // world, sampler=sampler, drop_last=True,
                      num_workers=args.num_workers, worker_init_fn=training.ignore_sigint,
                      pin_memory=torch.cuda.is_available(), generator=generator)  # fmt: skip


def epoch_batches(loader, step, steps_per_epoch, accelerator):
    """The batches of the epoch that `step` is in, from that step on (a resumed run continues mid-epoch)."""
    loader.set_epoch(step // steps_per_epoch)
    done = step % steps_per_epoch
    return accelerator.skip_first_batches(loader, done) if done else loader


def encode_images(dataset, indices, vae, scale, device):
    """Posterior mean and std of images (stacked as [plain, mirrored]) for the given indices."""
    pixels = torch.stack([dataset[int(i)][0] for i in indices]).to(device)  # (B, 3, H, W)
    mean, std = encode(vae, torch.cat([pixels, pixels.flip(-1)]), scale)
    return {
        "mean": torch.stack(mean.chunk(2), 1).cpu(),
        "std": torch.stack(std.chunk(2), 1).cpu(),
    }  # (B, 2, C, h, w)


def latent_batch(batch, vae, scale, cached, generator):
    """Training latents with random horizontal flips: x_0 ~ q(z | image), drawn from `generator`."""
    device = generator.device
    if cached:
        mean, std, y = batch
        flip = (torch.rand(len(y), generator=generator, device=device) < 0.5).long()
        rows = torch.arange(len(y), device=device)
        mean, std = mean[rows, flip], std[rows, flip]  # (N, C, h, w)
    else:
        pixels, y = batch
        flip = torch.rand(len(y), generator=generator, device=device) < 0.5
        mean, std = encode(vae, torch.where(flip[:, None, None, None], pixels.flip(-1), pixels), scale)
    return mean + std * torch.randn(mean.shape, generator=generator, device=device), y


# --------------------------------------------------------------------------- latent cache


def file_stats(paths):
    """(absolute path, size, mtime) of each file: what changes when a file is edited or replaced."""
    stats = [(os.path.abspath(p), os.stat(p)) for p in paths]
    return [(p, stat.st_size, stat.st_mtime_ns) for p, stat in stats]


def latent_cache_path(dataset, vae, config, run_dir):
    """run_dir/latents-<N>-<key>.pt, keyed on everything the latents depend on.

    The files (names, sizes, mtimes), the image size, the decoding rule and the VAE (its name, config
    and, for a local folder, its files), so an edited image or another VAE never reuses stale latents.
    """
    vae_folder = config["vae"] if os.path.isdir(config["vae"]) else None
    vae_files = sorted(glob.glob(os.path.join(vae_folder, "**"), recursive=True)) if vae_folder else []
    key = {
        "files": file_stats(path for path, _ in dataset.samples),
        "image_size": config["image_size"],
        "intensity": dataset.intensity,
        "vae": [config["vae"], dict(vae.config), file_stats(f for f in vae_files if os.path.isfile(f))],
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return os.path.join(run_dir, f"latents-{len(dataset)}-{digest}.pt")


def cache_latents(dataset, vae, config, run_dir, accelerator, logger):
    """Latent mean and std of every image and its mirror image, shared by all processes through run_dir."""
    path = latent_cache_path(dataset, vae, config, run_dir)
    rank, world = accelerator.process_index, accelerator.num_processes
    if not os.path.exists(path):
        logger.info(f"Caching latents of {len(dataset)} images (both flips) to {path}")
        if accelerator.is_main_process:  # caches of other files or VAEs are stale: they only fill the disk
            for stale in glob.glob(os.path.join(run_dir, "latents-*.pt")):
                os.remove(stale)
        shard = list(range(rank, len(dataset), world))
        parts = [
            encode_images(dataset, indices, vae, config["latent_scale"], accelerator.device)
            for indices in np.array_split(shard, max(1, len(shard) // 32))
        ]
        shard_table = {
            "index": torch.tensor(shard),
            **{k: torch.cat([p[k] for p in parts]) for k in ("mean", "std")},
        }
        files.atomic_save(shard_table, f"{path}.rank{rank}")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            files.atomic_save(merge_shards(path, world, dataset), path)
        accelerator.wait_for_everyone()
    cache = torch.load(path, weights_only=True)
    return TensorDataset(cache["mean"], cache["std"], cache["label"])


def merge_shards(path, world, dataset):
    """Combine the per-process latent shards into one table ordered like the data set."""
    shards = [torch.load(f"{path}.rank{r}", weights_only=True) for r in range(world)]
    order = torch.cat([s["index"] for s in shards]).argsort()
    merged = {k: torch.cat([s[k] for s in shards])[order] for k in ("mean", "std")}
    merged["label"] = torch.tensor([label for _, label in dataset.samples])
    for r in range(world):
        os.remove(f"{path}.rank{r}")
    return merged


def training_data(dataset, vae, config, args, run_dir, accelerator, logger, resume):
    """(training set, held-out evaluator or None): cached latents or images, minus the held-out images."""
    data = (
        cache_latents(dataset, vae, config, run_dir, accelerator, logger) if args.cache_latents else dataset
    )
    train_indices, heldout_indices = training.split_heldout(len(dataset), args.val_fraction, args.seed)
    if not heldout_indices:
        return data, None, []
    heldout = None
    if accelerator.is_main_process:  # only the main process evaluates and writes best.pt
        heldout = HeldOut(
            dataset,
            heldout_indices,
            vae,
            config["latent_scale"],
            accelerator.device,
            args.seed,
            sde.objective_of(config),
        )
        if resume and resume.get("best_val_loss") is not None:  # a resumed run keeps its best so far
            heldout.best = resume["best_val_loss"]
    return Subset(data, train_indices), heldout, heldout_indices


class HeldOut:
    """Held-out images with fixed timesteps and noise; their loss under the EMA weights selects best.pt.

    A continuous objective draws its times and noise from a generator seeded afresh at every evaluation,
    so every save scores the same draws too.
    """

    def __init__(self, dataset, indices, vae, scale, device, seed, objective):
        chunks = [indices[i : i + 32] for i in range(0, len(indices), 32)]
        self.latents = torch.cat(
            [encode_images(dataset, c, vae, scale, device)["mean"][:, 0] for c in chunks]
        )
        self.labels = torch.tensor([dataset.samples[i][1] for i in indices])
        generator = torch.Generator().manual_seed(seed)
        self.t = torch.randint(0, 1000, (len(indices),), generator=generator)
        self.noise = torch.randn(self.latents.shape, generator=generator)
        self.device, self.best, self.seed, self.objective = device, math.inf, seed, objective

    @torch.no_grad()
    def loss(self, ema, diffusion):
        """Mean loss (hybrid, or the objective's) of the EMA model on the held-out set."""
        total, generator = 0.0, torch.Generator().manual_seed(self.seed)
        for i in range(0, len(self.t), 64):
            part = [x[i : i + 64].to(self.device) for x in (self.latents, self.t, self.labels, self.noise)]
            if self.objective is None:
                total += diffusion.training_losses(ema, *part)["loss"].sum().item()
            else:  # a batch mean: weighted by the batch's size
                total += self.objective.loss(ema, part[0], part[2], generator).item() * len(part[0])
        return total / len(self.t)

    def improved(self, ema, diffusion, step, logger, writer):
        """Evaluate, log, and say whether this is the best EMA model so far."""
        value = self.loss(ema, diffusion)
        logger.info(f"(step={step:07d}) Held-out loss (EMA): {value:.4f} (best so far {self.best:.4f})")
        writer.scalars(step, **{"val/loss_ema": value})
        improved = value < self.best
        self.best = min(self.best, value)
        return improved


# --------------------------------------------------------------------------- run folder, logs, grids


def start_run(args, resume, config, accelerator):
    """RESULTS/NNN-<model>/ with the next free index (the checkpoint's own run folder on resume), its logger
    and TensorBoard writer."""
    run_dir = Path(args.resume).absolute().parent.parent if resume else None
    if resume:
        cli.ensure_writable_dir(run_dir / "checkpoints", "--resume")
    else:
        cli.ensure_writable_dir(args.results_dir, "--results-dir")
    if accelerator.is_main_process:
        if not resume:
            taken = [int(p.name.split("-")[0]) for p in Path(args.results_dir).glob("[0-9][0-9][0-9]-*")]
            name = f"{max(taken, default=-1) + 1:03d}-{config['model'].replace('/', '-')}"
            run_dir = Path(args.results_dir) / name
        for folder in (run_dir, run_dir / "checkpoints", run_dir / "samples"):
            folder.mkdir(parents=True, exist_ok=True)
            files.clean_temporaries(folder)  # left by a run killed while writing
    run_dir = Path(broadcast_object_list([run_dir])[0])
    logger = create_logger(run_dir, accelerator.is_main_process)
    where = f"{accelerator.num_processes} process(es) on {accelerator.device}"
    logger.info(f"Run folder {run_dir}; {where}; config {config}")
    return run_dir, logger, training.Writer(run_dir / "tensorboard", accelerator.is_main_process)


def create_logger(run_dir, enabled):
    """Logger writing to RUN/log.txt and the console on the main process, silent elsewhere."""
    logger = logging.getLogger("dit-train")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if enabled:
        for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(run_dir / "log.txt")):
            handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%Y-%m-%d %H:%M:%S"))
            logger.addHandler(handler)
    return logger


class LossMeter:
    """Running loss and throughput between log lines; the loss is averaged over processes."""

    def __init__(self, args, accelerator, logger, writer):
        self.args, self.accelerator, self.logger, self.writer = args, accelerator, logger, writer
        self.reset()

    def reset(self):
        self.total, self.steps, self.timer = 0.0, 0, training.Timer(self.accelerator.device)

    def update(self, loss):
        self.total += loss.item()
        self.steps += 1

    def log(self, step, grad_norm):
        (total,) = training.sum_across(self.accelerator, self.total / self.steps)
        loss, steps_per_sec = total / self.accelerator.num_processes, self.steps / self.timer.elapsed()
        self.logger.info(f"(step={step:07d}) Train Loss: {loss:.4f}, Train Steps/Sec: {steps_per_sec:.2f}")
        images_per_sec = steps_per_sec * self.args.global_batch_size
        self.writer.scalars(step, **{"train/loss": loss, "train/lr": self.args.learning_rate,
                                     "train/grad_norm": grad_norm, "train/steps_per_sec": steps_per_sec,
                                     "train/images_per_sec": images_per_sec})  # fmt: skip
        self.reset()


class Grids:
    """EMA samples from fixed noise, to TensorBoard and RUN/samples/NNNNNNN.png (8-bit previews).

    Continuous objectives preview with Euler steps of the probability-flow ODE from a prior drawn by a
    generator seeded afresh each time: the same noise at every step, deterministic and cheap.
    """

    def __init__(self, run_dir, config, channels, vae, writer, seed, device):
        n = min(GRID_IMAGES, max(4, config["num_classes"]))
        size = config["input_size"]
        generator = torch.Generator().manual_seed(seed)
        self.noise = torch.randn(n, config["in_channels"], size, size, generator=generator).to(device)
        self.labels = (torch.arange(n) % config["num_classes"]).to(device)
        self.folder, self.scale, self.channels = run_dir / "samples", config["latent_scale"], channels
        self.vae, self.writer, self.seed, self.objective = vae, writer, seed, sde.objective_of(config)

    @torch.no_grad()
    def sample(self, ema, noise, labels, seed):
        """Images (N, channels, H, W) in [0, 1] of the EMA model from noise (the DDPM's) or from seed."""
        model_fn = classifier_free_guidance(ema, GRID_CFG, ema.null_class)
        if self.objective is None:
            latents = create_diffusion(GRID_STEPS).sample_loop(model_fn, noise, labels)
        else:
            generator = torch.Generator().manual_seed(seed)
            latents, _ = sde_sampling.sample(model_fn, self.objective, noise.shape, GRID_STEPS, "euler",
                                             y=labels, generator=generator, device=noise.device)  # fmt: skip
        return images_from_latents(self.vae, latents, self.scale, self.channels)

    def write(self, ema, step):
        samples = self.sample(ema, self.noise, self.labels, self.seed)
        grid = training.save_grid(samples, self.folder / f"{step:07d}.png", images.EIGHT_BIT)
        self.writer.image("samples/ema", grid, step)


class FIDEval:
    """In-training FID and KID (core/inception.py) of --eval-samples EMA images, drawn with the grids'
    sampler and classes in turn, against the held-out images; the history travels in the checkpoints."""

    def __init__(self, args, dataset, indices, grids, run_dir, device, history):
        def reference():  # read only when the run folder has no cached features for these images
            for first in range(0, len(indices), 32):
                yield torch.stack([(dataset[i][0] + 1) / 2 for i in indices[first : first + 32]])

        names = [str(dataset.samples[i][0]) for i in indices]
        cache = run_dir / "fid_reference.pt"
        self.metrics = inception.TrainingEval(
            args.eval_inception_weights, device, (names, reference()), cache
        )
        self.grids, self.count, self.seed, self.device = grids, args.eval_samples, args.seed, device
        self.classes, self.history = len(dataset.class_names), history
        self.best = min((entry["fid"] for entry in history), default=math.inf)

    def batch(self, ema, n, first):
        # The same noise and labels at every evaluation (seeded by the image index): curves compare weights.
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + first)
        shape = (n, *self.grids.noise.shape[1:])
        noise = torch.randn(shape, generator=generator).to(self.device)
        labels = (torch.arange(first, first + n) % self.classes).to(self.device)
        return self.grids.sample(ema, noise, labels, self.seed + first)

    def improved(self, ema, step, logger, writer):
        """Score the EMA model, log it, and say whether its FID is the best so far."""
        scores = self.metrics.score(lambda n, first: self.batch(ema, n, first), self.count, self.seed)
        self.history.append({"step": step, **scores})
        writer.scalars(step, **{"eval/fid": scores["fid"], "eval/kid": scores["kid"]})
        kid = f"KID {scores['kid']:.5f} +- {scores['kid_std']:.5f}"
        logger.info(f"(step={step:07d}) FID (EMA, {self.count} samples): {scores['fid']:.3f} (best so far "
                    f"{self.best:.3f}), {kid}")  # fmt: skip
        improved = scores["fid"] < self.best
        self.best = min(self.best, scores["fid"])
        return improved


# --------------------------------------------------------------------------- checkpoints


def restore(resume, model, ema, optimizer, generator, accelerator, logger):
    """Weights, optimizer and this process's random streams of the checkpoint; returns its step."""
    if resume is None:
        return 0
    model.load_state_dict(resume["model"])
    ema.load_state_dict(resume["ema"])
    optimizer.load_state_dict(resume["opt"])
    if len(resume["rng"]) == accelerator.num_processes:
        checkpoints.set_rng_state(resume["rng"][accelerator.process_index], generator)
    else:
        saved = len(resume["rng"])
        logger.info(
            f"Resuming with {accelerator.num_processes} processes instead of {saved}: new random streams"
        )
    return resume["train_steps"]


def save_checkpoint(run_dir, step, state, generator, accelerator, logger, best=False, limit=None):
    """RUN/checkpoints/NNNNNNN.pt (and best.pt) with every process's random state, written by the main one."""
    rng = training.rng_states(accelerator, generator)
    if not accelerator.is_main_process:
        return
    state = {**state, "rng": rng, "world_size": accelerator.num_processes}
    folder = run_dir / "checkpoints"
    # The numbered file is what --resume picks, so it goes last: a run killed before it resumes from the
    # previous one and writes best.pt again.
    if best:
        checkpoints.save(state, folder / "best.pt")
    checkpoints.save(state, folder / f"{step:07d}.pt")
    checkpoints.prune(folder, NUMBERED, limit)
    logger.info(f"Saved checkpoint to {folder / f'{step:07d}.pt'}")


def create_model(config, args, accelerator):
    """DiT, its EMA, AdamW (the published constant rate, no weight decay) and this process's generator."""
    torch.manual_seed(args.seed)
    model = build_dit(config).to(accelerator.device)
    model.gradient_checkpointing = args.gradient_checkpointing
    ema = training.EMA(model, args.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0)
    seed = args.seed * accelerator.num_processes + accelerator.process_index
    return model, ema, optimizer, torch.Generator(accelerator.device).manual_seed(seed)


def count_steps(loader, data, args, world):
    """(steps per epoch, steps of the whole run)."""
    if len(loader) == 0:
        raise UserError(
            f"{args.data_root} has {len(data)} training images, fewer than the "
            f"{args.global_batch_size // world} that each process needs per step"
        )
    return len(loader), min(args.max_train_steps or math.inf, args.num_epochs * len(loader))


def drop_labels(y, dropout, null_class, generator):
    """Label dropout to the null class, which trains the unconditional branch for guidance."""
    drop = torch.rand(len(y), generator=generator, device=y.device) < dropout
    return torch.where(drop, torch.full_like(y, null_class), y)


def batch_loss(net, diffusion, objective, x0, y, dropout, null_class, generator):
    """The hybrid loss at random steps, or the continuous objective's loss at random times."""
    if objective is not None:  # t and the noise come from the run's generator too: resume stays exact
        return objective.loss(net, x0, drop_labels(y, dropout, null_class, generator), generator)
    # The draws keep their original order (steps, dropout, noise), so ddpm runs are what they were.
    t = torch.randint(0, diffusion.num_timesteps, (len(y),), generator=generator, device=x0.device)
    y = drop_labels(y, dropout, null_class, generator)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    return diffusion.training_losses(net, x0, t, y, noise)["loss"].mean()


def train_step(net, diffusion, objective, optimizer, x0, y, dropout, generator, accelerator):
    """One AdamW step on the batch's loss."""
    null_class = accelerator.unwrap_model(net).null_class
    loss = batch_loss(net, diffusion, objective, x0, y, dropout, null_class, generator)
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    grad_norm = accelerator.clip_grad_norm_(net.parameters(), float("inf"))  # measured, not clipped
    optimizer.step()
    return loss.detach(), grad_norm


def main():
    args, resume = parse_args()
    with accelerator_for(args.mixed_precision) as accelerator:
        train(args, resume, accelerator)


def train(args, resume, accelerator):
    world = accelerator.num_processes
    if args.global_batch_size % world:
        raise UserError(f"--global-batch-size {args.global_batch_size} is not divisible by {world} processes")
    dataset, vae, config, rule = prepare_data(args, resume, accelerator)
    run_dir, logger, writer = start_run(args, resume, config, accelerator)
    logger.info(
        f"Data: {len(dataset)} images, {rule['channels']} channel(s), {images.describe(rule['intensity'])}"
    )

    # Create model: the EMA is a full copy whose state_dict loads straight into a DiT, as published.
    model, ema, optimizer, generator = create_model(config, args, accelerator)
    step = restore(resume, model, ema, optimizer, generator, accelerator, logger)
    logger.info("Parameters:\n" + training.parameter_table({"DiT": model, "EMA": ema.model, "VAE": vae}))

    # Setup data: each process draws its share of every global batch; prepare() wraps the model in DDP.
    data, heldout, heldout_indices = training_data(
        dataset, vae, config, args, run_dir, accelerator, logger, resume
    )
    net, optimizer, loader = accelerator.prepare(model, optimizer, make_loader(data, args, world))
    net = torch.compile(net) if args.compile else net
    steps_per_epoch, max_steps = count_steps(loader, data, args, world)
    # objective None is the discrete DDPM of `diffusion`; the others are continuous-time (core/sde.py).
    diffusion, objective, stop = create_diffusion(), sde.objective_of(config), training.StopSignal()
    meter = LossMeter(args, accelerator, logger, writer)
    grids = Grids(run_dir, config, rule["channels"], vae, writer, args.seed, accelerator.device)
    history = list(resume.get("eval_history", [])) if resume else []  # FID / KID of earlier evaluations
    fid = None
    if args.eval_every and accelerator.is_main_process:  # the main process alone samples and scores
        fid = FIDEval(args, dataset, heldout_indices, grids, run_dir, accelerator.device, history)
    meta = {"args": checkpoints.plain(vars(args)), "model_type": "dit", "config": config, **rule}

    logger.info(f"Training for {max_steps} steps from step {step} ({steps_per_epoch} steps per epoch)")
    model.train()
    progress = tqdm(total=max_steps, initial=step, disable=not accelerator.is_main_process, file=sys.stdout)
    while step < max_steps:
        # A resumed run re-enters its epoch at the batch where it stopped, with the same shuffle.
        for batch in epoch_batches(loader, step, steps_per_epoch, accelerator):
            # Latents: encoded here (one VAE pass per batch), or drawn from the cached mean and std.
            x0, y = latent_batch(batch, vae, config["latent_scale"], args.cache_latents, generator)
            loss, grad_norm = train_step(
                net, diffusion, objective, optimizer, x0, y, args.cfg_dropout, generator, accelerator
            )
            ema.update(model)  # the unwrapped model: DDP's module and ours share their parameters
            step += 1
            progress.update()
            # Every process checks the same reduced loss and the same signal, so all stop at one step.
            training.check_finite(loss, f"step {step}", accelerator)
            signum = stop.agreed(accelerator)
            meter.update(loss)
            if step % args.log_every == 0 or step == max_steps:
                meter.log(step, grad_norm)
            # An evaluation that finds a new best FID saves (best.pt) when FID picks the best model.
            evaluate = bool(args.eval_every) and step % args.eval_every == 0
            new_fid = fid.improved(ema.model, step, logger, writer) if evaluate and fid else False
            # The save is collective, so every process takes the main process's verdict.
            fid_saves = evaluate and args.best_by == "fid" and broadcast_object_list([new_fid])[0]
            # A signal saves too, so Ctrl-C never loses more than the current step.
            if step % args.save_every == 0 or step == max_steps or signum or fid_saves:
                best = heldout is not None and heldout.improved(ema.model, diffusion, step, logger, writer)
                best = fid_saves if args.best_by == "fid" else best
                state = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": optimizer.state_dict(),
                         **meta, "train_steps": step, "epoch": step // steps_per_epoch,
                         "best_val_loss": heldout.best if heldout else None,
                         "eval_history": history}  # fmt: skip
                save_checkpoint(
                    run_dir, step, state, generator, accelerator, logger, best, args.checkpoints_total_limit
                )
            if args.sample_every and step % args.sample_every == 0 and accelerator.is_main_process:
                grids.write(ema.model, step)
            if signum:
                logger.info(f"Stopped by signal {signum} at step {step}")
                sys.exit(128 + signum)
            if step == max_steps:
                break
    progress.close()
    logger.info("Done.")


if __name__ == "__main__":
    run_cli(main)
