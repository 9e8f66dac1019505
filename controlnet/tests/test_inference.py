"""inference.py and mask_metrics.py end to end as subprocesses."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import IMAGE_SIZE, check, infer, run_script
from core import images


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, trained_run, pair_data):
    """Folder inference, two images per mask, with comparisons and mask scores."""
    out = tmp_path_factory.mktemp("gen")
    result = check(
        infer(
            trained_run[0] / "checkpoint_best.pt",
            *["--mask-folder", pair_data / "masks", "--output_dir", out],
            *"--num_images 2 --batch_size 5 --num_inference_steps 2 --save_comparison --eval_masks".split(),
        )
    )
    return out, result


def test_folder_inference_names_outputs_after_masks(folder_run, pair_data):
    out, result = folder_run
    stems = sorted(p.stem for p in (pair_data / "masks").iterdir())
    samples = sorted(f"{s}_{k:03d}.png" for s in stems for k in (0, 1))
    # the sample tree holds the samples and nothing else, so evaluating it recursively counts only them
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == samples
    image = Image.open(out / "000_000.png")
    assert image.mode == "L" and image.size == (IMAGE_SIZE, IMAGE_SIZE)  # saved in the data's mode
    comparison = Image.open(out.with_name(f"{out.name}_comparison") / "000.png")
    assert comparison.size == (3 * IMAGE_SIZE, IMAGE_SIZE)  # mask | image 0 | image 1
    assert np.asarray(comparison)[:, :IMAGE_SIZE].max() == 255  # the mask at full contrast
    assert "timing: 16 images, 2 steps" in result.stdout and "ms/step" in result.stdout
    assert "mask faithfulness over 16 images: Dice" in result.stdout


def test_rerun_skips_existing_and_batching_does_not_change_images(folder_run, trained_run, pair_data):
    out, _ = folder_run
    before = {name: (out / name).read_bytes() for name in ("003_001.png", "005_000.png")}
    (out / "003_001.png").unlink()
    (out / "005_000.png").write_bytes(before["005_000.png"][:40])  # truncated by a killed run: made again
    rerun = check(
        infer(
            trained_run[0] / "checkpoint_best.pt",
            *["--mask_folder", pair_data / "masks", "--output_dir", out],
            *"--num_images 2 --batch_size 1 --num_inference_steps 2".split(),
        )
    )
    assert "8 masks x 2 images: 2 to generate" in rerun.stdout
    for name, data in before.items():
        assert (out / name).read_bytes() == data  # seeded per image, not per batch


def test_mask_metrics_script(folder_run, pair_data):
    result = check(
        run_script(
            "mask_metrics.py", "--mask_folder", pair_data / "masks", "--generated_folder", folder_run[0]
        )
    )
    assert "mask faithfulness over 16 images" in result.stdout


def test_mask_metrics_scores_masks_as_the_model_saw_them(tmp_path):
    """A perfect generation scores Dice 1 for a non-square mask and an RGBA mask, also as 12-bit output."""
    masks, generated = tmp_path / "masks", tmp_path / "generated"
    masks.mkdir()
    generated.mkdir()
    wide = np.zeros((IMAGE_SIZE, 2 * IMAGE_SIZE), np.uint8)  # the centre crop cuts its sides
    wide[3:13, IMAGE_SIZE - 4 : 2 * IMAGE_SIZE - 1] = 255
    Image.fromarray(wide).save(masks / "wide.png")
    seen_wide = wide[:, IMAGE_SIZE // 2 : IMAGE_SIZE // 2 + IMAGE_SIZE] > 0
    shape = np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool)
    shape[2:9, 5:14] = True
    rgba = np.dstack([shape * 255] * 3 + [np.full(shape.shape, 255)]).astype(np.uint8)  # opaque alpha
    Image.fromarray(rgba, "RGBA").save(masks / "rgba.png")
    deep = {"kind": "integer", "bit_depth": 12}
    for stem, seen in (("wide", seen_wide), ("rgba", shape)):
        images.save(torch.from_numpy(seen * 0.7 + 0.15)[None].float(), generated / f"{stem}_000.png", deep)
    result = check(run_script("mask_metrics.py", "--mask_folder", masks, "--generated_folder", generated))
    assert "mask faithfulness over 2 images: Dice 1.0000 +- 0.0000, IoU 1.0000" in result.stdout
