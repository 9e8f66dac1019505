"""Train a mask-guided ControlNet on top of a trained class-conditional LDM (single or multi-process)."""

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import skip_first_batches
from accelerate.utils import set_seed
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from core import checkpoints, cli, files, images, training
from core.errors import UserError, run_cli, warn
from core.masks import scan_mask_max
from dataset import MaskPairDataset, collect_samples
from models import (
    ControlledUNet,
    build_controlnet,
    decode,
    diffusion_target,
    encode,
    load_ldm,
    load_vae,
    load_weights,
    make_scheduler,
    sample_latents,
)
from utils import PRECISION_HELP, add_intensity_flags, check_intensity_flags, load_checkpoint

# Schedule names diffusers.optimization.get_scheduler accepts.
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
# --resume and checkpoint pruning find checkpoints by these names; PERIODIC is a glob.
LATEST, PERIODIC = "checkpoint_latest.pt", "checkpoint_epoch_*.pt"

LAYOUT = """data layout:
  data_root/images/001.png  data_root/masks/001.png      pairs by stem (any of png jpg jpeg bmp tif tiff webp)
  data_root/images/Img_001.png  data_root/masks/seg_001.png   with --image_prefix Img_ --mask_prefix seg_
  data_root/<class>/images/*  data_root/<class>/masks/*     with --use_class_labels (class = LDM class name)
images: 8-bit, 12/16-bit grayscale (values scaled by the data set's bit depth, found by one scan of
every image before training, or --bit_depth) or float TIFF (scaled from --intensity_range).
masks: binary or integer label maps 0..K; the ControlNet sees labels / K, K = largest value in the
training masks (or --mask_max_value), so 0/1/2 label maps keep full contrast; transparent pixels of
masks with alpha are background.
outputs in --output_dir: checkpoint_latest.pt, checkpoint_best.pt (lowest validation loss),
checkpoint_epoch_<E>.pt, checkpoint_final.pt, logs/ (TensorBoard),
samples/epoch_<E>.png (rows of mask | generated | ground truth)."""


