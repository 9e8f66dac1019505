"""Sampling scripts end to end, guidance arithmetic, noise reproducibility."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_script
from core import images
from models import (
    ClassConditionalUNet,
    ClassEmbedder,
    build_unet,
    guided_prediction,
    noise_for,
    unet_settings,
)


def tiny_model(num_classes=3):
    torch.manual_seed(0)
    unet = build_unet(unet_settings("tiny"), latent_channels=4, latent_size=8)
    return ClassConditionalUNet(unet, ClassEmbedder(num_classes, unet.config.cross_attention_dim)).eval()


@torch.no_grad()
def test_guidance_scales_match_their_definitions():
    model = tiny_model()
    x, t, labels = torch.randn(2, 4, 8, 8), torch.tensor(500), torch.tensor([0, 2])
    null = torch.full_like(labels, 3)
    cond, uncond = model(x, t, labels), model(x, t, null)
    torch.testing.assert_close(guided_prediction(model, x, t, labels, 0.0), uncond)
    torch.testing.assert_close(guided_prediction(model, x, t, labels, 1.0), cond)
    torch.testing.assert_close(
        guided_prediction(model, x, t, labels, 3.0), uncond + 3.0 * (cond - uncond), rtol=1e-4, atol=1e-5
    )
    assert not torch.allclose(cond, uncond)


def test_noise_is_reproducible_and_differs_per_class_and_index():
    a = noise_for(7, 0, [0, 1], (4, 8, 8))
    torch.testing.assert_close(a, noise_for(7, 0, [0, 1], (4, 8, 8)), rtol=0, atol=0)
    torch.testing.assert_close(a[1], noise_for(7, 0, [1], (4, 8, 8))[0], rtol=0, atol=0)  # batch-independent
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a, noise_for(7, 1, [0, 1], (4, 8, 8)))
    assert not torch.equal(a, noise_for(8, 0, [0, 1], (4, 8, 8)))


SAMPLING = "--num_inference_steps 2 --scheduler dpmsolver++ --seed 5".split()


@pytest.fixture(scope="module")
def named_run(trained_run, tmp_path_factory):
    """inference.py for one class by name and one by index, with a grid."""
    ckpt = trained_run[0] / "checkpoint_best.pt"
    out = tmp_path_factory.mktemp("named") / "gen"
    args = ["--checkpoint", ckpt, "--output_dir", out, "--class_label", "dog", "0", "--num_samples", "3"]
    result = run_script("inference.py", *args, "--batch_size", "2", "--save_grid", *SAMPLING)
    return ckpt, out, result


def sample_tree(out):
    """Every file under a sample folder, relative to it."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def test_inference_by_name_and_index(named_run):
    ckpt, out, result = named_run
    for name in ("cat", "dog"):
        assert sorted(p.name for p in (out / name).iterdir()) == ["000000.png", "000001.png", "000002.png"]
        with Image.open(out / name / "000000.png") as sample:
            assert sample.size == (16, 16) and sample.mode == "RGB"  # 8-bit RGB data, written back as such
    # The grid lies beside the sample tree, which holds samples only (a recursive evaluation counts files).
    assert Image.open(out.with_name("gen_grid.png")).size[1] > 16
    assert sample_tree(out) == [f"{c}/00000{i}.png" for c in ("cat", "dog") for i in range(3)]
    for figure in ("6 images", "2 steps", "s/image", "ms/step", "images/s"):
        assert figure in result.stdout
    # A second run skips what exists and never replaces the earlier grid.
    args = [
        "--checkpoint",
        ckpt,
        "--output-dir",
        out,
        "--class-label",
        "1",
        "--num-samples",
        "4",
        "--save-grid",
    ]
    again = run_script("inference.py", *args, *SAMPLING)
    assert "generated 1, skipped 3" in again.stdout
    assert out.with_name("gen_grid_001.png").exists() and len(list((out / "dog").iterdir())) == 4
    assert sample_tree(out) == [f"cat/00000{i}.png" for i in range(3)] + [
        f"dog/00000{i}.png" for i in range(4)
    ]


def test_per_class_two_processes_counts_resume_npz(named_run, tmp_path):
    ckpt, named, _ = named_run
    out = tmp_path / "per_class"
    args = ["--checkpoint", ckpt, "--output_dir", out, "--total_samples", "5", "--batch_size", "2", *SAMPLING]
    two = run_script("inference_per_class.py", *args, "--npz", nproc=2)
    assert "process 0:" in two.stdout and "process 1:" in two.stdout  # both processes sampled
    assert len(list((out / "cat").iterdir())) == 3 and len(list((out / "dog").iterdir())) == 2
    assert len(sample_tree(out)) == 5  # the .npz lies beside the samples
    npz = np.load(tmp_path / "per_class_5x16x16x3.npz")
    assert npz["arr_0"].dtype == np.uint8 and npz["arr_0"].shape == (5, 16, 16, 3)
    assert npz["arr_1"].tolist() == [0, 0, 0, 1, 1]
    assert npz["class_names"].tolist() == ["cat", "dog"]
    # Same seed, class, index and sampler give the same image as inference.py.
    for name, index in (("cat", 2), ("dog", 1)):
        np.testing.assert_array_equal(
            np.asarray(Image.open(out / name / f"{index:06d}.png")),
            np.asarray(Image.open(named / name / f"{index:06d}.png")),
        )
    kept = out / "cat" / "000000.png"
    kept_time = kept.stat().st_mtime_ns
    redo, truncated = out / "dog" / "000001.png", out / "cat" / "000001.png"
    pixels = {path: np.asarray(Image.open(path)) for path in (redo, truncated)}
    redo.unlink()
    truncated.write_bytes(truncated.read_bytes()[:100])  # as a run killed while writing would leave it
    (out / "dog" / ".000000.png.tmp-999").write_bytes(b"partial")  # and its temporary file
    result = run_script("inference_per_class.py", *args)
    assert "2 to generate" in result.stdout
    assert len(sample_tree(out)) == 5
    assert kept.stat().st_mtime_ns == kept_time
    # Remade alone instead of in a batch of 2: the same noise, but batch-shaped float sums may round one
    # pixel to the neighbouring 8-bit level, so one level of difference is allowed and no more.
    for path, before in pixels.items():
        remade = np.asarray(Image.open(path)).astype(int)
        np.testing.assert_allclose(remade, before.astype(int), rtol=0, atol=1)


def test_npz_of_grayscale_samples_is_rgb(tmp_path):
    from inference_per_class import write_npz

    rng = np.random.default_rng(0)
    gray = {name: rng.integers(0, 256, (8, 8), dtype=np.uint8) for name in ("a", "b")}
    for name, pixels in gray.items():
        (tmp_path / name).mkdir()
        Image.fromarray(pixels).save(tmp_path / name / "000000.png")
    write_npz(tmp_path / "samples.npz", tmp_path, ["a", "b"], [1, 1], images.EIGHT_BIT)
    npz = np.load(tmp_path / "samples.npz")
    assert npz["arr_1"].tolist() == [0, 1] and npz["class_names"].tolist() == ["a", "b"]
    assert (npz["arr_0"][0] == gray["a"][..., None]).all() and (npz["arr_0"][1] == gray["b"][..., None]).all()
