"""Gray 8-, 12-, 16-bit and float data end to end: train.py stores the data set's rule and channel count,
sample.py writes samples back at that depth (16-bit gray PNG for 16-bit data, float TIFF for float data)."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, run_script

# name -> (pixels of one 16 x 16 image, file suffix, extra train.py flags, stored rule, written PIL modes)
SETS = {
    "8-bit": (lambda rng: rng.integers(0, 256, (16, 16), dtype=np.uint8), "png", [],
              {"kind": "integer", "bit_depth": 8}, ("L",)),
    "12-bit": (lambda rng: rng.integers(2048, 4096, (16, 16), dtype=np.uint16), "png", [],
               {"kind": "integer", "bit_depth": 12}, ("I;16", "I")),
    "16-bit": (lambda rng: rng.integers(0, 65536, (16, 16), dtype=np.uint16), "png", [],
               {"kind": "integer", "bit_depth": 16}, ("I;16", "I")),
    "float": (lambda rng: (rng.random((16, 16)) * 1000).astype(np.float32), "tif",
              ["--intensity_range", "0", "1000"], {"kind": "float", "range": [0.0, 1000.0]}, ("F",)),
}  # fmt: skip


@pytest.mark.parametrize("name", SETS)
def test_gray_data_round_trip_at_its_depth(workspace, tmp_path, name):
    make, ext, flags, rule, modes = SETS[name]
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(make(rng)).save(tmp_path / "data" / label / f"{i}.{ext}")
    train = "--global-batch-size 2 --max-steps 1 --ckpt-every 1 --num-workers 0 --sample-every 0"
    run_script("train.py", *TINY, *train.split(), *flags, "--data-path", tmp_path / "data",
               "--results-dir", tmp_path / "results", "--vae", workspace / "vae")  # fmt: skip
    ckpt = tmp_path / "results" / "000-DiT-S-2" / "checkpoints" / "0000001.pt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["intensity"] == rule and saved["channels"] == 1

    out = tmp_path / "samples"
    sample = "--num-samples 2 --batch-size 2 --num-sampling-steps 2"
    result = run_script(
        "sample.py", "--ckpt", ckpt, *sample.split(), "--output-dir", out, "--npz", f"{out}.npz"
    )
    assert "1-channel" in result.stdout
    for label in ("a", "b"):
        with Image.open(out / label / f"000000.{ext}") as image:
            assert image.mode in modes, image.mode
            pixels = np.asarray(image)
            if rule["kind"] == "float":
                assert 0 <= pixels.min() < pixels.max() <= 1000
                continue
            assert image.info["bit_depth"] == str(rule["bit_depth"])  # what a later scan reads back
            assert pixels.max() <= 2 ** rule["bit_depth"] - 1
            if rule["bit_depth"] > 8:  # values a byte could not hold: not 8-bit data stretched
                assert pixels.max() > 255 and not np.all(pixels % 257 == 0)
    npz = np.load(f"{out}.npz")
    assert npz["arr_0"].shape == (2, 16, 16, 3) and npz["arr_0"].dtype == np.uint8
    assert (npz["arr_0"][..., 0] == npz["arr_0"][..., 2]).all()  # gray repeated for the evaluator
    assert npz["class_names"].tolist() == ["a", "b"]
