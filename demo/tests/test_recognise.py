"""The classifier that scores the demo's samples: right on real digits, at chance on noise."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from build_digits import build_digits, digit_features, digit_images
from recognise import heldout_split, load_samples, recognition, train_classifier

DEMO_DIR = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def classifier():
    classifier, heldout_accuracy = train_classifier()
    assert heldout_accuracy > 0.97  # on the real 8x8 digits it never saw
    return classifier


def test_area_downsampling_brings_upscaled_digits_back_to_the_8x8_features():
    from sklearn.datasets import load_digits

    real = load_digits().data
    for size in (16, 32):
        back = digit_features(digit_images(size)[0])
        assert back.shape == real.shape and 0 <= back.min() and back.max() <= 16.5
        assert np.abs(back - real).mean() < 1.0  # on the 0..16 scale


@pytest.mark.parametrize("size", [16, 32])
def test_real_upscaled_digits_written_by_the_builder_are_recognised(tmp_path, classifier, size):
    build_digits(tmp_path, size)
    images, labels = load_samples(tmp_path)
    assert images.shape == (1797, size, size)
    share, per_class = recognition(classifier, images, labels)
    assert share > 0.95 and sorted(per_class) == list(range(10))
    assert all(hit / total > 0.9 for hit, total in per_class.values())


def test_held_out_digits_are_recognised_after_the_round_trip_through_16_px(classifier):
    images, labels = digit_images(16)
    _, heldout = heldout_split(labels)
    assert len(heldout) == 450  # a quarter, none of them seen in training
    assert recognition(classifier, images[heldout], labels[heldout])[0] > 0.95


@pytest.mark.parametrize("kind", ["uniform", "gaussian", "black", "white"])
def test_noise_and_blank_images_are_not_recognised_as_the_digit_asked_for(classifier, kind):
    rng = np.random.default_rng(0)
    shape = (200, 16, 16)
    images = {
        "uniform": rng.integers(0, 256, shape),
        "gaussian": np.clip(rng.normal(128, 60, shape), 0, 255),
        "black": np.zeros(shape),
        "white": np.full(shape, 255),
    }[kind].astype(np.uint8)
    labels = np.arange(len(images)) % 10  # twenty images "asked for" as each digit
    share, _ = recognition(classifier, images, labels)
    assert share <= 0.2  # chance is 0.1: all of one kind fall into one or two classes


def score(folder):
    return subprocess.run(
        [sys.executable, str(DEMO_DIR / "recognise.py"), str(folder)], capture_output=True, text=True
    )


def test_command_line_scores_a_folder_and_rejects_an_empty_one(tmp_path):
    build_digits(tmp_path / "digits", 16, limit=100)
    result = score(tmp_path / "digits")
    assert result.returncode == 0, result.stderr
    assert re.search(r"recognised: +(9\d|100) of 100 samples", result.stdout)
    (tmp_path / "empty").mkdir()
    Image.new("L", (16, 16)).save(tmp_path / "empty" / "stray.png")  # not in a class folder
    result = score(tmp_path / "empty")
    assert result.returncode != 0 and result.stderr.strip().startswith("error: no samples")
