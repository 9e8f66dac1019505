"""End-to-end runs of the training and sampling scripts as a user types them."""

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import DDPM_DIR, TINY, make_class_folders, run_script, torchrun
from core import images

EXPECTED_KEYS = {
    "model",
    "ema",
    "ema_state",
    "optimizer",
    "lr_scheduler",
    "grad_scaler",
    "epoch",
    "step_in_epoch",
    "global_step",
    "rng",
    "generators",
    "best_metric",
    "class_names",
    "config",
    "model_config",
}


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_training_writes_complete_weights_only_checkpoints_grids_and_logs(trained_run):
    models = trained_run / "models" / "tiny"
    names = {p.name for p in models.iterdir()}
    assert {"ckpt.pt", "ema_ckpt.pt", "ckpt_epoch_0001.pt", "ckpt_best.pt", "ckpt_final.pt"} <= names
    ckpt = load(models / "ckpt.pt")
    assert EXPECTED_KEYS <= set(ckpt) and ckpt["global_step"] == 6 and ckpt["epoch"] == 2
    assert ckpt["class_names"] == ["class_0", "class_1", "class_2"] and ckpt["config"]["channels"] == 1
    assert np.isfinite(ckpt["best_metric"])
    ema = load(models / "ema_ckpt.pt")
    assert ema["weights"] == "ema" and all(torch.equal(ema["model"][k], ckpt["ema"][k]) for k in ckpt["ema"])
    assert (trained_run / "results" / "tiny" / "final.png").is_file()
    assert any((trained_run / "runs" / "tiny").glob("events.out.tfevents*"))


