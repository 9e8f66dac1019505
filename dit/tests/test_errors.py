"""Bad input ends with one clear line on stderr and exit code 2; the cases run as parallel subprocesses,
typed the way a user types them."""

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import TINY, run_script

PARALLEL_CASES = 6


def cases(workspace, trained, tmp, runs):
    """name -> (script, arguments, words the error line must contain)."""
    data, vae, ckpt = workspace / "data", workspace / "vae", trained / "checkpoints" / "0000005.pt"
    under_file = tmp / "file" / "x"
    train = [*TINY, "--vae", vae, "--results-dir", tmp / "results", "--num-workers", 0, "--precision", "fp32"]
    return {
        "missing data": (
            "train.py",
            [*train, "--data-path", tmp / "nope"],
            ["data folder not found", "nope"],
        ),
        "no class folders": ("train.py", [*train, "--data-path", tmp / "empty"], ["no class folders"]),
        "truncated image": (
            "train.py",
            [
                *train,
                "--data-path",
                tmp / "broken",
                "--num-workers",
                1,
                "--results-dir",
                tmp / "results-broken",
                "--global-batch-size",
                1,
                "--max-steps",
                2,
            ],
            ["bad.png", "truncated"],
        ),
        "image size": (
            "train.py",
            [*train, "--data-path", data, "--image-size", 18],
            ["--image-size 18", "multiple of 4"],
        ),
        "unknown model": (
            "train.py",
            [*train, "--data-path", data, "--model", "DiT-Q/3"],
            ["unknown --model"],
        ),
        "vae offline": (
            "train.py",
            [*TINY, "--data-path", data, "--vae", "ema"],
            ["sd-vae-ft-ema", "--vae DIR"],
        ),
        "resume missing": (
            "train.py",
            [*train, "--data-path", data, "--resume", tmp / "x.pt"],
            ["does not exist", "x.pt"],
        ),
        "classes mismatch": (
            "sample.py",
            ["--ckpt", ckpt, "--num-classes", 5],
            ["number of classes is 3", "--num-classes"],
        ),
        "patch mismatch": (
            "sample.py",
            ["--ckpt", ckpt, "--model", "DiT-S/4"],
            ["patch size is 2", "--model"],
        ),
        "variant mismatch": (
            "sample.py",
            ["--ckpt", ckpt, "--model", "DiT-B/2"],
            ["depth (number of blocks) is 2"],
        ),
        "image mismatch": (
            "sample.py",
            ["--ckpt", ckpt, "--image-size", 32],
            ["image size is 16", "--image-size"],
        ),
        "bad class": ("sample.py", ["--ckpt", ckpt, "--class-labels", "zebra"], ["zebra", "cat"]),
        "not a checkpoint": (
            "sample.py",
            ["--ckpt", data / "cat" / "0.png"],
            ["cannot load checkpoint", "0.png", "not a PyTorch file"],
        ),
        "offline download": (
            "download.py",
            ["--dir", tmp / "pm", "--image-size", 256],
            ["dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt", "put it at"],
        ),
        **value_cases(train, data, ckpt),
        **objective_cases(train, data, ckpt, runs, tmp),
        "results dir is a file": ("train.py", [*train, "--data-path", data, "--results-dir", tmp / "file"],
                                  ["--results-dir", "is a file"]),
        "results dir under a file": ("train.py", [*train, "--data-path", data, "--results-dir", under_file],
                                     ["--results-dir", "under the file"]),
        "output dir is a file": ("sample.py", ["--ckpt", ckpt, "--output-dir", tmp / "file"],
                                 ["--output-dir", "is a file"]),
        "output dir under a file": ("sample.py", ["--ckpt", ckpt, "--output-dir", tmp / "file" / "s"],
                                    ["--output-dir", "under the file"]),
        "sample dir is a file": ("sample_ddp.py", ["--ckpt", ckpt, "--sample-dir", tmp / "file"],
                                 ["--sample-dir", "is a file"]),
        "npz is a folder": ("sample.py", ["--ckpt", ckpt, "--npz", tmp], ["--npz", "is a folder"]),
        "resume an ldm checkpoint": ("train.py", [*train, "--data-path", data, "--resume", tmp / "ldm.pt"],
                                     ["ldm.pt", "LDM checkpoint", "ldm/train.py", "not a DiT"]),
        "sample an ldm checkpoint": ("sample.py", ["--ckpt", tmp / "ldm.pt"],
                                     ["ldm.pt", "LDM checkpoint", "not a DiT"]),
        "sample an older ldm checkpoint": ("sample.py", ["--ckpt", tmp / "old-ldm.pt"],
                                           ["old-ldm.pt", "diffusers UNet config", "not a DiT"]),
    }  # fmt: skip


