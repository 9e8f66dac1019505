"""inference.py and mask_metrics.py end to end as subprocesses."""

import numpy as np
import pytest
from PIL import Image

from conftest import IMAGE_SIZE, check, run_script


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, trained_run, pair_data):
    """Folder inference, two images per mask, with comparisons and mask scores."""
    out = tmp_path_factory.mktemp("gen")
    result = check(
        run_script(
            "inference.py",
            "--checkpoint",
            trained_run[0] / "checkpoint_best.pt",
            "--mask-folder",
            pair_data / "masks",
            "--num_images",
            2,
            "--batch_size",
            5,
            "--num_inference_steps",
            2,
            "--output_dir",
            out,
            "--save_comparison",
            "--eval_masks",
        )
    )
    return out, result


def test_folder_inference_names_outputs_after_masks(folder_run, pair_data):
    out, result = folder_run
    stems = sorted(p.stem for p in (pair_data / "masks").iterdir())
    assert sorted(p.name for p in out.glob("*.png")) == sorted(
        f"{s}_{k:03d}.png" for s in stems for k in (0, 1)
    )
    image = Image.open(out / "000_000.png")
    assert image.mode == "L" and image.size == (IMAGE_SIZE, IMAGE_SIZE)  # saved in the data's mode
    comparison = Image.open(out / "comparison" / "000.png")
    assert comparison.size == (3 * IMAGE_SIZE, IMAGE_SIZE)  # mask | image 0 | image 1
    assert np.asarray(comparison)[:, :IMAGE_SIZE].max() == 255  # the mask at full contrast
    assert "timing: 16 images, 2 steps" in result.stdout and "ms/step" in result.stdout
    assert "mask faithfulness over 16 images: Dice" in result.stdout


def test_rerun_skips_existing_and_batching_does_not_change_images(folder_run, trained_run, pair_data):
    out, _ = folder_run
    before = (out / "003_001.png").read_bytes()
    (out / "003_001.png").unlink()
    rerun = check(
        run_script(
            "inference.py",
            "--checkpoint",
            trained_run[0] / "checkpoint_best.pt",
            "--mask_folder",
            pair_data / "masks",
            "--num_images",
            2,
            "--batch_size",
            1,
            "--num_inference_steps",
            2,
            "--output_dir",
            out,
        )
    )
    assert "8 masks x 2 images: 1 to generate" in rerun.stdout
    assert (out / "003_001.png").read_bytes() == before  # seeded per image, not per batch


def test_mask_metrics_script(folder_run, pair_data):
    result = check(
        run_script(
            "mask_metrics.py", "--mask_folder", pair_data / "masks", "--generated_folder", folder_run[0]
        )
    )
    assert "mask faithfulness over 16 images" in result.stdout
