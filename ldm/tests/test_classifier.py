"""Classifier guidance of the LDM: train_classifier.py on the LDM's latents, guided sampling in
inference.py and inference_per_class.py, and their bad input."""

import argparse
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import LDM_DIR, TRAIN_ARGS, run_script, tiny_autoencoder

CLASSIFIER_TINY = ("--base_channels", "8", "--time_dim", "32", "--depth", "1", "--num_workers", "0")
SAMPLE = ("--num_samples", "2", "--num_inference_steps", "3")


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def outputs(folder):
    """{path relative to folder: pixels} of every sample image."""
    return {p.relative_to(folder): np.asarray(Image.open(p)) for p in sorted(folder.rglob("*.png"))}


def classifier_flags(data, ldm, out, *extra):
    return ("--data_root", data, "--ldm_checkpoint", ldm, "--output_dir", out, *CLASSIFIER_TINY, *extra)


@pytest.fixture(scope="session")
def ldm_ckpt(trained_run):
    return trained_run[0] / "checkpoint_final.pt"


@pytest.fixture(scope="session")
def classifier_run(tmp_path_factory, rgb_data, ldm_ckpt):
    """Two epochs on the RGB set's latents, saving every epoch."""
    out = tmp_path_factory.mktemp("classifier") / "run"
    flags = classifier_flags(rgb_data, ldm_ckpt, out, "--num_epochs", "2", "--batch_size", "4")
    run_script("train_classifier.py", *flags, "--val_fraction", "0.3", "--save_every", "1")
    return out


def test_training_writes_the_checkpoint_contract(classifier_run, ldm_ckpt):
    from models import classifier_from_checkpoint, ldm_facts

    names = {p.name for p in classifier_run.iterdir()}
    assert {
        "checkpoint_best.pt",
        "checkpoint_final.pt",
        "checkpoint_latest.pt",
        "checkpoint_epoch_1.pt",
    } <= names
    ckpt = load(classifier_run / "checkpoint_final.pt")
    assert ckpt["model_type"] == "ldm-classifier" and ckpt["global_step"] == 4  # 6 images, batch 4: 2 a epoch
    assert {"classifier", "ema_classifier", "optimizer", "lr_scheduler", "ema", "rng", "progress"} <= set(
        ckpt
    )
    # The latents it saw are the LDM's: 4 channels of 8x8 (16 px through a 2x VAE), the LDM's classes.
    assert ckpt["ldm"] == ldm_facts(load(ldm_ckpt)) and ckpt["class_names"] == ["cat", "dog"]
    config = ckpt["classifier_config"]
    assert (config["c_in"], config["img_size"], config["num_classes"], config["channel_mult"]) == (
        4,
        8,
        2,
        [1, 2],
    )
    assert sorted(int(t) for t in ckpt["heldout_accuracy"]) == [0, 100, 250, 500, 749, 999]
    assert len(ckpt["progress"]["val_history"]) == 2
    classifier = classifier_from_checkpoint(ckpt)
    assert classifier(torch.randn(3, 4, 8, 8), torch.tensor([0, 5, 999])).shape == (3, 2)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(classifier_run / "logs")).Reload().Tags()["scalars"]
    assert {"train/loss", "val/loss", "val/accuracy_t0000", "val/accuracy_t0999"} <= set(tags)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, rgb_data, ldm_ckpt):
    extra = ("--batch_size", "4", "--val_fraction", "0.3")
    run_script(
        "train_classifier.py",
        *classifier_flags(rgb_data, ldm_ckpt, tmp_path / "a", *extra, "--num_epochs", "2"),
    )
    first = classifier_flags(rgb_data, ldm_ckpt, tmp_path / "b", *extra)
    run_script("train_classifier.py", *first, "--num_epochs", "1")
    run_script("train_classifier.py", *first, "--num_epochs", "2", "--resume")
    a, b = load(tmp_path / "a/checkpoint_final.pt"), load(tmp_path / "b/checkpoint_final.pt")
    assert a["global_step"] == b["global_step"] == 4
    assert same_weights(a["classifier"], b["classifier"]) and same_weights(
        a["ema_classifier"], b["ema_classifier"]
    )
    assert a["heldout_accuracy"] == b["heldout_accuracy"]


