"""Small shared helpers: user errors, a CLI parser accepting both flag spellings, atomic saves, reports."""

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch


class UserError(Exception):
    """A problem with the user's input: reported as one line on stderr, exit code 2."""

    exit_code = 2


class TrainingHalted(UserError):
    """Training cannot go on (e.g. non-finite loss); the last good checkpoint is kept."""

    exit_code = 1


def one_line_warning(message, category, filename, lineno, line=None):
    """Warnings as one 'warning: ...' line, without Python's source-location line."""
    return f"warning: {message}\n"


def run_main(main):
    """Run `main`, turning user errors into one clean stderr line and their exit code."""
    warnings.formatwarning = one_line_warning
    try:
        main()
    except UserError as error:
        print(f"error: {user_message(error)}", file=sys.stderr, flush=True)
        sys.exit(error.exit_code)


def user_message(error):
    """The one-line message of a UserError, also when a DataLoader worker re-raised it with a traceback."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1].split("UserError: ", 1)[-1] if lines else type(error).__name__


def both_spellings(names):
    """Option strings plus their --snake_case / --kebab-case twins."""
    spellings = list(names)
    for name in names:
        if name.startswith("--"):
            for other in (name.replace("_", "-"), "--" + name[2:].replace("-", "_")):
                if other not in spellings:
                    spellings.append(other)
    return spellings


class Parser(argparse.ArgumentParser):
    """ArgumentParser that accepts every multi-word flag both as --snake_case and --kebab-case."""

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


def atomic_save(obj, path):
    """torch.save through a temporary file in the same folder, so `path` is never half written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
