"""The continuous-time objectives (vp, subvp, ve, flow) through the scripts: training stores the objective,
every sampler runs end to end from the checkpoint alone, --likelihood scores a folder, --config presets."""

import re

import numpy as np
import pytest
import torch

from conftest import DDPM_DIR, TINY, make_class_folders, run_script, torchrun
from core import sde

# (objective, sampler, steps): every sampler on the objective it is made for; pc needs steps > beta_max.
SAMPLERS = [
    ("vp", "pc", 21),
    ("vp", "euler", 3),
    ("vp", "heun", 2),
    ("vp", "rk45", None),
    ("vp", "dpm++", 3),
    ("subvp", "pc", 21),
    ("subvp", "dpm++", 3),
    ("ve", "pc", 3),
    ("ve", "heun", 2),
    ("flow", "euler", 3),
    ("flow", "heun", 2),
    ("flow", "rk45", None),
]
NFE = {"pc": lambda steps: 2 * steps, "euler": lambda s: s, "heun": lambda s: 2 * s, "dpm++": lambda s: s}


def sample(ckpt, out, *flags, cwd):
    argv = ("--mode", "sample", "--ckpt", ckpt, "--num-samples", "4", "--output-dir", out, *flags)
    return run_script("ddpm_conditional_ddp.py", *argv, "--rtol", "1e-2", "--atol", "1e-2", cwd=cwd)


def test_training_stores_the_objective_so_sampling_needs_no_flags(objective_runs):
    for name, run in objective_runs.items():
        ckpt = torch.load(run / "ckpt.pt", map_location="cpu", weights_only=True)
        assert ckpt["config"]["objective"] == name and sde.objective_of(ckpt["config"]).name == name
        assert np.isfinite(ckpt["best_metric"])  # the held-out loss of the objective
    assert (objective_runs["flow"].parents[1] / "results/flow/final.png").is_file()  # the EMA grid


@pytest.mark.parametrize(
    ("objective", "sampler", "steps"), SAMPLERS, ids=[f"{o}-{s}" for o, s, _ in SAMPLERS]
)
def test_every_sampler_runs_end_to_end(tmp_path, objective_runs, objective, sampler, steps):
    step_flags = ("--steps", steps) if steps else ()
    ckpt = objective_runs[objective] / "ema_ckpt.pt"
    result = sample(ckpt, tmp_path / "s", "--sampler", sampler, *step_flags, "--cfg-scale", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    nfe = int(re.search(r"NFE (\d+) per batch", result.stdout).group(1))
    assert nfe == NFE[sampler](steps) if sampler in NFE else nfe > 4  # rk45: the solver's own count
    files = sorted((tmp_path / "s").rglob("*.png"))
    assert len(files) == 4 and {f.parent.name for f in files} == {"class_0", "class_1", "class_2"}
    pixels = np.stack([np.asarray(__import__("PIL.Image").Image.open(f)) for f in files])
    assert pixels.shape == (4, 16, 16) and pixels.std() > 0


def test_default_sampler_follows_the_objective(tmp_path, objective_runs):
    # Unset --sampler: pc for the SDEs, euler for flow (which has no SDE); the seeded noise repeats.
    flow = sample(objective_runs["flow"] / "ckpt.pt", tmp_path / "a", "--steps", "2", "--npz", cwd=tmp_path)
    assert flow.returncode == 0 and "euler, NFE 2 per batch" in flow.stdout, flow.stderr
    again = sample(objective_runs["flow"] / "ckpt.pt", tmp_path / "b", "--steps", "2", "--npz", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert np.array_equal(np.load(tmp_path / "a.npz")["arr_0"], np.load(tmp_path / "b.npz")["arr_0"])
    ve = sample(objective_runs["ve"] / "ckpt.pt", tmp_path / "c", "--steps", "2", cwd=tmp_path)
    assert ve.returncode == 0 and "pc, NFE 4 per batch" in ve.stdout, ve.stderr


def test_likelihood_of_a_folder(tmp_path, objective_runs):
    data = make_class_folders(tmp_path / "data", classes=2, per_class=1)
    flags = ("--mode", "sample", "--ckpt", objective_runs["flow"] / "ckpt.pt", "--likelihood", data)
    result = run_script("ddpm_conditional_ddp.py", *flags, "--rtol", "1e-2", "--atol", "1e-2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    found = re.search(r"bits/dim of 2 images in \S+: ([\d.]+) \+- ([\d.]+)", result.stdout)
    # An almost untrained model: worse than uniform noise over the 256 levels (8 bits), yet finite.
    assert found and 8 < float(found.group(1)) < 100, result.stdout


def test_config_preset_and_typed_flags(tmp_path, gray_data):
    flags = ("--dataset-path", gray_data, *TINY, "--num-classes", "3", "--max-steps", "1", "--val-split", "0")
    preset = DDPM_DIR / "configs" / "ve.yaml"
    result = run_script("ddpm_conditional.py", *flags, "--config", preset, "--sigma-max", "5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    config = torch.load(tmp_path / "models/DDPM_conditional/ckpt.pt", weights_only=True)["config"]
    assert (config["objective"], config["sigma_min"], config["sigma_max"]) == ("ve", 0.01, 5.0)


def test_continuous_objective_trains_and_samples_on_two_processes(tmp_path, gray_data):
    train = ["ddpm_conditional_ddp.py", "--mode", "train_ddp", "--dataset-path", gray_data, *TINY]
    train += "--objective flow --num-classes 3 --batch-size 2 --max-steps 2 --val-split 0".split()
    trained = torchrun(*train, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    ckpt = "models/DDPM_conditional/ema_ckpt.pt"
    # Batches of one: each image's noise is seeded by its own index, on whichever process draws it.
    common = ["--ckpt", ckpt, "--num-samples", "5", "--batch-size", "1", "--sampler", "heun", "--steps", "2"]
    two = torchrun(
        "ddpm_conditional_ddp.py",
        "--mode",
        "sample_ddp",
        *common,
        "--output-dir",
        "two",
        "--npz",
        cwd=tmp_path,
    )
    assert two.returncode == 0, two.stderr
    one = run_script(
        "ddpm_conditional_ddp.py", "--mode", "sample", *common, "--output-dir", "one", "--npz", cwd=tmp_path
    )
    assert one.returncode == 0, one.stderr
    # So two processes write exactly the images one process would.
    assert np.array_equal(np.load(tmp_path / "one.npz")["arr_0"], np.load(tmp_path / "two.npz")["arr_0"])


def test_python_api_example_of_the_readme_runs(tmp_path):
    readme = (DDPM_DIR / "README.md").read_text()
    example = next(block for block in readme.split("```python")[1:] if "Objective.from_config" in block)
    script = tmp_path / "example.py"
    checks = "assert images.shape == (8, 1, 16, 16) and nfe == 50 and torch.isfinite(images).all()\n"
    script.write_text(example.split("```")[0] + checks)
    result = run_script(script, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