def test_scale_zero_is_exactly_unguided_and_a_scale_guides(tmp_path, ldm_ckpt, classifier_run):
    base = ("inference.py", "--checkpoint", ldm_ckpt, *SAMPLE)
    guide = ("--classifier", classifier_run / "checkpoint_best.pt")
    runs = {
        "plain": base,
        "zero": (*base, *guide, "--classifier_scale", "0"),
        "strong": (*base, *guide, "--classifier_scale", "50", "--cfg_scale", "2"),
        "strong_cfg3": (*base, *guide, "--classifier_scale", "50"),
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda item: run_script(*item[1], "--output_dir", tmp_path / item[0]), runs.items()))
    plain, zero, strong, strong_cfg3 = (outputs(tmp_path / name) for name in runs)
    assert len(plain) == 4 and plain.keys() == zero.keys() == strong.keys()
    assert all(np.array_equal(plain[k], zero[k]) for k in plain)
    assert any(not np.array_equal(plain[k], strong_cfg3[k]) for k in plain)
    # It combines with classifier-free guidance: another --cfg_scale changes the guided images.
    assert any(not np.array_equal(strong[k], strong_cfg3[k]) for k in plain)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("scheduler", ["ddim", "dpmsolver++", "unipc"])
def test_every_scheduler_is_guided_and_callers_without_the_flags_sample_unguided(
    ldm_ckpt, classifier_run, scheduler, prediction
):
    import inference

    ckpt = load(ldm_ckpt)
    # The v path on the same weights: what is checked is the guidance arithmetic, not image quality.
    ckpt["scheduler_config"]["prediction_type"] = prediction
    flags = ["--checkpoint", str(ldm_ckpt), "--scheduler", scheduler, "--num_inference_steps", "4"]
    old_style = argparse.Namespace(**vars(inference.parse_args(flags)))
    del old_style.classifier, old_style.classifier_scale  # as the app and older code build their args
    guide = ["--classifier", str(classifier_run / "checkpoint_best.pt")]
    samplers = {
        "old": inference.LDMSampler(ckpt, old_style, "cpu"),
        "zero": inference.LDMSampler(
            ckpt, inference.parse_args([*flags, *guide, "--classifier_scale", "0"]), "cpu"
        ),
        "guided": inference.LDMSampler(
            ckpt, inference.parse_args([*flags, *guide, "--classifier_scale", "30"]), "cpu"
        ),
    }
    images = {name: sampler.sample(1, [0, 1]) for name, sampler in samplers.items()}
    assert samplers["old"].classifier is None and samplers["guided"].classifier_scale == 30
    assert torch.equal(images["old"], images["zero"])
    assert torch.isfinite(images["guided"]).all() and not torch.equal(images["old"], images["guided"])


def test_a_model_that_predicts_x0_is_refused(ldm_ckpt, classifier_run):
    import inference
    from core.errors import UserError

    ckpt = load(ldm_ckpt)
    ckpt["scheduler_config"]["prediction_type"] = "sample"
    args = inference.parse_args(
        ["--checkpoint", str(ldm_ckpt), "--classifier", str(classifier_run / "checkpoint_best.pt")]
    )
    with pytest.raises(UserError, match="epsilon or v_prediction LDM; this one predicts 'sample'"):
        inference.LDMSampler(ckpt, args, "cpu")


