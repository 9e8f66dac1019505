"""Train a mask-guided ControlNet on top of a trained class-conditional LDM (single or multi-process)."""

import json
import math
import os
import random
import signal
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from accelerate import (
    Accelerator,  # noqa: E402
    skip_first_batches,  # noqa: E402
)
from accelerate.utils import gather_object, set_seed  # noqa: E402
from diffusers import DDPMScheduler  # noqa: E402
from diffusers.optimization import get_scheduler  # noqa: E402
from diffusers.training_utils import EMAModel  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402
from torchvision.utils import make_grid, save_image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from core import cli, files, images  # noqa: E402
from dataset import MaskPairDataset, collect_samples, scan_mask_max, split_indices  # noqa: E402
from models import (  # noqa: E402
    ControlledUNet,
    build_controlnet,
    decode,
    diffusion_target,
    encode,
    load_ldm,
    load_vae,
    load_weights,
    make_scheduler,
    parameter_table,
    sample_latents,
)
from utils import (  # noqa: E402
    Parser,
    UserError,
    add_intensity_flags,
    check_intensity_flags,
    load_checkpoint,
    run_cli,
    warn,
)

LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")

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


def parse_args(argv=None):
    """Command line; every multi-word flag also accepts dashes."""
    p = Parser(description=__doc__, epilog=LAYOUT)
    p.add_argument("--data_root", required=True, help="dataset root (see data layout below)")
    p.add_argument(
        "--images_folder", default="images", help="image sub-folder of data_root (default: images)"
    )
    p.add_argument("--masks_folder", default="masks", help="mask sub-folder of data_root (default: masks)")
    p.add_argument(
        "--image_prefix", default="", help="image file-name prefix removed before pairing, e.g. Img_"
    )
    p.add_argument(
        "--mask_prefix", default="", help="mask file-name prefix removed before pairing, e.g. seg_"
    )
    p.add_argument(
        "--use_class_labels",
        action="store_true",
        help="per-class layout root/<class>/{images,masks}; condition on the LDM's class token",
    )
    p.add_argument("--ldm_checkpoint", help="required: checkpoint of the trained LDM (ldm/train.py)")
    p.add_argument("--vae_pretrained", help="VAE hub id or local folder (default: the LDM checkpoint's)")
    p.add_argument(
        "--output_dir",
        default="./controlnet_checkpoints",
        help="checkpoints, samples and logs (default: ./controlnet_checkpoints)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="start over in an output_dir that has checkpoints"
    )
    p.add_argument(
        "--resume", help="checkpoint to continue from, or 'latest' for output_dir/checkpoint_latest.pt"
    )
    p.add_argument(
        "--image_size", type=cli.positive_int, help="training resolution (default: the LDM's image_size)"
    )
    p.add_argument("--mask_channels", type=int, default=1, choices=(1, 3), help="mask channels (default: 1)")
    p.add_argument(
        "--mask_max_value",
        type=cli.positive_int,
        help="label value shown at full intensity (default: largest value in the training masks)",
    )
    add_intensity_flags(p)
    p.add_argument(
        "--batch_size", type=cli.positive_int, default=8, help="batch size per process (default: 8)"
    )
    p.add_argument("--num_epochs", type=cli.positive_int, default=100, help="training epochs (default: 100)")
    p.add_argument(
        "--learning_rate", type=cli.positive_float, default=1e-5, help="AdamW learning rate (default: 1e-5)"
    )
    p.add_argument(
        "--weight_decay", type=cli.nonnegative_float, default=1e-2, help="AdamW weight decay (default: 0.01)"
    )
    p.add_argument(
        "--lr_scheduler",
        default="constant",
        choices=LR_SCHEDULES,
        help="diffusers learning-rate schedule (default: constant)",
    )
    p.add_argument(
        "--lr_warmup_steps",
        type=cli.nonnegative_int,
        default=0,
        help="learning-rate warm-up steps (default: 0)",
    )
    p.add_argument(
        "--gradient_accumulation_steps",
        type=cli.positive_int,
        default=1,
        help="batches per step (default: 1)",
    )
    p.add_argument(
        "--max_grad_norm", type=cli.positive_float, default=1.0, help="gradient clipping norm (default: 1.0)"
    )
    p.add_argument(
        "--freeze_unet",
        dest="freeze_unet",
        action="store_true",
        default=True,
        help="keep the LDM UNet frozen (default)",
    )
    p.add_argument(
        "--no_freeze_unet",
        dest="freeze_unet",
        action="store_false",
        help="train the UNet too; the checkpoint then holds the trained UNet",
    )
    p.add_argument(
        "--mixed_precision",
        default="no",
        choices=("no", "fp16", "bf16"),
        help="mixed precision on CUDA; CPU falls back to fp32 with a warning (default: no)",
    )
    p.add_argument("--gradient_checkpointing", action="store_true", help="trade compute for memory")
    p.add_argument("--compile", action="store_true", help="torch.compile the ControlNet and the UNet")
    p.add_argument(
        "--cfg_dropout",
        type=cli.fraction,
        help="with --use_class_labels, probability of the null class (default: the LDM's cfg_dropout)",
    )
    p.add_argument(
        "--ema_decay",
        type=cli.fraction,
        default=0.9999,
        help="EMA decay of the ControlNet, in [0, 1) (default: 0.9999)",
    )
    p.add_argument(
        "--val_fraction",
        type=cli.fraction,
        default=0.1,
        help="held-out share for validation (default: 0.1)",
    )
    p.add_argument(
        "--random_flip",
        dest="random_flip",
        action="store_true",
        default=True,
        help="flip image and mask together at random (default)",
    )
    p.add_argument("--no_random_flip", dest="random_flip", action="store_false", help="no flip augmentation")
    p.add_argument(
        "--save_every",
        type=cli.positive_int,
        default=10,
        help="epochs between checkpoint_epoch_<E>.pt (default: 10)",
    )
    p.add_argument(
        "--checkpoints_total_limit", type=cli.positive_int, help="keep only the newest N epoch checkpoints"
    )
    p.add_argument(
        "--sample_every", type=cli.positive_int, default=5, help="epochs between sample grids (default: 5)"
    )
    p.add_argument(
        "--num_sample_masks", type=cli.positive_int, default=4, help="rows of the sample grid (default: 4)"
    )
    p.add_argument(
        "--sample_steps", type=cli.positive_int, default=25, help="UniPC steps for sample grids (default: 25)"
    )
    p.add_argument(
        "--num_workers",
        type=cli.nonnegative_int,
        default=4,
        help="data-loading workers per process (default: 4)",
    )
    p.add_argument("--seed", type=cli.nonnegative_int, default=42, help="random seed (default: 42)")
    args = p.parse_args(argv)
    check_intensity_flags(p, args)
    return args


