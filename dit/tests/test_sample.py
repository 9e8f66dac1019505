"""sample.py and sample_ddp.py end to end: class folders, exact counts, .npz, resume by skipping."""

import os

import numpy as np
from PIL import Image

from conftest import run_script
from core import images
from core.files import TEMP_MARK


def pngs(folder):
    return {c: sorted(os.listdir(folder / c)) for c in sorted(os.listdir(folder)) if (folder / c).is_dir()}


def test_sample_class_names_counts_npz_and_resume(trained, workspace, tmp_path):
    out = tmp_path / "samples"
    args = [
        "--ckpt",
        trained / "checkpoints" / "0000005.pt",
        "--class-labels",
        "cat",
        "2",
        "--num-samples",
        5,
        "--batch-size",
        2,
        "--num-sampling-steps",
        3,
        "--output-dir",
        out,
        "--npz",
        tmp_path / "s.npz",
    ]
    result = run_script("sample.py", *args)
    assert pngs(out) == {
        "cat": ["000000.png", "000001.png", "000002.png"],
        "eel": ["000000.png", "000001.png"],
    }
    assert "Timing: 5 images, 3 steps" in result.stdout and "images/s" in result.stdout
    npz = np.load(tmp_path / "s.npz")
    assert npz["arr_0"].shape == (5, 16, 16, 3) and npz["arr_0"].dtype == np.uint8
    assert npz["arr_1"].tolist() == [0, 0, 0, 2, 2]
    assert npz["class_names"].tolist() == ["cat", "dog", "eel"]  # label i is class_names[i]
    # A second run finds every image and generates nothing; an image deleted in between is made again.
    before = (out / "cat" / "000000.png").stat().st_mtime_ns
    os.remove(out / "eel" / "000001.png")
    again = run_script("sample.py", *args)
    assert "2 of 3 batches already done" in again.stdout
    assert (out / "cat" / "000000.png").stat().st_mtime_ns == before
    assert os.path.isfile(out / "eel" / "000001.png")


def test_sample_ddp_two_processes_exact_counts(trained, tmp_path):
    out = tmp_path / "fid"
    flags = (
        "--num-fid-samples 7 --per-proc-batch-size 2 --num-sampling-steps 4 --sampler ddim --cfg-channels 3"
    )
    ckpt = trained / "checkpoints" / "0000005.pt"
    result = run_script("sample_ddp.py", "--ckpt", ckpt, *flags.split(), "--output-dir", out, nproc=2)
    assert {c: len(f) for c, f in pngs(out).items()} == {"cat": 3, "dog": 2, "eel": 2}
    npz = np.load(f"{out}.npz")
    assert npz["arr_0"].shape == (7, 16, 16, 3) and npz["arr_0"].dtype == np.uint8
    assert npz["arr_1"].tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert npz["class_names"].tolist() == ["cat", "dog", "eel"]
    assert "Timing: 7 images" in result.stdout


def test_truncated_sample_is_rewritten_with_one_step(trained, tmp_path):
    """A rerun redoes a truncated PNG (an interrupted non-atomic write) and removes stale temporaries;
    --num-sampling-steps 1 samples (it used to crash with an IndexError)."""
    out = tmp_path / "samples"
    flags = "--class-labels dog --num-samples 2 --batch-size 1 --num-sampling-steps 1"
    args = ["--ckpt", trained / "checkpoints" / "0000005.pt", *flags.split(), "--output-dir", out]
    args += ["--npz", tmp_path / "s.npz"]
    assert "Timing: 2 images, 1 steps" in run_script("sample.py", *args).stdout
    kept, broken = out / "dog" / "000000.png", out / "dog" / "000001.png"
    before = kept.stat().st_mtime_ns
    broken.write_bytes(broken.read_bytes()[:60])
    stale = out / "dog" / f".000000.png{TEMP_MARK}12345"  # left by a run killed while writing
    stale.write_bytes(b"half a file")
    again = run_script("sample.py", *args)
    assert "1 of 2 batches already done" in again.stdout and "Timing: 1 images" in again.stdout
    assert images.is_readable_image(broken) and kept.stat().st_mtime_ns == before
    assert not stale.exists() and sorted(os.listdir(out / "dog")) == ["000000.png", "000001.png"]
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (2, 16, 16, 3)


def test_npz_of_grayscale_samples_is_rgb(tmp_path):
    from sample import write_npz

    rng = np.random.default_rng(0)
    gray = [rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in range(2)]
    plan = []
    for label, pixels in enumerate(gray):
        Image.fromarray(pixels).save(tmp_path / f"{label}.png")
        plan.append((label, tmp_path / f"{label}.png"))
    assert write_npz(plan, tmp_path / "s.npz", images.EIGHT_BIT, 1, ["a", "b"]) == (2, 8, 8, 3)
    npz = np.load(tmp_path / "s.npz")
    assert all((npz["arr_0"][i] == gray[i][..., None]).all() for i in range(2))
    assert npz["class_names"].tolist() == ["a", "b"] and sorted(os.listdir(tmp_path)) == [
        "0.png",
        "1.png",
        "s.npz",
    ]
