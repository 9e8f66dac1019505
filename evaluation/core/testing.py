"""Helpers for the folders' tests: run a script the way a user types it, check a one-line user error,
and write small image sets. Only the tests import this module."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# Offline, quiet, and one thread per process: the test machines have two shared cores.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def run(script, *args, cwd=None, nproc=None, env=None, timeout=300, check=False):
    """Run a script with python (or a gloo torchrun of nproc processes); returns the CompletedProcess."""
    script = str(script)
    if nproc:
        command = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", script]
    else:
        command = [sys.executable, script]
    result = subprocess.run(
        [*command, *map(str, args)],
        cwd=cwd or Path(script).parent,
        env={**ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{Path(script).name} exited {result.returncode}:\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def assert_user_error(result, *fragments, code=2):
    """The run ended as a user error: exit code, no traceback, an 'error:' line naming every fragment."""
    output = result.stdout + result.stderr
    assert result.returncode == code, f"exit {result.returncode}, wanted {code}:\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, f"wanted one error line:\n{result.stderr[-3000:]}"
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    return errors[0]


def random_image(rng, size, mode):
    """A random PIL image of mode L, RGB, RGBA or I;16 (full 16-bit range)."""
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (size, size), dtype=np.uint16))
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    array = rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
    return Image.fromarray(array[..., 0] if channels == 1 else array)


def write_images(folder, count, size=16, mode="L", seed=0, suffix=".png"):
    """count random images img_000<suffix>... in folder; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = [folder / f"img_{i:03d}{suffix}" for i in range(count)]
    for path in paths:
        random_image(rng, size, mode).save(path)
    return paths


def write_class_folders(root, classes=("a", "b"), per_class=4, size=16, mode="L", seed=0):
    """root/<class>/img_*.png for each class name; returns root."""
    for i, name in enumerate(classes):
        write_images(Path(root) / name, per_class, size, mode, seed + i)
    return Path(root)


def scalars(folder, tag):
    """(step, value) of one TensorBoard scalar tag in a log folder; [] when it was never logged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder)).Reload()
    if tag not in events.Tags()["scalars"]:
        return []
    return [(event.step, event.value) for event in events.Scalars(tag)]


class LinearClassifier(torch.nn.Module):
    """logits = W x (t ignored): a classifier whose grad_x log p(y | x) = W_y - sum_k p_k W_k is known in
    closed form (closed_form_gradient), for the classifier-guidance tests of core and ddpm."""

    def __init__(self, weight):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)  # (classes, C*H*W)

    def forward(self, x, t):
        return x.flatten(1) @ self.weight.T


def closed_form_gradient(weight, x, y):
    p = torch.softmax(x.flatten(1) @ weight.T, dim=-1)  # (N, classes)
    return (weight[y] - p @ weight).reshape(x.shape)


def linear_betas_alpha_bar(noise_steps=1000, beta_start=1e-4, beta_end=0.02):
    """The linear schedule written out: betas and cumulative products of 1 - beta, in float64."""
    betas = np.linspace(beta_start, beta_end, noise_steps, dtype=np.float64)
    return betas, np.cumprod(1 - betas)
