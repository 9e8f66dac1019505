"""One decoding rule per data set: 8-, 12-, 16-bit and float images train and sample at their own depth."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, run_script
from core import images
from utils import ImageDataset

SETS = {
    # name: (peak pixel value, PIL mode, suffix, rule the scan must find)
    "8bit": (255, "L", ".png", {"kind": "integer", "bit_depth": 8}),
    "12bit": (4095, "I;16", ".png", {"kind": "integer", "bit_depth": 12}),
    "16bit": (65535, "I;16", ".png", {"kind": "integer", "bit_depth": 16}),
    "float": (1.0, "F", ".tif", {"kind": "float", "range": [0.0, 1.0]}),
}


def write_image(path, unit, peak, mode):
    """Save values in [0, 1] (H, W) as an image whose brightest value is peak."""
    if mode == "F":
        Image.fromarray(unit.astype(np.float32), "F").save(path)
    else:
        pixels = np.rint(unit * peak).astype(np.uint8 if mode == "L" else np.uint16)
        Image.fromarray(pixels).save(path)


def make_set(root, peak, mode, suffix, classes=2, per_class=2):
    """Class folders of 16x16 images: a bright bar per class over a ramp that reaches peak."""
    ramp = np.linspace(0, 1, 256).reshape(16, 16)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            unit = ramp * (0.3 + 0.1 * i)
            unit[c * 4 : c * 4 + 3] = 1.0
            write_image(folder / f"img_{i}{suffix}", unit, peak, mode)
    return root


def test_a_12_bit_set_keeps_its_grey_levels_through_the_dataset(tmp_path):
    levels = np.rint(np.linspace(0, 4095, 256)).astype(np.uint16).reshape(16, 16)
    path = tmp_path / "ct.png"
    Image.fromarray(levels).save(path)
    found = images.scan([path])
    assert found == {"channels": 1, "intensity": {"kind": "integer", "bit_depth": 12}}
    x, _ = ImageDataset([path], [0], 16, 1, found["intensity"])[0]
    # 256 distinct values survive (dividing by 65535 and going through 8 bits left about 16).
    assert len(torch.unique(x)) == 256
    torch.testing.assert_close(x[0], torch.from_numpy(levels / 4095 * 2 - 1).float())


@pytest.fixture(scope="module")
def trained_sets(tmp_path_factory):
    """One tiny training run (one step) per kind of data set; returns {name: workdir}."""
    root = tmp_path_factory.mktemp("depths")

    def train(name):
        peak, mode, suffix, _ = SETS[name]
        data = make_set(root / "data" / name, peak, mode, suffix)
        work = root / name
        work.mkdir()
        flags = f"--num-classes 2 --max-steps 1 --batch-size 4 --val-split 0 --run-name {name}".split()
        result = run_script("ddpm_conditional.py", "--dataset-path", data, *flags, *TINY, cwd=work)
        assert result.returncode == 0, result.stderr
        return work

    return {name: train(name) for name in SETS}


@pytest.mark.parametrize("name", list(SETS))
def test_training_stores_the_scanned_rule_and_writes_its_grid_at_that_depth(trained_sets, name):
    _, _, suffix, rule = SETS[name]
    work = trained_sets[name]
    ckpt = torch.load(work / f"models/{name}/ckpt.pt", map_location="cpu", weights_only=True)
    assert ckpt["intensity"] == rule and ckpt["config"]["channels"] == 1
    ema = torch.load(work / f"models/{name}/ema_ckpt.pt", map_location="cpu", weights_only=True)
    assert ema["intensity"] == rule
    with Image.open(work / f"results/{name}/final{suffix}") as grid:
        assert grid.mode == {"8bit": "L", "12bit": "I;16", "16bit": "I;16", "float": "F"}[name]


@pytest.mark.parametrize("name,mode", [("16bit", "I;16"), ("float", "F")])
def test_sampling_writes_images_at_the_training_data_depth(trained_sets, name, mode, tmp_path):
    _, _, suffix, _ = SETS[name]
    out = tmp_path / "samples"
    ckpt = trained_sets[name] / f"models/{name}/ckpt.pt"
    flags = "--mode sample --num-samples 2 --sampler ddim --steps 2 --npz".split()
    result = run_script("ddpm_conditional_ddp.py", *flags, "--ckpt", ckpt, "--output-dir", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    files = sorted(out.rglob("*.*"))
    names = [f.relative_to(out).as_posix() for f in files]
    assert names == [f"class_0/000000{suffix}", f"class_1/000000{suffix}"]
    for path in files:
        with Image.open(path) as image:
            assert image.mode == mode
            if mode == "I;16":
                assert np.asarray(image).max() > 255  # the full 16-bit range, not 8-bit values
    npz = np.load(tmp_path / "samples.npz")
    assert npz["arr_0"].shape == (2, 16, 16, 3) and npz["arr_0"].dtype == np.uint8
    assert npz["class_names"].tolist() == ["class_0", "class_1"] and npz["arr_1"].tolist() == [0, 1]