def make_accelerator(args):
    """Accelerator with mixed precision only where the device supports it."""
    mixed = args.mixed_precision
    if mixed != "no" and not torch.cuda.is_available():
        warnings.warn(f"--mixed_precision {mixed} needs CUDA; training in fp32 on CPU", stacklevel=2)
        mixed = "no"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    # cpu=True without CUDA lets accelerate pick gloo under torchrun, as `accelerate launch --cpu` does
    return Accelerator(
        mixed_precision=mixed,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        cpu=not torch.cuda.is_available(),
    )


def plain(value):
    """JSON-plain copy (tuples -> lists, paths -> str) for weights_only checkpoints."""
    return json.loads(json.dumps(value, default=str))


def local_or_hub(source):
    """Absolute path for an existing local folder (so inference finds it from anywhere), else the hub id."""
    return str(Path(source).resolve()) if Path(source).exists() else source


def run_config(args, ldm, mask_max_value):
    """Full run configuration stored in every checkpoint."""
    cfg = plain(vars(args))
    ldm_cfg = ldm.config
    cfg.update(
        ldm_checkpoint=str(Path(args.ldm_checkpoint).resolve()),
        vae_pretrained=local_or_hub(args.vae_pretrained or ldm_cfg["vae_pretrained"]),
        image_size=args.image_size or int(ldm_cfg["image_size"]),
        image_channels=int(ldm_cfg["image_channels"]),
        latent_scale=float(ldm_cfg["latent_scale"]),
        latent_shift=float(ldm_cfg.get("latent_shift", 0.0)),
        vae_downsample=int(ldm_cfg["vae_downsample"]),
        mask_max_value=mask_max_value,
        cfg_dropout=args.cfg_dropout
        if args.cfg_dropout is not None
        else float(ldm_cfg.get("cfg_dropout", 0.1)),
    )
    multiple = cfg["vae_downsample"] * 2 ** (len(ldm.unet_config["block_out_channels"]) - 1)
    if cfg["image_size"] % multiple:
        raise UserError(f"--image_size {cfg['image_size']} must be a multiple of {multiple} for this LDM")
    return cfg


