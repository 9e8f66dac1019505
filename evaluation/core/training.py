"""The pieces every trainer and sampler shares: devices and processes (accelerate), stop on a signal,
held-out split, EMA, parameter table, timing line, TensorBoard logging and sample grids.

accelerate and tensorboard are imported where they are used, so folders that need neither (the
evaluation) can still import this module.
"""

import copy
import os
import signal
import time

import torch

from . import checkpoints, images
from .errors import UserError, warn

# --------------------------------------------------------------------------- devices and processes


def make_accelerator(mixed_precision="no", gradient_accumulation_steps=1, device=None):
    """One Accelerator for python, torchrun and accelerate launch alike (gloo on CPU, NCCL on CUDA).

    mixed_precision is no / fp16 / bf16 / auto (bf16 where CUDA supports it, else no); on CPU any
    16-bit request falls back to fp32 with a warning. device "cpu" forces the CPU. End every script
    with accelerator.end_training(): it destroys the process group, without which gloo can abort
    the interpreter at exit.
    """
    from accelerate import Accelerator

    # Accelerator(cpu=True) is the only way to keep a CUDA machine's processes on the CPU (tests, a
    # busy GPU); ACCELERATE_USE_CPU is what `accelerate launch --cpu` sets for the same wish.
    on_cpu = device == "cpu" or not torch.cuda.is_available()
    on_cpu = on_cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    if mixed_precision == "auto":
        mixed_precision = "bf16" if not on_cpu and torch.cuda.is_bf16_supported() else "no"
    # CPU autocast to 16 bits is slower than fp32 and fp16 has no scaler there: say so and go on.
    if mixed_precision != "no" and on_cpu:
        warn(f"--mixed_precision {mixed_precision} needs CUDA; training in fp32 on CPU")
        mixed_precision = "no"
    # TF32 matmuls keep fp32 range with a 10-bit mantissa: the DiT paper's setting, ~2x faster on Ampere+.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        cpu=on_cpu,
    )


def rng_states(accelerator, generator=None):
    """Every process's random states, in process order, for a checkpoint (collective: all call it)."""
    from accelerate.utils import gather_object

    # gather_object pickles through the process group: fine for a few kB once per checkpoint.
    mine = [checkpoints.rng_state(generator)]
    return gather_object(mine) if accelerator.num_processes > 1 else mine


def sum_across(accelerator, *values):
    """Each value (a number or a one-element tensor) summed over all processes (every process must call
    this). A tensor stays on its device until the one .tolist() at the end, so a step syncs once."""
    # float64, so that summed per-process loss totals over a large held-out set lose no digits.
    device = accelerator.device
    tensor = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values])
    if accelerator.num_processes > 1:
        tensor = accelerator.reduce(tensor, reduction="sum")
    return tensor.tolist()


# --------------------------------------------------------------------------- stop on a signal


class StopSignal:
    """Records SIGINT/SIGTERM so the loop can finish its step, save the latest checkpoint and exit."""

    exit_code = 130

    def __init__(self, saving="the latest checkpoint"):
        self.signum = 0
        self.saving = saving
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._record)

    def _record(self, signum, frame):
        # Only a flag is set here: saving inside a signal handler could interrupt a half-written file.
        self.signum = signum
        print(f"\nsignal {signum} received: finishing this step and saving {self.saving}", flush=True)

    def agreed(self, accelerator=None):
        """The signal any process received (0 if none), so all of them stop at the same step."""
        if accelerator is None or accelerator.num_processes == 1:
            return self.signum
        # One process may get the signal (Ctrl-C reaches torchrun's children unevenly): the max over
        # processes makes all of them stop after the same step, so no collective is left waiting.
        seen = torch.tensor([self.signum], device=accelerator.device)
        return int(accelerator.gather(seen).max())