def build_parser():
    """The command line; the first name of a flag is canonical, later ones are accepted aliases."""
    p = cli.Parser(description=__doc__, epilog=LAYOUT)
    off = argparse.SUPPRESS  # a --no_X flag shows no default of its own
    data = p.add_argument_group("data")
    add = data.add_argument
    add("--data_root", required=True, help="dataset root (see data layout below)")
    add("--images_folder", default="images", help="image sub-folder of data_root")
    add("--masks_folder", default="masks", help="mask sub-folder of data_root")
    add("--image_prefix", default="", help="image file-name prefix removed before pairing, e.g. Img_")
    add("--mask_prefix", default="", help="mask file-name prefix removed before pairing, e.g. seg_")
    add("--use_class_labels", action="store_true", help="root/<class>/{images,masks}; LDM class tokens")
    add("--mask_channels", type=int, default=1, choices=(1, 3), help="mask channels")
    add("--mask_max_value", type=cli.positive_int, help="full-intensity label (default: the masks' max)")
    add("--val_fraction", "--val_split", type=cli.fraction, default=0.1, help="held-out share for validation")
    add("--random_flip", action="store_true", default=True, help="joint random flips")
    add("--no_random_flip", dest="random_flip", action="store_false", default=off, help="no flips")
    add("--num_workers", type=cli.nonnegative_int, default=4, help="data-loading workers per process")
    add_intensity_flags(data)

    add = p.add_argument_group("model and output").add_argument
    add("--ldm_checkpoint", help="required: checkpoint of the trained LDM (ldm/train.py)")
    add("--vae_pretrained", help="VAE hub id or local folder (default: the LDM checkpoint's)")
    add("--output_dir", default="./controlnet_checkpoints", help="checkpoints, samples and logs")
    add("--overwrite", action="store_true", help="start over in an output_dir that has checkpoints")
    add("--resume", help="checkpoint or run folder to continue from; 'latest' is output_dir's latest")
    add("--image_size", type=cli.positive_int, help="training resolution (default: the LDM's image_size)")
    add("--freeze_unet", action="store_true", default=True, help="keep the LDM UNet frozen")
    add("--no_freeze_unet", dest="freeze_unet", action="store_false", default=off, help="train the UNet too")
    add("--cfg_dropout", type=cli.fraction, help="null-class share (default: the LDM's cfg_dropout)")
    add("--ema_decay", type=cli.fraction, default=0.9999, help="EMA decay of the ControlNet, in [0, 1)")

    add = p.add_argument_group("training").add_argument
    add("--batch_size", type=cli.positive_int, default=8, help="batch size per process")
    add("--num_epochs", "--epochs", type=cli.positive_int, default=100, help="training epochs")
    add("--learning_rate", "--lr", type=cli.positive_float, default=1e-5, help="AdamW learning rate")
    add("--weight_decay", type=cli.nonnegative_float, default=1e-2, help="AdamW weight decay")
    add("--lr_scheduler", default="constant", choices=LR_SCHEDULES, help="diffusers learning-rate schedule")
    add("--lr_warmup_steps", type=cli.nonnegative_int, default=0, help="learning-rate warm-up steps")
    add("--gradient_accumulation_steps", type=cli.positive_int, default=1, help="batches per step")
    add("--max_grad_norm", type=cli.positive_float, default=1.0, help="gradient clipping norm")
    add("--mixed_precision", "--precision", type=cli.mixed_precision, default="no", help=PRECISION_HELP)
    add("--gradient_checkpointing", "--grad_checkpointing", action="store_true", help="less memory, slower")
    add("--compile", action="store_true", help="torch.compile the ControlNet and the UNet")
    add("--seed", type=cli.nonnegative_int, default=42, help="random seed")

    add = p.add_argument_group("checkpoints and sample grids").add_argument
    add("--save_every", type=cli.positive_int, default=10, help="epochs between checkpoint_epoch_<E>.pt")
    add("--checkpoints_total_limit", type=cli.positive_int, help="keep only the newest N epoch checkpoints")
    add("--sample_every", type=cli.positive_int, default=5, help="epochs between sample grids")
    add("--num_sample_masks", type=cli.positive_int, default=4, help="rows of the sample grid")
    add("--sample_steps", type=cli.positive_int, default=25, help="UniPC steps for sample grids")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_intensity_flags(parser, args)
    return args


def check_output_dir(args):
    """Refuse to overwrite a previous run unless resuming or told to; prove output_dir writable."""
    # Runs before the accelerator starts, so these mistakes cost no model loading.
    if not args.ldm_checkpoint:
        raise UserError(
            "--ldm_checkpoint is required: train the LDM first (ldm/train.py) and pass its checkpoint"
        )
    out = Path(args.output_dir)
    if (out / LATEST).exists() and not args.resume and not args.overwrite:
        raise UserError(
            f"{out} already holds a run; pass --resume latest to continue or --overwrite to start over"
        )
    # Resolved to one checkpoint file here, once; 'latest' stands for this output_dir.
    if args.resume:
        wanted = out if args.resume == "latest" else args.resume
        args.resume = str(checkpoints.find_resume(wanted, LATEST, PERIODIC))
    cli.ensure_writable_dir(out, "--output_dir")


# --------------------------------------------------------------------------- data


def local_or_hub(source):
    """Absolute path for an existing local folder (so inference finds it from anywhere), else the hub id."""
    return str(Path(source).resolve()) if Path(source).exists() else source


