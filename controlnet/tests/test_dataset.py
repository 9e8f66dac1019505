"""Pairing, mask scaling, image modes and joint augmentation."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FLOAT_RANGE, IMAGE_SIZE, save_at_depth, write_pairs
from core import images
from core.errors import UserError
from core.masks import find_pairs, mask_array, scan_mask_max
from core.training import split_heldout
from dataset import MaskPairDataset, load_mask
from mask_metrics import score


def test_pairs_by_stem_and_reports_unpaired(tmp_path, capsys):
    root = write_pairs(tmp_path, 3)
    Image.new("L", (8, 8)).save(root / "images" / "lonely.png")
    Image.new("L", (8, 8)).save(root / "masks" / "orphan.PNG")
    pairs = find_pairs(root / "images", root / "masks")
    assert [(i.name, m.name) for i, m in pairs] == [(f"{k:03d}.png", f"{k:03d}.png") for k in range(3)]
    out = capsys.readouterr().out
    assert "Paired 3 images" in out
    assert "unpaired images (1): lonely.png" in out and "unpaired masks (1): orphan.PNG" in out


def test_pairs_by_prefix_mapping(tmp_path):
    root = write_pairs(tmp_path, 3, image_prefix="Img_", mask_prefix="seg_")
    pairs = find_pairs(root / "images", root / "masks", "Img_", "seg_", verbose=False)
    assert [(i.name, m.name) for i, m in pairs][1] == ("Img_001.png", "seg_001.png")
    with pytest.raises(UserError, match="--image_prefix"):
        find_pairs(root / "images", root / "masks")


def test_ambiguous_stems_are_an_error(tmp_path):
    root = write_pairs(tmp_path, 1)
    Image.new("L", (8, 8)).save(root / "masks" / "000.jpg")
    with pytest.raises(UserError, match="same key"):
        find_pairs(root / "images", root / "masks")


def label_map(values, size=IMAGE_SIZE):
    """A mask with vertical stripes of the given label values."""
    stripes = np.array_split(np.arange(size), len(values))
    mask = np.zeros((size, size), np.uint8)
    for value, cols in zip(values, stripes, strict=True):
        mask[:, cols] = value
    return mask


@pytest.mark.parametrize(
    "mode, values, expected",
    [("L", (0, 1, 2), (0.0, 0.5, 1.0)), ("L", (0, 255), (0.0, 1.0)), ("I;16", (0, 1), (0.0, 1.0))],
)
def test_label_maps_keep_full_contrast(tmp_path, mode, values, expected):
    path = tmp_path / "mask.png"
    Image.fromarray(label_map(values).astype(np.uint16 if mode == "I;16" else np.uint8)).save(path)
    max_value = scan_mask_max([path], 1)
    assert max_value == max(values)
    cond = load_mask(path, 1, max_value, IMAGE_SIZE)
    assert cond.shape == (1, IMAGE_SIZE, IMAGE_SIZE)
    assert sorted(cond.unique().tolist()) == pytest.approx(list(expected))


def test_masks_on_another_scale_are_reported(tmp_path, capsys):
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    Image.fromarray(label_map((0, 255))).save(paths[0])
    Image.fromarray(label_map((0, 1))).save(paths[1])
    assert scan_mask_max(paths, 1) == 255
    assert "1 masks have values far below the mask scale K=255" in capsys.readouterr().out
    load_mask(paths[1], 1, 255, IMAGE_SIZE)
    assert "b.png" in capsys.readouterr().out
    assert scan_mask_max(paths[:1], 1) == 255 and "warning" not in capsys.readouterr().out


def test_palette_masks_keep_label_indices_and_rgb_masks_give_three_channels(tmp_path):
    palette = Image.fromarray(label_map((0, 1, 2))).convert("P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    palette.save(tmp_path / "p.png")
    assert set(np.unique(mask_array(Image.open(tmp_path / "p.png"), 1))) == {0, 1, 2}
    rgb = mask_array(Image.open(tmp_path / "p.png"), 3)
    assert rgb.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and rgb[..., 0].max() == 255


def make_dataset(root, flip=True, image_channels=1, mask_channels=1):
    """The data set as train.py builds it: decoded under the rule of one scan of its images."""
    pairs = find_pairs(root / "images", root / "masks", verbose=False)
    samples = [(i, m, 0) for i, m in pairs]
    rule = images.scan([i for i, _ in pairs])["intensity"]
    return MaskPairDataset(samples, IMAGE_SIZE, image_channels, mask_channels, 255, flip, 0, rule)


def test_masks_of_another_size_are_resized_nearest(tmp_path):
    root = write_pairs(tmp_path, 2, mask_size=IMAGE_SIZE * 3)
    item = make_dataset(root, flip=False)[0]
    assert item["conditioning"].shape == (1, IMAGE_SIZE, IMAGE_SIZE)
    assert set(item["conditioning"].unique().tolist()) <= {0.0, 1.0}  # nearest: no blended labels


def test_flip_moves_image_and_mask_together(tmp_path):
    root = write_pairs(tmp_path, 6)
    plain, flipped = make_dataset(root, flip=False), make_dataset(root, flip=True)
    flips = 0
    for epoch in range(3):
        flipped.set_epoch(epoch)
        for i in range(len(plain)):
            a, b = plain[i], flipped[i]
            bright = b["pixel_values"] > 0.3  # the image is bright exactly where the mask is set
            assert torch.equal(bright, b["conditioning"] > 0.5)
            was_flipped = not torch.equal(a["conditioning"], b["conditioning"])
            flips += was_flipped
            if was_flipped:
                assert torch.equal(b["conditioning"], a["conditioning"].flip(-1))
                assert torch.equal(b["pixel_values"], a["pixel_values"].flip(-1))
    assert 0 < flips < 18


def test_image_modes_and_channels(tmp_path):
    root = write_pairs(tmp_path, 1)
    gray = np.asarray(Image.open(root / "images" / "000.png"))
    rgba = np.dstack([gray, gray, gray, np.full_like(gray, 255)])
    rgba[0, 0, 3] = 0  # a transparent pixel becomes black
    Image.fromarray(rgba, "RGBA").save(root / "images" / "000.png")
    rgb_item = make_dataset(root, flip=False, image_channels=3, mask_channels=3)[0]
    assert rgb_item["pixel_values"].shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert rgb_item["conditioning"].shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    Image.fromarray(gray.astype(np.uint16) * 257).save(root / "images" / "000.png")
    gray_item = make_dataset(root, flip=False)[0]
    assert rgb_item["pixel_values"][:, 0, 0].tolist() == [-1.0, -1.0, -1.0]
    rgb_item["pixel_values"][:, 0, 0] = gray_item["pixel_values"][0, 0, 0]
    torch.testing.assert_close(gray_item["pixel_values"][0], rgb_item["pixel_values"][0], atol=1e-6, rtol=0)
    assert gray_item["pixel_values"].min() >= -1 and gray_item["pixel_values"].max() <= 1


def test_unreadable_image_is_a_user_error(tmp_path):
    root = write_pairs(tmp_path, 1)
    (root / "images" / "000.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="000.png"):
        make_dataset(root)[0]


def test_split_is_deterministic_and_disjoint():
    train, val = split_heldout(10, 0.2, seed=1)
    assert (train, val) == split_heldout(10, 0.2, seed=1)
    assert len(val) == 2 and not set(train) & set(val) and len(train) + len(val) == 10
    assert split_heldout(2, 0.01, 0)[1] != [] and split_heldout(1, 0.5, 0) == ([0], [])


@pytest.mark.parametrize(
    ("depth", "rule"),
    [
        (8, {"kind": "integer", "bit_depth": 8}),
        (12, {"kind": "integer", "bit_depth": 12}),
        (16, {"kind": "integer", "bit_depth": 16}),
        ("float", {"kind": "float", "range": list(FLOAT_RANGE)}),
    ],
)
def test_every_depth_is_decoded_by_one_rule_per_data_set(tmp_path, depth, rule):
    root = write_pairs(tmp_path, 3, depth=depth)
    dark = np.full(
        (IMAGE_SIZE, IMAGE_SIZE), 20, np.uint8
    )  # a per-image rule would stretch it, or leave 12-bit dim
    save_at_depth(dark, root / "images" / "001.png", depth)
    pairs = find_pairs(root / "images", root / "masks", verbose=False)
    intensity_range = FLOAT_RANGE if depth == "float" else None
    found = images.scan([i for i, _ in pairs], intensity_range=intensity_range)["intensity"]
    assert found == rule
    dataset = MaskPairDataset([(i, m, 0) for i, m in pairs], IMAGE_SIZE, 1, 1, 255, False, 0, found)
    step = 2 / (2 ** rule.get("bit_depth", 16) - 1)  # one grey level of the data, in [-1, 1]
    torch.testing.assert_close(
        dataset[1]["pixel_values"],
        torch.full_like(dataset[1]["pixel_values"], 20 / 255 * 2 - 1),
        atol=step,
        rtol=0,
    )
    bright = dataset[0]["pixel_values"]
    assert bright.max() > 0.6 and bright.min() >= -1  # the bright image of the set stays bright


def test_alpha_of_rgba_masks_is_not_foreground(tmp_path):
    shape = label_map((0, 1)) > 0  # the right half
    full = np.full(shape.shape, 255, np.uint8)
    masks = {
        "opaque": np.dstack([shape * 255] * 3 + [full]),  # the usual RGBA export: alpha 255 everywhere
        "cutout": np.dstack([full] * 3 + [shape * 255]),  # white everywhere, transparent background
    }
    perfect = Image.fromarray((shape * 200 + 20).astype(np.uint8))
    for name, array in masks.items():
        path = tmp_path / f"{name}.png"
        Image.fromarray(array.astype(np.uint8), "RGBA").save(path)
        for channels in (1, 3):
            cond = load_mask(path, channels, 255, IMAGE_SIZE)
            assert torch.equal(cond.amax(0) > 0, torch.from_numpy(shape)), (name, channels)
        assert score(Image.open(path), perfect) == (1.0, 1.0), name
