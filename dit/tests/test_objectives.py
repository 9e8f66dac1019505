"""The continuous-time objectives (vp, subvp, ve, flow): training, checkpoints, every sampler, resume,
--config, --likelihood and RoPE checkpoints sampled at another size."""

import math
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import DIT_DIR, run_script
from core import testing

# (objective, sampler, extra flags, NFE per batch; None: rk45 chooses). pc needs more steps than
# beta_max = 20 on the VP family (fewer leave no signal); ve's and flow's steps are free.
SAMPLERS = [
    ("vp", "pc", ["--num-sampling-steps", 21], 42),
    ("vp", "euler", ["--num-sampling-steps", 3], 3),
    ("vp", "heun", ["--num-sampling-steps", 2], 4),
    ("vp", "rk45", ["--rtol", 1e-2, "--atol", 1e-2], None),
    ("vp", "dpm++", ["--num-sampling-steps", 3], 3),
    ("subvp", "pc", ["--num-sampling-steps", 21, "--predictor", "euler_maruyama"], 42),
    ("subvp", "euler", ["--num-sampling-steps", 2], 2),
    ("subvp", "heun", ["--num-sampling-steps", 2], 4),
    ("subvp", "ode", ["--rtol", 1e-2, "--atol", 1e-2], None),
    ("subvp", "dpm++", ["--num-sampling-steps", 2], 2),
    ("ve", "pc", ["--num-sampling-steps", 3, "--corrector-steps", 2], 9),
    ("ve", "euler", ["--num-sampling-steps", 2], 2),
    ("ve", "heun", ["--num-sampling-steps", 2], 4),
    ("ve", "rk45", ["--rtol", 1e-2, "--atol", 1e-2], None),
    ("flow", "euler", ["--num-sampling-steps", 3], 3),
    ("flow", "heun", ["--num-sampling-steps", 2], 4),
    ("flow", "rk45", ["--rtol", 1e-2, "--atol", 1e-2], None),
]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def sample_in_process(argv, capsys, ddp=False):
    """sample.py's own parse and run, in this process (a subprocess per sampler would mostly be start-up)."""
    import sample
    from utils import accelerator_for

    args = sample.build_parser(ddp).parse_args([str(a) for a in argv])
    with accelerator_for(args.mixed_precision) as accelerator:
        sample.sample(args, ddp, accelerator)
    return capsys.readouterr().out


@pytest.mark.parametrize("objective", ["vp", "subvp", "ve", "flow"])
def test_checkpoint_records_the_objective(objective_runs, objective):
    run = objective_runs[objective]
    assert sorted(os.listdir(run / "checkpoints")) == ["0000002.pt", "0000004.pt", "best.pt"]
    ckpt = load(run / "checkpoints" / "0000004.pt")
    config = ckpt["config"]
    assert config["objective"] == objective and config["learn_sigma"] is False
    constants = {"vp": (0.1, 20.0, None, None), "subvp": (0.1, 20.0, None, None),
                 "ve": (None, None, 0.01, 50.0), "flow": (None, None, None, None)}  # fmt: skip
    keys = ("beta_min", "beta_max", "sigma_min", "sigma_max")
    assert tuple(config[k] for k in keys) == constants[objective]
    # No learned variance: the output layer gives 2 x 2 patches of the 4 latent channels only.
    assert ckpt["model"]["final_layer.linear.weight"].shape == (2 * 2 * 4, 32)
    rope = objective == "flow"
    assert config["pos_embed"] == ("rope" if rope else "sincos")
    assert ("pos_embed" in ckpt["model"]) is not rope  # RoPE has no table
    assert 0 < ckpt["best_val_loss"] < 10 and "Held-out loss" in (run / "log.txt").read_text()
    assert os.path.isfile(run / "samples" / "0000004.png")  # the EMA preview grid (Euler ODE)
    weight = "final_layer.linear.weight"
    assert not torch.equal(load(run / "checkpoints" / "0000002.pt")["model"][weight], ckpt["model"][weight])


@pytest.mark.parametrize("objective,sampler,flags,nfe", SAMPLERS, ids=[f"{o}-{s}" for o, s, *_ in SAMPLERS])
def test_every_sampler_end_to_end(objective_runs, tmp_path, capsys, objective, sampler, flags, nfe):
    ckpt = objective_runs[objective] / "checkpoints" / "0000004.pt"
    out = tmp_path / "samples"
    argv = ["--ckpt", ckpt, "--sampler", sampler, *flags, "--num-samples", 3, "--batch-size", 2]
    stdout = sample_in_process([*argv, "--output-dir", out, "--npz", tmp_path / "s.npz"], capsys)
    assert {c: len(os.listdir(out / c)) for c in os.listdir(out)} == {"cat": 1, "dog": 1, "eel": 1}
    npz = np.load(tmp_path / "s.npz")
    assert npz["arr_0"].shape == (3, 16, 16, 3) and npz["arr_1"].tolist() == [0, 1, 2]
    line = next(line for line in stdout.splitlines() if line.startswith(f"{sampler}, "))
    found = int(line.split("NFE ")[1].split()[0])
    assert found == nfe if nfe is not None else found > 0, line
    assert f"{objective} objective" in stdout and "Timing: 3 images" in stdout


