"""Image loading in every mode and bit depth, channel detection and the held-out split."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import depth_set
from core import images
from core.errors import UserError
from dataset import ClassImageDataset, find_class_images, split_holdout


def test_modes_load_with_the_right_channels_and_range(tmp_path):
    deep = np.full((8, 8), 40000, dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette.save(tmp_path / "palette.png")
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 128
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    deep_rule = images.scan([tmp_path / "deep.png"])["intensity"]
    assert deep_rule == {"kind": "integer", "bit_depth": 16}
    assert images.load(tmp_path / "deep.png", deep_rule, 1).mean().item() == pytest.approx(40000 / 65535)
    eight_bit = lambda name: (images.load(tmp_path / name, images.EIGHT_BIT, 3)[:, 0, 0] * 255).round()  # noqa: E731
    assert eight_bit("palette.png").tolist() == [200, 100, 50]
    assert eight_bit("rgba.png").tolist() == [128, 0, 0]  # alpha composited on black
    assert images.scan([tmp_path / "deep.png"])["channels"] == 1
    assert images.scan([tmp_path / "palette.png", tmp_path / "rgba.png"])["channels"] == 3


@pytest.mark.parametrize(
    ("kind", "rule"),
    [
        ("8", {"kind": "integer", "bit_depth": 8}),
        ("12", {"kind": "integer", "bit_depth": 12}),
        ("16", {"kind": "integer", "bit_depth": 16}),
        ("float", {"kind": "float", "range": [0.0, 1.0]}),
    ],
)
def test_one_rule_per_data_set_for_every_depth(tmp_path, kind, rule):
    _, samples = find_class_images(depth_set(tmp_path, kind))
    data = images.scan([path for path, _ in samples])
    assert data == {"channels": 1, "intensity": rule}
    dataset = ClassImageDataset(samples[:2], 8, 1, rule)
    (bright, _), (dark, _) = dataset[0], dataset[1]
    assert bright.max().item() == pytest.approx(1.0, abs=1e-3) and bright.min().item() == pytest.approx(-1.0)
    # The darker image keeps its place on the same scale (not stretched to its own maximum).
    torch.testing.assert_close((dark + 1) / 2, (bright + 1) / 2 * 0.25, atol=2 / 255, rtol=0)


def test_bit_depth_and_range_flags_override_the_scan(tmp_path):
    twelve = tmp_path / "twelve.png"
    Image.fromarray(np.full((4, 4), 4095, dtype=np.uint16)).save(twelve)
    rule = images.scan([twelve], bit_depth=16)["intensity"]
    assert rule == {"kind": "integer", "bit_depth": 16}
    assert images.load(twelve, rule, 1).max().item() == pytest.approx(4095 / 65535)
    hounsfield = tmp_path / "ct.tif"
    Image.fromarray(np.full((4, 4), 0.0, dtype=np.float32), "F").save(hounsfield)
    rule = images.scan([hounsfield], intensity_range=(-1000, 1000))["intensity"]
    assert images.load(hounsfield, rule, 1).mean().item() == pytest.approx(0.5)


def test_dataset_items_and_classes(gray_data):
    names, samples = find_class_images(gray_data)
    assert names == ["benign", "malignant"] and len(samples) == 10
    rule = images.scan([path for path, _ in samples])["intensity"]
    image, label = ClassImageDataset(samples, 8, 1, rule)[7]
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