def run_config(args, ldm, mask_max_value):
    """Full run configuration stored in every checkpoint."""
    # Everything inference needs travels in the checkpoint: the latent normalisation and sizes come from
    # the LDM, so the ControlNet sees latents exactly as its UNet learned them.
    cfg, ldm_cfg = checkpoints.plain(vars(args)), ldm.config
    cfg.update(
        ldm_checkpoint=str(Path(args.ldm_checkpoint).resolve()),
        vae_pretrained=local_or_hub(args.vae_pretrained or ldm_cfg["vae_pretrained"]),
        image_size=args.image_size or int(ldm_cfg["image_size"]),
        image_channels=int(ldm_cfg["image_channels"]),
        latent_scale=float(ldm_cfg["latent_scale"]),
        latent_shift=float(ldm_cfg.get("latent_shift", 0.0)),
        vae_downsample=int(ldm_cfg["vae_downsample"]),
        mask_max_value=mask_max_value,
        cfg_dropout=float(ldm_cfg.get("cfg_dropout", 0.1)) if args.cfg_dropout is None else args.cfg_dropout,
    )
    # the UNet halves the latents once per level below the top, and the VAE before it
    multiple = cfg["vae_downsample"] * 2 ** (len(ldm.unet_config["block_out_channels"]) - 1)
    if cfg["image_size"] % multiple:
        raise UserError(f"--image_size {cfg['image_size']} must be a multiple of {multiple} for this LDM")
    return cfg


def scan_images(args, samples, ldm, verbose):
    """The data set's decoding rule, from one scan fully decoding every image (training and validation)."""
    rule = images.scan([img for img, _, _ in samples], args.bit_depth, args.intensity_range)["intensity"]
    if verbose:
        print(f"images: {images.describe(rule)}")
        # Only a warning: fine-tuning on differently scaled data is legitimate, but should not go unnoticed.
        if rule != ldm.intensity:
            warn(
                f"the LDM was trained on {images.describe(ldm.intensity)}, these images are "
                f"{images.describe(rule)}: its UNet sees other intensities than it learned "
                f"(--bit_depth / --intensity_range set the rule)"
            )
    return rule


def build_datasets(args, ldm, verbose):
    """(train set, validation set, decoding rule, run config), every file decoded once first."""
    samples = collect_samples(args, ldm.class_names, verbose)
    intensity = scan_images(args, samples, ldm, verbose)
    mask_max = scan_mask_max([m for _, m, _ in samples], args.mask_channels, args.mask_max_value, verbose)
    cfg = run_config(args, ldm, mask_max)
    train_idx, val_idx = training.split_heldout(len(samples), args.val_fraction, args.seed)
    # Validating on training pairs beats failing: a tiny data set still trains and still picks a best.
    if not val_idx:
        warn("no held-out pairs (--val_fraction 0 or one pair): validating on training pairs")
        val_idx = train_idx

    def subset(indices, flip):
        chosen = [samples[i] for i in indices]
        sizes = (cfg["image_size"], cfg["image_channels"], cfg["mask_channels"], cfg["mask_max_value"])
        return MaskPairDataset(chosen, *sizes, flip, cfg["seed"], intensity)

    # Validation never flips, so its loss compares across epochs.
    return subset(train_idx, args.random_flip), subset(val_idx, False), intensity, cfg


def train_loader(train_set, args, accelerator, epoch, skip):
    """This epoch's loader for this process, skipping the batches a resumed epoch already did."""
    train_set.set_epoch(epoch)
    world, rank = accelerator.num_processes, accelerator.process_index
    # A DistributedSampler even on one process: one code path, and a shuffle fixed by seed and epoch,
    # which skip_first_batches needs to resume mid-epoch at the exact batch.
    sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=args.seed)
    sampler.set_epoch(epoch)
    loader = DataLoader(
        train_set,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=args.num_workers,
        worker_init_fn=training.ignore_sigint,
        # Seeds the workers' base seed (augmentation RNG) per epoch.
        generator=torch.Generator().manual_seed(args.seed + epoch),
    )
    return skip_first_batches(loader, skip) if skip else loader


