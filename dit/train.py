"""Train a class-conditional DiT in the latent space of a frozen VAE.

Runs as a plain `python train.py ...` process or under torchrun (DDP: NCCL on CUDA, gloo on CPU).
Data layout: DATA/<class_name>/<images>; classes are the sorted folder names.
"""

import argparse
import contextlib
import glob
import hashlib
import io
import itertools
import json
import logging
import math
import os
import random
import signal
import sys
import time
from copy import deepcopy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from core import images  # noqa: E402
from core.cli import (  # noqa: E402
    Parser,
    bit_depth,
    finite_float,
    fraction,
    nonnegative_int,
    positive_float,
    positive_int,
)
from core.errors import warn  # noqa: E402
from core.files import atomic_save, clean_temporaries  # noqa: E402
from dataset import ImageFolderDataset  # noqa: E402
from diffusion import classifier_free_guidance, create_diffusion  # noqa: E402
from utils import (  # noqa: E402
    UserError,
    add_architecture_flags,
    add_flag,
    architecture,
    autocast,
    build_dit,
    check_output_folder,
    check_precision,
    images_from_latents,
    latent_size,
    load_checkpoint,
    load_vae,
    other_model,
    print_parameter_table,
    run_cli,
    setup_distributed,
    vae_downsample,
)

GRID_IMAGES, GRID_STEPS, GRID_CFG = 16, 50, 4.0


