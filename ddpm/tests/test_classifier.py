"""Classifier guidance: the noisy-image classifier's training (train_classifier.py) and guided sampling."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from classifier import CLASSIFIER_FORMAT, EncoderClassifier, log_prob_gradient
from conftest import CLASSIFIER_TINY, DDPM_DIR, run_script, torchrun
from core.testing import LinearClassifier, closed_form_gradient, linear_betas_alpha_bar
from diffusion import Diffusion

SAMPLE = ("ddpm_conditional_ddp.py", *"--mode sample --num-samples 6 --batch-size 3".split())


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture
def guidance_case():
    torch.manual_seed(0)
    weight = torch.randn(3, 1 * 8 * 8)
    x, eps = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    return LinearClassifier(weight), weight, x, eps, torch.tensor([0, 1, 2, 1])


def test_log_prob_gradient_is_the_closed_form(guidance_case):
    classifier, weight, x, _, y = guidance_case
    grad = log_prob_gradient(classifier, x, torch.zeros(4, dtype=torch.long), y)
    torch.testing.assert_close(grad, closed_form_gradient(weight, x, y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("steps", [None, 10])  # every training step, and strided DDPM steps
def test_guided_ddpm_mean_is_the_mean_plus_scale_sigma_gradient(guidance_case, steps):
    classifier, weight, x, eps, y = guidance_case
    diffusion, scale = Diffusion(img_size=8, device="cpu"), 2.5
    scheduler = diffusion.make_sampler("ddpm", steps)
    betas, alpha_bar = linear_betas_alpha_bar()
    stride = 1000 // (steps or 1000)
    for t in (scheduler.timesteps[0], scheduler.timesteps[len(scheduler.timesteps) // 2]):
        grad = log_prob_gradient(classifier, x, t.expand(4), y)
        # The same generator state on both sides: the noise cancels, leaving the shift of the mean.
        plain = diffusion.guided_step(scheduler, eps, t, x, None, scale, torch.Generator().manual_seed(1))
        guided = diffusion.guided_step(scheduler, eps, t, x, grad, scale, torch.Generator().manual_seed(1))
        # Sigma of the step t -> t - stride: (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev).
        prev = alpha_bar[int(t) - stride]
        sigma = (1 - prev) / (1 - alpha_bar[int(t)]) * (1 - alpha_bar[int(t)] / prev)
        if steps is None:  # with every step this is the textbook beta_t (1 - abar_{t-1}) / (1 - abar_t)
            assert sigma == pytest.approx(betas[int(t)] * (1 - prev) / (1 - alpha_bar[int(t)]))
        expected = scale * sigma * closed_form_gradient(weight, x, y)
        torch.testing.assert_close(guided - plain, expected.float(), rtol=1e-4, atol=1e-6)
    # The last step adds no noise, so its variance, and with it the shift, is zero (as in ADM).
    last = scheduler.timesteps[-1]
    grad = log_prob_gradient(classifier, x, last.expand(4), y)
    torch.testing.assert_close(
        diffusion.guided_step(scheduler, eps, last, x, grad, scale),
        diffusion.guided_step(scheduler, eps, last, x, None, scale),
    )


def test_guided_ddim_corrects_the_noise_as_condition_score(guidance_case):
    classifier, weight, x, eps, y = guidance_case
    diffusion, scale = Diffusion(img_size=8, device="cpu"), 3.0
    scheduler = diffusion.make_sampler("ddim", 5)
    _, alpha_bar = linear_betas_alpha_bar()
    t = scheduler.timesteps[1]
    grad = log_prob_gradient(classifier, x, t.expand(4), y)
    corrected = eps - np.sqrt(1 - alpha_bar[int(t)]) * scale * closed_form_gradient(weight, x, y)
    expected = scheduler.step(corrected.float(), t, x).prev_sample
    torch.testing.assert_close(diffusion.guided_step(scheduler, eps, t, x, grad, scale), expected)


def test_encoder_classifier_shapes_and_depth():
    shallow = EncoderClassifier(c_in=1, img_size=16, base_channels=8, time_dim=32, depth=1, num_classes=5)
    deep = EncoderClassifier(c_in=1, img_size=16, base_channels=8, time_dim=32, depth=3, num_classes=5)
    logits = deep(torch.randn(2, 1, 16, 16), torch.tensor([0, 999]))
    assert logits.shape == (2, 5)
    assert sum(p.numel() for p in deep.parameters()) > sum(p.numel() for p in shallow.parameters())
    assert EncoderClassifier(**deep.config).config == deep.config


def test_training_writes_weights_only_checkpoints_and_heldout_accuracy(classifier_run):
    names = {p.name for p in classifier_run.iterdir()}
    assert {"ckpt.pt", "ema_ckpt.pt", "ckpt_epoch_0001.pt", "ckpt_best.pt", "ckpt_final.pt"} <= names
    ckpt = load(classifier_run / "ckpt.pt")
    assert ckpt["format"] == CLASSIFIER_FORMAT and ckpt["global_step"] == 6
    assert {"model", "ema", "optimizer", "lr_scheduler", "rng", "generators"} <= set(ckpt)
    # The schedule, size and channels are those of the DDPM it was given.
    assert ckpt["config"]["image_size"] == 16 and ckpt["config"]["channels"] == 1
    assert ckpt["config"]["noise_steps"] == 1000 and ckpt["class_names"] == ["class_0", "class_1", "class_2"]
    assert sorted(int(t) for t in ckpt["heldout_accuracy"]) == [0, 100, 250, 500, 749, 999]
    ema = load(classifier_run / "ema_ckpt.pt")
    assert all(torch.equal(ema["model"][k], ckpt["ema"][k]) for k in ckpt["ema"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = classifier_run.parents[1] / "runs" / "classifier"
    assert not (classifier_run.parents[1] / "results").exists()  # a classifier run writes no sample grids
    tags = EventAccumulator(str(runs)).Reload().Tags()["scalars"]
    assert {"train/loss", "val/heldout_loss", "val/accuracy_t0000", "val/accuracy_t0999"} <= set(tags)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, trained_run, gray_data):
    flags = ("--dataset-path", gray_data, "--diffusion-checkpoint", trained_run / "models/tiny/ckpt.pt")
    flags += (*"--batch-size 4 --val-split 0.25 --ema-warmup-steps 0 --hflip".split(), *CLASSIFIER_TINY)
    straight = run_script("train_classifier.py", *flags, "--epochs", "2", "--run-name", "a", cwd=tmp_path)
    first = run_script("train_classifier.py", *flags, "--epochs", "1", "--run-name", "b", cwd=tmp_path)
    resumed = run_script(
        "train_classifier.py", *flags, "--epochs", "2", "--run-name", "b", "--resume", cwd=tmp_path
    )
    for result in (straight, first, resumed):
        assert result.returncode == 0, result.stderr
    a, b = load(tmp_path / "models/a/ckpt.pt"), load(tmp_path / "models/b/ckpt.pt")
    assert a["global_step"] == b["global_step"] == 6
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


def outputs(folder):
    """{path relative to folder: pixels} of every sample image."""
    return {p.relative_to(folder): np.asarray(Image.open(p)) for p in sorted(folder.rglob("*.png"))}


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_conditional_scale_zero_is_exactly_unguided_and_scale_five_guides(
    tmp_path, trained_run, classifier_run, sampler
):
    # CFG 3 (the default) and classifier guidance together, on the conditional DDPM.
    base = (*SAMPLE, "--ckpt", trained_run / "models/tiny/ema_ckpt.pt", "--sampler", sampler, "--steps", "3")
    guide = ("--classifier", classifier_run / "ema_ckpt.pt")
    runs = {
        "plain": base,
        "zero": (*base, *guide, "--classifier-scale", "0"),
        "five": (*base, *guide, "--classifier-scale", "5"),
    }
    for name, argv in runs.items():
        result = run_script(*argv, "--output-dir", tmp_path / name, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    plain, zero, five = (outputs(tmp_path / name) for name in runs)
    assert len(plain) == 6 and plain.keys() == zero.keys() == five.keys()
    assert all(np.array_equal(plain[k], zero[k]) for k in plain)
    assert any(not np.array_equal(plain[k], five[k]) for k in plain)
    assert "classifier_scale 5.0" in result.stdout


def test_unconditional_model_is_guided_into_the_classifiers_class_folders(
    tmp_path, unconditional_run, gray_data
):
    ddpm = unconditional_run / "ema_ckpt.pt"
    train = (
        "--dataset-path",
        gray_data,
        "--diffusion-checkpoint",
        ddpm,
        "--max-steps",
        "2",
        *CLASSIFIER_TINY,
    )
    result = run_script("train_classifier.py", *train, "--val-split", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    base = (*SAMPLE, "--ckpt", ddpm, "--sampler", "ddim", "--steps", "3")
    guide = ("--classifier", tmp_path / "models/classifier/ema_ckpt.pt")
    for name, argv in {"plain": base, "zero": (*base, *guide, "--classifier-scale", "0")}.items():
        result = run_script(*argv, "--output-dir", tmp_path / name, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    plain, zero = outputs(tmp_path / "plain"), outputs(tmp_path / "zero")
    # Round-robin over 3 classes: image i of the flat folder is image i // 3 of class i % 3.
    assert sorted(str(k) for k in zero) == [f"class_{c}/00000{i}.png" for c in range(3) for i in range(2)]
    for i in range(6):
        guided_path = next(k for k in zero if str(k) == f"class_{i % 3}/{i // 3:06d}.png")
        assert np.array_equal(plain[next(k for k in plain if str(k) == f"{i:06d}.png")], zero[guided_path])


def test_heldout_accuracy_on_the_digits_is_well_above_chance_at_small_t(tmp_path, unconditional_run):
    # The demo's digits: 400 images, 16 px like the DDPM; ten classes, so chance is 10%.
    build = [sys.executable, str(DDPM_DIR.parent / "demo/build_digits.py"), "--out-dir", str(tmp_path / "d")]
    subprocess.run([*build, "--size", "16", "--limit", "400"], check=True, capture_output=True)
    flags = (
        "--base-channels 16 --time-dim 32 --depth 1 --num-workers 0 --max-steps 120 --batch-size 32 --lr 2e-3"
    )
    flags += (
        " --lr-warmup-steps 20 --ema-warmup-steps 0 --ema-decay 0.9 --val-split 0.25 --save-interval 1000"
    )
    ddpm = unconditional_run / "ema_ckpt.pt"
    argv = ("--dataset-path", tmp_path / "d", "--diffusion-checkpoint", ddpm, *flags.split())
    result = run_script("train_classifier.py", *argv, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    accuracy = load(tmp_path / "models/classifier/ckpt_final.pt")["heldout_accuracy"]
    assert accuracy["0"] > 0.5 and accuracy["100"] > 0.5, accuracy
    assert accuracy["999"] < accuracy["0"], accuracy  # pure noise carries no class


def test_two_process_training_and_guided_sample_ddp_with_gloo(tmp_path, trained_run, gray_data):
    ddpm = trained_run / "models/tiny/ema_ckpt.pt"
    train = ("train_classifier.py", "--dataset-path", gray_data, "--diffusion-checkpoint", ddpm)
    result = torchrun(
        *train, "--epochs", "2", "--batch-size", "2", "--val-split", "0.25", *CLASSIFIER_TINY, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "training on 2 process(es)" in result.stdout
    ckpt = load(tmp_path / "models/classifier/ckpt.pt")
    # 9 training images over 2 ranks of batch 2: 3 steps per epoch, each rank's generator saved.
    assert ckpt["global_step"] == 6 and len(ckpt["generators"]) == 2
    guide = (
        "--ckpt",
        ddpm,
        "--classifier",
        tmp_path / "models/classifier/ema_ckpt.pt",
        "--classifier-scale",
        "4",
    )
    sample = (
        "ddpm_conditional_ddp.py",
        "--num-samples",
        "5",
        "--batch-size",
        "1",
        "--sampler",
        "ddim",
        "--steps",
        "2",
    )
    sample = (*sample, *guide)
    two = torchrun(*sample, "--mode", "sample_ddp", "--output-dir", tmp_path / "two", cwd=tmp_path)
    assert two.returncode == 0, two.stderr
    one = run_script(*sample, "--mode", "sample", "--output-dir", tmp_path / "one", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    # Noise follows the image index, not the rank: 2 processes write exactly what 1 does.
    a, b = outputs(tmp_path / "one"), outputs(tmp_path / "two")
    assert len(a) == 5 and a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
