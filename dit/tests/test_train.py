"""train.py end to end: checkpoints, resume equivalence, 2-process gloo run, signals."""

import logging
import os
import shutil
import signal
import subprocess

import torch
from PIL import Image

from conftest import ENV, TINY, run_script, script_command
from core.files import TEMP_MARK


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_training_run_layout_and_checkpoint_contents(trained):
    checkpoints = sorted(os.listdir(trained / "checkpoints"))
    assert checkpoints == ["0000002.pt", "0000004.pt", "0000005.pt", "best.pt"]  # every 2 steps, end, best
    ckpt = load(trained / "checkpoints" / "0000005.pt")
    assert {"model", "ema", "opt", "args", "config", "train_steps", "epoch", "rng"} <= ckpt.keys()
    assert isinstance(ckpt["args"], dict) and ckpt["args"]["global_batch_size"] == 4
    config = ckpt["config"]
    assert config["class_names"] == ["cat", "dog", "eel"] and ckpt["model_type"] == "dit"
    # The data mixes 8-bit colour with 16-bit gray: one rule for the whole set, stored with the weights.
    assert ckpt["channels"] == 3 and ckpt["intensity"] == {"kind": "integer", "bit_depth": 16}
    assert (config["depth"], config["hidden_size"], config["input_size"], config["num_classes"]) == (
        2,
        32,
        8,
        3,
    )
    assert ckpt["train_steps"] == 5 and ckpt["epoch"] == 2  # 11 training images, batch 4: 2 steps per epoch
    assert 0 < ckpt["best_val_loss"] < 10 and "Held-out loss" in (trained / "log.txt").read_text()
    # best.pt is written before the numbered file that --resume picks, so a kill between them is repaired.
    best = trained / "checkpoints" / "best.pt"
    same_step = trained / "checkpoints" / f"{load(best)['train_steps']:07d}.pt"
    assert best.stat().st_mtime_ns <= same_step.stat().st_mtime_ns
    assert ckpt["model"].keys() == ckpt["ema"].keys()
    # Training moved the weights, and the EMA (decay 0.9999) trails far behind them.
    first = load(trained / "checkpoints" / "0000002.pt")
    weight = "final_layer.linear.weight"
    assert not torch.equal(first["model"][weight], ckpt["model"][weight])
    assert ckpt["ema"][weight].abs().max() < ckpt["model"][weight].abs().max()
    log = (trained / "log.txt").read_text()
    assert "Train Loss" in log and "Saved checkpoint" in log
    assert any(f.startswith("events.") for f in os.listdir(trained / "tensorboard"))
    assert os.path.isfile(trained / "samples" / "0000004.png")  # EMA sample grid


def test_resume_gives_identical_weights(trained, workspace, tmp_path):
    """Resume from step 2 and reach step 5 (mid-epoch): model, EMA, optimizer and held-out loss match."""
    run_dir = tmp_path / "results" / "000-DiT-S-2"
    os.makedirs(run_dir / "checkpoints")
    shutil.copy(trained / "checkpoints" / "0000002.pt", run_dir / "checkpoints")
    stale = run_dir / "checkpoints" / f".0000004.pt{TEMP_MARK}999"  # a run killed while saving left it
    stale.write_bytes(b"half a checkpoint")
    flags = "--max-steps 5 --ckpt-every 2 --num-workers 0 --sample-every 0"
    run_script("train.py", "--data-path", workspace / "data", "--resume", run_dir, *flags.split())
    resumed = load(run_dir / "checkpoints" / "0000005.pt")
    straight = load(trained / "checkpoints" / "0000005.pt")
    for key in ("model", "ema"):
        assert all(torch.equal(resumed[key][k], straight[key][k]) for k in straight[key])
    for a, b in zip(resumed["opt"]["state"].values(), straight["opt"]["state"].values(), strict=True):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert resumed["best_val_loss"] == straight["best_val_loss"]
    assert {"0000002.pt", "0000004.pt", "0000005.pt"} <= set(os.listdir(run_dir / "checkpoints"))
    assert not stale.exists()


