"""One decoding rule per data set, end to end: scanned at the start of training, stored in the
checkpoint, and used to write samples back at the data's depth."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import depth_set, run_script
from core import images

# 8-bit data runs end to end in test_train.py / test_inference.py and 16-bit data in
# test_cached_latents_match_uncached_loss_scale; the decoding of all four kinds is in test_dataset.py.
CASES = [
    ("12", [], {"kind": "integer", "bit_depth": 12}, ".png", "I;16"),
    ("float", ["--intensity-range", "0", "2"], {"kind": "float", "range": [0.0, 2.0]}, ".tif", "F"),
]
TINY = "--image_size 8 --batch_size 4 --unet_preset tiny --num_workers 0 --num_epochs 1".split()


@pytest.mark.parametrize(("kind", "flags", "rule", "suffix", "mode"), CASES, ids=[c[0] for c in CASES])
def test_train_stores_the_rule_and_samples_keep_the_depth(
    tmp_path, tiny_vae, kind, flags, rule, suffix, mode
):
    data = depth_set(tmp_path / "data", kind)
    out = tmp_path / "run"
    run_script(
        "train.py", "--data_root", data, "--output_dir", out, "--vae_pretrained", tiny_vae, *TINY, *flags
    )
    ckpt = torch.load(out / "checkpoint_final.pt", map_location="cpu", weights_only=True)
    assert ckpt["intensity"] == rule and ckpt["channels"] == 1
    gen = tmp_path / "gen"
    sample = ["inference.py", "--checkpoint", out / "checkpoint_final.pt", "--output_dir", gen]
    sample += ["--class_label", "b", "--num_samples", "1", "--num_inference_steps", "1"]
    run_script(*sample)
    path = gen / "b" / f"000000{suffix}"
    with Image.open(path) as written:
        assert written.mode == mode
        if suffix == ".png":
            assert written.info["bit_depth"] == str(rule["bit_depth"])
        values = np.asarray(written, dtype=np.float64)
    assert values.max() <= (4095 if kind == "12" else 2.0)  # within the data's range


def test_flags_reach_the_rule_in_both_trainers(tmp_path):
    import train
    import train_vae
    from dataset import data_rule

    twelve = tmp_path / "twelve.png"
    Image.fromarray(np.full((4, 4), 4095, dtype=np.uint16)).save(twelve)
    for parse in (train.parse_args, train_vae.parse_args):
        for spelling in ("--bit_depth", "--bit-depth"):
            args = parse(["--data_root", str(tmp_path), spelling, "16"])
            assert data_rule([twelve], args)["intensity"] == {"kind": "integer", "bit_depth": 16}
        assert data_rule([twelve], parse(["--data_root", str(tmp_path)]))["intensity"]["bit_depth"] == 12
    resumed = {"kind": "integer", "bit_depth": 16}  # a resumed run keeps its checkpoint's rule
    assert (
        data_rule([twelve], train.parse_args(["--data_root", str(tmp_path)]), resumed)["intensity"] == resumed
    )


def test_old_checkpoints_sample_as_eight_bit():
    from models import intensity_of

    assert intensity_of({"model_type": "ldm"}) == images.EIGHT_BIT