def to_device(batch, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


# --------------------------------------------------------------------------- model


class Emas:
    """diffusers EMAModel per trained module (ControlNet, and the UNet when it trains).

    Kept rather than core.training.EMA: its decay warms up ((1 + n) / (10 + n) until it reaches
    --ema_decay), which short fine-tuning runs rely on, and it holds the parameters only.
    """

    def __init__(self, trainable, decay):
        self.modules = trainable
        # One EMAModel per module so each can be saved and loaded under its own checkpoint key.
        self.emas = {name: EMAModel(m.parameters(), decay=decay) for name, m in trainable.items()}

    def step(self):
        for name, ema in self.emas.items():
            ema.step(self.modules[name].parameters())

    def weights(self, name):
        """The EMA weights of one module as a state_dict (None for a module that does not train)."""
        if name not in self.emas:
            return None
        named = self.modules[name].named_parameters()
        shadows = self.emas[name].shadow_params
        return {key: s.detach().cpu().clone() for (key, _), s in zip(named, shadows, strict=True)}

    def steps(self):
        return {name: ema.optimization_step for name, ema in self.emas.items()}

    def load(self, ckpt):
        for name, ema in self.emas.items():
            weights = ckpt[f"ema_{name}"]
            named = self.modules[name].named_parameters()
            # Matched by parameter name, like a state_dict, rather than by position in a list.
            ema.shadow_params = [weights[key].to(p.device).clone() for key, p in named]
            ema.optimization_step = ckpt["ema_steps"][name]

    def swapped_in(self, fn):
        """fn() with the EMA weights in the modules, the trained ones back afterwards."""
        for name, ema in self.emas.items():
            ema.store(self.modules[name].parameters())
            ema.copy_to(self.modules[name].parameters())
        try:
            return fn()
        # The trained weights come back even if fn raises, so a failed validation cannot leave EMA in.
        finally:
            for name, ema in self.emas.items():
                ema.restore(self.modules[name].parameters())


def build_model(args, cfg, ldm, vae, accelerator):
    """ControlNet copied from the LDM UNet, joined to it; (model, trained modules, compute dtype)."""
    device = accelerator.device
    controlnet = build_controlnet(ldm.unet, args.mask_channels, cfg["vae_downsample"])
    ldm.unet.requires_grad_(not args.freeze_unet)
    # The class embedder stays frozen: the class tokens keep the meaning the LDM gave them.
    ldm.class_embedder.requires_grad_(False).to(device)
    model = ControlledUNet(controlnet, ldm.unet).to(device)
    if args.gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()
        ldm.unet.enable_gradient_checkpointing()
    if args.compile:  # in place, so state_dict keys stay those of the plain modules
        controlnet.compile()
        ldm.unet.compile()
    # Trained modules stay fp32 (AdamW's master weights); autocast runs their maths in dtype.
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    vae.to(device)
    if dtype != torch.float32:  # frozen parts run in half precision to save memory
        vae.to(dtype=dtype)
        if args.freeze_unet:
            ldm.unet.to(dtype=dtype)
    trainable = {"controlnet": controlnet} | ({} if args.freeze_unet else {"unet": ldm.unet})
    return model, trainable, dtype


def build_optimizer(args, trainable, steps_per_epoch):
    # Only the trained modules reach AdamW; the schedule counts optimizer steps, not micro-batches.
    params = [p for m in trainable.values() for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    total = args.num_epochs * steps_per_epoch
    schedule = get_scheduler(
        args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps, num_training_steps=total
    )
    return optimizer, schedule


# --------------------------------------------------------------------------- loss, validation, samples


class Diffusion:
    """The frozen parts around the trained model: VAE latents, noising, class tokens, autocast."""

    def __init__(self, ldm, vae, cfg, accelerator, dtype):
        self.ldm, self.vae, self.cfg, self.accelerator, self.dtype = ldm, vae, cfg, accelerator, dtype
        # The DDPM forward process, for noising only; samplers are built from the same config elsewhere.
        self.scheduler = DDPMScheduler.from_config(ldm.scheduler_config)
        self.num_t = self.scheduler.config.num_train_timesteps

    def tokens(self, labels, dropout=0.0):
        """Class tokens (N, 1, D); each class is replaced by the null class with probability dropout."""
        # Class dropout trains the null token alongside the classes, which classifier-free guidance
        # needs at sampling time (Ho & Salimans 2022).
        if dropout:
            drop = torch.rand(labels.shape, device=labels.device) < dropout
            labels = torch.where(drop, torch.full_like(labels, self.ldm.null_label), labels)
        return self.ldm.class_embedder(labels).to(self.dtype)

    def loss(self, model, batch, tokens):
        """Per-sample diffusion loss (N,) at fresh noise and timesteps."""
        # The VAE is frozen: no graph through the encoder.
        with torch.no_grad():
            latents = encode(self.vae, batch["pixel_values"], self.cfg)
        noise = torch.randn_like(latents)
        # Timesteps uniform over the whole training range, as in Ho et al. 2020 (Algorithm 1).
        timesteps = torch.randint(0, self.num_t, (latents.shape[0],), device=latents.device)
        return self.denoising_loss(model, latents, noise, timesteps, tokens, batch["conditioning"])

    def denoising_loss(self, model, latents, noise, timesteps, tokens, conditioning):
        """Per-sample MSE (N,) between the model's prediction and the schedule's target."""
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        with self.accelerator.autocast():
            pred = model(noisy, timesteps, tokens, conditioning)
        target = diffusion_target(self.scheduler, latents, noise, timesteps)
        # The loss in fp32 whatever autocast used; per sample (N,) so validation can sum it exactly.
        return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))

    def latent_shape(self, n):
        side = self.cfg["image_size"] // self.cfg["vae_downsample"]
        return (n, self.ldm.unet.config.in_channels, side, side)

    def batch_of(self, val_set, indices):
        """The validation pairs at indices stacked into one batch on the device."""
        items = [val_set[i] for i in indices]
        batch = {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}
        return to_device(batch, self.accelerator.device)

    def held_out_batch(self, val_set, indices, grid):
        """Model inputs for the pairs at indices, each pair at every timestep of grid (pair by pair)."""
        batch, seed, repeats = self.batch_of(val_set, indices), self.cfg["seed"], len(grid)
        noise = [torch.randn(self.latent_shape(repeats), generator=pair_generator(seed, i)) for i in indices]
        # One VAE pass per pair: its latents are the posterior mean, the same at every timestep.
        latents = encode(self.vae, batch["pixel_values"], self.cfg).repeat_interleave(repeats, dim=0)
        tokens = self.tokens(batch["label"]).repeat_interleave(repeats, dim=0)
        conditioning = batch["conditioning"].repeat_interleave(repeats, dim=0)
        noise = torch.cat(noise).to(latents.device)
        return latents, noise, grid.repeat(len(indices)), tokens, conditioning

    @torch.no_grad()
    def validation_loss(self, model, val_set, pairs_per_batch, per_sample=4):
        """Deterministic held-out loss: noise seeded per pair, evenly spaced timesteps."""
        acc = self.accelerator
        # Bin centres of [0, num_t): a fixed, evenly spread timestep grid, so epochs compare.
        # Pairs are strided over processes; sum_across adds totals and counts for the global mean.
        steps = [int(self.num_t * (k + 0.5) / per_sample) for k in range(per_sample)]
        grid = torch.tensor(steps, device=acc.device)
        mine = list(range(acc.process_index, len(val_set), acc.num_processes))
        total, count = 0.0, 0
        # pairs_per_batch pairs x per_sample timesteps per model pass; without gradients that is far
        # below a training step's memory, and a few large passes beat many small ones.
        for start in range(0, len(mine), pairs_per_batch):
            inputs = self.held_out_batch(val_set, mine[start : start + pairs_per_batch], grid)
            losses = self.denoising_loss(model, *inputs)
            total, count = total + losses.sum().item(), count + len(losses)
        total, count = training.sum_across(acc, total, count)
        return total / count

    @torch.no_grad()
    def sample_grid(self, model, val_set, count, steps):
        """Rows of mask | generated (fixed noise) | ground truth for the first validation pairs, in [0, 1]."""
        batch = self.batch_of(val_set, range(min(count, len(val_set))))
        # The same noise every epoch: the grids then show training progress, not new noise.
        generator = torch.Generator().manual_seed(self.cfg["seed"])
        noise = torch.randn(self.latent_shape(len(batch["label"])), generator=generator)
        noise = noise.to(self.accelerator.device)
        scheduler = make_scheduler("unipc", self.ldm.scheduler_config)
        with self.accelerator.autocast():
            tokens = self.tokens(batch["label"])
            latents = sample_latents(model, scheduler, noise, batch["conditioning"], tokens, steps=steps)
        generated = decode(self.vae, latents, self.cfg)
        # Masks are in [0, 1]; * 2 - 1 puts them on the images' [-1, 1] scale for one normalisation.
        rows = [to_rgb(batch["conditioning"] * 2 - 1), to_rgb(generated), to_rgb(batch["pixel_values"])]
        return make_grid(torch.stack(rows, 1).flatten(0, 1), nrow=3, normalize=True, value_range=(-1, 1))