def test_per_class_sampler_is_guided_like_inference(tmp_path, ldm_ckpt, classifier_run):
    guide = ("--classifier", classifier_run / "checkpoint_best.pt", "--classifier_scale", "20", "--seed", "7")
    common = ("--checkpoint", ldm_ckpt, "--num_inference_steps", "3", *guide)
    run_script("inference.py", *common, "--num_samples", "2", "--output_dir", tmp_path / "one")
    run_script("inference_per_class.py", *common, "--total_samples", "4", "--output_dir", tmp_path / "per")
    one, per = outputs(tmp_path / "one"), outputs(tmp_path / "per")
    assert len(one) == 4 and one.keys() == per.keys()
    assert all(np.array_equal(one[k], per[k]) for k in one)


def test_two_process_training_with_gloo(tmp_path, rgb_data, ldm_ckpt):
    flags = classifier_flags(rgb_data, ldm_ckpt, tmp_path / "ddp", "--num_epochs", "2", "--batch_size", "2")
    result = run_script("train_classifier.py", *flags, "--val_fraction", "0.3", nproc=2)
    assert "processes 2" in result.stdout
    ckpt = load(tmp_path / "ddp/checkpoint_final.pt")
    # 6 training images over 2 processes of batch 2: 2 steps an epoch; each rank keeps its own stream.
    assert ckpt["global_step"] == 4 and len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])
    # The held-out images are shared out over the ranks and summed: every accuracy is a share of 4 images.
    assert all(round(a * 4, 6) == round(a * 4) for a in ckpt["heldout_accuracy"].values())


