"""Checkpoints written by the code of commit 0a2aeff (tests/fixtures) still sample and resume."""

import os
import shutil
from pathlib import Path

import torch
from PIL import Image

from conftest import run_script, write_images

FIXTURES = Path(__file__).resolve().parent / "fixtures"
OLD = FIXTURES / "train_0000002.pt"


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_old_checkpoint_samples_into_its_class_folders(tmp_path):
    out = tmp_path / "samples"
    flags = "--num-samples 3 --batch-size 3 --num-sampling-steps 2"
    flags += f" --ckpt {OLD} --vae {FIXTURES / 'vae'} --output-dir {out}"
    result = run_script("sample.py", *flags.split())
    assert sorted(os.listdir(out)) == ["cat", "dog", "eel"]
    assert all(os.listdir(out / name) == ["000000.png"] for name in ("cat", "dog", "eel"))
    assert "3-channel" in result.stdout  # the stored data rule: colour, written as 8-bit RGB
    # Written before objectives existed: a ddpm model, sampled by the respaced DDPM as before.
    assert "ddpm objective" in result.stdout and "ddpm, 2 steps, NFE 2 per batch" in result.stdout
    with Image.open(out / "cat" / "000000.png") as image:
        assert image.mode == "RGB" and image.size == (16, 16)


def test_old_checkpoint_resumes_with_its_flags(tmp_path):
    """Resumed with only the data and a step limit: the seed's flag names in `args` still apply."""
    shutil.copytree(FIXTURES / "vae", tmp_path / "vae")  # the checkpoint names its VAE `vae`
    write_images(tmp_path / "data")
    run_dir = tmp_path / "results" / "000-DiT-S-2"
    os.makedirs(run_dir / "checkpoints")
    shutil.copy(OLD, run_dir / "checkpoints" / "0000002.pt")
    flags = "--max-steps 4 --num-workers 0 --sample-every 0"
    run_script("train.py", "--data-path", "data", "--resume", run_dir, *flags.split(), cwd=tmp_path)
    old, new = load(OLD), load(run_dir / "checkpoints" / "0000004.pt")
    assert new["train_steps"] == 4 and new["config"] == old["config"]
    assert new["model"].keys() == old["model"].keys() == new["ema"].keys()
    weight = "final_layer.linear.weight"
    assert not torch.equal(new["model"][weight], old["model"][weight])  # it trained on
    assert all(torch.isfinite(v).all() for v in new["model"].values())
    assert new["best_val_loss"] is not None and new["args"]["global_batch_size"] == 4  # kept from old args
