"""train.py end to end as subprocesses: outputs, frozen/trained UNet, resume, signals, 2 processes."""

import argparse
import signal
import subprocess
import time

import numpy as np
import torch
from PIL import Image

import train
from conftest import ENV, FLOAT_RANGE, HERE, IMAGE_SIZE, PYTHON, check, infer, load, run_script, train_args
from core import images
from models import load_controlled_unet, load_ldm

WEIGHT_KEYS = ("controlnet", "ema_controlnet")


def assert_same_weights(a, b, keys=WEIGHT_KEYS):
    """Bit-for-bit equality of the named state_dicts of two checkpoints."""
    for key in keys:
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"


def test_run_writes_complete_checkpoints_samples_and_logs(trained_run):
    out, result = trained_run
    for name in ("best", "final", "latest", "epoch_2"):
        assert (out / f"checkpoint_{name}.pt").is_file()
    assert not (out / "checkpoint_epoch_1.pt").exists()  # --checkpoints_total_limit 1
    ckpt = load(out / "checkpoint_final.pt")
    assert ckpt["model_type"] == "controlnet" and ckpt["epoch"] == 2 and ckpt["global_step"] == 6
    assert ckpt["unet"] is None and ckpt["ema_unet"] is None  # frozen UNet: the LDM's weights are used
    assert ckpt["config"]["mask_max_value"] == 255 and ckpt["config"]["image_channels"] == 1
    assert len(ckpt["rng"]) == 1 and ckpt["optimizer"]["state"] and ckpt["best_val_loss"] < float("inf")
    moved = [n for n, w in ckpt["controlnet"].items() if not torch.equal(w, ckpt["ema_controlnet"][n])]
    assert moved, "EMA equals the raw weights: EMA or training did not run"
    assert "Paired 8 images" in result.stdout and "ControlNet" in result.stdout and "frozen" in result.stdout
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["epoch_0001.png", "epoch_0002.png"]
    assert list((out / "logs").glob("events.out.tfevents.*"))


def test_unfrozen_unet_is_trained_saved_and_used(training_runs, ldm_checkpoint):
    out, result = training_runs["unfrozen"]
    check(result)
    ckpt = load(out / "checkpoint_final.pt")
    ldm = load_ldm(ldm_checkpoint)
    original = {k: v.clone() for k, v in ldm.unet.state_dict().items()}
    assert any(not torch.equal(ckpt["unet"][k], original[k]) for k in original)
    assert any(not torch.equal(ckpt["ema_unet"][k], original[k]) for k in original)
    model = load_controlled_unet(ckpt, ldm)  # what inference.py builds
    for name, weight in model.unet.state_dict().items():
        assert torch.equal(weight, ckpt["ema_unet"][name])


def test_sigterm_saves_latest_and_resume_matches_uninterrupted(
    tmp_path, trained_run, pair_data, ldm_checkpoint
):
    out = tmp_path / "run"
    args = train_args(pair_data, ldm_checkpoint, out)
    proc = subprocess.Popen(
        [PYTHON, str(HERE / "train.py"), *map(str, args)],
        cwd=HERE,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    while not (out / "logs").exists() and proc.poll() is None:
        time.sleep(0.01)  # the log folder appears just before the first step, after the handlers are set
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stdout + stderr
    assert "stopped by signal" in stdout
    interrupted = load(out / "checkpoint_latest.pt")
    assert interrupted["global_step"] < 6 and not (out / "checkpoint_final.pt").exists()
    stale = [out / ".checkpoint_best.pt.tmp-999999", out / "samples" / ".epoch_0001.png.tmp-999999"]
    for path in stale:  # what a kill -9 in the middle of a save leaves
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"partial")
    check(run_script("train.py", *args, "--resume", "latest"))
    assert not any(path.exists() for path in stale)
    assert_same_weights(load(out / "checkpoint_final.pt"), load(trained_run[0] / "checkpoint_final.pt"))


def test_two_process_cpu_launch(tmp_path, pair_data, ldm_checkpoint):
    out = tmp_path / "run"
    cmd = [
        PYTHON,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "train.py",
        *map(str, train_args(pair_data, ldm_checkpoint, out, "--num_epochs", 1)),
    ]
    result = subprocess.run(cmd, cwd=HERE, env=ENV, capture_output=True, text=True, timeout=300)
    check(result)
    ckpt = load(out / "checkpoint_final.pt")
    assert len(ckpt["rng"]) == 2 and ckpt["global_step"] == 2  # 6 pairs, 2 processes x batch 2
    assert result.stdout.count("Paired 8 images") == 1  # only rank 0 reports


