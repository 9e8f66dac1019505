"""Image loading: every format a user may have becomes the right 8-bit RGB; outputs keep the data's mode."""

import numpy as np
import pytest
import torch
from PIL import Image

from dataset import ImageFolderDataset, find_images, image_mode, load_rgb
from utils import UserError, to_pil


def save(path, image):
    image.save(path)
    return path


def test_formats_load_as_rgb(tmp_path):
    gray16 = np.full((4, 4), 65535, dtype=np.uint16)
    gray16[0, 0] = 0
    loaded = load_rgb(save(tmp_path / "a.png", Image.fromarray(gray16)))
    assert (
        loaded.mode == "RGB"
        and loaded.getpixel((1, 1)) == (255, 255, 255)
        and loaded.getpixel((0, 0)) == (0, 0, 0)
    )
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0
    assert load_rgb(save(tmp_path / "b.png", Image.fromarray(rgba))).getpixel((0, 0)) == (200, 0, 0)
    palette = Image.fromarray(np.full((4, 4, 3), (10, 200, 30), dtype=np.uint8)).quantize(4)
    assert load_rgb(save(tmp_path / "c.PNG", palette)).getpixel((2, 2)) == (10, 200, 30)
    tif = save(tmp_path / "d.tif", Image.fromarray(np.full((4, 4), 77, np.uint8)))
    assert load_rgb(tif).getpixel((0, 0)) == (77, 77, 77)


def test_image_mode_and_output_mode(tmp_path):
    gray = [save(tmp_path / f"{i}.png", Image.fromarray(np.zeros((4, 4), np.uint8))) for i in range(2)]
    gray.append(save(tmp_path / "16.png", Image.fromarray(np.zeros((4, 4), np.uint16))))
    assert image_mode(gray) == "L"
    assert image_mode([*gray, save(tmp_path / "rgb.png", Image.new("RGB", (4, 4)))]) == "RGB"
    assert to_pil(np.full((2, 2, 3), 9, np.uint8), "L").mode == "L"


def test_folder_layout_and_transform(tmp_path):
    for name in ("b", "a"):
        (tmp_path / name).mkdir()
        save(tmp_path / name / "x.jpeg", Image.new("RGB", (30, 20), (255, 0, 0)))
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    samples, classes = find_images(tmp_path)
    assert classes == ["a", "b"] and [label for _, label in samples] == [0, 1]
    image, label = ImageFolderDataset(tmp_path, 8)[1]
    assert image.shape == (3, 8, 8) and label == 1
    assert torch.allclose(image[0], torch.ones(8, 8), atol=0.02) and torch.allclose(
        image[1], -torch.ones(8, 8), atol=0.02
    )


def test_empty_class_folder_is_a_user_error(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(UserError, match="has no images"):
        find_images(tmp_path)
