"""Image loading in every mode, channel detection and the held-out split."""

import numpy as np
import pytest
from PIL import Image

from dataset import ClassImageDataset, detect_channels, find_class_images, split_holdout, to_mode
from utils import UserError


def test_modes_load_with_the_right_channels_and_range(tmp_path):
    deep = np.full((8, 8), 40000, dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette.save(tmp_path / "palette.png")
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 128
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    assert np.asarray(to_mode(Image.open(tmp_path / "deep.png"), 1)).mean() == pytest.approx(
        40000 / 257, abs=1
    )
    assert np.asarray(to_mode(Image.open(tmp_path / "palette.png"), 3))[0, 0].tolist() == [200, 100, 50]
    assert np.asarray(to_mode(Image.open(tmp_path / "rgba.png"), 3))[0, 0].tolist() == [128, 0, 0]
    assert detect_channels([tmp_path / "deep.png"]) == 1
    assert detect_channels([tmp_path / "deep.png", tmp_path / "palette.png"]) == 3


def test_dataset_items_and_classes(gray_data):
    names, samples = find_class_images(gray_data)
    assert names == ["benign", "malignant"] and len(samples) == 10
    image, label = ClassImageDataset(samples, 8, 1)[7]
    assert image.shape == (1, 8, 8) and label == 1
    assert -1 <= image.min() and image.max() <= 1 and image.std() > 0.1  # 16-bit data not collapsed


def test_split_is_deterministic_and_keeps_every_class():
    samples = [(f"{c}_{i}", c) for c in range(3) for i in range(10)]
    train, val = split_holdout(samples, 0.2, seed=1)
    assert (train, val) == split_holdout(samples, 0.2, seed=1)
    assert sorted(label for _, label in val) == [0, 0, 1, 1, 2, 2]
    assert not set(train) & set(val)
    train, val = split_holdout([("a", 0), ("b", 1), ("c", 1)], 0.5, 0)
    assert ("a", 0) in train and len(val) == 1 and val[0][1] == 1  # a lone image always trains


def test_missing_and_empty_folders_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not a folder"):
        find_class_images(tmp_path / "nope")
    with pytest.raises(UserError, match="no class sub-folders"):
        find_class_images(tmp_path)
    (tmp_path / "a").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        find_class_images(tmp_path)
