"""Shared tiny fixtures: a random AutoencoderKL folder, class-folder data sets and one trained run."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

LDM_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(LDM_DIR))

TRAIN_ARGS = [
    "--image_size",
    "16",
    "--batch_size",
    "4",
    "--unet_preset",
    "tiny",
    "--num_workers",
    "0",
    "--sample_steps",
    "2",
    "--grid_samples_per_class",
    "2",
]


# Offline, and one thread per process: the test machines have 2 cores shared by parallel runs, where
# torch's default of one thread per core makes every process spin-wait for the others (2-3x slower).
TEST_ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run_script(script, *args, check=True, env=None, nproc=1):
    """Run one of the ldm scripts as a user would, offline, from the ldm folder; with nproc > 1 as that
    many CPU processes under torchrun, in a clean environment."""
    command = [sys.executable, str(LDM_DIR / script), *map(str, args)]
    full_env = {**os.environ, **TEST_ENV, **(env or {})}
    if nproc > 1:
        command[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        full_env = {**TEST_ENV, "PATH": "/usr/bin:/bin"}
    result = subprocess.run(command, cwd=LDM_DIR, env=full_env, capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{script} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def random_images(folder, count, size, mode, seed, suffix=".png"):
    """Write `count` random images of a PIL mode into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        if mode == "I;16":
            image = Image.fromarray(rng.integers(0, 65535, (size, size), dtype=np.uint16))
        else:
            channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
            array = rng.integers(0, 255, (size, size, channels), dtype=np.uint8)
            image = Image.fromarray(array[..., 0] if channels == 1 else array)
        image.save(folder / f"img_{i:03d}{suffix}")


def depth_set(root, kind, size=8):
    """Two classes of two gray ramps of one kind ("8", "12", "16" bits or "float"); the second
    image of each class reaches only a quarter of the first one's peak."""
    peak = {"8": 255, "12": 4095, "16": 65535}
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i, scale in enumerate((1.0, 0.25)):
            ramp = np.linspace(0, scale, size * size, dtype=np.float32).reshape(size, size)
            if kind == "float":
                Image.fromarray(ramp, "F").save(root / label / f"{i}.tif")
            else:
                dtype = np.uint8 if kind == "8" else np.uint16
                Image.fromarray(np.rint(ramp * peak[kind]).astype(dtype)).save(root / label / f"{i}.png")
    return root


def tiny_autoencoder(**config):
    """A random tiny AutoencoderKL (block widths 8, 8: 2x downsampling; 4 latent channels)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=16,
        **config,
    )


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory):
    """tiny_autoencoder() saved with save_pretrained."""
    folder = tmp_path_factory.mktemp("vae")
    tiny_autoencoder().save_pretrained(folder)
    return folder


# (class, count, size, PIL mode, seed, suffix) of the two shared data sets.
RGB_SET = [
    ("cat", 5, 20, "RGB", 0, ".png"),
    ("dog", 4, 20, "RGB", 1, ".JPG"),
    ("dog", 1, 20, "RGBA", 2, ".webp"),
]
GRAY_SET = [("benign", 5, 16, "L", 3, ".png"), ("malignant", 5, 16, "I;16", 4, ".tif")]


def class_set(root, spec):
    """Class folders of random images under root, one entry of spec per (class, image kind)."""
    for name, count, size, mode, seed, suffix in spec:
        random_images(root / name, count, size, mode, seed, suffix)
    return root


@pytest.fixture(scope="session")
def rgb_data(tmp_path_factory):
    """Two RGB classes of five images each, in mixed formats."""
    return class_set(tmp_path_factory.mktemp("rgb"), RGB_SET)


@pytest.fixture(scope="session")
def gray_data(tmp_path_factory):
    """Two grayscale classes: 8-bit and 16-bit images."""
    return class_set(tmp_path_factory.mktemp("gray"), GRAY_SET)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, rgb_data, tiny_vae):
    """Three epochs on the RGB set, saving every epoch and keeping two periodic files."""
    out = tmp_path_factory.mktemp("run") / "ckpts"
    args = [
        "--data_root",
        rgb_data,
        "--vae_pretrained",
        tiny_vae,
        *TRAIN_ARGS,
        "--num_epochs",
        "3",
        "--save_every",
        "1",
        "--sample_every",
        "1",
        "--checkpoints_total_limit",
        "2",
    ]
    run_script("train.py", "--output_dir", out, *args)
    return out, args


@pytest.fixture(scope="session")
def trained_vae(tmp_path_factory, gray_data):
    """train_vae.py run from scratch on the grayscale set; returns the 'best' folder."""
    out = tmp_path_factory.mktemp("vae_run") / "vae"
    run_script(
        "train_vae.py",
        "--data_root",
        gray_data,
        "--output_dir",
        out,
        "--image_size",
        "16",
        "--block_out_channels",
        "8",
        "8",
        "--norm_num_groups",
        "8",
        "--layers_per_block",
        "1",
        "--batch_size",
        "4",
        "--num_epochs",
        "1",
        "--num_workers",
        "0",
    )
    return out / "best"
