"""End-to-end training runs: files written, checkpoint contract, exact resume, best by validation."""

import signal
import subprocess
import sys

import pytest
import torch

from conftest import LDM_DIR, TEST_ENV, TRAIN_ARGS, run_script

CONTRACT_CONFIG_KEYS = {
    "image_size",
    "image_channels",
    "vae_pretrained",
    "latent_scale",
    "latent_channels",
    "vae_downsample",
    "cfg_dropout",
}


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def scalars(log_dir, tag):
    """Values of one TensorBoard scalar tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [event.value for event in events.Scalars(tag)]


def test_training_writes_every_file(trained_run):
    out, _ = trained_run
    names = {p.name for p in out.glob("*.pt")}
    assert names == {
        "checkpoint_latest.pt",
        "checkpoint_best.pt",
        "checkpoint_final.pt",
        "checkpoint_epoch_2.pt",
        "checkpoint_epoch_3.pt",
    }  # epoch 1 pruned by the limit of 2
    assert sorted(p.name for p in (out / "samples").iterdir()) == [f"epoch_{e:04d}.png" for e in (1, 2, 3)]
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/images_per_sec", "val/loss"):
        assert len(scalars(out / "logs", tag)) > 0, tag
    assert not list(out.glob(".*tmp*")), "temporary files left behind"
    # latest is written last, so a run killed while saving resumes and writes the others again
    others = [p.stat().st_mtime_ns for p in out.glob("checkpoint_*.pt") if p.name != "checkpoint_latest.pt"]
    assert (out / "checkpoint_latest.pt").stat().st_mtime_ns >= max(others)


def test_checkpoint_follows_the_contract(trained_run):
    from diffusers import UNet2DConditionModel

    ckpt = load(trained_run[0] / "checkpoint_final.pt")
    assert ckpt["model_type"] == "ldm" and ckpt["format_version"] == 1
    assert ckpt["class_names"] == ["cat", "dog"]
    assert CONTRACT_CONFIG_KEYS <= set(ckpt["config"])
    assert ckpt["config"]["image_channels"] == 3 and ckpt["config"]["vae_downsample"] == 2
    assert ckpt["config"]["latent_scale"] == pytest.approx(0.18215)  # read from the VAE config
    assert ckpt["intensity"] == {"kind": "integer", "bit_depth": 8} and ckpt["channels"] == 3
    unet = UNet2DConditionModel.from_config(ckpt["unet_config"])
    unet.load_state_dict(ckpt["ema_unet"])
    table = ckpt["class_embedder"]["embedding.weight"]
    assert table.shape == (3, unet.config.cross_attention_dim)  # two classes + the null class
    assert ckpt["ema_class_embedder"]["embedding.weight"].shape == table.shape
    assert ckpt["scheduler_config"]["num_train_timesteps"] == 1000
    assert not same_weights(ckpt["unet"], ckpt["ema_unet"])
    assert ckpt["global_step"] == 3 * 2 and ckpt["epoch"] == 3


def test_best_is_the_lowest_validation_loss(trained_run, rgb_data, tiny_vae):
    from dataset import ClassImageDataset, find_class_images, split_holdout
    from models import DDPMScheduler, LatentCodec, load_vae, model_from_checkpoint
    from train import encode_moments, validation_loss

    out, _ = trained_run
    history = load(out / "checkpoint_final.pt")["progress"]["val_history"]
    best = load(out / "checkpoint_best.pt")
    epochs, losses = zip(*history, strict=True)
    assert best["best_val_loss"] == min(losses)
    assert best["epoch"] == epochs[losses.index(min(losses))]
    # The stored figure is reproducible from the weights: fixed timesteps and fixed noise.
    _, samples = find_class_images(rgb_data)
    _, val = split_holdout(samples, 0.1, 0)
    codec = LatentCodec(load_vae(str(tiny_vae)), 3)
    val_set = ClassImageDataset(val, 16, 3, best["intensity"])
    latents = encode_moments(codec, val_set, 4, "cpu", False)[:, 0, 0]
    model = model_from_checkpoint(best, use_ema=True)
    total, count = validation_loss(
        model,
        DDPMScheduler.from_config(best["scheduler_config"]),
        latents,
        torch.tensor([label for _, label in val]),
        0,
        4,
        4,
    )
    assert (total / count).item() == pytest.approx(best["best_val_loss"], rel=1e-5)


def test_sigint_saves_latest_and_resume_matches(trained_run, tmp_path):
    out, args = trained_run
    stopped = tmp_path / "stopped"
    command = [sys.executable, str(LDM_DIR / "train.py"), "--output_dir", str(stopped), *map(str, args)]
    process = subprocess.Popen(
        command,
        cwd=LDM_DIR,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env={**TEST_ENV, "PATH": "/usr/bin:/bin"},
    )
    seen = b""
    while b"epoch 1/3" not in seen:  # the progress bar appears once the signal handler is in place
        chunk = process.stderr.read1(256)
        assert chunk, seen.decode(errors="replace")
        seen += chunk
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT
    latest = load(stopped / "checkpoint_latest.pt")
    assert 1 <= latest["global_step"] < 6
    assert not (stopped / "checkpoint_final.pt").exists()
    (stopped / ".checkpoint_best.pt.tmp-999").write_bytes(b"partial")  # as a kill -9 while saving leaves
    run_script("train.py", "--output_dir", stopped, *args, "--resume")
    assert not list(stopped.glob(".*tmp*"))
    a, b = load(out / "checkpoint_final.pt"), load(stopped / "checkpoint_final.pt")
    for key in ("unet", "ema_unet", "class_embedder", "ema_class_embedder"):
        assert same_weights(a[key], b[key]), key
    moments = [
        (a["optimizer"]["state"][k]["exp_avg"], b["optimizer"]["state"][k]["exp_avg"])
        for k in a["optimizer"]["state"]
    ]
    assert all(torch.equal(x, y) for x, y in moments)
    assert a["progress"]["val_history"] == b["progress"]["val_history"]


def test_cached_latents_match_uncached_loss_scale(gray_data, trained_vae, tmp_path):
    common = ["--data_root", gray_data, "--vae_pretrained", trained_vae, *TRAIN_ARGS, "--num_epochs", "2"]
    run_script("train.py", "--output_dir", tmp_path / "plain", *common)
    run_script("train.py", "--output_dir", tmp_path / "cached", *common, "--cache_latents")
    ckpt = load(tmp_path / "cached" / "checkpoint_final.pt")
    assert ckpt["config"]["image_channels"] == 1 and ckpt["config"]["cache_latents"]
    assert ckpt["intensity"] == {"kind": "integer", "bit_depth": 16}  # one scale for the 8- and 16-bit images
    assert ckpt["config"]["latent_scale"] != pytest.approx(0.18215)  # measured on the data by train_vae.py
    plain = sum(scalars(tmp_path / "plain" / "logs", "train/loss"))
    cached = sum(scalars(tmp_path / "cached" / "logs", "train/loss"))
    assert 0.5 < cached / plain < 2.0


def test_two_process_cpu_launch(rgb_data, tiny_vae, tmp_path):
    out = tmp_path / "ddp"
    args = ["--data_root", rgb_data, "--output_dir", out, "--vae_pretrained", tiny_vae, *TRAIN_ARGS]
    result = run_script("train.py", *args, "--num_epochs", "2", "--mixed_precision", "fp16", nproc=2)
    assert "processes 2" in result.stdout and "needs CUDA" in result.stderr  # fp16 fell back to fp32
    ckpt = load(out / "checkpoint_final.pt")
    assert len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])
    assert ckpt["global_step"] == 2  # 8 training images / (2 processes x 4) = 1 step per epoch
    assert len(ckpt["progress"]["val_history"]) == 2