@pytest.fixture(scope="module")
def sharp_vae(tmp_path_factory):
    """A tiny random AutoencoderKL with a near-deterministic posterior and unit-scale latents, like a
    trained VAE's (the random one of conftest has a posterior std 10x its means' spread, which buries
    the image in the sampled latents)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("sharp_vae")
    vae = tiny_autoencoder(scaling_factor=24.0)  # about 1 / the spread of the latent means on the digits
    with torch.no_grad():
        vae.quant_conv.bias[4:] = -12.0  # log-variance channels: posterior std ~ 0.0025
    vae.save_pretrained(folder)
    return folder


def test_heldout_accuracy_on_the_digits_is_well_above_chance(tmp_path, sharp_vae):
    # scikit-learn's digits, 400 of them at 16 px: ten classes, so chance is 10%.
    build = [sys.executable, str(LDM_DIR.parent / "demo/build_digits.py"), "--out-dir", str(tmp_path / "d")]
    subprocess.run([*build, "--size", "16", "--limit", "400"], check=True, capture_output=True)
    ldm = ("--data_root", tmp_path / "d", "--vae_pretrained", sharp_vae, "--output_dir", tmp_path / "ldm")
    # One short epoch: the classifier needs the LDM's VAE, schedule and classes, not a good LDM.
    run_script(
        "train.py", *ldm, *TRAIN_ARGS, "--batch_size", "64", "--num_epochs", "1", "--val_fraction", "0.05"
    )
    flags = classifier_flags(tmp_path / "d", tmp_path / "ldm/checkpoint_final.pt", tmp_path / "cls")
    flags = (
        *flags,
        "--base_channels",
        "16",
        "--batch_size",
        "32",
        "--num_epochs",
        "8",
        "--val_fraction",
        "0.25",
    )
    flags = (
        *flags,
        "--cache_latents",
        "--learning_rate",
        "2e-3",
        "--lr_warmup_steps",
        "10",
        "--ema_decay",
        "0.9",
    )
    run_script("train_classifier.py", *flags)
    accuracy = load(tmp_path / "cls/checkpoint_final.pt")["heldout_accuracy"]
    assert accuracy["0"] > 0.4 and accuracy["100"] > 0.4, accuracy
    assert accuracy["999"] < accuracy["0"], accuracy  # (almost) pure noise carries (almost) no class


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, rgb_data, gray_data, ldm_ckpt, classifier_run):
    """{case: (script and args, expected text of the one error line)}."""
    root = tmp_path_factory.mktemp("bad_classifier")
    good = load(classifier_run / "checkpoint_best.pt")

    def other(name, **ldm):  # the classifier, as if trained for an LDM that differs in these facts
        path = root / f"{name}.pt"
        torch.save({**good, "ldm": {**good["ldm"], **ldm}}, path)
        return path

    ddpm = root / "ddpm_classifier.pt"
    torch.save({"format": "ddpm-classifier-v1", "model": {}, "model_config": {}, "config": {}}, ddpm)
    guide = ("--classifier", classifier_run / "checkpoint_best.pt")
    sample = ("inference.py", "--checkpoint", ldm_ckpt, "--output_dir", root / "g", *SAMPLE)
    per_class = ("inference_per_class.py", "--checkpoint", ldm_ckpt, "--output_dir", root / "p")
    per_class = (*per_class, "--total_samples", "2", "--num_inference_steps", "1")
    fixture_ldm = LDM_DIR / "tests/fixtures/ldm_checkpoint.pt"  # another VAE, other classes (grayscale set)
    train = ("train_classifier.py", *classifier_flags(rgb_data, ldm_ckpt, root / "t"), "--num_epochs", "1")
    return {
        "other_latent_size": ((*sample, "--classifier", other("size", latent_size=16)), "latent_size=16"),
        "other_channel_count": (
            (*sample, "--classifier", other("ch", latent_channels=8)),
            "latent_channels=8",
        ),
        "other_class_set": (
            (*per_class, "--classifier", other("cls", class_names=["cat", "wolf"])),
            "class_names=['cat', 'wolf']",
        ),
        "other_schedule": (
            (*sample, "--classifier", other("T", num_train_timesteps=500)),
            "num_train_timesteps",
        ),
        "another_ldm": (
            ("inference.py", "--checkpoint", fixture_ldm, "--output_dir", root / "f", *guide),
            "latent_scale=0.18215",
        ),
        "missing_file": ((*sample, "--classifier", root / "none.pt"), "file not found"),
        "ddpm_pixel_classifier": ((*sample, "--classifier", ddpm), "a DDPM pixel-space classifier"),
        "ldm_as_classifier": ((*sample, "--classifier", ldm_ckpt), "not an LDM latent classifier"),
        "scale_negative": ((*sample, *guide, "--classifier_scale", "-1"), "must be a number >= 0, got -1"),
        "per_class_scale_negative": (
            (*per_class, *guide, "--classifier-scale", "-0.5"),
            "must be a number >= 0",
        ),
        "scale_without_classifier": ((*sample, "--classifier_scale", "2"), "needs --classifier PATH"),
        "train_other_classes": (
            ("train_classifier.py", *classifier_flags(gray_data, ldm_ckpt, root / "t2")),
            "the LDM's classes are ['cat', 'dog']",
        ),
        "train_ldm_missing": ((*train, "--ldm_checkpoint", root / "none.pt"), "file not found"),
        "train_ldm_is_a_classifier": (
            (*train, "--ldm_checkpoint", classifier_run / "checkpoint_best.pt"),
            "(a ldm-classifier checkpoint)",
        ),
        "train_too_many_levels": (
            (*train, "--channel_mult", "1", "2", "4", "4"),
            "does not fit 4 classifier levels",
        ),
        "train_resume_other_ldm": (
            (*train, "--output_dir", root / "t3", "--resume", other("resume", latent_size=16)),
            "was trained with latent_size=16",
        ),
        "train_lr_negative": ((*train, "--lr", "-1"), "must be a number > 0"),
    }


def test_bad_input_is_one_error_line_and_exit_2(bad_inputs):
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(
            zip(
                bad_inputs,
                pool.map(lambda c: run_script(*c[0], check=False), bad_inputs.values()),
                strict=True,
            )
        )
    for case, (_, expected) in bad_inputs.items():
        result = results[case]
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2, (case, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, case
        assert lines[-1].startswith("error: ") and expected in lines[-1], (case, lines[-1])
        assert sum(line.startswith("error: ") for line in lines) == 1, case
