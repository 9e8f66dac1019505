"""Tiny checkpoints trained by ddpm/'s own trainer, and one server process driven over HTTP by the tests."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
SERVE = ROOT / "app" / "serve.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
# ddpm/tests/conftest.py's tiny UNet: 16 px, trains in seconds on a CPU.
TINY = "--image-size 16 --base-channels 8 --time-dim 32 --num-workers 0 --preview-steps 2".split()
CLASSES = 3


def class_folders(root, deep):
    """Three class folders of 16 px gray images (a bright bar per class); 16-bit PNGs when deep."""
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        folder = Path(root) / f"class_{c}"
        folder.mkdir(parents=True)
        for i in range(4):
            image = rng.integers(0, 40, (16, 16)).astype(np.uint16)
            image[c * 4 : c * 4 + 3] = 230
            # 230 * 250 = 57500: values that need 16 bits, so the run's intensity rule is 16-bit.
            pil = Image.fromarray(image * 250) if deep else Image.fromarray(image.astype(np.uint8), "L")
            pil.save(folder / f"{i}.png")
    return Path(root)


def train(work, data, name, *flags):
    """Start ddpm_conditional.py for 2 steps (returns the Popen; the runs go in parallel)."""
    argv = [
        "--dataset-path",
        str(data),
        "--num-classes",
        str(CLASSES),
        "--batch-size",
        "4",
        "--max-steps",
        "2",
    ]
    argv += ["--val-split", "0", "--run-name", name, *TINY, *flags]
    command = [sys.executable, str(ROOT / "ddpm" / "ddpm_conditional.py"), *argv]
    return subprocess.Popen(
        command, cwd=work, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """--checkpoints folder: ddpm16.pt (discrete, 16-bit data), flow.pt and vp.pt (8-bit), a junk file, a
    dict of an unknown format, a dit-tagged dict and a link that points outside."""
    work = tmp_path_factory.mktemp("train")
    gray, deep = class_folders(work / "gray", False), class_folders(work / "deep", True)
    runs = {
        "ddpm16": train(work, deep, "ddpm16"),
        "flow": train(work, gray, "flow", "--objective", "flow"),
        "vp": train(work, gray, "vp", "--objective", "vp"),
    }
    folder = tmp_path_factory.mktemp("checkpoints")
    (folder / "runs").mkdir()
    for name, process in runs.items():
        _, err = process.communicate(timeout=240)
        assert process.returncode == 0, err
        (folder / "runs" / f"{name}.pt").write_bytes((work / "models" / name / "ema_ckpt.pt").read_bytes())
    (folder / "junk.pt").write_bytes(b"not a checkpoint")
    import torch

    torch.save({"format": "someone-else-v3", "weights": torch.zeros(2)}, folder / "foreign.pt")
    torch.save({"model_type": "dit", "config": {}, "model": {}}, folder / "dit.pt")  # a DiT's tag, no weights
    torch.save({"model_type": "ldm-classifier", "model": {}}, folder / "ldm_classifier.pt")
    (folder / "outside.pt").symlink_to(work / "models" / "ddpm16" / "ema_ckpt.pt")
    (folder / "inside.pt").symlink_to(folder / "runs" / "flow.pt")  # a link that stays inside is served
    return folder


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def running_server(folder, log, *flags):
    """Start `python app/serve.py --checkpoints folder *flags` on a free loopback port; yields its URL once
    /health answers, and stops it afterwards."""
    port = free_port()
    command = [sys.executable, str(SERVE), "--checkpoints", str(folder), "--port", str(port), *flags]
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=ENV, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        assert process.poll() is None, log.read_text()
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not answer /health in 90 s"
        time.sleep(0.2)
    yield url
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="session")
def server(checkpoints, tmp_path_factory):
    """The base URL of `python app/serve.py` on a free loopback port (batches of 2, so cancel acts soon)."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    flags = ["--max-images", "8", "--max-steps", "1000", "--max-image-size", "64", "--batch-size", "2"]
    yield from running_server(checkpoints, log, *flags)


# ---------------------------------------------------------------- the other kinds: dit, ldm, controlnet


def tiny_vae(folder):
    """A random 2x-downsampling AutoencoderKL saved with save_pretrained (as the folders' tests make it)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    blocks = dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    sizes = dict(block_out_channels=(8, 8), latent_channels=4, norm_num_groups=8, layers_per_block=1)
    vae = AutoencoderKL(**blocks, **sizes, sample_size=16)
    vae.save_pretrained(folder)
    return folder


def mask_pairs(root):
    """Four 16-bit gray 16 px images bright where their binary (0/255) mask is set: ControlNet data."""
    rng = np.random.default_rng(1)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    for i in range(4):
        mask = np.zeros((16, 16), np.uint8)
        x, y = rng.integers(0, 8, 2)
        mask[y : y + 6, x : x + 6] = 1
        image = ((mask * 180 + rng.integers(0, 60, mask.shape)) * 257).astype(np.uint16)  # 16-bit data
        Image.fromarray(image).save(root / "images" / f"{i:03d}.png")
        Image.fromarray(mask * 255).save(root / "masks" / f"{i:03d}.png")
    return root


def start(script, *argv, cwd):
    """Start one of the folders' scripts (a trainer) with tiny settings; returns the Popen."""
    command = [sys.executable, str(ROOT / script), *map(str, argv)]
    return subprocess.Popen(
        command, cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def finished(process):
    _, err = process.communicate(timeout=240)
    assert process.returncode == 0, err


def resaved(source, target, change):
    """A copy of a checkpoint with change(ckpt) applied (a test's variant of a trained file)."""
    import torch

    ckpt = torch.load(source, map_location="cpu", weights_only=True)
    change(ckpt)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, target)