def pair_generator(seed, index):
    """The private noise stream of validation pair `index`: the same whichever process or batch holds it."""
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


def to_rgb(images):
    """(N, C, H, W) -> (N, 3, H, W) so masks and images of any channel count share one grid."""
    return images.float().expand(-1, 3, -1, -1) if images.shape[1] == 1 else images.float()


# --------------------------------------------------------------------------- checkpoints


class Run:
    """What a checkpoint holds and restores: the trained modules, optimizer state and counters."""

    def __init__(self, args, cfg, intensity, ldm, model, emas, optimizer, lr_scheduler, accelerator):
        self.args, self.cfg, self.intensity, self.ldm, self.model = args, cfg, intensity, ldm, model
        self.emas, self.optimizer, self.lr_scheduler, self.accelerator = (
            emas,
            optimizer,
            lr_scheduler,
            accelerator,
        )
        self.epoch, self.batch_in_epoch, self.global_step, self.best_val_loss = 0, 0, 0, math.inf

    def state(self, rng_states):
        """Everything needed to resume or to sample, as weights_only-loadable values."""
        unet_trained, scaler = not self.args.freeze_unet, self.accelerator.scaler
        return {
            "model_type": "controlnet",
            "format_version": 1,
            "controlnet_config": checkpoints.plain(dict(self.model.controlnet.config)),
            "controlnet": self.model.controlnet.state_dict(),
            "ema_controlnet": self.emas.weights("controlnet"),
            "unet_config": self.ldm.unet_config,
            # A frozen UNet is the LDM's own and is not stored again; inference reloads it from the LDM.
            "unet": self.ldm.unet.state_dict() if unet_trained else None,
            "ema_unet": self.emas.weights("unet"),
            "class_embedder": self.ldm.class_embedder.state_dict(),
            "class_names": self.ldm.class_names,
            "scheduler_config": checkpoints.plain(self.ldm.scheduler_config),
            "ldm_config": checkpoints.plain(self.ldm.config),
            "config": self.cfg,
            "intensity": self.intensity,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "ema_steps": self.emas.steps(),
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "global_step": self.global_step,
            "best_val_loss": self.best_val_loss,
            "rng": rng_states,  # one entry per process
        }

    def save(self, *names):
        """Write the checkpoint under each name (atomically) from the main process; all processes call it."""
        # rng_states gathers from every process, so all must get here; only the main one writes.
        rng_states = training.rng_states(self.accelerator)
        if self.accelerator.is_main_process:
            state = self.state(rng_states)
            for name in names:
                checkpoints.save(state, Path(self.args.output_dir) / name)
            checkpoints.prune(self.args.output_dir, PERIODIC, self.args.checkpoints_total_limit)
        self.accelerator.wait_for_everyone()

    def resume(self, path):
        """Restore weights, EMA, optimizer, schedule, scaler, counters and RNG states."""
        ckpt = load_checkpoint(path, "controlnet", "--resume")
        if ckpt["unet_config"] != self.ldm.unet_config:
            raise UserError(f"--resume {path} was trained on another LDM than --ldm_checkpoint")
        # Another decoding rule would silently change the intensities the ControlNet sees: refuse.
        trained_on = ckpt.get("intensity", images.EIGHT_BIT)
        if trained_on != self.intensity:
            raise UserError(
                f"--resume {path} was trained on {images.describe(trained_on)}, these images are "
                f"{images.describe(self.intensity)}: set --bit_depth / --intensity_range as in that run"
            )
        # Raw weights go into the modules and EMA shadows load apart: training continues from the raw ones.
        load_weights(self.model.controlnet, ckpt["controlnet"], f"--resume {path}")
        if ckpt["unet"] is not None:
            load_weights(self.ldm.unet, ckpt["unet"], f"--resume {path}")
        self.emas.load(ckpt)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
        if ckpt["scaler"] is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.batch_in_epoch = ckpt["epoch"], ckpt["batch_in_epoch"]
        self.global_step, self.best_val_loss = ckpt["global_step"], ckpt["best_val_loss"]
        # another process count draws other streams anyway: reseed by step instead
        if len(ckpt["rng"]) == self.accelerator.num_processes:
            checkpoints.set_rng_state(ckpt["rng"][self.accelerator.process_index])
        else:
            set_seed(self.args.seed + self.global_step, device_specific=True)
        if self.accelerator.is_main_process:
            print(f"resumed from {path} at epoch {self.epoch}, step {self.global_step}")