def ignore_sigint(worker_id):
    """DataLoader worker_init_fn: Ctrl-C is the main process's, which finishes its step and saves."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class TrainingHalted(UserError):
    """Training cannot go on (a non-finite loss, a signal); the last good checkpoint is kept."""

    exit_code = 1


def check_finite(loss, where, accelerator=None):
    """Stop every process with one clear line when the loss is NaN or infinite."""
    # Reduced over processes: one rank with a NaN must stop them all, or the others hang in the next
    # all-reduce. The .item() is one sync per check; callers check at log steps, not every step.
    bad = torch.tensor([0.0 if torch.isfinite(loss).all() else 1.0], device=loss.device)
    if accelerator is not None and accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    if bad.item():
        raise TrainingHalted(
            f"the loss became non-finite at {where}: lower --learning_rate or use --mixed_precision no; "
            "the last saved checkpoint is kept"
        )


# --------------------------------------------------------------------------- held-out split


def split_heldout(n, fraction, seed=0):
    """(train, held_out) index lists: a fixed random fraction held out (at least one if fraction > 0)."""
    if fraction <= 0 or n < 2:
        return list(range(n)), []
    # A private generator: the split depends on n and seed only, never on the training RNG, so a
    # resumed or re-launched run holds out exactly the same images.
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    count = min(n - 1, max(1, round(n * fraction)))
    return sorted(order[count:]), sorted(order[:count])


# --------------------------------------------------------------------------- EMA


class EMA:
    """An exponential moving average of a model's weights, kept as a full copy of the model.

    Its state_dict has the model's own keys, so the EMA weights load straight into the model (the
    layout of the official DiT checkpoints). Before start_step the copy just follows the model.
    """

    def __init__(self, model, decay=0.9999, start_step=0):
        self.decay, self.start_step = decay, start_step
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model, step=None):
        """ema <- decay * ema + (1 - decay) * model (a plain copy before start_step)."""
        # lerp_(ema, model, 1 - decay) is ema*decay + model*(1 - decay) in one fused kernel per
        # parameter group; weight 1 copies the model outright (the warm-up before start_step).
        weight = 1.0 if step is not None and step < self.start_step else 1 - self.decay
        ema_params = [p for p in self.model.parameters()]
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, weight)
        # Buffers (norm statistics, fixed positional embeddings) are not averaged but copied.
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_buffer.copy_(buffer)

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state_dict):
        self.model.load_state_dict(state_dict)


# --------------------------------------------------------------------------- reports


def count_parameters(module):
    """(total, trainable) parameter counts of a module."""
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return total, trainable


def parameter_table(components):
    """Total / trainable / frozen parameters per named module and overall, as printable lines."""
    lines = [f"{'component':<16}{'total':>14}{'trainable':>14}{'frozen':>14}"]
    grand = [0, 0]
    for name, module in components.items():
        total, trainable = count_parameters(module)
        grand = [grand[0] + total, grand[1] + trainable]
        lines.append(f"{name:<16}{total:>14,}{trainable:>14,}{total - trainable:>14,}")
    if len(components) > 1:
        lines.append(f"{'total':<16}{grand[0]:>14,}{grand[1]:>14,}{grand[0] - grand[1]:>14,}")
    return "\n".join(lines)


class Timer:
    """Wall-clock seconds that wait for queued GPU work before reading the clock."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.start = self.now()

    def now(self):
        # CUDA kernels run asynchronously: without the sync the clock would stop before the work does.
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def elapsed(self):
        return self.now() - self.start


def timing_line(images_done, steps, batches, seconds, label="sampling"):
    """The one timing line: images, steps, seconds, s/image, ms per denoising step of a batch, images/s."""
    # Per denoising step of one batch: the figure that compares samplers and step counts fairly.
    ms_step = 1000.0 * seconds / max(1, steps * batches)
    return (
        f"{label}: {images_done} images, {steps} steps, {seconds:.2f} s total, "
        f"{seconds / max(1, images_done):.4f} s/image, {ms_step:.2f} ms/step, "
        f"{images_done / max(seconds, 1e-9):.2f} images/s"
    )


# --------------------------------------------------------------------------- logging and grids


class Writer:
    """TensorBoard on the main process; every call is a no-op on the others."""

    def __init__(self, folder, enabled=True):
        self.board = None
        # Only the main process writes, so torchrun runs do not leave one event file per process.
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(folder))

    def scalars(self, step, **values):
        if self.board is not None:
            for name, value in values.items():
                self.board.add_scalar(name, float(value), step)

    def image(self, tag, grid, step):
        """grid: (C, H, W) in [0, 1]."""
        if self.board is not None:
            self.board.add_image(tag, grid.float().clamp(0, 1), step)

    def close(self):
        if self.board is not None:
            self.board.close()


def make_grid(samples, nrow=None):
    """(N, C, H, W) in [0, 1] -> one (C, H, W) grid, keeping one channel for grayscale samples."""
    from torchvision.utils import make_grid as tile

    nrow = nrow or max(1, int(len(samples) ** 0.5))
    # torchvision tiles into 3 channels; a grayscale grid is cut back to one so it is saved as gray.
    grid = tile(samples.float().clamp(0, 1).cpu(), nrow=nrow, padding=2)
    return grid[:1] if samples.shape[1] == 1 else grid


def save_grid(samples, path, intensity, nrow=None):
    """Write a grid of samples at the data's bit depth; returns the grid."""
    grid = make_grid(samples, nrow)
    images.save(grid, path, intensity)
    return grid
