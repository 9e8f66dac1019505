"""The training loop shared by the DDPM scripts: one process or many through accelerate (DDP, mixed
precision, grad scaling), EMA, held-out loss, sample grids, checkpoints, resume and stop on a signal."""

import copy
import math
import signal
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from core import checkpoints, cli, images, inception, sde, training
from core.files import atomic_save
from diffusion import Diffusion, sample_objective
from flags import parse_flags
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
from utils import CHECKPOINT_FORMAT, ImageDataset, cpu_state, make_accelerator, save_grid

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
    """One training run: model, EMA, optimizer, data and the loop, on one or several processes.

    A subclass trains another network on the same loop (train_classifier.py): it overrides build_network,
    compute_loss and heldout_loss, and names its files' format and its network.
    """

    checkpoint_format, network_name = CHECKPOINT_FORMAT, "UNet"

    def __init__(self, config, ckpt, class_names, train_data, val_data, accelerator):
        # Imported here: only training needs them, and they add seconds to every sampling start-up.
        from diffusers.optimization import get_constant_schedule_with_warmup
        from diffusers.training_utils import EMAModel

        self.config, self.class_names, self.accelerator = config, class_names, accelerator
        self.device = accelerator.device
        self.rank, self.world_size = accelerator.process_index, accelerator.num_processes
        torch.manual_seed(config["seed"])  # identical initial weights on every rank
        self.model = self.build_network().to(self.device)
        # The EMA weights live in diffusers' EMAModel (decay and warm-up); ema_model is the module they are
        # copied into for held-out losses, sample grids and the checkpoint's "ema" state_dict.
        self.ema_model = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.ema = EMAModel(
            self.model.parameters(), decay=config["ema_decay"], update_after_step=config["ema_warmup_steps"]
        )
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"]
        )
        self.lr_scheduler = get_constant_schedule_with_warmup(self.optimizer, config["lr_warmup_steps"])
        self.diffusion = Diffusion.from_config(config, self.device)
        self.objective = sde.objective_of(config)  # None: the discrete DDPM of `diffusion`
        # Flips, timesteps, noise and label dropout all come from this per-rank generator, which the
        # checkpoint stores: a resumed run draws exactly what the uninterrupted one would have.
        self.generator = torch.Generator(self.device).manual_seed(config["seed"] * 1000 + self.rank)
        image_format = (config["image_size"], config["channels"], config["intensity"])
        self.train_set = ImageDataset(*train_data, *image_format)
        self.val_set = ImageDataset(*val_data, *image_format)
        self.epoch = self.step_in_epoch = self.global_step = 0
        self.best_metric, self.improved, self.stop_signal = math.inf, False, None
        # In-training FID / KID (--eval-every): the scores so far, and the scorer on the main process.
        self.eval_history, self.fid = [], None
        if config.get("eval_every") and accelerator.is_main_process:
            self.fid = self.make_fid(val_data[0])
        if config["grad_checkpointing"]:
            self.model.set_grad_checkpointing()
        if config["compile"]:  # in place: the state_dict keys stay those of the plain UNet
            self.model.compile()
        # prepare() wraps the model in DDP when launched as several processes and the optimizer in the
        # fp16 grad scaler; the LR schedule stays ours, stepped once per optimizer step on every rank.
        self.net, self.optimizer = accelerator.prepare(self.model, self.optimizer)
        # Loaded after prepare(): DDP shares the module's parameters, and the prepared optimizer passes
        # load_state_dict through to AdamW.
        if ckpt is not None:
            self.load_state(ckpt)

    def build_network(self):
        return build_model(model_config(self.config))

    # --------------------------------------------------------------- state

    def state_dict(self):
        """Everything needed to continue bit for bit; collective, so every rank calls it."""
        generators = [state["generator"] for state in training.rng_states(self.accelerator, self.generator)]
        scaler = self.accelerator.scaler
        # Tensors go to the CPU so that the file loads on any machine; shadow_params duplicate "ema".
        self.ema.copy_to(self.ema_model.parameters())
        return {
            "format": self.checkpoint_format,
            "model": cpu_state(self.model.state_dict()),
            "ema": cpu_state(self.ema_model.state_dict()),
            "ema_state": {k: v for k, v in self.ema.state_dict().items() if k != "shadow_params"},
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "grad_scaler": scaler.state_dict() if scaler is not None else {},
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "rng": checkpoints.rng_state(),
            "generators": generators,
            "best_metric": self.best_metric,
            "eval_history": list(self.eval_history),
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
        # Files of fp32 or bf16 runs hold an empty scaler state; it only matters for an fp16 run.
        if self.accelerator.scaler is not None and ckpt.get("grad_scaler"):
            self.accelerator.scaler.load_state_dict(ckpt["grad_scaler"])
        self.epoch, self.step_in_epoch = ckpt["epoch"], ckpt["step_in_epoch"]
        self.global_step, self.best_metric = ckpt["global_step"], ckpt["best_metric"]
        self.eval_history = list(ckpt.get("eval_history", []))  # older files have none
        # Python / NumPy / torch states are rank 0's for every rank; the per-rank streams are the generators.
        checkpoints.set_rng_state(ckpt["rng"])
        if len(ckpt["generators"]) == self.world_size:
            self.generator.set_state(ckpt["generators"][self.rank])
        else:  # another process count: data order and noise cannot repeat exactly anyway
            self.generator.manual_seed(self.config["seed"] * 1000 + self.rank + self.global_step)

    def save(self, final=False, periodic=False):
        """Write the periodic / best / final copies and ema_ckpt.pt, then ckpt.pt (latest) last.

        A kill between two writes leaves the previous ckpt.pt, and resuming from it redoes this save.
        """
        state = self.state_dict()  # collective: the other ranks contribute their generators, then return
        if not self.accelerator.is_main_process:
            return
        folder = run_dir(self.config, "models")
        # The same state under every name; ema_ckpt.pt carries only what sampling needs.
        copies = [f"ckpt_epoch_{self.epoch:04d}.pt"] if periodic else []
        copies += ["ckpt_best.pt"] if self.improved else []
        copies += ["ckpt_final.pt"] if final else []
        for name in copies:
            atomic_save(state, folder / name)
        keys = ("format", "class_names", "intensity", "config", "model_config", "epoch", "global_step")
        ema_only = {k: state[k] for k in keys}
        atomic_save({**ema_only, "weights": "ema", "model": state["ema"]}, folder / "ema_ckpt.pt")
        atomic_save(state, folder / "ckpt.pt")
        # Pruned after the new files are complete, so a crash never leaves fewer than the limit.
        checkpoints.prune(folder, "ckpt_epoch_*.pt", self.config["checkpoints_total_limit"])

    # --------------------------------------------------------------- loop

    def epoch_loader(self, epoch, skip_batches):
        """This rank's shuffled batches of one epoch, minus those a resumed run already did."""
        sampler = DistributedSampler(
            self.train_set, self.world_size, self.rank, shuffle=True, seed=self.config["seed"]
        )
        sampler.set_epoch(epoch)
        # The shuffle depends only on seed and epoch, so dropping the batches already done resumes mid-epoch.
        indices = list(sampler)[skip_batches * self.config["batch_size"] :]
        return DataLoader(
            self.train_set,
            batch_size=self.config["batch_size"],
            sampler=indices,
            num_workers=self.config["num_workers"],
            pin_memory=self.device.type == "cuda",  # page-locked batches make non_blocking copies async
            worker_init_fn=ignore_sigint,
        )

    def steps_per_epoch(self):
        # DistributedSampler pads every rank to the same share, so all ranks run the same number of steps.
        per_rank = math.ceil(len(self.train_set) / self.world_size)
        return math.ceil(per_rank / self.config["batch_size"])

    def train_step(self, x, y):
        """One optimizer step; returns the loss averaged over ranks and the gradient norm."""
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        n, gen = x.shape[0], self.generator
        if self.config["hflip"]:  # flips drawn from the checkpointed generator keep resume exact
            flip = torch.rand(n, generator=gen, device=self.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        loss = self.compute_loss(x, y)
        # The loss, "I was signalled" and "my budget is spent" travel in one all-reduce, so every rank
        # sees the same values and all ranks stop (or fail) at the same step.
        votes = (float(self.stop_signal is not None), self.over_budget())
        total, signals, over = training.sum_across(self.accelerator, loss.detach(), *votes)
        self.check_finite(total / self.world_size)
        grad_norm = self.optimize(loss)
        self.signalled = self.signalled or signals > 0  # every rank learns that one of them was signalled
        return total / self.world_size, grad_norm, signals + over > 0

    def compute_loss(self, x, y):
        """The training loss of one batch (float32 scalar); noise and timesteps come from self.generator."""
        n, gen = x.shape[0], self.generator
        if self.objective is None:
            # Timesteps and noise come from the run's own generator too: a resumed run draws the same ones.
            t = self.diffusion.sample_timesteps(n, gen)
            noise = torch.randn(x.shape, generator=gen, device=self.device)
            x_t = self.diffusion.noise_images(x, t, noise)
        labels = None
        if self.config["conditional"]:  # label dropout to the null class trains the unconditional branch
            drop = torch.rand(n, generator=gen, device=self.device) < self.config["cfg_dropout"]
            labels = torch.where(drop, self.config["num_classes"], y)
        with self.accelerator.autocast():
            if self.objective is None:
                # In fp32, whatever precision autocast computed the prediction in.
                loss = F.mse_loss(self.net(x_t, t, labels).float(), noise)
            else:  # continuous t, noise and the regression target, drawn from the same generator
                loss = self.objective.loss(self.net, x, labels, gen).float()
        return loss

    def optimize(self, loss):
        """Backward, clip, step optimizer, LR schedule and EMA; returns the gradient norm."""
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)  # scaled under fp16; DDP averages the gradients over ranks here
        max_norm = self.config["grad_clip"] if self.config["grad_clip"] > 0 else math.inf
        # clip_grad_norm_ unscales first, so the norm and the clipping see the true gradients.
        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()  # under fp16 the scaler skips steps with inf/nan gradients
        self.lr_scheduler.step()
        self.ema.step(self.model.parameters())  # the plain module: DDP's wrapper shares its parameters
        self.global_step += 1
        return grad_norm.item()

    def over_budget(self):
        """1.0 when the step or time budget ends with the current step."""
        minutes = self.config["max_minutes"]
        over_time = minutes is not None and time.time() - self.start_time > 60 * minutes
        over_steps = self.config["max_steps"] is not None and self.global_step + 1 >= self.config["max_steps"]
        return float(over_time or over_steps)

    def check_finite(self, loss):
        # Checked before the optimizer step, so the weights (and ckpt.pt) never hold a NaN update.
        if not math.isfinite(loss):
            latest = run_dir(self.config, "models") / "ckpt.pt"
            raise TrainingStopped(
                f"loss became {loss} at step {self.global_step}; stopped without saving "
                f"(last good checkpoint: {latest if latest.exists() else 'none yet'}); "
                "lower --learning_rate or check the data",
                exit_code=1,
            )

    def request_stop(self, signum, _frame):
        # Only recorded here: the loop acts on it after the all-reduce of the current step.
        self.stop_signal = signum

    def fit(self):
        """Train until the epochs or a budget run out; signals save ckpt.pt and exit non-zero."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.request_stop)
        self.start_time, self.signalled = time.time(), False
        self.writer = self.make_writer()
        stopped = self.global_step >= (self.config["max_steps"] or math.inf)
        # A signal is acted on between steps: the step finishes, ckpt.pt is saved and the exit code is
        # 128 + signum. Periodic saves happen at epoch ends only, never after an early stop.
        while self.epoch < self.config["epochs"] and not stopped:
            stopped = self.run_epoch()
            if self.signalled:
                self.save()
                signum = self.stop_signal or signal.SIGTERM
                raise TrainingStopped(f"stopped by signal {signum}; saved {self.latest_path()}", 128 + signum)
            at_interval = self.step_in_epoch == 0 and self.epoch % self.config["save_interval"] == 0
            if (at_interval or self.evaluates()) and not stopped and self.epoch < self.config["epochs"]:
                self.checkpoint_and_preview(periodic=at_interval)
        self.checkpoint_and_preview(final=True)

    def run_epoch(self):
        """Train over (the rest of) one epoch; returns True when asked to stop early."""
        loader = self.epoch_loader(self.epoch, self.step_in_epoch)
        bar = tqdm(
            loader,
            desc=f"epoch {self.epoch + 1}/{self.config['epochs']}",
            initial=self.step_in_epoch,
            total=self.steps_per_epoch(),
            disable=not self.accelerator.is_main_process,
            dynamic_ncols=True,
        )
        for x, y in bar:
            # images/s counts every rank's batch; the clock includes the step's one all-reduce.
            tic = time.perf_counter()
            loss, grad_norm, stop = self.train_step(x, y)
            self.step_in_epoch += 1
            self.log_step(loss, grad_norm, x.shape[0] * self.world_size / (time.perf_counter() - tic))
            bar.set_postfix(loss=f"{loss:.4f}")
            if stop:  # step_in_epoch stays where it is, so a resumed run continues inside this epoch
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
        if not self.accelerator.is_main_process:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(run_dir(self.config, "runs")))

    def latest_path(self):
        return run_dir(self.config, "models") / "ckpt.pt"

    # --------------------------------------------------------------- evaluation

    def checkpoint_and_preview(self, periodic=False, final=False):
        """Held-out loss, checkpoints and an EMA sample grid (files written by rank 0 only)."""
        self.ema.copy_to(self.ema_model.parameters())
        # Only rank 0 evaluates: it alone writes files, and the others wait at the barrier below.
        val_loss = self.heldout_loss() if self.accelerator.is_main_process else math.inf
        fid = self.fid_score() if self.fid is not None and (self.evaluates() or final) else math.inf
        # --best-by fid: ckpt_best.pt is the lowest-FID model; other ranks hold inf and write nothing.
        metric = fid if self.config.get("best_by") == "fid" else val_loss
        self.improved = metric < self.best_metric
        self.best_metric = min(self.best_metric, metric)
        self.save(final=final, periodic=periodic)
        self.improved = False
        if self.accelerator.is_main_process:
            self.log_save("final" if final else f"epoch_{self.epoch:04d}", val_loss)
        self.accelerator.wait_for_everyone()

    def evaluates(self):
        """Whether this epoch end scores FID / KID (every --eval-every epochs)."""
        every = self.config.get("eval_every")
        return bool(every) and self.step_in_epoch == 0 and self.epoch % every == 0

    def make_fid(self, files):
        """The FID / KID scorer against the held-out images, their features cached in the run's models/."""
        loader = DataLoader(self.val_set, batch_size=self.config["batch_size"])
        reference = (([str(f) for f in files]), ((x + 1) / 2 for x, _ in loader))
        cache = run_dir(self.config, "models") / "fid_reference.pt"
        return inception.TrainingEval(self.config["eval_inception_weights"], self.device, reference, cache)

    def fid_batch(self, n, first):
        """n EMA samples in [0, 1] with the grids' sampler; the same noise and labels at every evaluation."""
        classes = self.config["num_classes"]
        labels = (torch.arange(first, first + n, device=self.device) % classes) if classes else None
        return self.ema_samples(
            n, labels, torch.Generator().manual_seed(self.config["seed"] * 1_000_003 + first)
        )

    def ema_samples(self, n, labels, gen):
        """n EMA samples in [0, 1]: stochastic DDIM for the DDPM, Euler steps of the probability-flow ODE
        (deterministic and cheap) for the continuous objectives; --preview-steps steps (0: 50)."""
        steps = self.config["preview_steps"] or 50
        if self.objective is not None:
            samples, _ = sample_objective(
                self.ema_model, self.objective, n, labels, PREVIEW_CFG, gen, method="euler", steps=steps
            )
            return samples
        options = dict(sampler="ddim", steps=steps, eta=PREVIEW_ETA, generator=gen, output_type="float")
        return self.diffusion.sample(self.ema_model, n, labels, PREVIEW_CFG, log_time=False, **options)

    def fid_score(self):
        """FID of the EMA weights (KID beside it), logged and appended to the run's history."""
        scores = self.fid.score(self.fid_batch, self.config["eval_samples"], self.config["seed"])
        self.eval_history.append({"epoch": self.epoch, "step": self.global_step, **scores})
        for name in ("fid", "kid"):
            self.writer.add_scalar(f"eval/{name}", scores[name], self.global_step)
        best = min(entry["fid"] for entry in self.eval_history)
        tqdm.write(f"epoch {self.epoch}: FID (EMA, {len(self.fid.reference)} held-out images, "
                   f"{self.config['eval_samples']} samples) {scores['fid']:.3f} (best {best:.3f}), "
                   f"KID {scores['kid']:.5f} +- {scores['kid_std']:.5f}")  # fmt: skip
        return scores["fid"]

    @torch.no_grad()
    def heldout_loss(self):
        """EMA loss on the held-out images with fixed timesteps and noise, so saves compare."""
        if len(self.val_set) == 0:
            return math.inf
        # A CPU generator reseeded at every evaluation draws the same timesteps and noise each time, and
        # leaves the training generator untouched (evaluating must not change what training draws next).
        gen = torch.Generator().manual_seed(self.config["seed"])
        total = 0.0
        for x, y in DataLoader(self.val_set, batch_size=self.config["batch_size"]):
            if self.objective is not None:  # per-image mean over pixels, as the DDPM branch below
                labels = y.to(self.device) if self.config["conditional"] else None
                with self.accelerator.autocast():
                    loss = self.objective.loss(self.ema_model, x.to(self.device), labels, gen)
                total += loss.item() * x.shape[0] * x[0].numel()
                continue
            t = torch.randint(0, self.diffusion.noise_steps, (x.shape[0],), generator=gen).to(self.device)
            noise = torch.randn(x.shape, generator=gen).to(self.device)
            x_t = self.diffusion.noise_images(x.to(self.device), t, noise)
            labels = y.to(self.device) if self.config["conditional"] else None
            with self.accelerator.autocast():
                pred = self.ema_model(x_t, t, labels)
            total += F.mse_loss(pred.float(), noise, reduction="sum").item()
        return total / (len(self.val_set) * self.val_set[0][0].numel())

    def preview_samples(self):
        """EMA samples from fixed noise, 4 per class (up to 16 classes), in [0, 1], and the grid's columns."""
        # Fixed noise from the seed: grids of successive saves show the same samples as the model improves.
        classes = min(self.config["num_classes"] or 0, 16)
        labels = torch.arange(classes, device=self.device).repeat(4) if classes else None
        gen = torch.Generator().manual_seed(self.config["seed"])
        return self.ema_samples(len(labels) if classes else 16, labels, gen), classes or 4

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


def launch_training(parser, argv=None):
    """Train with the flags of argv (the command line by default) over the parser's defaults."""
    argv = sys.argv[1:] if argv is None else argv
    train(parse_flags(parser, argv), cli.explicit_flags(parser, argv))


def train(args, explicit=frozenset()):
    """Train a DDPM from parsed flags; `explicit` flags (typed by the user) win over a resumed config."""
    # Everything that can fail on user input runs before the accelerator exists, so a bad flag or data set
    # ends with one error line and no process group.
    config, ckpt = resolve_config(args, explicit)
    validate(config, fresh=ckpt is None)
    files, labels, class_names = load_data(config, ckpt)
    check_eval(config, files, labels)
    prepare_outputs(config)
    scan_images(config, files, ckpt)
    return run_training(Trainer, config, ckpt, files, labels, class_names)


def check_eval(config, files, labels):
    """--eval-every / --best-by fid settings that cannot score are UserErrors; the Inception file is found
    (or refused offline) now, before any process or file exists."""
    if config["eval_every"] or config["best_by"] == "fid":
        heldout = len(split_heldout(files, labels, config["val_split"], config["seed"])[1][0])
        inception.check_eval_flags(config["eval_every"], config["best_by"], heldout, "--val-fraction")
        config["eval_inception_weights"] = inception.weights_path(config["eval_inception_weights"])


def run_training(trainer_class, config, ckpt, files, labels, class_names):
    """Start the processes, build trainer_class and train it; every input check must have been done."""
    # One process under python, one per GPU (or CPU worker) under torchrun or accelerate launch.
    accelerator = make_accelerator(config["device"], config["precision"])
    train_data, val_data = split_heldout(files, labels, config["val_split"], config["seed"])
    trainer = trainer_class(config, ckpt, class_names, train_data, val_data, accelerator)
    if accelerator.is_main_process:
        name = trainer.network_name
        print(training.parameter_table({name: trainer.model, f"EMA {name}": trainer.ema_model}))
        print(
            f"training on {accelerator.num_processes} process(es), device {accelerator.device}: "
            f"{len(trainer.train_set)} images ({len(trainer.val_set)} held out), {len(class_names)} classes, "
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
        accelerator.end_training()
    if accelerator.is_main_process:
        print(
            f"done: {trainer.global_step} steps; checkpoints in {run_dir(config, 'models')}, "
            f"grids in {run_dir(config, 'results')}, TensorBoard logs in {run_dir(config, 'runs')}"
        )
    return trainer