def check_output_dir(args):
    """Refuse to overwrite a previous run unless resuming or told to; prove output_dir writable."""
    out = Path(args.output_dir)
    if (out / "checkpoint_latest.pt").exists() and not args.resume and not args.overwrite:
        raise UserError(
            f"{out} already holds a run; pass --resume latest to continue or --overwrite to start over"
        )
    if args.resume == "latest":
        args.resume = str(out / "checkpoint_latest.pt")
    if args.resume and not Path(args.resume).is_file():
        raise UserError(f"--resume {args.resume} does not exist; pass a checkpoint of controlnet/train.py")
    cli.ensure_writable_dir(out, "--output_dir")


def scan_images(args, samples, ldm, verbose):
    """The data set's decoding rule, from one scan fully decoding every image (training and validation)."""
    rule = images.scan([img for img, _, _ in samples], args.bit_depth, args.intensity_range)["intensity"]
    if verbose:
        print(f"images: {images.describe(rule)}")
        if rule != ldm.intensity:
            warn(
                f"the LDM was trained on {images.describe(ldm.intensity)}, these images are "
                f"{images.describe(rule)}: its UNet sees other intensities than it learned "
                f"(--bit_depth / --intensity_range set the rule)"
            )
    return rule


def build_datasets(args, ldm, verbose):
    """Train and validation pairs, the images' decoding rule and the mask scale, every file checked."""
    samples = collect_samples(args, ldm.class_names, verbose)
    intensity = scan_images(args, samples, ldm, verbose)
    masks = [m for _, m, _ in samples]
    mask_max = scan_mask_max(masks, args.mask_channels, args.mask_max_value, verbose)
    train_idx, val_idx = split_indices(len(samples), args.val_fraction, args.seed)
    if not val_idx:
        message = "no held-out pairs (--val_fraction 0 or one pair): validating on training pairs"
        warnings.warn(message, stacklevel=2)
        val_idx = train_idx
    return [samples[i] for i in train_idx], [samples[i] for i in val_idx], intensity, mask_max


def make_dataset(samples, cfg, intensity, flip):
    """MaskPairDataset with the run's sizes, decoding rule and mask scaling."""
    return MaskPairDataset(
        samples,
        cfg["image_size"],
        cfg["image_channels"],
        cfg["mask_channels"],
        cfg["mask_max_value"],
        flip,
        cfg["seed"],
        intensity,
    )


def count_steps(n_batches, accumulation):
    """Optimizer steps per epoch."""
    return math.ceil(n_batches / accumulation)


