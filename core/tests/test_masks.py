"""Image/mask pairing by file name and mask decoding to integer labels (core/masks.py)."""

import numpy as np
import pytest
from PIL import Image

from core.errors import UserError
from core.masks import describe_unpaired, find_pairs, mask_array, pair_key, scan_mask_max


def write(folder, names, value=255, size=4):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(np.full((size, size), value, np.uint8)).save(folder / name)


def test_pairs_by_stem_and_lists_the_unpaired(tmp_path, capsys):
    write(tmp_path / "images", ["a.png", "b.png", "lonely.png"])
    write(tmp_path / "masks", ["b.PNG", "a.png", "orphan.png"])
    pairs = find_pairs(tmp_path / "images", tmp_path / "masks")
    assert [(i.name, m.name) for i, m in pairs] == [("a.png", "a.png"), ("b.png", "b.PNG")]
    out = capsys.readouterr().out
    assert "Paired 2 images" in out and "unpaired images (1): lonely.png" in out
    assert "unpaired masks (1): orphan.png" in out


def test_prefixes_pair_and_a_missing_prefix_is_skipped(tmp_path):
    write(tmp_path / "images", ["Img_001.png", "Img_002.png", "notes.png"])
    write(tmp_path / "masks", ["seg_001.png", "seg_002.png"])
    pairs = find_pairs(tmp_path / "images", tmp_path / "masks", "Img_", "seg_", verbose=False)
    assert [m.name for _, m in pairs] == ["seg_001.png", "seg_002.png"]
    assert pair_key(tmp_path / "notes.png", "Img_") is None and pair_key("x/Img_7.tif", "Img_") == "7"
    with pytest.raises(UserError, match="--image_prefix"):
        find_pairs(tmp_path / "images", tmp_path / "masks")  # stems differ without the prefixes


def test_two_files_with_one_key_and_missing_folders_are_user_errors(tmp_path):
    write(tmp_path / "images", ["001.png", "001.jpg"])
    write(tmp_path / "masks", ["001.png"])
    with pytest.raises(UserError, match="same key '001'"):
        find_pairs(tmp_path / "images", tmp_path / "masks")
    with pytest.raises(UserError, match="does not exist"):
        find_pairs(tmp_path / "nowhere", tmp_path / "masks")


def test_describe_unpaired_caps_the_list(tmp_path):
    line = describe_unpaired("masks", [tmp_path / f"{k}.png" for k in range(12)], limit=2)
    assert line == "  unpaired masks (12): 0.png, 1.png and 10 more"


def test_palette_sixteen_bit_float_and_alpha_masks_decode_to_labels():
    labels = np.array([[0, 1], [2, 3]], np.uint8)
    palette = Image.new("P", (2, 2))
    palette.putdata(labels.flatten().tolist())
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    assert mask_array(palette).squeeze(-1).tolist() == labels.tolist()  # indices, not colours
    assert mask_array(palette, 3).shape == (2, 2, 3)
    wide = Image.fromarray(labels.astype(np.uint16) * 1000)
    assert mask_array(wide).squeeze(-1).tolist() == [[0, 1000], [2000, 3000]]
    floats = Image.fromarray(np.array([[0.2, 0.9], [1.6, 2.4]], np.float32))
    assert mask_array(floats).squeeze(-1).tolist() == [[0, 1], [2, 2]]
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 255, [[255, 0], [200, 100]]
    assert mask_array(Image.fromarray(rgba)).squeeze(-1).tolist() == [[255, 0], [255, 0]]
    assert mask_array(Image.fromarray(labels * 80)).dtype == np.int64


def test_mask_scale_is_the_largest_label_or_the_given_value(tmp_path, capsys):
    Image.fromarray(np.array([[0, 1], [2, 0]], np.uint8)).save(tmp_path / "labels.png")
    Image.fromarray(np.array([[0, 255], [0, 0]], np.uint8)).save(tmp_path / "binary.png")
    assert scan_mask_max([tmp_path / "labels.png"]) == 2
    assert scan_mask_max([tmp_path / "labels.png"], max_value=7) == 7
    assert scan_mask_max([tmp_path / "labels.png", tmp_path / "binary.png"]) == 255
    assert "labels.png" in capsys.readouterr().out  # 2 of 255 would look black: one warning says so
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(UserError, match="broken.png"):
        scan_mask_max([tmp_path / "broken.png"])
