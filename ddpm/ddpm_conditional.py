"""Class-conditional pixel-space DDPM with classifier-free guidance: the Diffusion class and training loop.

Run `python ddpm_conditional.py` to train with the values in build_parser(); command-line flags override them.
ddpm.py (unconditional) and ddpm_conditional_ddp.py (multi-GPU, sampling) reuse this training loop.
"""

import argparse
import copy
import math
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from core import cli, images
from core.files import atomic_save, clean_temporaries
from modules import build_model, check_architecture
from utils import (
    CHECKPOINT_FORMAT,
    DistContext,
    ImageDataset,
    UserError,
    add_flag,
    autocast_dtype,
    cpu_state,
    data_layout,
    enable_tf32,
    load_checkpoint,
    pick_device,
    print_parameter_table,
    print_timing,
    prune_checkpoints,
    rng_states,
    run_cli,
    save_grid,
    scan_dataset,
    set_rng_states,
    to_uint8,
    to_unit,
)

# Settings that fix the network and the noise schedule: a resumed run takes them from its checkpoint.
ARCH_KEYS = (
    "conditional",
    "image_size",
    "channels",
    "base_channels",
    "time_dim",
    "attn_resolutions",
    "num_classes",
    "noise_steps",
    "beta_start",
    "beta_end",
)
# Settings of one invocation that a resumed run does not inherit.
RUNTIME_KEYS = ("resume", "mode", "device", "overwrite", "max_steps", "max_minutes")
OUTPUT_KINDS = ("models", "results", "runs")  # the folders of a run under --workdir
PREVIEW_CFG = 3.0  # guidance of the EMA sample grids written during training
PREVIEW_ETA = 1.0  # stochastic DDIM: deterministic DDIM shows blotches on a model early in training