def epoch_checkpoints(done, improved, args):
    """The names saved after epoch `done`: latest last, so a run killed in between redoes the epoch."""
    names = ["checkpoint_best.pt"] if improved else []
    if done % args.save_every == 0 or done == args.num_epochs:
        names.append(f"checkpoint_epoch_{done}.pt")
    return [*names, LATEST]


# --------------------------------------------------------------------------- training


def train_step(net, batch, diffusion, run, dropout):
    """One forward/backward under accumulation; (mean loss over processes, grad norm or None)."""
    acc = run.accelerator
    # accumulate() skips DDP's all-reduce and makes optimizer.step() a no-op on all but the last
    # micro-batch of a group; sync_gradients says which one this is.
    with acc.accumulate(net):
        loss = diffusion.loss(net, batch, diffusion.tokens(batch["label"], dropout)).mean()
        mean_loss = acc.reduce(loss.detach(), "mean")  # every process sees it, so all stop on a NaN
        # Checked before backward, so a NaN stops the run before it reaches the weights or the EMA.
        training.check_finite(mean_loss, f"step {run.global_step}")
        acc.backward(loss)
        grad_norm = (
            acc.clip_grad_norm_(net.parameters(), run.args.max_grad_norm) if acc.sync_gradients else None
        )
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    # Schedule, EMA and step counter advance once per optimizer step, not per micro-batch.
    if acc.sync_gradients:
        run.lr_scheduler.step()
        run.emas.step()
        run.global_step += 1
    return mean_loss.item(), grad_norm


