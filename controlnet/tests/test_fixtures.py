"""Checkpoints written by the seed-era code (tests/fixtures) still sample and resume."""

import pytest
import torch

from conftest import check, load, run_many, write_pairs
from models import load_controlled_unet, load_ldm

FIXTURES = __import__("pathlib").Path(__file__).resolve().parent / "fixtures"
LDM, VAE = FIXTURES / "ldm.pt", FIXTURES / "vae"
KINDS = {"frozen": [], "unfrozen": ["--no_freeze_unet"]}


@pytest.mark.parametrize("kind", KINDS)
def test_fixture_builds_the_controlled_unet(kind):
    ckpt = load(FIXTURES / f"controlnet_{kind}.pt")
    assert ckpt["model_type"] == "controlnet" and ckpt["epoch"] == 1 and ckpt["global_step"] == 2
    assert (ckpt["unet"] is None) == (kind == "frozen")
    model = load_controlled_unet(ckpt, load_ldm(LDM))
    if kind == "unfrozen":  # the trained UNet's EMA weights replace the LDM's
        for name, weight in model.unet.state_dict().items():
            assert torch.equal(weight, ckpt["ema_unet"][name])
    latents, tokens = torch.randn(2, 4, 4, 4), torch.randn(2, 1, 4)
    with torch.no_grad():
        out = model(latents, torch.tensor([3, 50]), tokens, torch.rand(2, 1, 8, 8))
    assert out.shape == (2, 4, 4, 4) and torch.isfinite(out).all()


@pytest.fixture(scope="module")
def fixture_runs(tmp_path_factory):
    """Resume each fixture for one more epoch and sample from it, all at once."""
    base = tmp_path_factory.mktemp("fixture_runs")
    data = write_pairs(base / "data", 4)
    flags = "--batch_size 2 --num_epochs 2 --learning_rate 1e-3 --num_workers 0 --sample_steps 1"
    flags += " --num_sample_masks 1 --val_fraction 0.25 --image_size 8"
    commands = {}
    for kind, extra in KINDS.items():
        ckpt = FIXTURES / f"controlnet_{kind}.pt"
        commands[f"resume_{kind}"] = (
            "train.py",
            *("--data_root", data, "--output_dir", base / kind, "--resume", ckpt),
            *("--ldm_checkpoint", LDM, "--vae_pretrained", VAE, *flags.split(), *extra),
        )
        commands[f"sample_{kind}"] = (
            "inference.py",
            *("--checkpoint", ckpt, "--ldm_checkpoint", LDM, "--vae_pretrained", VAE),
            *(
                "--mask",
                data / "masks" / "001.png",
                "--num_inference_steps",
                2,
                "--output_dir",
                base / f"gen_{kind}",
            ),
        )
    return base, run_many(commands, workers=2)


@pytest.mark.parametrize("kind", KINDS)
def test_fixture_resumes_for_another_epoch(fixture_runs, kind):
    base, results = fixture_runs
    result = check(results[f"resume_{kind}"])
    assert "resumed from" in result.stdout and "at epoch 1, step 2" in result.stdout
    final = load(base / kind / "checkpoint_final.pt")
    assert final["epoch"] == 2 and final["global_step"] == 4
    old = load(FIXTURES / f"controlnet_{kind}.pt")
    assert any(not torch.equal(final["ema_controlnet"][k], v) for k, v in old["ema_controlnet"].items())


@pytest.mark.parametrize("kind", KINDS)
def test_fixture_samples(fixture_runs, kind):
    base, results = fixture_runs
    check(results[f"sample_{kind}"])
    assert [p.name for p in (base / f"gen_{kind}").iterdir()] == ["001_000.png"]