def parse_args(argv=None):
    """Flags (with --resume, unset ones default to the resumed run's) and the checkpoint to resume."""
    parser = Parser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Data layout: DATA/<class_name>/*.{png,jpg,jpeg,bmp,tif,tiff,webp}; grayscale data is "
        "trained through the RGB VAE and sampled back as grayscale. Integer images are scaled by the data "
        "set's bit depth (one scan: the largest value rounded up to 2^k - 1), float images by "
        "--intensity-range; the rule is stored in the checkpoint and samples are written at that depth.",
    )
    add_architecture_flags(parser, "DiT-B/2")
    add_flag(
        parser, "--data-path", default=None, help="folder with one sub-folder of images per class (required)"
    )
    add_flag(
        parser, "--results-dir", default="results", help="runs go to RESULTS/NNN-<model>/ (default: results)"
    )
    add_flag(
        parser,
        "--image-size",
        type=positive_int,
        default=256,
        help="image side in pixels, a multiple of 8 x patch size (default: 256)",
    )
    add_flag(
        parser,
        "--num-classes",
        type=positive_int,
        default=None,
        help="label-table size (default: the number of class folders)",
    )
    add_flag(
        parser,
        "--global-batch-size",
        type=positive_int,
        default=256,
        help="batch size over all processes (default: 256)",
    )
    add_flag(parser, "--epochs", type=positive_int, default=1400, help="training epochs (default: 1400)")
    add_flag(
        parser,
        "--max-steps",
        type=positive_int,
        default=None,
        help="stop after this many steps (default: no limit)",
    )
    add_flag(
        parser, "--lr", type=positive_float, default=1e-4, help="constant AdamW learning rate (default: 1e-4)"
    )
    add_flag(
        parser,
        "--ema-decay",
        type=fraction,
        default=0.9999,
        help="EMA decay per step, in [0, 1) (default: 0.9999)",
    )
    add_flag(
        parser,
        "--class-dropout-prob",
        type=fraction,
        default=0.1,
        help="probability of training on the null class, for guidance (default: 0.1)",
    )
    add_flag(
        parser,
        "--vae",
        default="ema",
        help="'ema', 'mse' (stabilityai/sd-vae-ft-*) or a local diffusers folder",
    )
    add_flag(
        parser,
        "--bit-depth",
        type=bit_depth,
        default=None,
        help="bits per pixel of integer images, e.g. 12 for CT stored in 16-bit files (default: found by "
        "scanning the data set)",
    )
    add_flag(
        parser,
        "--intensity-range",
        type=finite_float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=None,
        help="value range of float ('F') images, mapped onto [0, 1] (default: 0 1)",
    )
    add_flag(parser, "--global-seed", type=int, default=0, help="random seed (default: 0)")
    add_flag(
        parser,
        "--num-workers",
        type=nonnegative_int,
        default=4,
        help="data loader workers per process (default: 4)",
    )
    add_flag(
        parser,
        "--log-every",
        type=positive_int,
        default=100,
        help="log the loss every N steps (default: 100)",
    )
    add_flag(
        parser,
        "--ckpt-every",
        type=positive_int,
        default=50000,
        help="save a checkpoint every N steps (default: 50000)",
    )
    add_flag(
        parser,
        "--checkpoints-total-limit",
        type=positive_int,
        default=None,
        help="keep only the newest N checkpoints (default: keep all)",
    )
    add_flag(
        parser,
        "--sample-every",
        type=nonnegative_int,
        default=10000,
        help="write an EMA sample grid every N steps, 0 = never (default: 10000)",
    )
    add_flag(
        parser,
        "--precision",
        choices=["bf16", "fp32"],
        default="bf16",
        help="bf16 autocast on CUDA; CPU always runs fp32 (default: bf16)",
    )
    add_flag(
        parser,
        "--cache-latents",
        action="store_true",
        help="encode the data set once (both flips, latent mean and std) instead of every step",
    )
    add_flag(parser, "--compile", action="store_true", help="torch.compile the model")
    add_flag(parser, "--grad-checkpointing", action="store_true", help="recompute activations to save memory")
    add_flag(
        parser,
        "--val-fraction",
        type=fraction,
        default=0.0,
        help="hold out this fraction of the images; their EMA loss at each checkpoint picks "
        "checkpoints/best.pt (default: 0, train on everything as published)",
    )
    add_flag(
        parser,
        "--resume",
        default=None,
        help="checkpoint file, or a run folder (resumes its newest checkpoint)",
    )
    args = parser.parse_args(argv)
    resume = None
    if args.resume:
        path = resolve_resume(args.resume)
        resume = load_checkpoint(path)
        what = other_model(resume)
        if what:
            raise UserError(
                f"--resume {path} is {what}, not a DiT checkpoint: resume that run with its own trainer, "
                "or pass a dit/train.py run folder or checkpoint"
            )
        if not isinstance(resume, dict) or not {"config", "args", "model", "ema"} <= resume.keys():
            raise UserError(
                f"--resume {path} is not a checkpoint of dit/train.py (no config): it cannot be resumed; "
                "pass a file from RESULTS/NNN-<model>/checkpoints"
            )
        parser.set_defaults(**{k: v for k, v in resume["args"].items() if k != "resume"})
        args = parser.parse_args(argv)
    if args.intensity_range and not args.intensity_range[0] < args.intensity_range[1]:
        parser.error(f"--intensity-range needs LOW < HIGH, got {' '.join(map(str, args.intensity_range))}")
    if args.data_path is None:
        raise UserError("--data-path is required: a folder with one sub-folder of images per class")
    if resume:
        check_output_folder(run_folder_of(args.resume), "--resume")
    else:
        check_output_folder(args.results_dir, "--results-dir")
    return args, resume


def create_run_folder(results_dir, model_name):
    """results/NNN-<model>/ with the next free index."""
    os.makedirs(results_dir, exist_ok=True)
    indices = [
        int(os.path.basename(p).split("-")[0])
        for p in glob.glob(os.path.join(results_dir, "[0-9][0-9][0-9]-*"))
    ]
    run_dir = os.path.join(results_dir, f"{max(indices, default=-1) + 1:03d}-{model_name.replace('/', '-')}")
    os.makedirs(os.path.join(run_dir, "checkpoints"))
    return run_dir


def run_folder_of(resume):
    """The run folder RESULTS/NNN-<model> of a --resume path."""
    return os.path.dirname(os.path.dirname(os.path.abspath(resolve_resume(resume))))


def resolve_resume(path):
    """Checkpoint file to resume: the path itself, or the newest checkpoint of a run folder."""
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, "checkpoints", "[0-9]" * 7 + ".pt")))
        if not found:
            raise UserError(f"no checkpoints in {path}/checkpoints to resume from")
        return found[-1]
    return path


def make_logger(run_dir, rank):
    """Logger writing to log.txt and the console on rank 0, silent elsewhere."""
    logger = logging.getLogger("dit-train")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if rank == 0:
        for handler in (
            logging.StreamHandler(sys.stdout),
            logging.FileHandler(os.path.join(run_dir, "log.txt")),
        ):
            handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%Y-%m-%d %H:%M:%S"))
            logger.addHandler(handler)
    return logger


def broadcast(value, world):
    """Rank 0's value on every rank."""
    if world == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


class ResumableSampler(DistributedSampler):
    """Distributed shuffling that can start part-way into an epoch, so resumed runs see the same batches."""

    skip = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self):
        return super().__len__() - self.skip


def encode(vae, pixels, scale):
    """Scaled mean and std of the VAE posterior for images in [-1, 1]."""
    with torch.no_grad():
        posterior = vae.encode(pixels.to(vae.dtype)).latent_dist
    return posterior.mean.float() * scale, posterior.std.float() * scale


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


def cache_latents(dataset, vae, config, run_dir, rank, world, device, logger):
    """Latent mean and std of every image and its mirror image, shared by all ranks through run_dir."""
    path = latent_cache_path(dataset, vae, config, run_dir)
    scale = config["latent_scale"]
    if not os.path.exists(path):
        logger.info(f"Caching latents of {len(dataset)} images (both flips) to {path}")
        if rank == 0:  # caches of other files, sizes or VAEs are stale: they would only fill the disk
            for stale in glob.glob(os.path.join(run_dir, "latents-*.pt")):
                os.remove(stale)
        shard = list(range(rank, len(dataset), world))
        parts = [
            encode_images(dataset, indices, vae, scale, device)
            for indices in np.array_split(shard, max(1, len(shard) // 32))
        ]
        atomic_save(
            {"index": torch.tensor(shard), **{k: torch.cat([p[k] for p in parts]) for k in ("mean", "std")}},
            f"{path}.rank{rank}",
        )
        barrier(world)
        if rank == 0:
            atomic_save(merge_shards(path, world, dataset), path)
        barrier(world)
    cache = torch.load(path, weights_only=True)
    return TensorDataset(cache["mean"], cache["std"], cache["label"])


def encode_images(dataset, indices, vae, scale, device):
    """Posterior mean and std of images (stacked as [plain, mirrored]) for the given indices."""
    pixels = torch.stack([dataset[int(i)][0] for i in indices]).to(device)  # (B, 3, H, W)
    mean, std = encode(vae, torch.cat([pixels, pixels.flip(-1)]), scale)
    return {
        "mean": torch.stack(mean.chunk(2), 1).cpu(),
        "std": torch.stack(std.chunk(2), 1).cpu(),
    }  # (B, 2, C, h, w)


def merge_shards(path, world, dataset):
    """Combine per-rank latent shards into one table ordered like the data set."""
    shards = [torch.load(f"{path}.rank{r}", weights_only=True) for r in range(world)]
    order = torch.cat([s["index"] for s in shards]).argsort()
    merged = {k: torch.cat([s[k] for s in shards])[order] for k in ("mean", "std")}
    merged["label"] = torch.tensor([label for _, label in dataset.samples])
    for r in range(world):
        os.remove(f"{path}.rank{r}")
    return merged


def barrier(world):
    """Wait for every rank (no-op in a single process)."""
    if world > 1:
        dist.barrier()


def latent_batch(batch, vae, scale, cached, generator, device):
    """Training latents with random horizontal flips: x_0 ~ q(z | image), drawn from `generator`."""
    if cached:
        mean, std, y = (b.to(device) for b in batch)
        flip = torch.rand(len(y), generator=generator, device=device) < 0.5
        rows = torch.arange(len(y), device=device)
        mean, std = mean[rows, flip.long()], std[rows, flip.long()]  # (N, C, h, w)
    else:
        pixels, y = batch[0].to(device), batch[1].to(device)
        flip = torch.rand(len(y), generator=generator, device=device) < 0.5
        mean, std = encode(vae, torch.where(flip[:, None, None, None], pixels.flip(-1), pixels), scale)
    return mean + std * torch.randn(mean.shape, generator=generator, device=device), y


def train_step(net, diffusion, optimizer, x0, y, null_class, args, generator, device):
    """One AdamW step on the hybrid loss; label dropout trains the null class for guidance."""
    n = len(y)
    t = torch.randint(0, diffusion.num_timesteps, (n,), generator=generator, device=device)
    drop = torch.rand(n, generator=generator, device=device) < args.class_dropout_prob
    y = torch.where(drop, torch.full_like(y, null_class), y)
    noise = torch.randn(x0.shape, generator=generator, device=device)
    with autocast(device, args.precision):
        losses = diffusion.training_losses(net, x0, t, y, noise)
    loss = losses["loss"].mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), float("inf"))
    optimizer.step()
    return loss.detach(), grad_norm


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model."""
    for ema_param, param in zip(ema.parameters(), model.parameters(), strict=True):
        ema_param.mul_(decay).add_(param.detach(), alpha=1 - decay)


def rng_state(generator):
    """Every random state this process uses, as plain types."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generator": generator.get_state(),
    }


def set_rng_state(state, generator):
    random.setstate(state["python"])
    np.random.set_state(
        (state["numpy"][0], np.array(state["numpy"][1], dtype=np.uint32), *state["numpy"][2:])
    )
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    generator.set_state(state["generator"])


def gather(value, world):
    """List of every rank's value (all ranks call this)."""
    if world == 1:
        return [value]
    values = [None] * world
    dist.all_gather_object(values, value)
    return values


def save_checkpoint(paths, modules, meta, generator, world):
    """State dicts, plain-type metadata and every rank's random state, written atomically by rank 0 to
    each of paths in turn."""
    rng = gather(rng_state(generator), world)
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    state = {**{k: m.state_dict() for k, m in modules.items()}, **meta, "rng": rng, "world_size": world}
    for path in paths:
        atomic_save(state, path)


def prune_checkpoints(folder, limit):
    """Keep only the newest `limit` numbered checkpoints (best.pt is not among them)."""
    for old in sorted(glob.glob(os.path.join(folder, "[0-9]" * 7 + ".pt")))[:-limit]:
        os.remove(old)


def split_holdout(n, fraction, seed):
    """(training, held-out) indices: a fixed random `fraction` of the images, at least one, is held out."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = max(1, round(n * fraction)) if fraction > 0 else 0
    if k >= n:
        raise UserError(f"--val-fraction {fraction} leaves no training images out of {n}")
    return sorted(order[k:]), sorted(order[:k])


class HeldOut:
    """Held-out images with fixed timesteps and noise; their loss under the EMA weights selects best.pt."""

    def __init__(self, dataset, indices, vae, scale, device, seed):
        chunks = [indices[i : i + 32] for i in range(0, len(indices), 32)]
        self.latents = torch.cat(
            [encode_images(dataset, c, vae, scale, device)["mean"][:, 0] for c in chunks]
        )
        self.labels = torch.tensor([dataset.samples[i][1] for i in indices])
        generator = torch.Generator().manual_seed(seed)
        self.t = torch.randint(0, 1000, (len(indices),), generator=generator)
        self.noise = torch.randn(self.latents.shape, generator=generator)
        self.device = device
        self.best = math.inf

    @torch.no_grad()
    def loss(self, ema, diffusion):
        """Mean hybrid loss of the EMA model on the held-out set."""
        total = 0.0
        for i in range(0, len(self.t), 64):
            part = [x[i : i + 64].to(self.device) for x in (self.latents, self.t, self.labels, self.noise)]
            total += diffusion.training_losses(ema, part[0], part[1], part[2], part[3])["loss"].sum().item()
        return total / len(self.t)

    def update(self, ema, diffusion, step, logger, writer):
        """Evaluate, log, and say whether this is the best EMA model so far."""
        value = self.loss(ema, diffusion)
        logger.info(f"(step={step:07d}) Held-out loss (EMA): {value:.4f} (best so far {self.best:.4f})")
        writer.add_scalar("val/loss_ema", value, step)
        if value < self.best:
            self.best = value
            return True
        return False


@torch.no_grad()
def sample_grid(ema, vae, config, noise, labels, channels):
    """EMA samples from fixed noise, as a (3, H, W) grid in [0, 1] (gray data shown gray)."""
    diffusion = create_diffusion(GRID_STEPS)
    model_fn = classifier_free_guidance(ema, GRID_CFG, ema.null_class)
    latents = diffusion.sample_loop(model_fn, noise, labels)
    samples = images_from_latents(vae, latents, config["latent_scale"], channels)
    return make_grid(samples, nrow=int(math.sqrt(len(samples))))


class StopSignal:
    """Remember SIGINT/SIGTERM so the loop can finish its step, save and exit."""

    def __init__(self):
        self.received = None
        signal.signal(signal.SIGINT, self.handle)
        signal.signal(signal.SIGTERM, self.handle)

    def handle(self, signum, frame):
        self.received = signum


def check_stop(loss, stop, world, device):
    """(stop requested on any rank, loss non-finite on any rank)."""
    flags = torch.tensor(
        [stop.received is not None, not torch.isfinite(loss).item()], device=device, dtype=torch.float32
    )
    if world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags[0]), bool(flags[1])


def model_config(args, dataset, vae, resume_config):
    """Architecture, class and VAE facts saved with every checkpoint (taken from the checkpoint on resume)."""
    if resume_config is not None:
        if resume_config["class_names"] != dataset.class_names:
            raise UserError(
                f"--data-path classes {dataset.class_names} differ from the checkpoint's "
                f"{resume_config['class_names']}"
            )
        return resume_config
    name = args.model
    arch = architecture(
        name, {"depth": args.depth, "hidden_size": args.hidden_size, "num_heads": args.num_heads}
    )
    num_classes = args.num_classes or len(dataset.class_names)
    if num_classes < len(dataset.class_names):
        raise UserError(
            f"--num-classes {num_classes} is less than the {len(dataset.class_names)} class folders "
            f"in {args.data_path}"
        )
    downsample = vae_downsample(vae)
    return dict(
        model=name,
        **arch,
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


class GridWriter:
    """EMA sample grids from fixed noise, to TensorBoard and run_dir/samples/NNNNNNN.png (8-bit previews)."""

    def __init__(self, run_dir, config, channels, seed, device):
        n = min(GRID_IMAGES, max(4, config["num_classes"]))
        size = config["input_size"]
        generator = torch.Generator().manual_seed(seed)
        self.noise = torch.randn(n, config["in_channels"], size, size, generator=generator).to(device)
        self.labels = (torch.arange(n) % config["num_classes"]).to(device)
        self.folder = os.path.join(run_dir, "samples")
        self.config, self.channels = config, channels

    def write(self, ema, vae, writer, step):
        grid = sample_grid(ema, vae, self.config, self.noise, self.labels, self.channels)
        writer.add_image("samples/ema", grid, step)
        os.makedirs(self.folder, exist_ok=True)
        images.save(grid, os.path.join(self.folder, f"{step:07d}.png"), images.EIGHT_BIT)


class LossMeter:
    """Running loss and throughput between log lines; the loss is averaged over ranks."""

    def __init__(self, args, world, device, logger, writer):
        self.args, self.world, self.device, self.logger, self.writer = args, world, device, logger, writer
        self.reset()

    def reset(self):
        self.total, self.steps, self.start = 0.0, 0, time.time()

    def update(self, loss):
        self.total += loss.item()
        self.steps += 1

    def log(self, step, grad_norm):
        elapsed = time.time() - self.start
        avg = torch.tensor(self.total / self.steps, device=self.device)
        if self.world > 1:
            dist.all_reduce(avg)
            avg /= self.world
        steps_per_sec = self.steps / elapsed
        self.logger.info(
            f"(step={step:07d}) Train Loss: {avg.item():.4f}, Train Steps/Sec: {steps_per_sec:.2f}"
        )
        if self.writer:
            scalars = {"loss": avg.item(), "lr": self.args.lr, "grad_norm": grad_norm.item(),
                       "steps_per_sec": steps_per_sec,
                       "images_per_sec": steps_per_sec * self.args.global_batch_size}  # fmt: skip
            for tag, value in scalars.items():
                self.writer.add_scalar(f"train/{tag}", value, step)
        self.reset()


def data_rule(dataset, args, resume, rank, world):
    """{"channels", "intensity"} of the data set, found before any training by decoding every file once.

    Each rank scans its share of the files (fast, and no rank waits on a collective for a long scan);
    rank 0 alone prints the scan's warnings, since its share, every world-th file, shows what the set
    mixes. A resumed run keeps the rule its checkpoint was trained with (one written before rules were
    stored takes the scan's rule).
    """
    mine = None
    if dataset.samples[rank::world]:
        quiet = contextlib.redirect_stderr(io.StringIO()) if rank else contextlib.nullcontext()
        try:
            with quiet:
                mine = dataset.scan(args.bit_depth, args.intensity_range, rank, world)
        except UserError as error:  # every rank must stop with it, not wait for the others forever
            mine = {"error": str(error)}
    found = merge_scans(gather(mine, world))
    if resume and "intensity" in resume:
        kept = {"channels": resume["channels"], "intensity": resume["intensity"]}
        if kept != found and rank == 0:
            warn(
                f"the data now scans as {found['channels']}-channel {images.describe(found['intensity'])}, "
                f"the checkpoint was trained on {kept['channels']}-channel "
                f"{images.describe(kept['intensity'])}: keeping the checkpoint's rule"
            )
        return kept
    return found


def merge_scans(scans):
    """One rule from the scans of every rank's share of the files (a rank without files sends None)."""
    scans = [scan for scan in scans if scan is not None]
    for scan in scans:
        if "error" in scan:
            raise UserError(scan["error"])
    return images.combine(scans)


def prepare_run(args, resume, rank, world, device):
    """Data set, VAE, model config, data rule, run folder and logger (the checkpoint's run folder on resume).

    The cheap checks (classes, VAE, sizes) come before the scan that decodes every image.
    """
    dataset = ImageFolderDataset(
        args.data_path, resume["config"]["image_size"] if resume else args.image_size
    )
    vae = load_vae(resume["config"]["vae"] if resume else args.vae, device)
    config = model_config(args, dataset, vae, resume["config"] if resume else None)
    rule = data_rule(dataset, args, resume, rank, world)
    dataset.intensity = rule["intensity"]
    run_dir = None
    if rank == 0:
        run_dir = (
            run_folder_of(args.resume) if resume else create_run_folder(args.results_dir, config["model"])
        )
        for folder in (run_dir, os.path.join(run_dir, "checkpoints"), os.path.join(run_dir, "samples")):
            clean_temporaries(folder)  # left by a run killed while writing
    run_dir = broadcast(run_dir, world)
    logger = make_logger(run_dir, rank)
    logger.info(f"Run folder {run_dir}; {world} process(es) on {device}; config {config}")
    logger.info(
        f"Data: {len(dataset)} images, {rule['channels']} channel(s), {images.describe(rule['intensity'])}"
    )
    return dataset, vae, config, rule, run_dir, logger


def build_training(args, config, resume, rank, world, device, logger):
    """Model, EMA, optimizer and this rank's random generator, restored from the checkpoint on resume."""
    torch.manual_seed(args.global_seed)
    model = build_dit(config).to(device)
    model.gradient_checkpointing = args.grad_checkpointing
    ema = deepcopy(model).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0)
    generator = torch.Generator(device).manual_seed(args.global_seed * world + rank)
    if resume:
        model.load_state_dict(resume["model"])
        ema.load_state_dict(resume["ema"])
        optimizer.load_state_dict(resume["opt"])
        if len(resume["rng"]) == world:
            set_rng_state(resume["rng"][rank], generator)
        else:
            logger.info(
                f"Resuming with {world} processes instead of {len(resume['rng'])}: new random streams"
            )
    return model, ema, optimizer, generator


def make_loader(data, args, rank, world, device, step):
    """Loader whose shuffling depends only on the seed and epoch, positioned at `step`."""
    local_batch = args.global_batch_size // world
    sampler = ResumableSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=args.global_seed)
    steps_per_epoch = len(sampler) // local_batch
    if steps_per_epoch == 0:
        raise UserError(
            f"{args.data_path} has {len(data)} images, fewer than the {local_batch} "
            "that each process needs per step"
        )
    sampler.skip = (step % steps_per_epoch) * local_batch
    loader = DataLoader(data, batch_size=local_batch, sampler=sampler, num_workers=args.num_workers,
                        pin_memory=device.type == "cuda", drop_last=True,
                        generator=torch.Generator().manual_seed(args.global_seed))  # fmt: skip
    return loader, sampler, steps_per_epoch


def main():
    args, resume = parse_args()
    rank, world, device = setup_distributed()
    if args.global_batch_size % world:
        raise UserError(
            f"--global-batch-size {args.global_batch_size} is not divisible by the {world} processes"
        )
    dataset, vae, config, rule, run_dir, logger = prepare_run(args, resume, rank, world, device)
    if rank == 0:
        check_precision(args.precision, device)
    model, ema, optimizer, generator = build_training(args, config, resume, rank, world, device, logger)
    if rank == 0:
        print_parameter_table({"DiT": model, "EMA": ema, "VAE": vae})
    net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    if args.compile:
        net = torch.compile(net)
    diffusion = create_diffusion()
    scale = config["latent_scale"]
    data = (
        cache_latents(dataset, vae, config, run_dir, rank, world, device, logger)
        if args.cache_latents
        else dataset
    )
    train_indices, holdout_indices = split_holdout(len(dataset), args.val_fraction, args.global_seed)
    data = Subset(data, train_indices) if holdout_indices else data
    holdout = None
    if holdout_indices and rank == 0:
        holdout = HeldOut(dataset, holdout_indices, vae, scale, device, args.global_seed)
        holdout.best = (resume or {}).get("best_val_loss") or math.inf
    step = resume["train_steps"] if resume else 0
    loader, sampler, steps_per_epoch = make_loader(data, args, rank, world, device, step)
    max_steps = min(args.max_steps or math.inf, args.epochs * steps_per_epoch)
    writer = SummaryWriter(os.path.join(run_dir, "tensorboard")) if rank == 0 else None
    grids, meter, stop = (
        GridWriter(run_dir, config, rule["channels"], args.global_seed, device),
        LossMeter(args, world, device, logger, writer),
        StopSignal(),
    )

    def save(step):
        folder = os.path.join(run_dir, "checkpoints")
        improved = holdout is not None and rank == 0 and holdout.update(ema, diffusion, step, logger, writer)
        meta = {"model_type": "dit", "args": vars(args), "config": config, **rule, "train_steps": step,
                "epoch": step // steps_per_epoch,
                "best_val_loss": holdout.best if holdout else None}  # fmt: skip
        path = os.path.join(folder, f"{step:07d}.pt")
        # The numbered file is what --resume picks, so it goes last: a run killed before it resumes from
        # the previous one and writes best.pt again.
        paths = ([os.path.join(folder, "best.pt")] if improved else []) + [path]
        save_checkpoint(paths, {"model": model, "ema": ema, "opt": optimizer}, meta, generator, world)
        if rank == 0:
            logger.info(f"Saved checkpoint to {path}")
            if args.checkpoints_total_limit:
                prune_checkpoints(folder, args.checkpoints_total_limit)

    logger.info(f"Training for {max_steps} steps from step {step} ({steps_per_epoch} steps per epoch)")
    model.train()
    progress = tqdm(total=max_steps, initial=step, disable=rank != 0, dynamic_ncols=True, file=sys.stdout)
    epoch = step // steps_per_epoch
    while step < max_steps:
        sampler.set_epoch(epoch)
        for batch in itertools.islice(loader, max_steps - step):
            x0, y = latent_batch(batch, vae, scale, args.cache_latents, generator, device)
            loss, grad_norm = train_step(
                net, diffusion, optimizer, x0, y, model.null_class, args, generator, device
            )
            update_ema(ema, model, args.ema_decay)
            step += 1
            progress.update()
            stopping, diverged = check_stop(loss, stop, world, device)
            if diverged:
                print(
                    f"error: the loss became non-finite at step {step}; the last checkpoint is kept",
                    file=sys.stderr,
                )
                sys.exit(1)
            meter.update(loss)
            if step % args.log_every == 0 or step == max_steps:
                meter.log(step, grad_norm)
            if step % args.ckpt_every == 0 or step == max_steps or stopping:
                save(step)
            if args.sample_every and step % args.sample_every == 0 and rank == 0:
                grids.write(ema, vae, writer, step)
            if stopping:
                logger.info(f"Stopped by signal {stop.received} at step {step}")
                sys.exit(128 + (stop.received or signal.SIGTERM))
        epoch += 1
        sampler.skip = 0
    progress.close()
    logger.info("Done.")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(main)
