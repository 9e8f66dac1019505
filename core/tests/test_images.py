"""The one decoding rule: bit depth decided per data set, written back at the same depth."""

import numpy as np
import pytest
import torch
from PIL import Image

from core import images
from core.errors import UserError


def write(path, array, mode=None):
    Image.fromarray(array, mode).save(path)
    return path


@pytest.mark.parametrize(
    ("dtype", "peak", "depth"),
    [(np.uint8, 200, 8), (np.uint16, 4000, 12), (np.uint16, 1000, 10), (np.uint16, 65535, 16)],
)
def test_scan_rounds_the_set_maximum_up_to_a_bit_depth(tmp_path, dtype, peak, depth):
    bright = write(tmp_path / "a.png", np.full((4, 4), peak, dtype))
    dark = write(tmp_path / "b.png", np.full((4, 4), peak // 8, dtype))
    found = images.scan([bright, dark])
    assert found == {"channels": 1, "intensity": {"kind": "integer", "bit_depth": depth}}
    # One rule for the set: the dark image keeps its ratio to the bright one.
    rule = found["intensity"]
    a, b = (images.load(p, rule, 1) for p in (bright, dark))
    assert a.max().item() == pytest.approx(peak / (2**depth - 1))
    assert b.max().item() == pytest.approx((peak // 8) / (2**depth - 1))


def test_twelve_bit_scans_keep_their_grey_levels(tmp_path):
    ramp = np.arange(4096, dtype=np.uint16).reshape(64, 64)
    path = write(tmp_path / "ct.png", ramp)
    rule = images.scan([path])["intensity"]
    assert len(torch.unique(images.load(path, rule, 1))) == 4096


def test_bit_depth_flag_overrides_the_scan(tmp_path):
    path = write(tmp_path / "a.png", np.full((4, 4), 100, np.uint16))
    rule = images.scan([path], bit_depth=12)["intensity"]
    assert rule == {"kind": "integer", "bit_depth": 12}
    assert images.load(path, rule, 1).max().item() == pytest.approx(100 / 4095)


def test_float_images_use_the_stated_range(tmp_path):
    values = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    unit = tmp_path / "unit.tif"
    Image.fromarray(values, "F").save(unit)
    rule = images.scan([unit])["intensity"]
    assert rule == {"kind": "float", "range": [0.0, 1.0]}
    assert images.load(unit, rule, 1).max().item() == pytest.approx(1.0)
    hounsfield = tmp_path / "hu.tif"
    Image.fromarray(values * 2000 - 1000, "F").save(hounsfield)
    rule = images.scan([hounsfield], intensity_range=(-1000, 1000))["intensity"]
    assert images.load(hounsfield, rule, 1).flatten().tolist() == pytest.approx(
        values.flatten().tolist(), abs=1e-6
    )


def test_mixed_float_and_integer_sets_are_refused(tmp_path):
    a = write(tmp_path / "a.png", np.zeros((4, 4), np.uint8))
    b = tmp_path / "b.tif"
    Image.fromarray(np.zeros((4, 4), np.float32), "F").save(b)
    with pytest.raises(UserError, match="mixes float"):
        images.scan([a, b])


def test_truncated_image_is_found_by_the_scan(tmp_path):
    good = write(tmp_path / "good.png", np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8))
    bad = tmp_path / "bad.png"
    bad.write_bytes(good.read_bytes()[:60])
    with pytest.raises(UserError, match="bad.png"):
        images.scan([good, bad])


def test_modes_decode_to_the_requested_channels(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 255
    rgba[0, 0, 3] = 0  # transparent pixel composites to black
    image = Image.fromarray(rgba, "RGBA")
    out = images.decode(image, images.EIGHT_BIT, 3)
    assert out.shape == (2, 2, 3) and out[0, 0].tolist() == [0, 0, 0] and out[1, 1].tolist() == [1, 0, 0]
    gray = images.decode(Image.fromarray(np.full((2, 2), 255, np.uint8)), images.EIGHT_BIT, 3)
    assert gray.shape == (2, 2, 3) and np.all(gray == 1)
    palette = Image.fromarray(np.full((2, 2, 3), 128, np.uint8)).convert("P")
    assert images.decode(palette, images.EIGHT_BIT, 1).shape == (2, 2, 1)
    red = Image.fromarray(np.array([[[255, 0, 0]]], np.uint8)).convert("P").convert("PA")
    assert images.decode(red, images.EIGHT_BIT, 3)[0, 0].tolist() == [1, 0, 0]  # colour kept


@pytest.mark.parametrize(
    ("rule", "suffix", "mode"),
    [
        ({"kind": "integer", "bit_depth": 8}, ".png", "L"),
        ({"kind": "integer", "bit_depth": 12}, ".png", "I;16"),
        ({"kind": "integer", "bit_depth": 16}, ".png", "I;16"),
        ({"kind": "float", "range": [-1000.0, 1000.0]}, ".tif", "F"),
    ],
)
def test_samples_are_written_back_at_the_data_depth(tmp_path, rule, suffix, mode):
    sample = torch.linspace(0, 1, 64).reshape(1, 8, 8)
    path = tmp_path / f"s{images.suffix(rule)}"
    assert path.suffix == suffix
    images.save(sample, path, rule)
    with Image.open(path) as written:
        assert written.mode == mode
    again = images.scan([path])["intensity"]
    if rule["kind"] == "integer":
        assert again == rule  # the declared depth survives dark samples
    back = images.load(path, rule, 1)
    step = 1 / (2 ** rule.get("bit_depth", 16) - 1)
    assert torch.allclose(back, sample, atol=step)
    assert not list(tmp_path.glob(".*"))  # no temporaries left


def test_uint8_rgb_for_npz():
    batch = torch.ones(2, 1, 4, 4)
    out = images.to_uint8_rgb(batch)
    assert out.shape == (2, 4, 4, 3) and out.dtype == np.uint8 and out.max() == 255


def test_colour_samples_of_deep_data_are_tagged_as_written(tmp_path):
    rule = {"kind": "integer", "bit_depth": 16}
    images.save(torch.full((3, 4, 4), 0.5), tmp_path / "c.png", rule)
    assert images.scan([tmp_path / "c.png"])["intensity"]["bit_depth"] == 8


def test_scans_of_parts_combine_to_the_scan_of_the_whole(tmp_path):
    gray = write(tmp_path / "g.png", np.full((4, 4), 4000, np.uint16))
    colour = write(tmp_path / "c.png", np.zeros((4, 4, 3), np.uint8))
    assert images.combine([images.scan([gray]), images.scan([colour])]) == images.scan([gray, colour])
    floats = tmp_path / "f.tif"
    Image.fromarray(np.zeros((4, 4), np.float32), "F").save(floats)
    with pytest.raises(UserError, match="mixes float"):
        images.combine([images.scan([gray]), images.scan([floats])])