def test_class_conditioned_training_and_inference(tmp_path, training_runs, class_data):
    out, result = training_runs["class"]
    check(result)
    ckpt = load(out / "checkpoint_final.pt")
    assert ckpt["config"]["use_class_labels"] and ckpt["class_names"] == ["benign", "malignant"]
    assert ckpt["config"]["mask_max_value"] == 2  # 0/1/2 label maps are scaled by 1/2
    assert "Paired 3 images" in result.stdout and result.stdout.count("Paired") == 2
    assert "training in fp32 on CPU" in result.stderr  # the seed's --mixed_precision fp16 still runs
    gen = tmp_path / "gen"
    mask = class_data / "malignant" / "masks" / "001.png"
    flags = "--class_name malignant --cfg_scale 2 --scheduler dpm++ --controlnet_scale 1.5 --num_images 2 "
    flags += "--num_inference_steps 3 --save_comparison"
    result = check(infer(out / "checkpoint_final.pt", "--mask", mask, *flags.split(), "--output_dir", gen))
    assert sorted(p.name for p in (gen / "malignant").iterdir()) == ["001_000.png", "001_001.png"]
    comparison = Image.open(tmp_path / "gen_comparison" / "malignant" / "001.png")
    assert comparison.size == (3 * IMAGE_SIZE, IMAGE_SIZE)
    assert set(np.unique(np.asarray(comparison)[:, :IMAGE_SIZE])) == {0, 128, 255}  # the mask, full contrast
    assert "timing: 2 images, 3 steps" in result.stdout


def test_non_finite_loss_stops_without_checkpoint(training_runs):
    out, result = training_runs["nan"]
    assert result.returncode == 1 and "loss became non-finite at step 0" in result.stderr
    assert not (out / "checkpoint_latest.pt").exists()


def test_latest_is_saved_after_best_and_periodic():
    args = argparse.Namespace(save_every=1, num_epochs=3)
    assert train.epoch_checkpoints(1, True, args) == [
        "checkpoint_best.pt",
        "checkpoint_epoch_1.pt",
        "checkpoint_latest.pt",
    ]
    assert train.epoch_checkpoints(2, False, argparse.Namespace(save_every=5, num_epochs=3)) == [
        "checkpoint_latest.pt"
    ]


def test_deep_gray_data_trains_and_samples_at_its_depth(tmp_path, training_runs, deep_data):
    out, result = training_runs["deep"]
    check(result)
    twelve_bit = {"kind": "integer", "bit_depth": 12}
    assert load(out / "checkpoint_final.pt")["intensity"] == twelve_bit
    assert "images: 12-bit integer images, values / 4095" in result.stdout
    # the tiny LDM learned 8-bit images: one line says so
    assert result.stderr.count("warning: the LDM was trained on 8-bit integer images") == 1
    gen = tmp_path / "gen"
    flags = "--num_images 1 --num_inference_steps 2 --eval_masks".split()
    mask = deep_data / "masks" / "001.png"
    result = check(infer(out / "checkpoint_final.pt", "--mask", mask, *flags, "--output_dir", gen))
    written = gen / "001_000.png"
    assert Image.open(written).mode == "I;16" and images.scan([written])["intensity"] == twelve_bit
    assert "mask faithfulness over 1 images" in result.stdout


def test_float_data_trains_and_samples_as_float(tmp_path, training_runs, float_data):
    out, result = training_runs["float"]
    check(result)
    assert load(out / "checkpoint_final.pt")["intensity"] == {"kind": "float", "range": list(FLOAT_RANGE)}
    gen = tmp_path / "gen"
    mask = float_data / "masks" / "002.png"
    flags = "--num_images 2 --num_inference_steps 2".split()
    check(infer(out / "checkpoint_final.pt", "--mask", mask, *flags, "--output_dir", gen))
    written = sorted(gen.iterdir())
    assert [p.name for p in written] == ["002_000.tif", "002_001.tif"]
    values = np.asarray(Image.open(written[0]))
    assert (
        Image.open(written[0]).mode == "F"
        and FLOAT_RANGE[0] <= values.min() <= values.max() <= FLOAT_RANGE[1]
    )