def end_of_epoch(run, diffusion, val_set, writer):
    """Validation (EMA weights), best/periodic/latest checkpoints and the sample grid."""
    args, done, is_main = run.args, run.epoch, run.accelerator.is_main_process
    # Validation and samples use the EMA weights, the ones inference loads by default.
    val_loss = run.emas.swapped_in(lambda: diffusion.validation_loss(run.model, val_set, args.batch_size))
    improved = val_loss < run.best_val_loss
    run.best_val_loss = min(run.best_val_loss, val_loss)
    # Checkpoints are written before sampling, so a failure while sampling loses no training.
    run.save(*epoch_checkpoints(done, improved, args))
    writer.scalars(run.global_step, **{"val/loss": val_loss})
    if is_main:
        print(f"epoch {done}: validation loss {val_loss:.5f} (best {run.best_val_loss:.5f})")
    if is_main and (done % args.sample_every == 0 or done == args.num_epochs):
        count, steps = args.num_sample_masks, args.sample_steps
        grid = run.emas.swapped_in(lambda: diffusion.sample_grid(run.model, val_set, count, steps)).cpu()
        path = Path(args.output_dir) / "samples" / f"epoch_{done:04d}.png"
        files.atomic_write(path, lambda tmp: save_image(grid, tmp, format="png"))
        writer.image("samples/mask_generated_truth", grid, run.global_step)
    # The others wait while the main process samples, so all start the next epoch together.
    run.accelerator.wait_for_everyone()


