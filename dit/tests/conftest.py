"""Shared fixtures: a tiny VAE, a tiny mixed-format class-folder data set, and one short training run."""

import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

DIT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, DIT_DIR)
from core import testing  # noqa: E402

# Tiny DiT on 16 px images: the test VAE downsamples by 2, so latents are 8 x 8 and there are 16 tokens.
TINY = ["--model", "DiT-S/2", "--depth", "2", "--hidden-size", "32", "--num-heads", "2", "--image-size", "16"]
# Offline, quiet, one thread per process: the test machine has two shared cores.
ENV = testing.ENV

torch.set_num_threads(1)


def script_command(script, *args):
    """Command line of a dit script, as a user types it."""
    return [sys.executable, os.path.join(DIT_DIR, script), *map(str, args)]


def run_script(script, *args, nproc=None, cwd=None, check=True):
    """Run a dit script as a user would (under a gloo torchrun with nproc); fail with its output if asked."""
    return testing.run(os.path.join(DIT_DIR, script), *args, nproc=nproc, cwd=cwd, check=check)


def tiny_vae():
    """Randomly initialised AutoencoderKL: 2x downsampling, 4 latent channels."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    blocks = dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    return AutoencoderKL(block_out_channels=(8, 8), **blocks, latent_channels=4, norm_num_groups=4,
                         layers_per_block=1, sample_size=16)  # fmt: skip


def write_images(root):
    """Three classes of four images each, in every format a user may have."""
    rng = np.random.default_rng(0)
    rgb = lambda: rng.integers(0, 256, (20, 18, 3), dtype=np.uint8)  # noqa: E731
    makers = {
        "cat": [lambda: Image.fromarray(rgb()), "png"],
        "dog": [lambda: Image.fromarray(rng.integers(0, 65535, (18, 18), dtype=np.uint16)), "png"],
        "eel": [lambda: Image.fromarray(rgb()).convert("P"), "png"],
    }
    for name, (make, ext) in makers.items():
        os.makedirs(os.path.join(root, name))
        for i in range(4):
            make().save(os.path.join(root, name, f"{i}.{ext}"))
    Image.fromarray(rgb()[..., 0]).save(os.path.join(root, "dog", "4.JPG"))
    Image.fromarray(np.dstack([rgb(), rgb()[..., :1]])).save(os.path.join(root, "cat", "4.png"))


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """Folder with vae/ (diffusers format) and data/<class>/ images."""
    root = tmp_path_factory.mktemp("dit")
    tiny_vae().save_pretrained(root / "vae")
    write_images(root / "data")
    return root


@pytest.fixture(scope="session")
def trained(workspace):
    """A 5-step single-process run holding out 3 of the 14 images (checkpoints at steps 2, 4 and 5)."""
    flags = (
        "--global-batch-size 4 --max-steps 5 --ckpt-every 2 --log-every 2 --num-workers 0 --sample-every 4"
    )
    run_script("train.py", *TINY, *flags.split(), "--val-fraction", 0.2, "--data-path", workspace / "data",
               "--results-dir", workspace / "results", "--vae", workspace / "vae")  # fmt: skip
    return workspace / "results" / "000-DiT-S-2"


# The continuous objectives' runs: each trains 4 steps (checkpoints at 2 and 4); flow also uses RoPE.
OBJECTIVE_RUNS = {"vp": [], "subvp": [], "ve": [], "flow": ["--pos-embed", "rope"]}


@pytest.fixture(scope="session")
def objective_runs(workspace):
    """{objective: run folder} of 4-step runs holding out 3 images, with a preview grid at step 4."""
    flags = "--global-batch-size 4 --max-steps 4 --ckpt-every 2 --log-every 2 --num-workers 0"
    flags += " --sample-every 4"

    def train(name):
        results = workspace / f"results-{name}"
        run_script("train.py", *TINY, *flags.split(), "--objective", name, *OBJECTIVE_RUNS[name],
                   "--val-fraction", 0.2, "--data-path", workspace / "data", "--results-dir", results,
                   "--vae", workspace / "vae")  # fmt: skip
        return name, results / "000-DiT-S-2"

    with ThreadPoolExecutor(2) as pool:  # two at a time: start-up time dominates these runs
        return dict(pool.map(train, OBJECTIVE_RUNS))


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same random state, so numerical checks are reproducible."""
    torch.manual_seed(0)
