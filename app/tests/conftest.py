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
    (folder / "outside.pt").symlink_to(work / "models" / "ddpm16" / "ema_ckpt.pt")
    (folder / "inside.pt").symlink_to(folder / "runs" / "flow.pt")  # a link that stays inside is served
    return folder


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def server(checkpoints, tmp_path_factory):
    """The base URL of `python app/serve.py` on a free loopback port (batches of 2, so cancel acts soon)."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    command = [sys.executable, str(SERVE), "--checkpoints", str(checkpoints), "--port", str(port)]
    command += ["--max-images", "8", "--max-steps", "1000", "--max-image-size", "64", "--batch-size", "2"]
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
