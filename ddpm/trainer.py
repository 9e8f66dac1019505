"""The training loop shared by the DDPM scripts: one process or DDP, EMA, mixed precision, held-out loss,
sample grids, checkpoints, resume and stop on a signal."""

import copy
import math
import signal
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from core import images
from core.files import atomic_save
from diffusion import Diffusion
from modules import build_model
from run_config import (
    load_data,
    model_config,
    prepare_outputs,
    resolve_config,
    run_dir,
    scan_images,
    split_heldout,
    validate,
)
from utils import (
    CHECKPOINT_FORMAT,
    DistContext,
    ImageDataset,
    autocast_dtype,
    cpu_state,
    enable_tf32,
    print_parameter_table,
    prune_checkpoints,
    rng_states,
    save_grid,
    set_rng_states,
)

PREVIEW_CFG = 3.0  # guidance of the EMA sample grids written during training
PREVIEW_ETA = 1.0  # stochastic DDIM: deterministic DDIM shows blotches on a model early in training


def ignore_sigint(_worker_id):
    """Data workers leave Ctrl-C to the main process, which saves a checkpoint before exiting."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class TrainingStopped(Exception):
    """Raised to end training early: by a signal (exit 128+signum) or a non-finite loss (exit 1)."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code


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
        # Timesteps and noise come from the run's own generator too: a resumed run draws the same ones.
        t = self.diffusion.sample_timesteps(n, gen)
        noise = torch.randn(x.shape, generator=gen, device=self.device)
        x_t = self.diffusion.noise_images(x, t, noise)
        labels = None
        if self.config["conditional"]:  # label dropout to the null class trains the unconditional branch
            drop = torch.rand(n, generator=gen, device=self.device) < self.config["cfg_dropout"]
            labels = torch.where(drop, self.config["num_classes"], y)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            pred = self.net(x_t, t, labels)
        loss = F.mse_loss(pred.float(), noise)
        # The loss, "I was signalled" and "my budget is spent" travel in one all-reduce, so every rank
        # sees the same values and all ranks stop (or fail) at the same step.
        votes = torch.tensor([float(self.stop_signal is not None), self.over_budget()], device=self.device)
        stats = self.ctx.all_reduce_sum(torch.cat([loss.detach()[None], votes])).tolist()  # one sync per step
        self.check_finite(stats[0] / self.ctx.world_size)
        grad_norm = self.optimize(loss)
        self.signalled = self.signalled or stats[1] > 0  # every rank learns that one of them was signalled
        return stats[0] / self.ctx.world_size, grad_norm, stats[1] + stats[2] > 0

    def optimize(self, loss):
        """Backward, clip, step optimizer, LR schedule and EMA; returns the gradient norm."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # the scaler is a no-op unless fp16 autocast is on
        self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
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