def objective_cases(train, data, ckpt, runs, tmp):
    """Objectives, samplers and --config that do not fit: one line before any model is loaded."""
    vp, ve, flow = (runs[name] / "checkpoints" / "0000004.pt" for name in ("vp", "ve", "flow"))
    train = [*train, "--data-path", data]
    return {
        "unknown objective": ("train.py", [*train, "--objective", "vpp"],
                              ["--objective", "invalid choice: 'vpp'"]),
        "beta on ddpm": ("train.py", [*train, "--beta-max", 5], ["beta_max", "not to ddpm"]),
        "rope head size": ("train.py", [*train, "--pos-embed", "rope", "--hidden-size", 36, "--num-heads", 6],
                           ["--pos-embed rope", "divisible by 4", "6"]),
        "resume another objective": ("train.py", ["--data-path", data, "--resume", runs["vp"], "--objective",
                                     "flow"], ["objective=vp", "--objective flow"]),
        "unknown config key": ("train.py", [*train, "--config", tmp / "bad.yaml"],
                               ["--config", "'objectiv' is not a flag"]),
        "ve with dpm++": ("sample.py", ["--ckpt", ve, "--sampler", "dpm++"], ["dpm++", "not ve"]),
        "flow with pc": ("sample.py", ["--ckpt", flow, "--sampler", "pc"], ["flow objective", "pc sampler"]),
        "ddim on a vp checkpoint": ("sample.py", ["--ckpt", vp, "--sampler", "ddim"],
                                    ["vp-objective", "not --sampler ddim"]),
        "euler on a ddpm checkpoint": ("sample.py", ["--ckpt", ckpt, "--sampler", "euler"],
                                       ["ddpm-objective", "--sampler euler"]),
        "likelihood on a ddpm checkpoint": ("sample.py", ["--ckpt", ckpt, "--likelihood", data],
                                            ["ddpm-objective", "--likelihood"]),
        "likelihood of unknown classes": ("sample.py", ["--ckpt", vp, "--likelihood", tmp / "broken"],
                                          ["--likelihood", "'a' is not one of the checkpoint's classes"]),
    }  # fmt: skip


def value_cases(train, data, ckpt):
    """Values rejected at parse time, before any data, model or VAE is loaded."""
    train_flags = {
        "--global-batch-size 0": "--global-batch-size", "--ckpt-every 0": "--ckpt-every",
        "--log-every 0": "--log-every", "--epochs 0": "--epochs", "--max-steps -3": "--max-steps",
        "--lr -1": "--lr", "--lr nan": "--lr", "--ema-decay 2": "--ema-decay", "--ema-decay 1": "--ema-decay",
        "--num-workers -1": "--num-workers", "--bit-depth 0": "--bit-depth", "--bit_depth 40": "--bit_depth",
        "--intensity_range 1 0": "LOW < HIGH", "--intensity-range 0 inf": "--intensity-range",
        "--val-fraction 1": "--val-fraction", "--image-size 0": "--image-size",
    }  # fmt: skip
    sample_flags = {
        "--cfg-scale nan": "--cfg-scale", "--cfg-scale inf": "--cfg-scale",
        "--num-sampling-steps 0": "--num-sampling-steps", "--num-sampling-steps 1001": "at most 1000",
        "--num-samples 0": "--num-samples", "--eta -1": "--eta", "--snr 0": "--snr",
        "--corrector-steps -1": "--corrector-steps",
    }  # fmt: skip
    cases = {f: ("train.py", [*train, "--data-path", data, *f.split()], [w]) for f, w in train_flags.items()}
    cases.update({f: ("sample.py", ["--ckpt", ckpt, *f.split()], [w]) for f, w in sample_flags.items()})
    return cases