@pytest.fixture(scope="session")
def vae_folder(tmp_path_factory):
    return tiny_vae(tmp_path_factory.mktemp("vae") / "tiny_vae")


@pytest.fixture(scope="session")
def kind_checkpoints(tmp_path_factory, request, vae_folder):
    """--checkpoints folder of every kind, trained by each folder's own trainer with tiny settings:
    dit/0000002.pt (8-bit gray data), ldm/checkpoint_best.pt (16-bit data) and a copy ldm_b/,
    controlnet/checkpoint_best.pt (16-bit pairs; its recorded LDM lies outside, the same run's LDM is
    found inside), ddpm.pt; and variants: recorded.pt (a ControlNet whose recorded LDM is ldm_b/ inside),
    orphan.pt (a ControlNet of an LDM that is not there), dit_hub.pt (its VAE a hub id), DiT-S-2-bare.pt
    (a bare state_dict, as the official DiT files are) and DiT-official.pt (two such keys only)."""
    work = tmp_path_factory.mktemp("kinds")
    gray, deep = class_folders(work / "gray", False), class_folders(work / "deep", True)
    dit_flags = "--model DiT-S/2 --depth 2 --hidden-size 32 --num-heads 2 --image-size 16 --max-steps 2"
    dit_flags += " --global-batch-size 4 --num-workers 0"
    dit_data = ["--data-path", gray, "--results-dir", work / "dit", "--vae", vae_folder]
    dit = start("dit/train.py", *dit_flags.split(), *dit_data, cwd=work)
    ldm_flags = "--image_size 16 --batch_size 4 --num_epochs 1 --unet_preset tiny --num_workers 0"
    ldm_data = ["--data_root", deep, "--output_dir", work / "ldm", "--vae_pretrained", vae_folder]
    ldm = start("ldm/train.py", *ldm_flags.split(), *ldm_data, cwd=work)
    # A bare state_dict as the official files are (dit/download.py): a random DiT-S/2 of 1000 classes on the
    # tiny VAE's 8x8 latents (16 px images), made by dit's own model code.
    bare_file = work / "DiT-S-2-bare.pt"
    build = "import sys, torch; from models import DiT_models; torch.manual_seed(0); "
    build += "torch.save(DiT_models['DiT-S/2'](input_size=8, num_classes=1000).state_dict(), sys.argv[1])"
    bare = subprocess.Popen([sys.executable, "-c", build, str(bare_file)], cwd=ROOT / "dit", env=ENV)
    ddpm = request.getfixturevalue("checkpoints")  # ddpm's runs train meanwhile (or are there already)
    finished(ldm)
    cn_flags = "--batch_size 2 --num_epochs 1 --num_workers 0 --sample_steps 2 --num_sample_masks 1"
    cn_flags += " --val_fraction 0.25"
    cn_data = ["--data_root", mask_pairs(work / "pairs"), "--output_dir", work / "controlnet"]
    cn_data += ["--ldm_checkpoint", work / "ldm" / "checkpoint_best.pt"]
    controlnet = start("controlnet/train.py", *cn_flags.split(), *cn_data, cwd=work)
    folder = tmp_path_factory.mktemp("kind_checkpoints")
    for sub in ("dit", "ldm", "ldm_b", "controlnet"):
        (folder / sub).mkdir()
    finished(dit)
    (folder / "dit" / "0000002.pt").write_bytes(
        (work / "dit" / "000-DiT-S-2" / "checkpoints" / "0000002.pt").read_bytes()
    )
    for sub in ("ldm", "ldm_b"):
        (folder / sub / "checkpoint_best.pt").write_bytes((work / "ldm" / "checkpoint_best.pt").read_bytes())
    (folder / "ddpm.pt").write_bytes((ddpm / "runs" / "ddpm16.pt").read_bytes())
    finished(controlnet)
    trained = work / "controlnet" / "checkpoint_best.pt"
    (folder / "controlnet" / "checkpoint_best.pt").write_bytes(trained.read_bytes())

    def record(ckpt):
        ckpt["config"]["ldm_checkpoint"] = str(folder / "ldm_b" / "checkpoint_best.pt")

    def orphan(ckpt):  # another LDM run's config: no LDM under the folder is its own
        ckpt["ldm_config"] = {**ckpt["ldm_config"], "seed": 12345}

    def hub_vae(ckpt):  # as a run trained with the default VAE would record it
        ckpt["config"]["vae"] = "ema"

    resaved(trained, folder / "recorded.pt", record)
    resaved(trained, folder / "orphan.pt", orphan)
    resaved(folder / "dit" / "0000002.pt", folder / "dit_hub.pt", hub_vae)
    import torch

    # Two of the keys of an official DiT file with stand-in tensors, too little to read its classes from.
    torch.save({"pos_embed": torch.zeros(1, 4, 8), "x_embedder.proj.weight": torch.zeros(8, 4, 2, 2)},
               folder / "DiT-official.pt")  # fmt: skip
    assert bare.wait(timeout=240) == 0
    (folder / "DiT-S-2-bare.pt").write_bytes(bare_file.read_bytes())
    return folder


@pytest.fixture(scope="session")
def kinds_server(kind_checkpoints, vae_folder, tmp_path_factory):
    """A server over every kind, with --vae (for dit_hub.pt) and a 1 MB upload limit."""
    log = tmp_path_factory.mktemp("kinds_server") / "server.log"
    flags = ["--max-images", "8", "--max-image-size", "64", "--batch-size", "4", "--max-upload-mb", "1"]
    yield from running_server(kind_checkpoints, log, *flags, "--vae", str(vae_folder))