class Diffusion:
    """Linear-schedule Gaussian diffusion: noising for training, DDPM or DDIM sampling with CFG."""

    def __init__(self, noise_steps=1000, beta_start=1e-4, beta_end=0.02, img_size=64, device=None):
        # diffusers is imported on first use: it adds seconds to start-up, and input errors should be instant.
        from diffusers import DDPMScheduler

        self.noise_steps, self.img_size = noise_steps, img_size
        self.device = pick_device(device)
        self.scheduler = DDPMScheduler(
            num_train_timesteps=noise_steps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule="linear",
            clip_sample=True,
        )

    @classmethod
    def from_config(cls, config, device=None):
        """The diffusion a training config describes."""
        return cls(
            config["noise_steps"], config["beta_start"], config["beta_end"], config["image_size"], device
        )

    def sample_timesteps(self, n, generator=None):
        """Uniform training timesteps: (n,)."""
        return torch.randint(0, self.noise_steps, (n,), generator=generator, device=self.device)

    def noise_images(self, x, t, noise):
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise."""
        return self.scheduler.add_noise(x, noise, t)

    def make_sampler(self, sampler="ddpm", steps=None):
        """A fresh diffusers scheduler for ancestral DDPM or DDIM, set to `steps` denoising steps."""
        from diffusers import DDIMScheduler, DDPMScheduler

        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"unknown sampler {sampler!r}: use 'ddpm' or 'ddim'")
        scheduler_cls = DDPMScheduler if sampler == "ddpm" else DDIMScheduler
        scheduler = scheduler_cls.from_config(self.scheduler.config)
        scheduler.set_timesteps(steps or (self.noise_steps if sampler == "ddpm" else 50))
        return scheduler

    @staticmethod
    def guided_noise(model, x, t, labels, cfg_scale):
        """Noise prediction with classifier-free guidance; both halves share one forward pass."""
        if labels is None or cfg_scale == 1:
            return model(x, t, labels)
        if cfg_scale == 0:
            return model(x, t, None)
        null = model.null_labels(x.shape[0], x.device)
        eps_cond, eps_uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null])).chunk(2)
        return eps_uncond + cfg_scale * (eps_cond - eps_uncond)

    @torch.no_grad()
    def sample(
        self,
        model,
        n,
        labels=None,
        cfg_scale=3,
        log_time=True,
        sampler="ddpm",
        steps=None,
        eta=0.0,
        generator=None,
        output_type="uint8",
    ):
        """Generate n images (n, C, H, W); labels=None samples unconditionally.

        output_type "uint8" gives 0..255; "float" gives float32 in [0, 1], for writing more than 8 bits.
        """
        from diffusers.utils.torch_utils import randn_tensor

        if labels is not None and (model.num_classes is None or len(labels) != n):
            raise ValueError("labels need a conditional model and one label per image")
        scheduler = self.make_sampler(sampler, steps)
        device = next(model.parameters()).device
        dtype = autocast_dtype(device, "auto")
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        x = randn_tensor((n, model.c_in, self.img_size, self.img_size), generator=generator, device=device)
        # DDIM re-derives the noise from the clipped x0, as guided-diffusion does: guided samples stay clean.
        extra = {"eta": eta, "use_clipped_model_output": True} if sampler == "ddim" else {}
        for t in tqdm(scheduler.timesteps, desc=f"{sampler} sampling", leave=False, disable=not log_time):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                eps = self.guided_noise(model, x, t.to(device).expand(n), labels, cfg_scale).float()
            x = scheduler.step(eps, t, x, generator=generator, **extra).prev_sample
        samples = (to_unit(x) if output_type == "float" else to_uint8(x)).cpu()
        model.train(was_training)
        if log_time:
            print_timing(n, len(scheduler.timesteps), time.perf_counter() - start, 1)
        return samples


# ----------------------------------------------------------------------------- command line


def add_train_args(parser, conditional=True):
    """Training flags, checked as they are parsed; both spellings of every multi-word flag are accepted."""
    add_flag(
        parser, "run_name", default="DDPM_conditional", help="name of models/, results/ and runs/ subfolders"
    )
    add_flag(
        parser,
        "data_root",
        "dataset-path",
        dest="dataset_path",
        default=None,
        help="training images (layout in the text below)",
    )
    add_flag(parser, "workdir", default=".", help="folder that holds models/, results/ and runs/")
    add_flag(
        parser,
        "num_epochs",
        "epochs",
        dest="epochs",
        type=cli.positive_int,
        default=300,
        help="passes over the training images",
    )
    add_flag(parser, "batch_size", type=cli.positive_int, default=14, help="images per step on each process")
    add_flag(
        parser,
        "image_size",
        type=cli.positive_int,
        default=64,
        help="side of the square training images (multiple of 8, >= 16)",
    )
    add_flag(
        parser,
        "channels",
        type=int,
        choices=(1, 3),
        default=None,
        help="image channels of the model (default: 1 if every image is grayscale, else 3)",
    )
    add_flag(
        parser,
        "bit_depth",
        type=cli.bit_depth,
        default=None,
        metavar="N",
        help="integer images: scale pixel values by 2^N - 1; unset: N found by scanning the whole data set",
    )
    add_flag(
        parser,
        "intensity_range",
        type=cli.finite_float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=None,
        help="float ('F') images: the values that map to black and white; unset: 0 1",
    )
    add_flag(
        parser,
        "learning_rate",
        "lr",
        dest="lr",
        type=cli.positive_float,
        default=3e-4,
        help="AdamW learning rate",
    )
    add_flag(
        parser,
        "lr_warmup_steps",
        type=cli.nonnegative_int,
        default=500,
        help="linear learning-rate warm-up steps",
    )
    add_flag(parser, "weight_decay", type=cli.nonnegative_float, default=0.0, help="AdamW weight decay")
    add_flag(
        parser,
        "grad_clip",
        type=cli.nonnegative_float,
        default=1.0,
        help="max gradient norm (0 disables clipping)",
    )
    add_flag(parser, "device", default="auto", help="auto (GPU if available), cpu, cuda or cuda:N")
    add_flag(
        parser,
        "mixed_precision",
        "precision",
        dest="precision",
        type=cli.mixed_precision,
        default="auto",
        help="no, fp16 (with a grad scaler), bf16 (fp32 = no) or auto (bf16 if the GPU has it, else fp16); "
        "CUDA only, the CPU runs fp32",
    )
    add_flag(parser, "seed", type=int, default=42, help="random seed")
    add_flag(
        parser,
        "num_workers",
        type=cli.nonnegative_int,
        default=4,
        help="data-loading worker processes per process (0: load in the main process)",
    )
    add_flag(
        parser,
        "save_every",
        "save-interval",
        dest="save_interval",
        type=cli.positive_int,
        default=10,
        help="every this many epochs: save checkpoints, evaluate held-out loss, write a sample grid",
    )
    add_flag(
        parser,
        "checkpoints_total_limit",
        type=cli.positive_int,
        default=None,
        help="keep only the newest N periodic checkpoints",
    )
    add_flag(
        parser,
        "val_fraction",
        "val-split",
        dest="val_split",
        type=cli.fraction,
        default=0.05,
        help="fraction of images held out to choose ckpt_best.pt (0 disables)",
    )
    add_flag(
        parser,
        "resume",
        nargs="?",
        const="auto",
        default=None,
        help="continue from a checkpoint: a path, or no value for <workdir>/models/<run-name>/ckpt.pt",
    )
    add_flag(
        parser,
        "overwrite",
        action="store_true",
        help="training: start a new run over an existing run folder; sampling: redo existing images",
    )
    add_flag(
        parser,
        "max_steps",
        type=cli.positive_int,
        default=None,
        help="stop after this many optimizer steps in total",
    )
    add_flag(
        parser,
        "max_minutes",
        type=cli.positive_float,
        default=None,
        help="stop training after this many minutes",
    )
    add_flag(parser, "noise_steps", type=cli.positive_int, default=1000, help="diffusion timesteps T")
    add_flag(
        parser,
        "beta_start",
        type=cli.positive_float,
        default=1e-4,
        help="first beta of the linear schedule (0 < beta-start < beta-end < 1)",
    )
    add_flag(
        parser, "beta_end", type=cli.positive_float, default=0.02, help="last beta of the linear schedule"
    )
    add_flag(
        parser,
        "base_channels",
        type=cli.positive_int,
        default=64,
        help="UNet width (channels of the first level, even)",
    )
    add_flag(
        parser, "time_dim", type=cli.positive_int, default=256, help="size of the time (and class) embedding"
    )
    add_flag(
        parser,
        "attn_resolutions",
        type=cli.positive_int,
        nargs="+",
        default=None,
        help="feature-map sides that get self-attention (default: levels below full size, up to 32)",
    )
    add_flag(parser, "ema_decay", type=cli.fraction, default=0.995, help="EMA decay, in [0, 1)")
    add_flag(
        parser,
        "ema_warmup_steps",
        type=cli.nonnegative_int,
        default=2000,
        help="steps during which the EMA copies the weights",
    )
    add_flag(
        parser,
        "preview_steps",
        type=cli.nonnegative_int,
        default=50,
        help="DDIM steps of the EMA sample grids written at each save (0: no grids)",
    )
    add_flag(
        parser,
        "hflip",
        action="store_true",
        help="random horizontal flips (off: they harm e.g. digits, text)",
    )
    add_flag(parser, "compile", action="store_true", help="torch.compile the UNet")
    add_flag(
        parser, "grad_checkpointing", action="store_true", help="recompute activations to save GPU memory"
    )
    if conditional:
        add_flag(
            parser,
            "num_classes",
            type=cli.positive_int,
            default=None,
            help="number of classes (None: count the class folders)",
        )
        add_flag(
            parser,
            "cfg_dropout",
            type=cli.fraction,
            default=0.1,
            help="probability of replacing a label by the null class, for classifier-free guidance",
        )
    parser.set_defaults(conditional=conditional)


def train_parser(conditional, description):
    """Argument parser of the training scripts, before their own defaults."""
    layout = data_layout() if conditional else "any folder of images (sub-folders are searched)"
    parser = cli.Parser(
        description=description,
        epilog=f"Data layout: {layout}",
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_train_args(parser, conditional)
    return parser


def parse_flags(parser, argv):
    """Parse argv, also checking the values that only make sense together (one 'error:' line, exit 2)."""
    args = parser.parse_args(argv)
    if not 0 < args.beta_start < args.beta_end < 1:
        parser.error(
            "the noise schedule needs 0 < --beta-start < --beta-end < 1, "
            f"got {args.beta_start} and {args.beta_end}"
        )
    if args.base_channels % 2:
        parser.error(f"--base-channels must be even (it sizes the time embedding), got {args.base_channels}")
    if args.intensity_range is not None and not args.intensity_range[0] < args.intensity_range[1]:
        low, high = args.intensity_range
        parser.error(f"--intensity-range needs LOW < HIGH, got {low:g} {high:g}")
    return args


# ----------------------------------------------------------------------------- configuration


def resolve_config(args, explicit):
    """The run's config dict and the checkpoint to resume from (or None)."""
    config = vars(args).copy()
    config.setdefault("num_classes", None)
    config.setdefault("cfg_dropout", 0.0)
    if not args.resume:
        return config, None
    path = run_dir(config, "models") / "ckpt.pt" if args.resume == "auto" else Path(args.resume)
    if args.resume == "auto" and not path.is_file():
        raise UserError(
            f"--resume found no checkpoint at {path}: pass --resume <path> or the right --run-name"
        )
    ckpt = load_checkpoint(path, "--resume")
    if "optimizer" not in ckpt or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(
            f"{path} cannot be resumed: it is not a training checkpoint (use models/<run>/ckpt.pt)"
        )
    for key, value in ckpt["config"].items():
        if key in ARCH_KEYS and key in explicit and config[key] != value:
            raise UserError(
                f"{path} was trained with {key}={value}, not {config[key]}: drop that flag to resume"
            )
        if key not in explicit and key not in RUNTIME_KEYS:
            config[key] = value
    return config, ckpt