def test_two_process_gloo_run_with_cached_latents(workspace, tmp_path):
    flags = (
        "--global-batch-size 4 --max-steps 3 --ckpt-every 100 --log-every 1 --num-workers 0 --cache-latents"
    )
    paths = ["--data-path", workspace / "data", "--results-dir", tmp_path, "--vae", workspace / "vae"]
    result = run_script("train.py", *TINY, *flags.split(), "--sample-every", 0, *paths, nproc=2)
    run_dir = tmp_path / "000-DiT-S-2"
    ckpt = load(run_dir / "checkpoints" / "0000003.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    # Each rank scanned half of the files; the merged rule is the whole set's, warned about once.
    assert ckpt["intensity"] == {"kind": "integer", "bit_depth": 16} and ckpt["channels"] == 3
    assert result.stderr.count("mixes 8-bit and wider images") == 1
    assert not torch.equal(ckpt["rng"][0]["generator"], ckpt["rng"][1]["generator"])  # one stream per rank
    (cache_file,) = run_dir.glob("latents-14-*.pt")  # named by the image count and a key of the files
    cache = load(cache_file)
    assert cache["mean"].shape == (14, 2, 4, 8, 8)  # both flips of every image
    assert torch.allclose(cache["label"].bincount(), torch.tensor([5, 5, 4]))
    assert result.stdout.count("Train Loss") == 3  # rank 0 logs the loss averaged over ranks


def test_sigterm_finishes_the_step_saves_and_exits_nonzero(workspace, tmp_path):
    flags = "--global-batch-size 2 --epochs 10000 --num-workers 0 --sample-every 0 --log-every 1"
    command = script_command("train.py", *TINY, *flags.split(), "--data-path", workspace / "data",
                             "--results-dir", tmp_path, "--vae", workspace / "vae")  # fmt: skip
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if "(step=0000003)" in line:
            break
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 128 + signal.SIGTERM, output
    saved = sorted(os.listdir(tmp_path / "000-DiT-S-2" / "checkpoints"))
    assert len(saved) == 1 and int(saved[0][:7]) >= 3
    assert "Stopped by signal" in output


def test_editing_an_image_invalidates_the_latent_cache(workspace, tmp_path):
    """The cache is keyed on the files (names, sizes, mtimes), image size, rule and VAE, not on the count."""
    from core.training import make_accelerator
    from dataset import ImageFolderDataset
    from train import cache_latents, latent_cache_path
    from utils import load_vae

    shutil.copytree(workspace / "data", tmp_path / "data")
    accelerator, logger = make_accelerator("no", device="cpu"), logging.getLogger("test-cache")
    vae = load_vae(str(workspace / "vae"), accelerator.device)
    config = {"vae": str(workspace / "vae"), "image_size": 16, "latent_scale": 0.18215}
    dataset = ImageFolderDataset(tmp_path / "data", 16)
    dataset.intensity = dataset.scan()["intensity"]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    before = cache_latents(dataset, vae, config, run_dir, accelerator, logger).tensors[0]
    first = latent_cache_path(dataset, vae, config, run_dir)
    assert latent_cache_path(dataset, vae, config, run_dir) == first  # nothing changed: reused
    for changed in ({"image_size": 8}, {"vae": "mse"}):
        assert latent_cache_path(dataset, vae, {**config, **changed}, run_dir) != first
    dataset.intensity = {"kind": "integer", "bit_depth": 12}
    assert latent_cache_path(dataset, vae, config, run_dir) != first
    dataset.intensity = {"kind": "integer", "bit_depth": 16}
    edited = tmp_path / "data" / "cat" / "1.png"
    index = [path for path, _ in dataset.samples].index(str(edited))
    Image.new("RGB", (20, 18), (255, 255, 255)).save(edited)  # same image count, new pixels
    os.utime(edited, ns=(edited.stat().st_atime_ns, edited.stat().st_mtime_ns + 10**9))  # coarse clocks
    after = cache_latents(dataset, vae, config, run_dir, accelerator, logger).tensors[0]
    assert latent_cache_path(dataset, vae, config, run_dir) != first
    assert sorted(os.listdir(run_dir)) == [os.path.basename(latent_cache_path(dataset, vae, config, run_dir))]
    assert not torch.allclose(after[index], before[index])
    assert all(torch.equal(after[i], before[i]) for i in range(len(dataset)) if i != index)
