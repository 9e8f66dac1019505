"""One decoding rule per side (core.images): 8-, 12-, 16-bit and float folders of the same images agree."""

import argparse
import os

import numpy as np
import pytest
import torch
from PIL import Image

import inputs
from conftest import read_json, run_script
from core import images


def gray_images(count=6, size=16, seed=0):
    """Smooth random 8-bit gray images (H x W uint8) that reach above 128, so every depth is used."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        coarse = Image.fromarray(rng.uniform(0, 255, (4, 4)).astype(np.uint8))
        image = np.asarray(coarse.resize((size, size), Image.BILINEAR)).copy()
        image[0, 0] = 200
        out.append(image)
    return out


def write_folder(folder, arrays, suffix=".png"):
    os.makedirs(folder, exist_ok=True)
    for i, array in enumerate(arrays):
        Image.fromarray(array).save(os.path.join(folder, f"{i:06d}{suffix}"))
    return folder


@pytest.fixture(scope="module")
def depths(tmp_path_factory):
    """{name: folder}: the same gray images at every depth, written the way scanners and samplers do."""
    root = tmp_path_factory.mktemp("depths")
    gray = gray_images()
    folders = {
        "8": write_folder(root / "8", gray),
        # 12-bit CT/MR values stored in 16-bit PNGs (no depth tag), as DICOM exports usually are.
        "12": write_folder(root / "12", [np.rint(g * (4095 / 255)).astype(np.uint16) for g in gray]),
        "16": write_folder(root / "16", [g.astype(np.uint16) * 257 for g in gray]),
        "float": write_folder(root / "float", [g.astype(np.float32) / 255 for g in gray], ".tif"),
        "float 0..1000": write_folder(
            root / "f1000", [g.astype(np.float32) * (1000 / 255) for g in gray], ".tif"
        ),
    }
    # Dim 12-bit samples written by our samplers (core.images.save): their maximum needs only 11 bits,
    # but the PNG's bit_depth tag says 12, and the scan honours it.
    dim = [g // 2 for g in gray]
    os.makedirs(root / "sampled")
    twelve = {"kind": "integer", "bit_depth": 12}
    for i, g in enumerate(dim):
        images.save(torch.from_numpy(g / 255.0)[None], root / "sampled" / f"{i:06d}.png", twelve)
    folders["sampled"], folders["dim 8"] = str(root / "sampled"), write_folder(root / "dim8", dim)
    return folders


def settings(**overrides):
    return argparse.Namespace(**{"no_cache": True, "bit_depth": None, "intensity_range": None, **overrides})


def decoded(folder, **overrides):
    """(rule, (N, 3, H, W) uint8) of a folder as the script decodes it."""
    image_set = inputs.open_image_set(str(folder), "real", "REAL_IMAGES_DIR")
    image_set.intensity = inputs.decoding_rule(image_set, settings(**overrides))
    dataset = image_set.dataset()
    return image_set.intensity, torch.stack([dataset[i][1] for i in range(len(dataset))])


@pytest.mark.parametrize(
    ("name", "rule", "overrides"),
    [
        ("12", {"kind": "integer", "bit_depth": 12}, {}),
        ("16", {"kind": "integer", "bit_depth": 16}, {}),
        ("float", {"kind": "float", "range": [0.0, 1.0]}, {}),
        ("float 0..1000", {"kind": "float", "range": [0.0, 1000.0]}, {"intensity_range": [0.0, 1000.0]}),
    ],
)
def test_every_depth_decodes_to_the_same_8bit_rgb(depths, name, rule, overrides):
    reference_rule, reference = decoded(depths["8"])
    assert reference_rule == images.EIGHT_BIT
    found_rule, pixels = decoded(depths[name], **overrides)
    assert found_rule == rule
    assert pixels.dtype == torch.uint8 and pixels.shape == reference.shape
    assert torch.equal(pixels, reference)


def test_sampler_png_depth_tag_is_honoured(depths):
    rule, pixels = decoded(depths["sampled"])
    assert rule == {"kind": "integer", "bit_depth": 12}
    assert torch.equal(pixels, decoded(depths["dim 8"])[1])


def test_bit_depth_flag_overrides_the_scan(depths):
    rule, pixels = decoded(depths["12"], bit_depth=16)
    assert rule == {"kind": "integer", "bit_depth": 16}
    assert pixels.max() <= 16  # 4095 / 65535 of white: what the user asked for


def test_two_16bit_images_of_one_set_share_one_scale(tmp_path):
    """A dim and a bright 16-bit image keep their ratio (per-image scaling put them 256x apart)."""
    bright = np.full((8, 8), 65535, np.uint16)
    dim = np.full((8, 8), 255, np.uint16)  # 16-bit file whose values happen to stay below 256
    write_folder(tmp_path, [bright, dim])
    rule, pixels = decoded(tmp_path)
    assert rule == {"kind": "integer", "bit_depth": 16}
    assert pixels[0].max() == 255 and pixels[1].max() == 1  # round(255 / 65535 * 255)


def test_each_side_has_its_own_rule_and_a_12bit_set_matches_its_8bit_copy(depths, weights, tmp_path):
    """FID ~0 and precision = recall = 1 between the 8-bit images and their 12-bit copies."""
    out = str(tmp_path / "result.json")
    args = ["--real", depths["8"], "--gen", depths["12"], "--metrics", "fid,pr", "--pr-features", "inception"]
    args += ["--inception-weights", weights[0], "--no-cache", "--num-workers", "0", "--json", out]
    result = run_script(args)
    assert result.returncode == 0, result.stderr[-2000:]
    report = read_json(out)
    assert report["preprocessing"]["intensity"] == {
        "real": images.EIGHT_BIT,
        "gen": {"kind": "integer", "bit_depth": 12},
    }
    assert "12-bit integer images, values / 4095" in result.stderr
    assert abs(report["metrics"]["fid"]) < 0.01
    assert report["metrics"]["precision"] == 1.0 and report["metrics"]["recall"] == 1.0