def run_dir(config, kind):
    """<workdir>/<kind>/<run_name>, kind being models, results or runs."""
    return Path(config["workdir"]) / kind / config["run_name"]


def validate(config, fresh):
    """Fail early, before touching any file, on settings that cannot work (single values: at parsing)."""
    pick_device(config["device"])  # an unavailable device fails now, before any data is read
    if config["dataset_path"] is None:
        raise UserError(f"pass --data_root (layout: {data_layout()})")
    if fresh and (run_dir(config, "models") / "ckpt.pt").exists() and not config["overwrite"]:
        raise UserError(
            f"{run_dir(config, 'models')} already holds a run: pass --resume to continue it, "
            "another --run-name, or --overwrite"
        )


def model_config(config):
    """UNet constructor arguments for a training config."""
    return dict(
        c_in=config["channels"],
        c_out=config["channels"],
        time_dim=config["time_dim"],
        img_size=config["image_size"],
        base_channels=config["base_channels"],
        attn_resolutions=config["attn_resolutions"],
        num_classes=config["num_classes"],
    )


def load_data(config, ckpt):
    """List and check the images; fill in num_classes and class names."""
    try:
        check_architecture(config["image_size"], config["attn_resolutions"] or [])
    except ValueError as err:
        raise UserError(f"{err} (--image-size / --attn-resolutions)") from None
    files, labels, class_names = scan_dataset(config["dataset_path"], config["conditional"])
    if config["conditional"]:
        if config["num_classes"] not in (None, len(class_names)):
            raise UserError(
                f"{config['dataset_path']} has {len(class_names)} class folders but --num-classes is "
                f"{config['num_classes']}: pass --num-classes {len(class_names)} or leave it out"
            )
        config["num_classes"] = len(class_names)
        if ckpt is not None and ckpt["class_names"] != class_names:
            raise UserError(
                f"the class folders of {config['dataset_path']} differ from the checkpoint's "
                f"{ckpt['class_names']}: resume with the data set it was trained on"
            )
    return files, labels, class_names