def test_default_sampler_and_guidance_scales(objective_runs, tmp_path, capsys):
    """Unset, the sampler is pc for the SDEs (1000 steps, one corrector step each) and euler for flow."""
    ckpt = objective_runs["ve"] / "checkpoints" / "0000004.pt"
    flags = ["--ckpt", ckpt, "--num-samples", 1, "--class-labels", "dog", "--output-dir", tmp_path / "a"]
    assert "pc, 1000 steps, NFE 2000 per batch" in sample_in_process(flags, capsys)
    ckpt = objective_runs["flow"] / "checkpoints" / "0000004.pt"
    for scale in (0, 1):  # each runs one half of the guidance batch: still one evaluation per step
        flags = ["--ckpt", ckpt, "--num-samples", 1, "--cfg-scale", scale, "--output-dir", tmp_path / "s"]
        assert "euler, 100 steps, NFE 100 per batch" in sample_in_process([*flags, "--overwrite"], capsys)


def test_rope_checkpoint_samples_at_another_size(objective_runs, tmp_path, capsys):
    """A RoPE model trained on 16 px images samples 32 px ones (a sin-cos one refuses: test_errors)."""
    ckpt = objective_runs["flow"] / "checkpoints" / "0000004.pt"
    out = tmp_path / "big"
    flags = ["--ckpt", ckpt, "--image-size", 32, "--num-samples", 2, "--num-sampling-steps", 2]
    sample_in_process([*flags, "--class-labels", "eel", "--output-dir", out], capsys)
    with Image.open(out / "eel" / "000001.png") as image:
        assert image.size == (32, 32)


def test_two_process_sampling_of_a_continuous_checkpoint(objective_runs, tmp_path):
    out = tmp_path / "fid"
    ckpt = objective_runs["vp"] / "checkpoints" / "0000004.pt"
    flags = "--num-fid-samples 5 --per-proc-batch-size 2 --sampler heun --num-sampling-steps 2"
    result = run_script("sample_ddp.py", "--ckpt", ckpt, *flags.split(), "--output-dir", out, nproc=2)
    assert {c: len(os.listdir(out / c)) for c in os.listdir(out)} == {"cat": 2, "dog": 2, "eel": 1}
    assert np.load(f"{out}.npz")["arr_0"].shape == (5, 16, 16, 3)
    assert "heun, 2 steps, NFE 4 per batch" in result.stdout


def test_likelihood_of_the_latents(objective_runs, workspace, tmp_path, capsys):
    """bits/dim of the latents, the same split over processes or not. The EMA of 4 steps is still almost the
    zero-output initial model (score 0), whose ODE only shrinks x: by the closed form, log p(x) is the prior's
    log density at about 0 plus the integral of the divergence, -D beta_integral / 2."""
    data = tmp_path / "data"
    for name in ("dog", "eel"):  # a subset of the classes is fine: labels follow the checkpoint's names
        shutil.copytree(workspace / "data" / name, data / name)
    ckpt = objective_runs["subvp"] / "checkpoints" / "0000004.pt"
    # One image per batch: each image's probes and solver steps are then its own, for any process count.
    flags = ["--ckpt", ckpt, "--likelihood", data, "--rtol", 1e-3, "--atol", 1e-3, "--batch-size", 1]
    line = sample_in_process(flags, capsys).strip().splitlines()[-1]
    assert line.startswith("bits/dim of the VAE latents (not of the pixels) of 9 images"), line
    log_mean_coeff = -0.25 * (20 - 0.1) - 0.5 * 0.1  # -(integral of beta from 0 to 1) / 2
    closed_form = (0.5 * math.log(2 * math.pi) - log_mean_coeff) / math.log(2)
    assert abs(float(line.split(": ")[1].split()[0]) - closed_form) < 0.01 and "subvp objective" in line
    result = run_script("sample_ddp.py", *flags, nproc=2)
    assert result.stdout.strip().splitlines()[-1].split(" (")[0] == line.split(" (")[0]


def test_continuous_resume_gives_identical_weights(objective_runs, workspace, tmp_path):
    """A vp run resumed at step 2 reaches step 4 with the weights, EMA and held-out loss of an uncut run."""
    straight = objective_runs["vp"]
    run_dir = tmp_path / "results" / "000-DiT-S-2"
    os.makedirs(run_dir / "checkpoints")
    shutil.copy(straight / "checkpoints" / "0000002.pt", run_dir / "checkpoints")
    flags = "--max-steps 4 --ckpt-every 2 --num-workers 0 --sample-every 0 --objective vp"
    run_script("train.py", "--data-path", workspace / "data", "--resume", run_dir, *flags.split())
    resumed = load(run_dir / "checkpoints" / "0000004.pt")
    reference = load(straight / "checkpoints" / "0000004.pt")
    for key in ("model", "ema"):
        assert all(torch.equal(resumed[key][k], reference[key][k]) for k in reference[key])
    assert resumed["best_val_loss"] == reference["best_val_loss"] and resumed["config"] == reference["config"]


def test_config_presets_set_flags_that_typed_flags_override():
    from train import build_parser

    parser = build_parser()
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    for name in ("vp", "subvp", "ve", "flow"):
        args = parser.parse_args(["--config", os.path.join(folder, f"{name}.yaml")])
        assert args.objective == name and args.learning_rate == 1e-4
    args = parser.parse_args(["--config", os.path.join(folder, "vp.yaml"), "--beta-max", "5"])
    assert (args.beta_min, args.beta_max) == (0.1, 5.0)


def test_python_api_example_of_the_readme_runs(tmp_path):
    readme = open(os.path.join(DIT_DIR, "README.md")).read()
    example = next(block for block in readme.split("```python")[1:] if "Objective.from_config" in block)
    script = tmp_path / "example.py"
    checks = "assert latents.shape == (4, 4, 8, 8) and nfe == 10 and torch.isfinite(latents).all()\n"
    script.write_text(example.split("```")[0] + checks)
    # Its own process, with dit/ importable as for a user's script that sits next to models.py.
    testing.run(script, env={"PYTHONPATH": DIT_DIR}, check=True)
