"""Bad input ends with one clear line on stderr and exit code 2; the cases run as parallel subprocesses."""

import os
import subprocess

import pytest

from conftest import ENV, TINY, script_command


def cases(workspace, trained, tmp):
    """name -> (script, arguments, words the error line must contain)."""
    data, vae, ckpt = workspace / "data", workspace / "vae", trained / "checkpoints" / "0000005.pt"
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
            ["not found", "x.pt"],
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
            ["cannot read checkpoint", "0.png"],
        ),
        "offline download": (
            "download.py",
            ["--dir", tmp / "pm", "--image-size", 256],
            ["dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt", "put it at"],
        ),
    }


@pytest.fixture(scope="module")
def outcomes(workspace, trained, tmp_path_factory):
    """Run every case at once (they are mostly start-up time) and collect (returncode, stderr)."""
    tmp = tmp_path_factory.mktemp("errors")
    os.makedirs(tmp / "empty")
    os.makedirs(tmp / "broken" / "a")
    png = (workspace / "data" / "cat" / "0.png").read_bytes()
    (tmp / "broken" / "a" / "bad.png").write_bytes(png[: len(png) // 2])
    table = cases(workspace, trained, tmp)
    assert sorted(table) == sorted(CASE_NAMES)
    processes = {
        name: subprocess.Popen(script_command(script, *args), env=ENV, cwd=tmp, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        for name, (script, args, _) in table.items()
    }  # fmt: skip
    stderr = {name: p.communicate(timeout=300)[1] for name, p in processes.items()}
    results = {name: (p.returncode, stderr[name]) for name, p in processes.items()}
    return table, results, tmp


CASE_NAMES = [
    "missing data", "no class folders", "truncated image", "image size", "unknown model", "vae offline",
    "resume missing", "classes mismatch", "patch mismatch", "variant mismatch", "image mismatch", "bad class",
    "not a checkpoint", "offline download",
]  # fmt: skip


@pytest.mark.parametrize("name", CASE_NAMES)
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
    assert not os.path.exists(tmp / "pm" / "DiT-XL-2-256x256.pt")
