"""Shared fixtures: random-weight network files and tiny image folders, built once per session."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

FOLDER = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, FOLDER)
SCRIPT = os.path.join(FOLDER, "precision_recall.py")
# Runs started two at a time use one thread each, so they do not fight over the two cores.
PARALLEL = {"OMP_NUM_THREADS": "1"}

from random_weights import write_random_weights  # noqa: E402


@pytest.fixture(scope="session")
def weights(tmp_path_factory):
    """(inception_path, vgg16_path): random weights of the real architectures."""
    return write_random_weights(str(tmp_path_factory.mktemp("weights")))


def blob_image(rng, size, tint):
    """A smooth random colour image (uint8 H x W x 3), so features differ from image to image."""
    coarse = rng.uniform(0, 255, (4, 4, 3)) * 0.6 + np.asarray(tint) * 0.4
    image = Image.fromarray(coarse.astype(np.uint8)).resize((size, size), Image.BILINEAR)
    return np.asarray(image)


def write_set(root, seed, tint, special=False):
    """<root>/a and <root>/b with 5 images each; `special` adds grayscale, 16-bit, 24 px and .PNG files."""
    rng = np.random.default_rng(seed)
    for name, shift in (("a", 0), ("b", 90)):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(5):
            size = 24 if special and name == "a" and i == 3 else 16
            rgb = blob_image(rng, size, np.add(tint, shift) % 255)
            path = os.path.join(root, name, f"{i:06d}.png")
            if special and name == "a" and i == 1:
                Image.fromarray(rgb).convert("L").save(path)
            elif special and name == "a" and i == 2:
                # A 16-bit file of 8-bit values: the set stays 8-bit (a full-range one would make the
                # whole set 16-bit data, one rule per set; tests/test_decoding.py covers that).
                Image.fromarray(rgb[:, :, 0].astype(np.uint16)).save(path)
            elif special and name == "a" and i == 3:
                Image.fromarray(rgb).save(path[:-4] + ".PNG")
            else:
                Image.fromarray(rgb).save(path)
    return root


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """Real set (with unusual files in class a), generated set, and a few derived inputs."""
    root = tmp_path_factory.mktemp("data")
    real = write_set(str(root / "real"), 0, (200, 40, 40), special=True)
    gen = write_set(str(root / "gen"), 1, (150, 80, 60))
    outlier = np.full((16, 16, 3), 255, np.uint8)  # far from every real image: precision < 1
    Image.fromarray(outlier).save(os.path.join(gen, "a", "000005.png"))
    return {"root": root, "real": real, "gen": gen}


class Evil:
    """Pickled, it runs a command on load (as a hostile weights or cache file would): creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def run_script(args, env=None, cwd=FOLDER, script=SCRIPT, interpreter=sys.executable, timeout=300):
    """Run the evaluation script as a user would; returns the CompletedProcess."""
    # One BLAS thread: FID's 2048 x 2048 eigen-decomposition is slower with two on a shared 2-core box.
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OPENBLAS_NUM_THREADS": "1", **(env or {})}
    command = [interpreter, script, *args]
    return subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def frd_installed():
    """Whether the optional FRD packages (requirements-frd.txt) can be imported."""
    try:
        import frd_score  # noqa: F401
        import radiomics  # noqa: F401
    except ImportError:
        return False
    return True


def read_json(path):
    with open(path) as handle:
        return json.load(handle)