class Trainer:
    """Holds the run state; the training loop below reads top to bottom."""

    def __init__(self, args):
        self.args = args
        self.accelerator = make_accelerator(args)
        self.is_main = self.accelerator.is_main_process
        set_seed(args.seed, device_specific=True)
        self.ldm = load_ldm(args.ldm_checkpoint)
        train_samples, val_samples, self.intensity, mask_max = build_datasets(args, self.ldm, self.is_main)
        self.cfg = run_config(args, self.ldm, mask_max)
        self.vae = load_vae(self.cfg["vae_pretrained"])
        self.train_set = make_dataset(train_samples, self.cfg, self.intensity, args.random_flip)
        self.val_set = make_dataset(val_samples, self.cfg, self.intensity, False)
        self.noise_scheduler = DDPMScheduler.from_config(self.ldm.scheduler_config)
        self.build_model()
        self.epoch, self.global_step, self.batch_in_epoch, self.best_val_loss = 0, 0, 0, float("inf")
        self.stop_signal = None

    def build_model(self):
        """ControlNet from the LDM UNet, optimizer, LR schedule and EMA."""
        args, device = self.args, self.accelerator.device
        controlnet = build_controlnet(self.ldm.unet, args.mask_channels, self.cfg["vae_downsample"])
        self.ldm.unet.requires_grad_(not args.freeze_unet)
        self.ldm.class_embedder.requires_grad_(False).to(device)
        self.model = ControlledUNet(controlnet, self.ldm.unet).to(device)
        self.wrapped = self.model  # the DDP-wrapped module once train() prepares it; eval uses the bare one
        if args.gradient_checkpointing:
            controlnet.enable_gradient_checkpointing()
            self.ldm.unet.enable_gradient_checkpointing()
        if args.compile:  # in place, so state_dict keys stay those of the plain modules
            controlnet.compile()
            self.ldm.unet.compile()
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            self.accelerator.mixed_precision, torch.float32
        )
        self.vae.to(device)
        if self.weight_dtype != torch.float32:  # frozen parts run in half precision to save memory
            self.vae.to(dtype=self.weight_dtype)
            if args.freeze_unet:
                self.ldm.unet.to(dtype=self.weight_dtype)
        self.trainable = {"controlnet": controlnet} | ({} if args.freeze_unet else {"unet": self.ldm.unet})
        self.ema = {
            name: EMAModel(m.parameters(), decay=args.ema_decay) for name, m in self.trainable.items()
        }
        params = [p for m in self.trainable.values() for p in m.parameters()]
        self.optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
        total_steps = args.num_epochs * count_steps(self.num_batches(), args.gradient_accumulation_steps)
        self.lr_scheduler = get_scheduler(
            args.lr_scheduler,
            self.optimizer,
            num_warmup_steps=args.lr_warmup_steps,
            num_training_steps=total_steps,
        )

    def num_batches(self):
        """Batches per epoch on one process."""
        return math.ceil(len(self.train_set) / self.accelerator.num_processes / self.args.batch_size)

    def print_parameters(self):
        """Parameter table per component."""
        components = {
            "VAE": self.vae,
            "UNet": self.ldm.unet,
            "ControlNet": self.model.controlnet,
            "embedder": self.ldm.class_embedder,
        }
        if self.is_main:
            print("\n".join(parameter_table(components)))
            print(
                f"train pairs: {len(self.train_set)}, validation pairs: {len(self.val_set)}, "
                f"mask labels scaled by 1/{self.cfg['mask_max_value']}"
            )

    # ---- checkpoints -------------------------------------------------------------------------

    def rng_state(self):
        """This process's RNG states as plain types."""
        np_state = np.random.get_state()
        return {
            "python": random.getstate(),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def set_rng_state(self, state):
        """Restore RNG states saved by rng_state()."""
        random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
        np.random.set_state(
            (state["numpy"][0], np.array(state["numpy"][1], dtype=np.uint32), *state["numpy"][2:])
        )
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])

    def ema_weights(self, name):
        """The EMA weights of one trainable module as a state_dict."""
        module = self.trainable[name]
        return {
            key: shadow.detach().cpu().clone()
            for (key, _), shadow in zip(module.named_parameters(), self.ema[name].shadow_params, strict=True)
        }

    def checkpoint(self, rng_states):
        """Everything needed to resume or to sample, as plain types."""
        unet_trained = not self.args.freeze_unet
        scaler = self.accelerator.scaler
        return {
            "model_type": "controlnet",
            "format_version": 1,
            "controlnet_config": plain(dict(self.model.controlnet.config)),
            "controlnet": self.model.controlnet.state_dict(),
            "ema_controlnet": self.ema_weights("controlnet"),
            "unet_config": self.ldm.unet_config,
            "unet": self.ldm.unet.state_dict() if unet_trained else None,
            "ema_unet": self.ema_weights("unet") if unet_trained else None,
            "class_embedder": self.ldm.class_embedder.state_dict(),
            "class_names": self.ldm.class_names,
            "scheduler_config": plain(self.ldm.scheduler_config),
            "ldm_config": plain(self.ldm.config),
            "config": self.cfg,
            "intensity": self.intensity,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "ema_steps": {name: ema.optimization_step for name, ema in self.ema.items()},
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "global_step": self.global_step,
            "best_val_loss": self.best_val_loss,
            "rng": rng_states,
        }

    def save(self, *names):
        """Write the checkpoint under each name (atomically) from the main process."""
        rng_states = gather_object([self.rng_state()])
        if self.is_main:
            out = Path(self.args.output_dir)
            ckpt = self.checkpoint(rng_states)
            for name in names:
                files.atomic_save(ckpt, out / name)
        self.accelerator.wait_for_everyone()

    def prune_epoch_checkpoints(self):
        """Keep only the newest --checkpoints_total_limit epoch checkpoints."""
        limit = self.args.checkpoints_total_limit
        if not self.is_main or not limit:
            return
        files = sorted(
            Path(self.args.output_dir).glob("checkpoint_epoch_*.pt"),
            key=lambda p: int(p.stem.rsplit("_", 1)[1]),
        )
        for old in files[:-limit]:
            old.unlink()

    def resume(self, path):
        """Restore model, EMA, optimizer, schedules, scaler, counters and RNG states."""
        ckpt = load_checkpoint(path, "controlnet", "--resume")
        if ckpt["unet_config"] != self.ldm.unet_config:
            raise UserError(f"--resume {path} was trained on another LDM than --ldm_checkpoint")
        trained_on = ckpt.get("intensity", images.EIGHT_BIT)
        if trained_on != self.intensity:
            raise UserError(
                f"--resume {path} was trained on {images.describe(trained_on)}, these images are "
                f"{images.describe(self.intensity)}: set --bit_depth / --intensity_range as in that run"
            )
        load_weights(self.model.controlnet, ckpt["controlnet"], f"--resume {path}")
        if ckpt["unet"] is not None:
            load_weights(self.ldm.unet, ckpt["unet"], f"--resume {path}")
        for name, ema in self.ema.items():
            weights = ckpt[f"ema_{name}"]
            named = self.trainable[name].named_parameters()
            ema.shadow_params = [weights[key].to(p.device).clone() for key, p in named]
            ema.optimization_step = ckpt["ema_steps"][name]
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
        if ckpt["scaler"] is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.batch_in_epoch = ckpt["epoch"], ckpt["batch_in_epoch"]
        self.global_step, self.best_val_loss = ckpt["global_step"], ckpt["best_val_loss"]
        rank = self.accelerator.process_index
        if len(ckpt["rng"]) == self.accelerator.num_processes:
            self.set_rng_state(ckpt["rng"][rank])
        else:
            set_seed(self.args.seed + self.global_step, device_specific=True)
        if self.is_main:
            print(f"resumed from {path} at epoch {self.epoch}, step {self.global_step}")

    # ---- signals -----------------------------------------------------------------------------

    def install_signal_handlers(self):
        """SIGINT/SIGTERM ask the loop to stop after the current step."""

        def request_stop(signum, _frame):
            self.stop_signal = signum

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)

    def should_stop(self):
        """True on every process once any process got a signal."""
        flag = torch.tensor([1.0 if self.stop_signal else 0.0], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, "max")
        return bool(flag.item())

    # ---- training ----------------------------------------------------------------------------

    def tokens(self, labels):
        """Class tokens (N, 1, D); in class mode the class is replaced by the null class with cfg_dropout."""
        if self.args.use_class_labels:
            drop = torch.rand(labels.shape, device=labels.device) < self.cfg["cfg_dropout"]
            labels = torch.where(drop, torch.full_like(labels, self.ldm.null_label), labels)
        return self.ldm.class_embedder(labels)

    def loss(self, model, batch, tokens, noise=None, timesteps=None):
        """Per-sample diffusion loss (N,); fresh noise and timesteps unless both are given."""
        with torch.no_grad():
            latents = encode(self.vae, batch["pixel_values"], self.cfg)
        if noise is None:
            noise = torch.randn_like(latents)
            num_t = self.noise_scheduler.config.num_train_timesteps
            timesteps = torch.randint(0, num_t, (latents.shape[0],), device=latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        with self.accelerator.autocast():
            pred = model(noisy, timesteps, tokens.to(self.weight_dtype), batch["conditioning"])
        target = diffusion_target(self.noise_scheduler, latents, noise, timesteps)
        return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (N,)

    def to_device(self, batch):
        """Move a batch to this process's device."""
        device = self.accelerator.device
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def train_step(self, batch):
        """One forward/backward; returns (loss, grad norm or None)."""
        with self.accelerator.accumulate(self.wrapped):
            loss = self.loss(self.wrapped, batch, self.tokens(batch["label"])).mean()
            mean_loss = self.accelerator.reduce(loss.detach(), "mean")
            if not torch.isfinite(mean_loss):
                raise FloatingPointError(f"loss became {mean_loss.item()} at step {self.global_step}")
            self.accelerator.backward(loss)
            grad_norm = None
            if self.accelerator.sync_gradients:
                grad_norm = self.accelerator.clip_grad_norm_(
                    self.wrapped.parameters(), self.args.max_grad_norm
                )
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if self.accelerator.sync_gradients:
            self.lr_scheduler.step()
            for name, ema in self.ema.items():
                ema.step(self.trainable[name].parameters())
            self.global_step += 1
        return mean_loss.item(), grad_norm

    def train_loader(self):
        """This epoch's loader for this process, skipping batches already done before a resume."""
        self.train_set.set_epoch(self.epoch)
        sampler = DistributedSampler(
            self.train_set,
            num_replicas=self.accelerator.num_processes,
            rank=self.accelerator.process_index,
            shuffle=True,
            seed=self.args.seed,
        )
        sampler.set_epoch(self.epoch)
        loader = DataLoader(
            self.train_set,
            batch_size=self.args.batch_size,
            sampler=sampler,
            num_workers=self.args.num_workers,
            drop_last=False,
            generator=torch.Generator().manual_seed(self.args.seed + self.epoch),
        )
        return skip_first_batches(loader, self.batch_in_epoch) if self.batch_in_epoch else loader

    # ---- validation and samples --------------------------------------------------------------

    def with_ema(self, fn):
        """Call fn() with the EMA weights swapped in."""
        for name, ema in self.ema.items():
            ema.store(self.trainable[name].parameters())
            ema.copy_to(self.trainable[name].parameters())
        try:
            return fn()
        finally:
            for name, ema in self.ema.items():
                ema.restore(self.trainable[name].parameters())

    @torch.no_grad()
    def validation_loss(self, timesteps_per_sample=4):
        """Deterministic held-out loss: latent means, noise seeded per sample, evenly spaced timesteps."""
        device, total = self.accelerator.device, torch.zeros(2, device=self.accelerator.device)
        num_t = self.noise_scheduler.config.num_train_timesteps
        grid = torch.tensor(
            [int(num_t * (k + 0.5) / timesteps_per_sample) for k in range(timesteps_per_sample)]
        )
        for index in range(self.accelerator.process_index, len(self.val_set), self.accelerator.num_processes):
            batch = {
                k: v[None] if torch.is_tensor(v) else torch.tensor([v])
                for k, v in self.val_set[index].items()
            }
            batch = self.to_device(
                {k: v.expand(timesteps_per_sample, *v.shape[1:]) for k, v in batch.items()}
            )
            generator = torch.Generator().manual_seed(self.args.seed * 1_000_003 + index)
            latent_shape = self.latent_shape(timesteps_per_sample)
            noise = torch.randn(latent_shape, generator=generator).to(device)
            tokens = self.ldm.class_embedder(batch["label"])
            losses = self.loss(self.model, batch, tokens, noise, grid.to(device))
            total += torch.stack([losses.sum(), torch.tensor(float(len(losses)), device=device)])
        total = self.accelerator.reduce(total, "sum")
        return (total[0] / total[1]).item()

    def latent_shape(self, n):
        """(n, c, h, w) of the latents at the training resolution."""
        side = self.cfg["image_size"] // self.cfg["vae_downsample"]
        return (n, self.ldm.unet.config.in_channels, side, side)

    @torch.no_grad()
    def sample_grid(self):
        """Rows of mask | generated (EMA, fixed noise) | ground truth for the first validation pairs."""
        count = min(self.args.num_sample_masks, len(self.val_set))
        items = [self.val_set[i] for i in range(count)]
        batch = self.to_device({k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]})
        noise = torch.randn(self.latent_shape(count), generator=torch.Generator().manual_seed(self.args.seed))
        scheduler = make_scheduler("unipc", self.ldm.scheduler_config)
        with self.accelerator.autocast():
            latents = sample_latents(
                self.model,
                scheduler,
                noise.to(self.accelerator.device),
                batch["conditioning"],
                self.ldm.class_embedder(batch["label"]).to(self.weight_dtype),
                steps=self.args.sample_steps,
            )
        generated = decode(self.vae, latents, self.cfg)
        rows = [to_rgb(batch["conditioning"] * 2 - 1), to_rgb(generated), to_rgb(batch["pixel_values"])]
        return make_grid(torch.stack(rows, 1).flatten(0, 1), nrow=3, normalize=True, value_range=(-1, 1))

    def end_of_epoch(self, writer):
        """Validation, best/periodic checkpoints and sample grid after a finished epoch."""
        done = self.epoch  # epochs completed so far
        val_loss = self.with_ema(self.validation_loss)
        names = []
        if val_loss < self.best_val_loss:
            self.best_val_loss = val_loss
            names.append("checkpoint_best.pt")
        if done % self.args.save_every == 0 or done == self.args.num_epochs:
            names.append(f"checkpoint_epoch_{done}.pt")
        # latest last: killed in between, a resume from the previous latest redoes this epoch and its saves
        self.save(*names, "checkpoint_latest.pt")
        self.prune_epoch_checkpoints()
        if self.is_main:
            print(f"epoch {done}: validation loss {val_loss:.5f} (best {self.best_val_loss:.5f})")
            writer.add_scalar("val/loss", val_loss, self.global_step)
            if done % self.args.sample_every == 0 or done == self.args.num_epochs:
                grid = self.with_ema(self.sample_grid).cpu()
                path = Path(self.args.output_dir) / "samples" / f"epoch_{done:04d}.png"
                files.atomic_write(path, lambda tmp: save_image(grid, tmp, format="png"))
                writer.add_image("samples/mask_generated_truth", grid, self.global_step)
        self.accelerator.wait_for_everyone()

    def run_epoch(self, writer):
        """Train over one epoch; returns False when a signal asked to stop."""
        loader = self.train_loader()
        bar = tqdm(
            loader,
            desc=f"epoch {self.epoch + 1}/{self.args.num_epochs}",
            disable=not self.is_main,
            initial=self.batch_in_epoch,
            total=self.num_batches(),
        )
        tick = time.perf_counter()
        for batch in bar:
            loss, grad_norm = self.train_step(self.to_device(batch))
            self.batch_in_epoch += 1
            if self.is_main:
                images_per_s = (
                    len(batch["index"]) * self.accelerator.num_processes / (time.perf_counter() - tick)
                )
                self.log(writer, loss, grad_norm, images_per_s)
                bar.set_postfix(loss=f"{loss:.4f}")
            tick = time.perf_counter()
            if self.accelerator.sync_gradients and self.should_stop():
                return False
        self.epoch += 1
        self.batch_in_epoch = 0
        return True

    def log(self, writer, loss, grad_norm, images_per_s):
        """TensorBoard scalars of one step."""
        writer.add_scalar("train/loss", loss, self.global_step)
        writer.add_scalar("train/lr", self.lr_scheduler.get_last_lr()[0], self.global_step)
        writer.add_scalar("train/images_per_s", images_per_s, self.global_step)
        if grad_norm is not None:
            writer.add_scalar("train/grad_norm", float(grad_norm), self.global_step)


