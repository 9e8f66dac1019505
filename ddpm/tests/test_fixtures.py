"""Checkpoints written by the code of commit 0a2aeff (tests/fixtures) still load, resume and sample."""

from pathlib import Path

import pytest
import torch

from conftest import make_class_folders, run_script

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FLAGS = ("--num-workers", "0", "--run-name", "tiny", "--preview-steps", "2")


def test_fixture_layout_is_the_one_users_have():
    full = torch.load(FIXTURES / "ckpt.pt", weights_only=True)
    ema = torch.load(FIXTURES / "ema_ckpt.pt", weights_only=True)
    assert {"model", "ema", "optimizer", "config", "class_names"} <= full.keys()
    assert full["global_step"] == 3 and full["class_names"] == ["class_0", "class_1", "class_2"]
    assert full["config"]["precision"] == "auto" and full["config"]["val_split"] == 0.25  # keys of that time
    for name, weight in ema["model"].items():
        assert torch.equal(weight, full["ema"][name])


def test_fixture_resumes_for_another_epoch(tmp_path):
    data = make_class_folders(tmp_path / "data")
    resumed = run_script(
        "ddpm_conditional.py",
        *("--data_root", data, "--resume", FIXTURES / "ckpt.pt", "--num_epochs", "2", *FLAGS),
        cwd=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "starting at epoch 2 step 3" in resumed.stdout
    final = torch.load(tmp_path / "models/tiny/ckpt_final.pt", weights_only=True)
    old = torch.load(FIXTURES / "ckpt.pt", weights_only=True)
    assert final["global_step"] == 6 and final["config"]["val_split"] == 0.25
    assert any(not torch.equal(final["model"][k], v) for k, v in old["model"].items())


@pytest.mark.parametrize("name", ["ckpt.pt", "ema_ckpt.pt"])
def test_fixture_samples(tmp_path, name):
    out = tmp_path / "out"
    sampled = run_script(
        "ddpm_conditional_ddp.py",
        *("--mode", "sample", "--ckpt", FIXTURES / name, "--num-samples", "3"),
        *("--sampler", "ddim", "--steps", "2", "--output-dir", out),
        cwd=tmp_path,
    )
    assert sampled.returncode == 0, sampled.stderr
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [
        "class_0/000000.png",
        "class_1/000000.png",
        "class_2/000000.png",
    ]
