"""Small helpers of the LDM scripts: a parser accepting both flag spellings, parameter tables, timing.

User errors and the CLI runner are the shared core's (core.errors), so that one exception class is
caught everywhere; they are re-exported here under the names the scripts import.
"""

import argparse
import time

import torch

from core import cli
from core.errors import UserError, run_cli, warn  # noqa: F401 (re-exported)


class TrainingHalted(UserError):
    """Training cannot go on (e.g. non-finite loss); the last good checkpoint is kept."""

    exit_code = 1


def both_spellings(names):
    """Option strings plus their --snake_case / --kebab-case twins."""
    spellings = list(names)
    for name in names:
        if name.startswith("--"):
            for other in (name.replace("_", "-"), "--" + name[2:].replace("-", "_")):
                if other not in spellings:
                    spellings.append(other)
    return spellings


class Parser(cli.Parser):
    """The core parser (one-line errors, exit 2); every multi-word flag as --snake_case and --kebab-case."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kwargs)

    def add_argument(self, *names, **kwargs):
        return super().add_argument(*both_spellings(names), **kwargs)

    def add_argument_group(self, *args, **kwargs):
        group = super().add_argument_group(*args, **kwargs)
        add = group.add_argument
        group.add_argument = lambda *names, **kw: add(*both_spellings(names), **kw)
        return group


def count_parameters(module):
    """(total, trainable) parameter counts of a module."""
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return total, trainable


def print_parameter_table(components):
    """Print total / trainable / frozen parameters per named component and overall."""
    rows, grand = [], [0, 0]
    for name, module in components.items():
        total, trainable = count_parameters(module)
        rows.append((name, total, trainable))
        grand[0], grand[1] = grand[0] + total, grand[1] + trainable
    rows.append(("total", grand[0], grand[1]))
    print(f"{'component':<16}{'total':>14}{'trainable':>14}{'frozen':>14}")
    for name, total, trainable in rows:
        print(f"{name:<16}{total:>14,}{trainable:>14,}{total - trainable:>14,}")


class Timer:
    """Wall-clock timer that waits for queued GPU work before reading the clock."""

    def __init__(self, device):
        self.device = torch.device(device)

    def now(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def print_timing(num_images, num_steps, num_batches, seconds, label="sampling"):
    """Print the standard sampling figures; ms/step is per denoising step of one batch."""
    print(
        f"[{label}] images: {num_images} | steps: {num_steps} | total: {seconds:.2f} s | "
        f"{seconds / max(num_images, 1):.3f} s/image | "
        f"{1000 * seconds / max(num_steps * num_batches, 1):.1f} ms/step | "
        f"{num_images / max(seconds, 1e-9):.2f} images/s",
        flush=True,
    )
