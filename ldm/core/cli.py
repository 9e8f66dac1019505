"""Command-line pieces: a parser whose errors are one line, value checks at parse time, output checks."""

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

from .errors import UserError


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one 'error: ...' line and exit code 2 (no usage block)."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
        sys.exit(2)


def _number(kind, text):
    try:
        value = kind(text)
    except ValueError:
        wanted = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _checked(kind, test, wanted):
    """An argparse type: parse with kind, then require test(value)."""

    def parse(text):
        value = _number(kind, text)
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value

    parse.__name__ = wanted
    return parse


finite_float = _checked(float, lambda v: True, "a finite number")
positive_float = _checked(float, lambda v: v > 0, "a number > 0")
nonnegative_float = _checked(float, lambda v: v >= 0, "a number >= 0")
positive_int = _checked(int, lambda v: v > 0, "an integer >= 1")
nonnegative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
fraction = _checked(float, lambda v: 0 <= v < 1, "a fraction in [0, 1)")
unit_interval = _checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
bit_depth = _checked(int, lambda v: 1 <= v <= 32, "a bit depth from 1 to 32")


def ensure_writable_dir(path, flag):
    """Create folder path if needed and prove it is writable; else one UserError naming the flag."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder: pass a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as error:
        raise UserError(
            f"{flag} {path} is not writable ({error.strerror or error}): pass another folder"
        ) from None
    return path


def ensure_writable_file(path, flag):
    """Check that file path can be written (its folder is created if needed) without touching the file."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder: pass a file path")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"{flag} {path} cannot be written: {parent} is a file, not a folder")
    ensure_writable_dir(path.parent, flag)
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{flag} {path} is not writable: pass another file")
    return path
