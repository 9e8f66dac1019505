"""The digits builder and a seconds-long run of the whole demo."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from build_digits import build_digits, digit_images

DEMO_DIR = Path(__file__).resolve().parents[1]

MIN_STEPS = 80


@pytest.mark.parametrize("size", [16, 32])
def test_builder_writes_every_digit_as_grayscale_png_class_folders(tmp_path, size):
    assert build_digits(tmp_path, size) == 1797
    folders = sorted(p.name for p in tmp_path.iterdir())
    assert folders == [str(d) for d in range(10)]
    counts = [len(list((tmp_path / d).glob("*.png"))) for d in folders]
    assert sum(counts) == 1797 and min(counts) >= 170  # the set is roughly balanced (174..183 per digit)
    img = Image.open(next((tmp_path / "3").glob("*.png")))
    assert img.mode == "L" and img.size == (size, size)


def test_upscaled_digits_keep_their_content():
    from sklearn.datasets import load_digits

    images, labels = digit_images(16)
    original = load_digits()
    assert labels.tolist() == original.target.tolist()
    down = np.asarray(Image.fromarray(images[0]).resize((8, 8), Image.BILINEAR), dtype=np.float64)
    correlation = np.corrcoef(down.ravel(), original.images[0].ravel())[0, 1]
    assert correlation > 0.9 and images.max() > 200  # same strokes, full 0..255 range


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_tiny_demo_run_writes_the_grid_and_reports_timing_and_recognised_share(tmp_path, objective):
    # A floor above what 3 s of training give on two CPU cores, so the run normally also resumes up to it.
    cmd = [
        sys.executable,
        str(DEMO_DIR / "run_demo.py"),
        "--minutes",
        "0.05",
        "--min-steps",
        str(MIN_STEPS),
        "--limit",
        "60",
        "--samples-per-class",
        "1",
        "--sampling-steps",
        "3",
        "--output-dir",
        str(tmp_path / "out"),
        "--objective",
        objective,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    grid = Image.open(tmp_path / "out" / "digits_grid.png")
    assert grid.mode == "L" and grid.size == (10 * 18 + 2, 18 + 2)  # ten 16 px digits with 2 px padding
    assert len(list((tmp_path / "out" / "samples").rglob("*.png"))) == 10
    assert (tmp_path / "out" / "models" / "digits" / "ckpt_final.pt").is_file()
    assert f"sampling every class with CFG and {'ddim' if objective == 'ddpm' else 'heun'}" in result.stdout
    assert "grid:" in result.stdout and "steps/s" in result.stdout and "images/s" in result.stdout
    steps = int(re.search(r"training [0-9.]+ s for (\d+) steps", result.stdout).group(1))
    assert steps >= MIN_STEPS
    # The score of the ten samples is printed (a few seconds of training make no claim on its value).
    assert re.search(r"recognised: +\d+ of 10 samples \(\d+%\) read as the digit asked for", result.stdout)
    assert re.search(r"gets 9\d\.\d% of held-out real ones right", result.stdout)