def to_rgb(images):
    """(N, C, H, W) -> (N, 3, H, W) so masks and images of any channel count share one grid."""
    return images.float().expand(-1, 3, -1, -1) if images.shape[1] == 1 else images.float()


def train(args):
    """Set up, optionally resume, then run epochs with checkpoints, validation and samples."""
    if not args.ldm_checkpoint:
        raise UserError(
            "--ldm_checkpoint is required: train the LDM first (ldm/train.py) and pass its checkpoint"
        )
    check_output_dir(args)
    trainer = Trainer(args)
    if trainer.is_main:  # partial files of a run killed while saving
        for folder in (Path(args.output_dir), Path(args.output_dir) / "samples"):
            files.clean_temporaries(folder)
    trainer.install_signal_handlers()
    trainer.print_parameters()
    if args.resume:
        trainer.resume(args.resume)
    trainer.wrapped, trainer.optimizer = trainer.accelerator.prepare(trainer.model, trainer.optimizer)
    if trainer.is_main:
        (Path(args.output_dir) / "samples").mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(str(Path(args.output_dir) / "logs")) if trainer.is_main else None
    while trainer.epoch < args.num_epochs:
        if not trainer.run_epoch(writer):
            trainer.save("checkpoint_latest.pt")
            if trainer.is_main:
                print(
                    f"stopped by signal {trainer.stop_signal}; saved checkpoint_latest.pt (--resume latest)"
                )
            sys.exit(128 + (trainer.stop_signal or signal.SIGTERM))
        trainer.end_of_epoch(writer)
    trainer.save("checkpoint_final.pt", "checkpoint_latest.pt")
    if trainer.is_main:
        writer.close()
        print(
            f"done: {args.output_dir}/checkpoint_final.pt (best validation loss {trainer.best_val_loss:.5f})"
        )
    trainer.accelerator.end_training()


def main():
    args = parse_args()
    try:
        train(args)
    except FloatingPointError as err:
        print(f"error: {err}; training stopped, the last good checkpoint is kept", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main)