def prepare_outputs(config):
    """Prove the run folders writable before any work starts, and remove a killed run's temporaries."""
    cli.ensure_writable_dir(config["workdir"], "--workdir")
    for kind in OUTPUT_KINDS:
        clean_temporaries(cli.ensure_writable_dir(run_dir(config, kind), f"run folder ({kind})"))


def scan_images(config, files, ckpt):
    """Decode every image once (a broken one fails now): fill in channels and the intensity rule."""
    found = images.scan(files, config["bit_depth"], config["intensity_range"])
    config["channels"] = config["channels"] or found["channels"]
    config["intensity"] = found["intensity"]
    # Checkpoints from before the rule was stored resume with the scanned one, as nothing else is known.
    trained = (ckpt or {}).get("intensity", found["intensity"])
    if trained != found["intensity"]:
        raise UserError(
            f"{config['dataset_path']} scans as {images.describe(found['intensity'])}, but the checkpoint "
            f"was trained on {images.describe(trained)}: resume with the data it was trained on, "
            "or state the rule with --bit-depth / --intensity-range"
        )


def split_heldout(files, labels, fraction, seed):
    """Deterministic (train, held-out) split of the file list."""
    n_val = (
        min(max(1, round(len(files) * fraction)), len(files) - 1) if fraction > 0 and len(files) > 1 else 0
    )
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()

    def subset(indices):
        return [files[i] for i in sorted(indices)], [labels[i] for i in sorted(indices)]

    return subset(order[n_val:]), subset(order[:n_val])


