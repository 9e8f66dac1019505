"""Shared fixtures: a tiny VAE folder, a tiny LDM checkpoint, tiny image/mask data sets, script runners."""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from PIL import Image

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))
PYTHON = sys.executable
IMAGE_SIZE = 16
CLASS_NAMES = ["benign", "malignant"]


ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
torch.set_num_threads(1)  # tiny in-process models: extra threads only contend with the script subprocesses


def run_script(script, *args, cwd=HERE, timeout=300):
    """Run a script (path relative to controlnet/) as a user would; returns the CompletedProcess."""
    cmd = [PYTHON, str(HERE / script), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def infer(checkpoint, *args):
    """Run inference.py with a checkpoint and more flags, as a user would."""
    return run_script("inference.py", "--checkpoint", checkpoint, *args)


def check(result):
    """Assert a script run succeeded, showing its output otherwise."""
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def tiny_vae(folder, channels=(8, 16), groups=8, size=IMAGE_SIZE):
    """A 2x-downsampling AutoencoderKL saved with save_pretrained (random weights, real architecture)."""
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=groups,
        sample_size=size,
    )
    vae.save_pretrained(folder)
    return vae


def tiny_unet(side=IMAGE_SIZE // 2, widths=(16, 32), token_dim=16, head_dim=4, groups=8):
    """A two-level UNet2DConditionModel on side x side latents with token_dim-dimensional class tokens."""
    return UNet2DConditionModel(
        sample_size=side,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=widths,
        layers_per_block=1,
        cross_attention_dim=token_dim,
        attention_head_dim=head_dim,
        norm_num_groups=groups,
    )


def contract_ldm_checkpoint(path, vae_folder, image_channels=1):
    """An LDM checkpoint written exactly as /work/ldm_checkpoint_contract.md fixes it (random weights)."""
    torch.manual_seed(1)
    unet = tiny_unet()
    embedding = torch.nn.Embedding(len(CLASS_NAMES) + 1, 16)
    scheduler = DDPMScheduler(num_train_timesteps=100, beta_schedule="linear")
    ckpt = {
        "model_type": "ldm",
        "format_version": 1,
        "unet_config": {k: list(v) if isinstance(v, tuple) else v for k, v in dict(unet.config).items()},
        "unet": unet.state_dict(),
        "ema_unet": unet.state_dict(),
        "class_embedder": {"embedding.weight": embedding.weight.detach().clone()},
        "ema_class_embedder": None,
        "class_names": CLASS_NAMES,
        "scheduler_config": {
            k: list(v) if isinstance(v, tuple) else v for k, v in dict(scheduler.config).items()
        },
        "config": {
            "image_size": IMAGE_SIZE,
            "image_channels": image_channels,
            "vae_pretrained": str(vae_folder),
            "latent_scale": 0.18215,
            "latent_channels": 4,
            "vae_downsample": 2,
            "cfg_dropout": 0.1,
        },
    }
    torch.save(ckpt, path)
    return path


def shape_mask(rng, size, labels=(1,)):
    """A random rectangle (or one per label) on a zero background."""
    mask = np.zeros((size, size), dtype=np.uint8)
    for label in labels:
        x, y = rng.integers(0, size // 2, 2)
        w, h = rng.integers(size // 4, size // 2, 2)
        mask[y : y + h, x : x + w] = label
    return mask


FLOAT_RANGE = (-1000.0, 1000.0)  # float images of the tests hold values like CT Hounsfield units


def save_at_depth(image, path, depth):
    """A uint8 image saved at bit depth 8, 12 or 16 (PNG) or as float TIFF over FLOAT_RANGE; its path."""
    if depth == "float":
        low, high = FLOAT_RANGE
        path = path.with_suffix(".tif")
        Image.fromarray((low + image / 255.0 * (high - low)).astype(np.float32), "F").save(path)
    elif depth == 8:
        Image.fromarray(image).save(path)
    else:
        Image.fromarray((image.astype(np.uint32) * (2**depth - 1) // 255).astype(np.uint16)).save(path)
    return path


def write_pairs(
    root, count, seed=0, image_prefix="", mask_prefix="", mask_size=IMAGE_SIZE, labels=None, depth=8
):
    """count gray images at `depth` with masks (0/255, or label maps with `labels`); bright where masked."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        mask = shape_mask(rng, IMAGE_SIZE, labels or (1,))
        image = ((mask > 0) * 180 + rng.integers(0, 60, mask.shape)).astype(np.uint8)
        save_at_depth(image, root / "images" / f"{image_prefix}{i:03d}.png", depth)
        mask_img = Image.fromarray(mask if labels else mask * 255)
        mask_img.resize((mask_size, mask_size), Image.NEAREST).save(
            root / "masks" / f"{mask_prefix}{i:03d}.png"
        )
    return root


@pytest.fixture(scope="session")
def vae_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    tiny_vae(folder)
    return folder


def write_class_images(root, per_class=3, seed=0):
    """root/<class>/*.png grayscale images for the LDM."""
    rng = np.random.default_rng(seed)
    for name in CLASS_NAMES:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)).save(
                root / name / f"{i}.png"
            )
    return root


@pytest.fixture(scope="session")
def ldm_checkpoint(tmp_path_factory, vae_folder):
    """A tiny LDM checkpoint made by ldm/train.py in a subprocess: what every ControlNet run builds on."""
    base = tmp_path_factory.mktemp("ldm")
    data = write_class_images(base / "data")
    result = run_script(
        "../ldm/train.py",
        "--data_root",
        data,
        "--output_dir",
        base / "out",
        "--image_size",
        IMAGE_SIZE,
        "--batch_size",
        4,
        "--num_epochs",
        1,
        "--unet_preset",
        "tiny",
        "--vae_pretrained",
        vae_folder,
        "--num_workers",
        0,
    )
    check(result)
    return base / "out" / "checkpoint_best.pt"


@pytest.fixture(scope="session")
def contract_ldm(tmp_path_factory, vae_folder):
    """An LDM checkpoint built in-process to the contract, for fast in-process model tests."""
    return contract_ldm_checkpoint(tmp_path_factory.mktemp("contract") / "ldm.pt", vae_folder)


@pytest.fixture(scope="session")
def pair_data(tmp_path_factory):
    """Eight image/mask pairs in root/images + root/masks."""
    return write_pairs(tmp_path_factory.mktemp("pairs"), 8)


TINY_RUN = "--batch_size 2 --num_epochs 2 --learning_rate 1e-3 --num_workers 0 --sample_steps 2 "
TINY_RUN += "--sample_every 1 --save_every 1 --checkpoints_total_limit 1"


def train_args(data, ldm, out, *extra):
    """A tiny two-epoch training command line (later flags override earlier ones)."""
    return [
        "--data_root",
        data,
        "--ldm_checkpoint",
        ldm,
        "--output_dir",
        out,
        *TINY_RUN.split(),
        "--num_sample_masks",
        2,
        "--val_fraction",
        0.25,
        *extra,
    ]


def run_many(commands, workers=3, cwd=HERE):
    """Run {name: (script, *args)} concurrently (the suite has two cores); {name: CompletedProcess}."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {name: pool.submit(run_script, *command, cwd=cwd) for name, command in commands.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.fixture(scope="session")
def deep_data(tmp_path_factory):
    """Image/mask pairs whose images are 12-bit data in 16-bit PNGs, as CT and MR scans often are."""
    return write_pairs(tmp_path_factory.mktemp("deep"), 4, depth=12)


@pytest.fixture(scope="session")
def float_data(tmp_path_factory):
    """Image/mask pairs whose images are float TIFFs over FLOAT_RANGE."""
    return write_pairs(tmp_path_factory.mktemp("float"), 4, depth="float")


@pytest.fixture(scope="session")
def training_runs(
    tmp_path_factory, pair_data, class_data, deep_data, float_data, ldm_checkpoint, contract_ldm
):
    """Independent training runs started together: {name: (output_dir, CompletedProcess)}."""
    base = tmp_path_factory.mktemp("runs")
    nan_ldm = base / "nan_ldm.pt"
    broken = torch.load(contract_ldm, weights_only=True)
    broken["ema_unet"]["conv_out.weight"].fill_(float("nan"))
    torch.save(broken, nan_ldm)
    commands = {
        "frozen": train_args(pair_data, ldm_checkpoint, base / "frozen"),
        "unfrozen": train_args(
            pair_data, ldm_checkpoint, base / "unfrozen", "--no_freeze_unet", "--num_epochs", 1
        ),
        "class": train_args(
            class_data,
            ldm_checkpoint,
            base / "class",
            "--use_class_labels",
            *"--num_epochs 1 --mixed_precision fp16".split(),
        ),
        "nan": train_args(pair_data, nan_ldm, base / "nan"),
        "deep": train_args(deep_data, ldm_checkpoint, base / "deep", "--num_epochs", 1),
        "float": train_args(
            float_data, ldm_checkpoint, base / "float", "--num_epochs", 1, "--intensity-range", *FLOAT_RANGE
        ),
    }
    results = run_many({name: ("train.py", *args) for name, args in commands.items()})
    return {name: (base / name, results[name]) for name in commands}


@pytest.fixture(scope="session")
def trained_run(training_runs):
    """The finished two-epoch run with a frozen UNet (the default)."""
    out, result = training_runs["frozen"]
    return out, check(result)


@pytest.fixture(scope="session")
def class_data(tmp_path_factory):
    """Per-class layout root/<class>/images + root/<class>/masks (label maps) with the LDM's class names."""
    root = tmp_path_factory.mktemp("classes")
    for seed, name in enumerate(CLASS_NAMES):
        write_pairs(root / name, 3, seed=seed, labels=(1, 2))  # label maps 0/1/2
    return root


def load(path):
    """A checkpoint as users load it."""
    return torch.load(path, map_location="cpu", weights_only=True)