@pytest.fixture(scope="module")
def outcomes(workspace, trained, objective_runs, tmp_path_factory):
    """Run every case at once (they are mostly start-up time) and collect (returncode, stderr)."""
    tmp = tmp_path_factory.mktemp("errors")
    os.makedirs(tmp / "empty")
    os.makedirs(tmp / "broken" / "a")
    png = (workspace / "data" / "cat" / "0.png").read_bytes()
    (tmp / "broken" / "a" / "bad.png").write_bytes(png[: len(png) // 2])
    (tmp / "file").write_text("a file where a folder is expected")
    (tmp / "bad.yaml").write_text("objectiv: vp\n")
    (tmp / "broken.yaml").write_text("objective: [vp\n")
    ldm_keys = [
        "format_version",
        "unet",
        "ema_unet",
        "class_embedder",
        "ema_class_embedder",
        "class_names",
        "scheduler_config",
        "optimizer",
        "lr_scheduler",
        "ema",
        "progress",
        "epoch",
        "global_step",
    ]
    ldm = {
        **dict.fromkeys(ldm_keys, {}),
        "config": {"vae_pretrained": "x"},
        "unet_config": {"sample_size": 8},
    }
    torch.save({"model_type": "ldm", **ldm}, tmp / "ldm.pt")  # the layout ldm/train.py writes
    torch.save(ldm, tmp / "old-ldm.pt")  # written before LDM checkpoints carried a model_type
    table = cases(workspace, trained, tmp, objective_runs)
    assert sorted(table) == sorted(ALL_CASES)

    def run(name):
        script, args, _ = table[name]
        done = run_script(script, *args, cwd=tmp, check=False)
        return done.returncode, done.stderr

    # A few at a time: each process loads torch, and dozens at once would exhaust the memory.
    with ThreadPoolExecutor(PARALLEL_CASES) as pool:
        results = dict(zip(table, pool.map(run, table), strict=True))
    return table, results, tmp


CASE_NAMES = [
    "missing data", "no class folders", "truncated image", "image size", "unknown model", "vae offline",
    "resume missing", "classes mismatch", "patch mismatch", "variant mismatch", "image mismatch", "bad class",
    "not a checkpoint", "offline download", "results dir is a file", "results dir under a file",
    "output dir is a file", "output dir under a file", "sample dir is a file", "npz is a folder",
    "resume an ldm checkpoint", "sample an ldm checkpoint", "sample an older ldm checkpoint",
]  # fmt: skip
OBJECTIVE_CASES = list(objective_cases([], "", "", dict.fromkeys(("vp", "ve", "flow"), Path()), Path()))
ALL_CASES = CASE_NAMES + OBJECTIVE_CASES + list(value_cases([], "", ""))


@pytest.mark.parametrize("name", ALL_CASES)
def test_bad_input_is_one_clear_line(outcomes, name):
    table, results, _ = outcomes
    returncode, stderr = results[name]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert returncode == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for word in table[name][2]:
        assert word in lines[0], (word, lines[0])


def test_failed_runs_leave_nothing_behind(outcomes):
    _, _, tmp = outcomes
    assert not os.path.exists(tmp / "results")  # no run folder for a run that never started
    assert not os.path.exists(tmp / "results-broken")  # the scan finds the truncated image first
    assert not os.path.exists(tmp / "pm" / "DiT-XL-2-256x256.pt")
