"""Shared fixtures: tiny image sets, a subprocess runner and one small trained run reused by many tests."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

DDPM_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(DDPM_DIR))

# A tiny architecture that trains in a second on a CPU.
TINY = ["--image-size", "16", "--base-channels", "8", "--time-dim", "32", "--num-workers", "0"]


def run_script(script, *args, cwd, env=None, timeout=240):
    """Run a ddpm script as a user would, one thread per process so parallel runs do not thrash."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    cmd = [sys.executable, str(DDPM_DIR / script), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def torchrun(script, *args, cwd, nproc=2, timeout=240):
    """Launch a script on nproc CPU processes with torchrun (gloo)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [*launcher, str(DDPM_DIR / script), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def make_class_folders(root, classes=3, per_class=4, size=16, mode="L", seed=0):
    """Class folders of simple patterned images: class c has a bright bar at a class-specific row."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = Path(root) / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 40, (size, size), dtype=np.uint8)
            img[c * 4 : c * 4 + 3] = 230
            pil = Image.fromarray(img, "L")
            pil.convert(mode).save(folder / f"img_{i}.png")
    return Path(root)


@pytest.fixture(scope="session")
def gray_data(tmp_path_factory):
    return make_class_folders(tmp_path_factory.mktemp("gray"))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, gray_data):
    """One conditional training run (2 epochs, saves every epoch) shared by the sampling tests."""
    work = tmp_path_factory.mktemp("run")
    result = run_script(
        "ddpm_conditional.py",
        "--dataset-path",
        gray_data,
        "--num-classes",
        "3",
        "--run-name",
        "tiny",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--save-interval",
        "1",
        "--val-split",
        "0.2",
        *TINY,
        cwd=work,
    )
    assert result.returncode == 0, result.stderr
    return work