def test_seed_inference_snippet_works_as_written(tmp_path):
    data = make_class_folders(tmp_path / "rgb", classes=2, per_class=2, mode="RGB")
    flags = "--num-classes 2 --image-size 16 --max-steps 1 --val-split 0 --num-workers 0 --preview-steps 0"
    result = run_script("ddpm_conditional.py", "--dataset-path", data, *flags.split(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    snippet = f"""
import sys; sys.path.insert(0, {str(DDPM_DIR)!r})
import torch
from modules import UNet_conditional, count_parameters
from ddpm_conditional import Diffusion

device = "cpu"
img_size = 16
num_classes = 2

# Load model
model = UNet_conditional(num_classes=num_classes, img_size=img_size).to(device)
ckpt = torch.load("./models/DDPM_conditional/ckpt.pt", weights_only=False)
model.load_state_dict(ckpt)

# Sample
diffusion = Diffusion(img_size=img_size, device=device)
labels = torch.Tensor([0, 1, 0, 1]).long().to(device)
samples = diffusion.sample(model, n=4, labels=labels, cfg_scale=3, log_time=True, sampler="ddim", steps=5)
assert samples.dtype == torch.uint8 and samples.shape == (4, 3, 16, 16), samples.shape
assert torch.equal(model.state_dict()["label_emb.weight"], ckpt["model"]["label_emb.weight"])
print("params", count_parameters(model)["total"])
"""
    out = subprocess.run(
        [sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "4 images, 5 steps" in out.stdout


@pytest.mark.parametrize("objective", ["ddpm", "vp"])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, objective):
    data = make_class_folders(tmp_path / "data", classes=2, per_class=5)
    flags = "--num-classes 2 --batch-size 2 --epochs 5 --hflip --val-split 0.2 --save-interval 1"
    flags += f" --objective {objective}"
    common = [
        "--dataset-path",
        data,
        *flags.split(),
        "--lr-warmup-steps",
        "2",
        "--ema-warmup-steps",
        "1",
        *TINY,
    ]
    straight = run_script("ddpm_conditional.py", *common, "--run-name", "a", "--max-steps", "6", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    first = run_script("ddpm_conditional.py", *common, "--run-name", "b", "--max-steps", "3", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert load(tmp_path / "models/b/ckpt.pt")["step_in_epoch"] == 3  # stopped in the middle of an epoch
    resumed = run_script(
        "ddpm_conditional.py", *common, "--run-name", "b", "--max-steps", "6", "--resume", cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr
    a, b = load(tmp_path / "models/a/ckpt.pt"), load(tmp_path / "models/b/ckpt.pt")
    assert a["global_step"] == b["global_step"] == 6
    for part in ("model", "ema"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    assert torch.equal(a["generators"][0], b["generators"][0])


def test_sigint_saves_latest_and_exits_nonzero_then_resumes(tmp_path, gray_data):
    cmd = [sys.executable, str(DDPM_DIR / "ddpm_conditional.py"), "--dataset-path", str(gray_data), *TINY]
    cmd += "--num-classes 3 --epochs 10000 --batch-size 2 --val-split 0".split()
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    head = [proc.stdout.readline() for _ in range(5)]  # the parameter table, then the run's description
    assert "training on" in head[-1], head
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err
    ckpt = load(tmp_path / "models/DDPM_conditional/ckpt.pt")
    assert ckpt["global_step"] > 0
    steps = str(ckpt["global_step"] + 2)
    resumed = run_script(
        "ddpm_conditional.py", "--resume", "--dataset-path", gray_data, "--max-steps", steps, cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr
    assert load(tmp_path / "models/DDPM_conditional/ckpt.pt")["global_step"] == ckpt["global_step"] + 2


def test_non_finite_loss_stops_with_a_clear_message(tmp_path, gray_data):
    flags = "--num-classes 3 --lr 1e20 --lr-warmup-steps 0 --grad-clip 0 --epochs 50 --batch-size 4"
    result = run_script(
        "ddpm_conditional.py", "--dataset-path", gray_data, *flags.split(), *TINY, cwd=tmp_path
    )
    assert result.returncode == 1
    assert "loss became" in result.stderr and "Traceback" not in result.stderr


def test_unconditional_training_and_sampling(tmp_path):
    data = make_class_folders(tmp_path / "flat", classes=1, per_class=4, mode="RGB")
    result = run_script(
        "ddpm.py", "--dataset-path", data, "--epochs", "1", "--batch-size", "2", *TINY, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    ckpt = tmp_path / "models/DDPM_Uncondtional/ema_ckpt.pt"
    flags = "--mode sample --num-samples 3 --sampler ddim --steps 3".split()
    sampled = run_script(
        "ddpm_conditional_ddp.py", *flags, "--ckpt", ckpt, "--output-dir", tmp_path / "out", cwd=tmp_path
    )
    assert sampled.returncode == 0, sampled.stderr
    assert "unconditional" in sampled.stdout and "cfg_scale" not in sampled.stdout  # no labels to guide with
    files = sorted((tmp_path / "out").glob("*.png"))
    assert [f.name for f in files] == ["000000.png", "000001.png", "000002.png"]
    assert np.asarray(__import__("PIL.Image").Image.open(files[0])).shape == (16, 16, 3)


def test_sample_writes_balanced_class_folders_npz_and_grid(tmp_path, trained_run):
    ckpt = trained_run / "models/tiny/ckpt.pt"
    args = [
        "--mode",
        "sample",
        "--ckpt",
        ckpt,
        "--output-dir",
        tmp_path / "s",
        "--grid-path",
        tmp_path / "g.png",
    ]
    args += (
        "--use-ema --num-samples 5 --class-labels 0 class_2 --cfg-scale 3 --sampler ddim --steps 4".split()
    )
    args += ["--npz"]
    result = run_script("ddpm_conditional_ddp.py", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "s/image" in result.stdout and "ms/step" in result.stdout and "images/s" in result.stdout
    assert sorted(p.name for p in (tmp_path / "s/class_0").iterdir()) == [
        "000000.png",
        "000001.png",
        "000002.png",
    ]
    assert sorted(p.name for p in (tmp_path / "s/class_2").iterdir()) == ["000000.png", "000001.png"]
    npz = np.load(tmp_path / "s.npz")
    # Grayscale samples go into the .npz as RGB, as the ADM evaluator needs.
    assert npz["arr_0"].shape == (5, 16, 16, 3) and npz["arr_0"].dtype == np.uint8
    assert (npz["arr_0"] == npz["arr_0"][..., :1]).all()
    assert npz["arr_1"].tolist() == [0, 2, 0, 2, 0]
    assert npz["class_names"].tolist() == ["class_0", "class_1", "class_2"]  # label i is class_names[i]
    assert (tmp_path / "g.png").is_file()


def test_two_process_train_ddp_and_sample_ddp_with_gloo(tmp_path, gray_data):
    flags = "--mode train_ddp --batch-size 2 --val-split 0.2 --save-interval 1".split()
    train = ["ddpm_conditional_ddp.py", *flags, "--dataset-path", gray_data, *TINY]
    first = torchrun(*train, "--epochs", "1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    ckpt = load(tmp_path / "models/DDPM_conditional/ckpt.pt")
    assert len(ckpt["generators"]) == 2 and ckpt["global_step"] == 3  # 10 images / 2 ranks / batch 2
    resumed = torchrun(*train, "--epochs", "2", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert load(tmp_path / "models/DDPM_conditional/ckpt.pt")["global_step"] == 6
    sample = ["ddpm_conditional_ddp.py", "--mode", "sample_ddp", "--ckpt", "models/DDPM_conditional/ckpt.pt"]
    sample += (
        "--use-ema --num-classes 3 --batch-size 2 --sampler ddim --steps 3 --output-dir samples --npz".split()
    )
    out = torchrun(*sample, "--num-samples", "7", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert len(list((tmp_path / "samples").rglob("*.png"))) == 7
    more = torchrun(*sample, "--num-samples", "10", cwd=tmp_path)
    assert more.returncode == 0, more.stderr
    assert "(3 new, 7 already there)" in more.stdout
    counts = sorted(len(list(d.iterdir())) for d in (tmp_path / "samples").iterdir())
    assert counts == [3, 3, 4] and np.load(tmp_path / "samples.npz")["arr_0"].shape[0] == 10


def test_example_scripts_train_and_sample(tmp_path, gray_data):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHON": sys.executable,
        "DATASET_PATH": str(gray_data),
        "WORKDIR": str(tmp_path),
        "IMAGE_SIZE": "16",
        "EPOCHS": "1",
        "BATCH_SIZE": "4",
        "EXTRA_ARGS": "--base-channels 8 --time-dim 32 --num-workers 0 --preview-steps 2",
    }
    trained = subprocess.run(
        ["bash", str(DDPM_DIR / "scripts/train.sh")], env=env, capture_output=True, text=True
    )
    assert trained.returncode == 0, trained.stderr
    env.update(
        CKPT=str(tmp_path / "models/DDPM_conditional/ckpt.pt"),
        OUTPUT_DIR=str(tmp_path / "out"),
        NUM_SAMPLES="3",
        STEPS="2",
        EXTRA_ARGS="",
    )
    sampled = subprocess.run(
        ["bash", str(DDPM_DIR / "scripts/sample.sh")], env=env, capture_output=True, text=True
    )
    assert sampled.returncode == 0, sampled.stderr
    assert len(list((tmp_path / "out").rglob("*.png"))) == 3 and (tmp_path / "out.npz").is_file()


def test_sampling_uses_the_ema_weights_unless_raw_ones_are_asked_for(tmp_path, trained_run):
    from ddpm_conditional_ddp import build_parser, load_sampling_model, parse_flags

    ckpt = load(trained_run / "models/tiny/ckpt.pt")
    ckpt["ema"] = {k: v + 1 for k, v in ckpt["ema"].items()}  # so that the two sets of weights differ
    torch.save(ckpt, tmp_path / "ckpt.pt")
    parser = build_parser()
    for flags, expected in (
        ([], "ema"),
        (["--use-ema"], "ema"),
        (["--use-ema", "true"], "ema"),
        (["--no-ema"], "model"),
        (["--use-ema", "false"], "model"),
    ):
        argv = ["--mode", "sample", "--ckpt", str(tmp_path / "ckpt.pt"), *flags]
        model, *_, which, _sampler = load_sampling_model(parse_flags(parser, argv), set())
        assert which == ("EMA weights" if expected == "ema" else "raw weights"), flags
        for key, value in model.state_dict().items():
            assert torch.equal(value, ckpt[expected][key]), (flags, key)


def test_checkpoints_are_saved_latest_last_and_stale_temporaries_removed(tmp_path, trained_run, gray_data):
    models = tmp_path / "models/tiny"
    shutil.copytree(trained_run / "models/tiny", models)
    stale = [models / ".ckpt.pt.tmp-99999", tmp_path / "results/tiny/.final.png.tmp-99999"]
    stale[1].parent.mkdir(parents=True)
    for path in stale:
        path.write_bytes(b"half a file from a killed run")
    flags = "--resume --run-name tiny --epochs 3 --max-steps 7 --num-workers 0".split()
    resumed = run_script("ddpm_conditional.py", *flags, "--dataset-path", gray_data, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert not any(path.exists() for path in stale)
    assert load(models / "ckpt_final.pt")["global_step"] == load(models / "ckpt.pt")["global_step"] == 7
    # ckpt.pt, the resume file, is written last: a kill before it leaves the old one, and resuming redoes all.
    latest = (models / "ckpt.pt").stat().st_mtime_ns
    assert all(latest >= (models / name).stat().st_mtime_ns for name in ("ckpt_final.pt", "ema_ckpt.pt"))


def test_sampling_redoes_a_truncated_image_and_removes_stale_temporaries(tmp_path, trained_run):
    out = tmp_path / "s"
    args = ["--mode", "sample", "--ckpt", trained_run / "models/tiny/ckpt.pt", "--num-samples", "2"]
    args += ["--class-labels", "0", "--sampler", "ddim", "--steps", "2", "--output-dir", out]
    first = run_script("ddpm_conditional_ddp.py", *args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    truncated, kept = out / "class_0/000000.png", out / "class_0/000001.png"
    truncated.write_bytes(truncated.read_bytes()[:60])
    stale = out / "class_0/.000002.png.tmp-99999"
    stale.write_bytes(b"half a file")
    before = kept.read_bytes()
    second = run_script("ddpm_conditional_ddp.py", *args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "(1 new, 1 already there)" in second.stdout
    assert images.is_readable_image(truncated) and kept.read_bytes() == before and not stale.exists()