def train(args, accelerator):
    is_main, out = accelerator.is_main_process, Path(args.output_dir)
    set_seed(args.seed, device_specific=True)
    if is_main:  # partial files of a run killed while saving
        for folder in (out, out / "samples"):
            files.clean_temporaries(folder)

    # Data: every pair decoded once (bit depth, mask scale) before any model is built.
    ldm = load_ldm(args.ldm_checkpoint)
    train_set, val_set, intensity, cfg = build_datasets(args, ldm, is_main)
    vae = load_vae(cfg["vae_pretrained"])

    # Model: a ControlNet copied from the LDM's UNet; only it (and the UNet if unfrozen) trains.
    model, trainable, dtype = build_model(args, cfg, ldm, vae, accelerator)
    batches = math.ceil(len(train_set) / accelerator.num_processes / args.batch_size)
    optimizer, lr_scheduler = build_optimizer(
        args, trainable, math.ceil(batches / args.gradient_accumulation_steps)
    )
    emas = Emas(trainable, args.ema_decay)
    run = Run(args, cfg, intensity, ldm, model, emas, optimizer, lr_scheduler, accelerator)
    diffusion = Diffusion(ldm, vae, cfg, accelerator, dtype)
    if is_main:
        parts = {"VAE": vae, "UNet": ldm.unet, "ControlNet": model.controlnet, "embedder": ldm.class_embedder}
        print(training.parameter_table(parts))
        sizes = f"train pairs: {len(train_set)}, validation pairs: {len(val_set)}"
        print(f"{sizes}, mask labels scaled by 1/{cfg['mask_max_value']}")
    # Resume before prepare(): DDP then wraps, and broadcasts from rank 0, the restored weights.
    if args.resume:
        run.resume(args.resume)
    net, run.optimizer = accelerator.prepare(model, optimizer)  # net: DDP-wrapped; evaluation uses model
    # Without class labels every pair carries the null token: there is nothing to drop.
    dropout = cfg["cfg_dropout"] if args.use_class_labels else 0.0

    # The handlers go in before the log folder appears, so a signal after that is always caught.
    stop = training.StopSignal("checkpoint_latest.pt")
    (out / "samples").mkdir(parents=True, exist_ok=True)
    writer = training.Writer(out / "logs", is_main)
    while run.epoch < args.num_epochs:
        loader = train_loader(train_set, args, accelerator, run.epoch, run.batch_in_epoch)
        desc = f"epoch {run.epoch + 1}/{args.num_epochs}"
        bar = tqdm(loader, desc=desc, disable=not is_main, initial=run.batch_in_epoch, total=batches)
        for batch in bar:
            loss, grad_norm = train_step(net, to_device(batch, accelerator.device), diffusion, run, dropout)
            # batch_in_epoch counts micro-batches, so a resume skips exactly those already done.
            run.batch_in_epoch += 1
            lr = run.lr_scheduler.get_last_lr()[0]
            norm = {} if grad_norm is None else {"train/grad_norm": float(grad_norm)}
            writer.scalars(run.global_step, **{"train/loss": loss, "train/lr": lr}, **norm)
            bar.set_postfix(loss=f"{loss:.4f}")
            # Stop only between optimizer steps, agreed by all processes, so the saved state is whole.
            signum = accelerator.sync_gradients and stop.agreed(accelerator)
            if signum:
                run.save(LATEST)
                if is_main:
                    print(f"stopped by signal {signum}; saved {LATEST} (--resume latest)")
                writer.close()
                # 128 + signal number: the shell's convention for a process ended by a signal.
                return 128 + signum
        # The counters advance before end_of_epoch, so its checkpoints record a finished epoch.
        run.epoch, run.batch_in_epoch = run.epoch + 1, 0
        end_of_epoch(run, diffusion, val_set, writer)
    run.save("checkpoint_final.pt", LATEST)
    writer.close()
    if is_main:
        print(f"done: {out}/checkpoint_final.pt (best validation loss {run.best_val_loss:.5f})")
    return 0


def main(argv=None):
    args = parse_args(argv)
    check_output_dir(args)
    accelerator = training.make_accelerator(args.mixed_precision, args.gradient_accumulation_steps)
    try:
        code = train(args, accelerator)
    # end_training in finally: trackers and the process group close even after an error.
    finally:
        accelerator.end_training()
    if code:
        sys.exit(code)


if __name__ == "__main__":
    run_cli(main)