def ignore_sigint(_worker_id):
    """Data workers leave Ctrl-C to the main process, which saves a checkpoint before exiting."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class TrainingStopped(Exception):
    """Raised to end training early: by a signal (exit 128+signum) or a non-finite loss (exit 1)."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code


# ----------------------------------------------------------------------------- training


class Trainer:
    """One training run: model, EMA, optimizer, data and the loop, on one or several processes."""

    def __init__(self, config, ckpt, class_names, train_data, val_data, ctx):
        # Imported here: only training needs them, and they add seconds to every sampling start-up.
        from diffusers.optimization import get_constant_schedule_with_warmup
        from diffusers.training_utils import EMAModel

        self.config, self.class_names, self.ctx = config, class_names, ctx
        self.device = ctx.device
        torch.manual_seed(config["seed"])  # identical initial weights on every rank
        self.model = build_model(model_config(config)).to(self.device)
        self.ema_model = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.ema = EMAModel(
            self.model.parameters(), decay=config["ema_decay"], update_after_step=config["ema_warmup_steps"]
        )
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"]
        )
        self.lr_scheduler = get_constant_schedule_with_warmup(self.optimizer, config["lr_warmup_steps"])
        self.dtype = autocast_dtype(self.device, config["precision"])
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.diffusion = Diffusion.from_config(config, self.device)
        self.generator = torch.Generator(self.device).manual_seed(config["seed"] * 1000 + ctx.rank)
        image_format = (config["image_size"], config["channels"], config["intensity"])
        self.train_set = ImageDataset(*train_data, *image_format)
        self.val_set = ImageDataset(*val_data, *image_format)
        self.epoch = self.step_in_epoch = self.global_step = 0
        self.best_metric, self.improved, self.stop_signal = math.inf, False, None
        if ckpt is not None:
            self.load_state(ckpt)
        self.net = self.wrap_model()

    def wrap_model(self):
        """The module the loop calls: compiled and/or DDP-wrapped as requested."""
        if self.config["grad_checkpointing"]:
            self.model.set_grad_checkpointing()
        net = torch.compile(self.model) if self.config["compile"] else self.model
        if self.ctx.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            net = torch.nn.parallel.DistributedDataParallel(net, device_ids=device_ids)
        return net

    # --------------------------------------------------------------- state

    def state_dict(self):
        """Everything needed to continue bit for bit; collective, so every rank calls it."""
        generators = [None] * self.ctx.world_size
        if self.ctx.distributed:
            torch.distributed.all_gather_object(generators, self.generator.get_state())
        else:
            generators = [self.generator.get_state()]
        self.ema.copy_to(self.ema_model.parameters())
        return {
            "format": CHECKPOINT_FORMAT,
            "model": cpu_state(self.model.state_dict()),
            "ema": cpu_state(self.ema_model.state_dict()),
            "ema_state": {k: v for k, v in self.ema.state_dict().items() if k != "shadow_params"},
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "grad_scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "rng": rng_states(),
            "generators": generators,
            "best_metric": self.best_metric,
            "class_names": list(self.class_names),
            "intensity": dict(self.config["intensity"]),
            "config": dict(self.config),
            "model_config": dict(self.model.config),
        }

    def load_state(self, ckpt):
        """Restore what state_dict() saved."""
        from diffusers.training_utils import EMAModel

        self.model.load_state_dict(ckpt["model"])
        self.ema_model.load_state_dict(ckpt["ema"])
        self.ema = EMAModel(self.ema_model.parameters())
        self.ema.load_state_dict(ckpt["ema_state"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
        self.scaler.load_state_dict(ckpt["grad_scaler"])
        self.epoch, self.step_in_epoch = ckpt["epoch"], ckpt["step_in_epoch"]
        self.global_step, self.best_metric = ckpt["global_step"], ckpt["best_metric"]
        set_rng_states(ckpt["rng"])
        if len(ckpt["generators"]) == self.ctx.world_size:
            self.generator.set_state(ckpt["generators"][self.ctx.rank])
        else:  # another process count: data order and noise cannot repeat exactly anyway
            self.generator.manual_seed(self.config["seed"] * 1000 + self.ctx.rank + self.global_step)

    def save(self, final=False, periodic=False):
        """Write the periodic / best / final copies and ema_ckpt.pt, then ckpt.pt (latest) last.

        A kill between two writes leaves the previous ckpt.pt, and resuming from it redoes this save.
        """
        state = self.state_dict()
        if not self.ctx.is_main:
            return
        folder = run_dir(self.config, "models")
        copies = [f"ckpt_epoch_{self.epoch:04d}.pt"] if periodic else []
        copies += ["ckpt_best.pt"] if self.improved else []
        copies += ["ckpt_final.pt"] if final else []
        for name in copies:
            atomic_save(state, folder / name)
        keys = ("format", "class_names", "intensity", "config", "model_config", "epoch", "global_step")
        ema_only = {k: state[k] for k in keys}
        atomic_save({**ema_only, "weights": "ema", "model": state["ema"]}, folder / "ema_ckpt.pt")
        atomic_save(state, folder / "ckpt.pt")
        prune_checkpoints(folder, "ckpt_epoch_*.pt", self.config["checkpoints_total_limit"])

    # --------------------------------------------------------------- loop

    def epoch_loader(self, epoch, skip_batches):
        """This rank's shuffled batches of one epoch, minus those a resumed run already did."""
        sampler = DistributedSampler(
            self.train_set, self.ctx.world_size, self.ctx.rank, shuffle=True, seed=self.config["seed"]
        )
        sampler.set_epoch(epoch)
        indices = list(sampler)[skip_batches * self.config["batch_size"] :]
        return DataLoader(
            self.train_set,
            batch_size=self.config["batch_size"],
            sampler=indices,
            num_workers=self.config["num_workers"],
            pin_memory=self.device.type == "cuda",
            worker_init_fn=ignore_sigint,
        )

    def steps_per_epoch(self):
        per_rank = math.ceil(len(self.train_set) / self.ctx.world_size)
        return math.ceil(per_rank / self.config["batch_size"])

    def train_step(self, x, y):
        """One optimizer step; returns the loss averaged over ranks and the gradient norm."""
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        n, gen = x.shape[0], self.generator
        if self.config["hflip"]:  # flips drawn from the checkpointed generator keep resume exact
            flip = torch.rand(n, generator=gen, device=self.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        t = self.diffusion.sample_timesteps(n, gen)
        noise = torch.randn(x.shape, generator=gen, device=self.device)
        x_t = self.diffusion.noise_images(x, t, noise)
        labels = None
        if self.config["conditional"]:
            drop = torch.rand(n, generator=gen, device=self.device) < self.config["cfg_dropout"]
            labels = torch.where(drop, self.config["num_classes"], y)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            pred = self.net(x_t, t, labels)
        loss = F.mse_loss(pred.float(), noise)
        votes = torch.tensor([float(self.stop_signal is not None), self.over_budget()], device=self.device)
        stats = self.ctx.all_reduce_sum(torch.cat([loss.detach()[None], votes])).tolist()  # one sync per step
        self.check_finite(stats[0] / self.ctx.world_size)
        grad_norm = self.optimize(loss)
        self.signalled = self.signalled or stats[1] > 0  # every rank learns that one of them was signalled
        return stats[0] / self.ctx.world_size, grad_norm, stats[1] + stats[2] > 0

    def optimize(self, loss):
        """Backward, clip, step optimizer, LR schedule and EMA; returns the gradient norm."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        max_norm = self.config["grad_clip"] if self.config["grad_clip"] > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_scheduler.step()
        self.ema.step(self.model.parameters())
        self.global_step += 1
        return grad_norm.item()

    def over_budget(self):
        """1.0 when the step or time budget ends with the current step."""
        minutes = self.config["max_minutes"]
        over_time = minutes is not None and time.time() - self.start_time > 60 * minutes
        over_steps = self.config["max_steps"] is not None and self.global_step + 1 >= self.config["max_steps"]
        return float(over_time or over_steps)

    def check_finite(self, loss):
        if not math.isfinite(loss):
            latest = run_dir(self.config, "models") / "ckpt.pt"
            raise TrainingStopped(
                f"loss became {loss} at step {self.global_step}; stopped without saving "
                f"(last good checkpoint: {latest if latest.exists() else 'none yet'}); "
                "lower --learning_rate or check the data",
                exit_code=1,
            )

    def request_stop(self, signum, _frame):
        self.stop_signal = signum

    def fit(self):
        """Train until the epochs or a budget run out; signals save ckpt.pt and exit non-zero."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.request_stop)
        self.start_time, self.signalled = time.time(), False
        self.writer = self.make_writer()
        stopped = self.global_step >= (self.config["max_steps"] or math.inf)
        while self.epoch < self.config["epochs"] and not stopped:
            stopped = self.run_epoch()
            if self.signalled:
                self.save()
                signum = self.stop_signal or signal.SIGTERM
                raise TrainingStopped(f"stopped by signal {signum}; saved {self.latest_path()}", 128 + signum)
            at_interval = self.step_in_epoch == 0 and self.epoch % self.config["save_interval"] == 0
            if at_interval and not stopped and self.epoch < self.config["epochs"]:
                self.checkpoint_and_preview(periodic=True)
        self.checkpoint_and_preview(final=True)

    def run_epoch(self):
        """Train over (the rest of) one epoch; returns True when asked to stop early."""
        loader = self.epoch_loader(self.epoch, self.step_in_epoch)
        bar = tqdm(
            loader,
            desc=f"epoch {self.epoch + 1}/{self.config['epochs']}",
            initial=self.step_in_epoch,
            total=self.steps_per_epoch(),
            disable=not self.ctx.is_main,
            dynamic_ncols=True,
        )
        for x, y in bar:
            tic = time.perf_counter()
            loss, grad_norm, stop = self.train_step(x, y)
            self.step_in_epoch += 1
            self.log_step(loss, grad_norm, x.shape[0] * self.ctx.world_size / (time.perf_counter() - tic))
            bar.set_postfix(loss=f"{loss:.4f}")
            if stop:
                return True
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        return False

    def log_step(self, loss, grad_norm, images_per_s):
        if self.writer is None:
            return
        for name, value in (
            ("loss", loss),
            ("lr", self.lr_scheduler.get_last_lr()[0]),
            ("grad_norm", grad_norm),
            ("images_per_s", images_per_s),
        ):
            self.writer.add_scalar(f"train/{name}", value, self.global_step)

    def make_writer(self):
        if not self.ctx.is_main:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(run_dir(self.config, "runs")))

    def latest_path(self):
        return run_dir(self.config, "models") / "ckpt.pt"

    # --------------------------------------------------------------- evaluation

    def checkpoint_and_preview(self, periodic=False, final=False):
        """Held-out loss, checkpoints and an EMA sample grid (files written by rank 0 only)."""
        self.ema.copy_to(self.ema_model.parameters())
        val_loss = self.heldout_loss() if self.ctx.is_main else math.inf
        self.improved = val_loss < self.best_metric
        self.best_metric = min(self.best_metric, val_loss)
        self.save(final=final, periodic=periodic)
        self.improved = False
        if self.ctx.is_main:
            self.log_save("final" if final else f"epoch_{self.epoch:04d}", val_loss)
        self.ctx.barrier()

    @torch.no_grad()
    def heldout_loss(self):
        """EMA loss on the held-out images with fixed timesteps and noise, so saves compare."""
        if len(self.val_set) == 0:
            return math.inf
        gen = torch.Generator().manual_seed(self.config["seed"])
        total = 0.0
        for x, y in DataLoader(self.val_set, batch_size=self.config["batch_size"]):
            t = torch.randint(0, self.diffusion.noise_steps, (x.shape[0],), generator=gen).to(self.device)
            noise = torch.randn(x.shape, generator=gen).to(self.device)
            x_t = self.diffusion.noise_images(x.to(self.device), t, noise)
            labels = y.to(self.device) if self.config["conditional"] else None
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
                pred = self.ema_model(x_t, t, labels)
            total += F.mse_loss(pred.float(), noise, reduction="sum").item()
        return total / (len(self.val_set) * self.val_set[0][0].numel())

    def preview_samples(self):
        """EMA samples from fixed noise, 4 per class (up to 16 classes), in [0, 1], and the grid's columns."""
        classes = min(self.config["num_classes"] or 0, 16)
        labels = torch.arange(classes, device=self.device).repeat(4) if classes else None
        gen = torch.Generator().manual_seed(self.config["seed"])
        samples = self.diffusion.sample(
            self.ema_model,
            len(labels) if classes else 16,
            labels,
            PREVIEW_CFG,
            log_time=False,
            sampler="ddim",
            steps=self.config["preview_steps"],
            eta=PREVIEW_ETA,
            generator=gen,
            output_type="float",
        )
        return samples, classes or 4

    def log_save(self, name, val_loss):
        """Report a save: held-out loss and the EMA sample grid to TensorBoard, the grid to results/."""
        message = f"step {self.global_step}: saved {self.latest_path()}"
        if math.isfinite(val_loss):
            self.writer.add_scalar("val/heldout_loss", val_loss, self.global_step)
            message += f", held-out loss {val_loss:.5f} (best {self.best_metric:.5f})"
        if self.config["preview_steps"] > 0:
            intensity = self.config["intensity"]
            path = run_dir(self.config, "results") / f"{name}{images.suffix(intensity)}"
            grid = save_grid(*self.preview_samples(), path, intensity)  # at the data's depth
            self.writer.add_image("ema_samples", grid, self.global_step)
            message += f", grid {path}"
        self.writer.flush()
        tqdm.write(message)


def train(args, explicit=frozenset(), distributed=False):
    """Train a DDPM from parsed flags; `explicit` flags (typed by the user) win over a resumed config."""
    config, ckpt = resolve_config(args, explicit)
    validate(config, fresh=ckpt is None)
    files, labels, class_names = load_data(config, ckpt)
    prepare_outputs(config)
    scan_images(config, files, ckpt)
    ctx = DistContext(distributed, config["device"])
    if ctx.device.type == "cuda":
        enable_tf32()
    train_data, val_data = split_heldout(files, labels, config["val_split"], config["seed"])
    trainer = Trainer(config, ckpt, class_names, train_data, val_data, ctx)
    if ctx.is_main:
        print_parameter_table({"UNet": trainer.model, "EMA UNet": trainer.ema_model})
        print(
            f"training on {ctx.world_size} process(es), device {ctx.device}: {len(trainer.train_set)} images "
            f"({len(trainer.val_set)} held out), {len(class_names)} classes, "
            f"{config['channels']} channel(s) of {images.describe(config['intensity'])}, "
            f"{trainer.steps_per_epoch()} steps/epoch, starting at epoch {trainer.epoch + 1} "
            f"step {trainer.global_step}",
            flush=True,
        )
    try:
        trainer.fit()
    except TrainingStopped as stop:
        print(f"{'error: ' if stop.exit_code == 1 else ''}{stop}", file=sys.stderr)
        sys.exit(stop.exit_code)
    finally:
        ctx.close()
    if ctx.is_main:
        print(
            f"done: {trainer.global_step} steps; checkpoints in {run_dir(config, 'models')}, "
            f"grids in {run_dir(config, 'results')}, TensorBoard logs in {run_dir(config, 'runs')}"
        )
    return trainer


def build_parser():
    """The training flags; edit the defaults below or override them with flags."""
    parser = train_parser(conditional=True, description=__doc__)
    parser.set_defaults(
        run_name="DDPM_conditional",
        epochs=300,
        batch_size=14,
        image_size=64,
        num_classes=10,
        dataset_path="/path/to/dataset",
        device="auto",  # the original used "cuda"; auto picks the GPU when there is one
        lr=3e-4,
    )
    return parser


def launch(argv=None):
    """Train the class-conditional DDPM."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    train(parse_flags(parser, argv), cli.explicit_flags(parser, argv))


if __name__ == "__main__":
    run_cli(launch)
