"""Image loading: one decoding rule per data set (8-, 12-, 16-bit and float), every format as 3 channels
in [-1, 1] for the RGB VAE, and every file checked by the scan before training."""

import numpy as np
import pytest
import torch
from PIL import Image

from dataset import ImageFolderDataset, find_images
from utils import UserError


def dataset_of(root, images, ext="png", size=4, **scan_flags):
    """One class folder holding images; returns the scanned data set and its rule."""
    (root / "a").mkdir(parents=True)
    for i, image in enumerate(images):
        image.save(root / "a" / f"{i}.{ext}")
    dataset = ImageFolderDataset(root, size)
    rule = dataset.scan(**scan_flags)
    dataset.intensity = rule["intensity"]
    return dataset, rule


def pixels(dataset, index):
    """Item `index` back in [0, 1], (3, H, W)."""
    return (dataset[index][0] + 1) / 2


def test_formats_load_as_rgb(tmp_path):
    """Updated for the one rule: alpha is now composited on black (it was dropped), and a 16-bit image is
    scaled by the data set's depth, not by its own maximum."""
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0], rgba[:2, ..., 3] = 200, 255  # top half opaque red, bottom half transparent
    palette = Image.fromarray(np.full((4, 4, 3), (10, 200, 30), dtype=np.uint8)).quantize(4)
    colour = [Image.fromarray(rgba), palette, Image.fromarray(np.full((4, 4), 77, np.uint8))]
    dataset, rule = dataset_of(tmp_path / "colour", colour)
    assert rule == {"channels": 3, "intensity": {"kind": "integer", "bit_depth": 8}}
    red = pixels(dataset, 0)
    assert torch.allclose(red[:, 0, 0], torch.tensor([200 / 255, 0, 0]), atol=1e-6)
    assert red[:, 3, 0].abs().max() < 1e-6
    assert torch.allclose(pixels(dataset, 1)[:, 2, 2], torch.tensor([10, 200, 30]) / 255, atol=1e-6)
    assert torch.allclose(pixels(dataset, 2), torch.full((3, 4, 4), 77 / 255), atol=1e-6)
    gray16 = np.full((4, 4), 65535, dtype=np.uint16)
    gray16[0, 0] = 0
    dataset, rule = dataset_of(tmp_path / "deep", [Image.fromarray(gray16)], ext="tif")
    assert rule == {"channels": 1, "intensity": {"kind": "integer", "bit_depth": 16}}
    assert (
        pixels(dataset, 0)[:, 0, 0].tolist() == [0, 0, 0] and pixels(dataset, 0)[:, 1, 1].tolist() == [1] * 3
    )


def gray(value, dtype):
    return Image.fromarray(np.full((4, 4), value, dtype=dtype))


def integer(depth):
    return {"kind": "integer", "bit_depth": depth}


FLOAT = {"kind": "float", "range": [0, 1]}


@pytest.mark.parametrize(
    "name, images, ext, flags, rule, expected",
    [
        ("8-bit", [gray(200, np.uint8), gray(20, np.uint8)], "png", {}, integer(8), [200 / 255, 20 / 255]),
        # 12-bit CT/MR stored in 16-bit files: the scan finds 12 bits, so the full range is used.
        ("12-bit", [gray(4000, np.uint16), gray(100, np.uint16)], "png", {}, integer(12),
         [4000 / 4095, 100 / 4095]),
        # Two images of one 16-bit set, one of them dark: both are divided by 65535 (never 256x apart).
        ("16-bit", [gray(60000, np.uint16), gray(200, np.uint16)], "png", {}, integer(16),
         [60000 / 65535, 200 / 65535]),
        ("--bit_depth", [gray(4000, np.uint16)], "png", {"bit_depth": 16}, integer(16), [4000 / 65535]),
        ("float", [gray(0.75, np.float32), gray(0.25, np.float32)], "tif", {}, FLOAT, [0.75, 0.25]),
        ("float range", [gray(250.0, np.float32)], "tif", {"intensity_range": (0, 1000)},
         {"kind": "float", "range": [0, 1000]}, [0.25]),
    ],
)  # fmt: skip
def test_one_rule_per_data_set(tmp_path, name, images, ext, flags, rule, expected):
    dataset, found = dataset_of(tmp_path, images, ext=ext, **flags)
    assert found == {"channels": 1, "intensity": rule}
    for index, value in enumerate(expected):
        assert torch.allclose(pixels(dataset, index), torch.full((3, 4, 4), value), atol=1e-6), name


def test_channels_follow_the_data(tmp_path):
    gray_set = [gray(0, np.uint8), gray(0, np.uint16)]
    assert dataset_of(tmp_path / "gray", gray_set)[1]["channels"] == 1
    assert dataset_of(tmp_path / "rgb", [*gray_set, Image.new("RGB", (4, 4))])[1]["channels"] == 3


def test_scan_checks_every_file_before_training(tmp_path):
    """A truncated image stops the run at the scan, not when the loader first reaches it."""
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    for i in range(3):
        gray(i, np.uint8).resize((64, 64)).save(root / "a" / f"{i}.png")
    data = (root / "a" / "2.png").read_bytes()
    (root / "a" / "2.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="2.png"):
        ImageFolderDataset(root, 8).scan()


def test_folder_layout_and_transform(tmp_path):
    for name in ("b", "a"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (30, 20), (255, 0, 0)).save(tmp_path / name / "x.jpeg")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    samples, classes = find_images(tmp_path)
    assert classes == ["a", "b"] and [label for _, label in samples] == [0, 1]
    dataset = ImageFolderDataset(tmp_path, 8)
    dataset.intensity = dataset.scan()["intensity"]
    image, label = dataset[1]
    assert image.shape == (3, 8, 8) and label == 1
    assert torch.allclose(image[0], torch.ones(8, 8), atol=0.02) and torch.allclose(
        image[1], -torch.ones(8, 8), atol=0.02
    )


def test_empty_class_folder_is_a_user_error(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(UserError, match="has no images"):
        find_images(tmp_path)
