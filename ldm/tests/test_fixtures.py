"""Checkpoints written by the code of commit 0a2aeff (tests/fixtures) still resume and sample."""

from pathlib import Path

import torch

from conftest import TRAIN_ARGS, run_script

FIXTURES = Path(__file__).resolve().parent / "fixtures"  # trained on conftest's gray_data set


def load(path):
    return torch.load(path, weights_only=True)


def test_ldm_fixture_resumes_for_another_epoch(gray_data, tmp_path):
    resume = ("--resume", FIXTURES / "ldm_checkpoint.pt", "--vae_pretrained", FIXTURES / "vae")
    out = tmp_path / "run"
    run_script(
        "train.py", "--data_root", gray_data, "--output_dir", out, *resume, *TRAIN_ARGS, "--num_epochs", "2"
    )
    old, final = load(FIXTURES / "ldm_checkpoint.pt"), load(out / "checkpoint_final.pt")
    assert (old["epoch"], old["global_step"]) == (1, 2)
    assert (final["epoch"], final["global_step"]) == (2, 4)
    assert final["progress"]["val_history"][0] == old["progress"]["val_history"][0]  # the history carries on
    assert final["class_names"] == ["benign", "malignant"] and final["unet_config"] == old["unet_config"]
    assert any(not torch.equal(final["unet"][k], v) for k, v in old["unet"].items())


def test_ldm_fixture_samples(tmp_path):
    out = tmp_path / "gen"
    run_script(
        "inference.py",
        *("--checkpoint", FIXTURES / "ldm_checkpoint.pt", "--vae_pretrained", FIXTURES / "vae"),
        *("--num_samples", "1", "--num_inference_steps", "2", "--output_dir", out),
    )
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert names == ["benign/000000.png", "malignant/000000.png"]
    assert load(FIXTURES / "ldm_checkpoint.pt")["intensity"]["bit_depth"] == 16  # so the samples are 16-bit


def test_vae_fixture_resumes_for_another_epoch(gray_data, tmp_path):
    flags = ("--num_epochs", "2", "--num_workers", "0", "--batch_size", "4", "--image_size", "16")
    resume = ("--resume", FIXTURES / "vae_checkpoint.pt")
    run_script("train_vae.py", "--data_root", gray_data, "--output_dir", tmp_path / "vae", *resume, *flags)
    old, latest = load(FIXTURES / "vae_checkpoint.pt"), load(tmp_path / "vae" / "checkpoint_latest.pt")
    assert old["progress"]["epoch"] == 1 and latest["progress"]["epoch"] == 2
    architecture = lambda config: {k: v for k, v in config.items() if k != "scaling_factor"}  # noqa: E731
    assert architecture(latest["vae_config"]) == architecture(old["vae_config"])  # the factor is re-measured
    assert (tmp_path / "vae" / "best" / "config.json").is_file()
