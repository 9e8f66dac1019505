"""Bad input to every script: exit code 2, one clear line naming the problem, nothing overwritten."""

import pytest

from conftest import HERE, run_many, train_args, write_pairs
from core.training import split_heldout

TRAIN_CASES = {
    "no_ldm": "--ldm_checkpoint is required",
    "wrong_model_type": "not of type 'ldm'",
    "missing_data_root": "--data_root",
    "no_pairs": "no image in",
    "unreadable_image": "001.png",
    "existing_run": "--resume latest",
    "offline_vae": "--vae_pretrained",
    "bad_image_size": "--image_size 18",
    "num_epochs_zero": "--num_epochs/--num-epochs/--epochs: must be an integer >= 1, got 0",
    "save_every_zero": "--save_every/--save-every: must be an integer >= 1, got 0",
    "batch_size_negative": "--batch_size/--batch-size: must be an integer >= 1, got -2",
    "learning_rate_negative": "--learning_rate/--learning-rate/--lr: must be a number > 0, got -1",
    "learning_rate_nan": "--learning_rate/--learning-rate/--lr: expected a finite number, got 'nan'",
    "ema_decay_one": "--ema_decay/--ema-decay: must be a fraction in [0, 1), got 1",
    "ema_decay_two": "--ema_decay/--ema-decay: must be a fraction in [0, 1), got 2",
    "num_workers_negative": "--num_workers/--num-workers: must be an integer >= 0, got -1",
    "val_fraction_one": "--val_fraction/--val-fraction/--val_split/--val-split: "
    "must be a fraction in [0, 1), got 1",
    "lr_scheduler_unknown": "--lr_scheduler/--lr-scheduler: invalid choice: 'warmup'",
    "bit_depth_zero": "--bit_depth/--bit-depth: must be a bit depth from 1 to 32, got 0",
    "intensity_range_reversed": "--intensity_range needs LOW < HIGH, got 1 0",
    "bit_depth_on_float_images": "--bit_depth applies to integer images",
    "output_dir_is_file": "is a file, not a folder",
    "output_dir_under_file": "is not writable",
    "resume_missing": "--resume",
    "truncated_validation_image": "003.png",
    "truncated_mask": "006.png",
}
INFERENCE_CASES = {
    "ldm_as_checkpoint": "not of type 'controlnet'",
    "empty_mask_folder": "holds no images",
    "class_name": "'cat'",
    "class_label_range": "--class_label 7",
    "mask_and_mask_folder": "give exactly one of --mask and --mask_folder",
    "controlnet_scale_nan": "--controlnet_scale/--controlnet-scale: expected a finite number, got 'nan'",
    "controlnet_scale_inf": "--controlnet_scale/--controlnet-scale: expected a finite number, got 'inf'",
    "guidance_scale_nan": "--cfg_scale/--cfg-scale/--guidance_scale/--guidance-scale: "
    "expected a finite number",
    "cfg_scale_inf": "expected a finite number, got '-inf'",
    "num_images_zero": "--num_images/--num-images: must be an integer >= 1, got 0",
    "inference_batch_size_negative": "--batch_size/--batch-size: must be an integer >= 1, got -2",
    "inference_output_dir_is_file": "is a file, not a folder",
    "inference_output_dir_under_file": "is not writable",
    "comparison_dir_is_file": "--comparison_dir",
}


def truncated(path):
    """Cut an image file in half: its header still reads, its pixels do not (a copy that was interrupted)."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def train_cases(tmp, pair_data, ldm, run_dir):
    """Command lines of bad training inputs, run from the repository root."""
    empty, broken = tmp / "empty", write_pairs(tmp / "broken", 3)
    (empty / "images").mkdir(parents=True)
    (empty / "masks").mkdir()
    (broken / "images" / "001.png").write_bytes(b"\x89PNG truncated")
    bad_val, bad_mask = write_pairs(tmp / "bad_val", 8), write_pairs(tmp / "bad_mask", 8)
    assert 3 in split_heldout(8, 0.25, 42)[1]  # 003 is a validation pair of train_args' split
    truncated(bad_val / "images" / "003.png")
    truncated(bad_mask / "masks" / "006.png")
    floats = write_pairs(tmp / "floats", 2, depth="float")
    out, a_file = tmp / "out", tmp / "a_file"
    a_file.write_text("not a folder")
    return {
        "no_ldm": ["--data_root", pair_data],
        "wrong_model_type": train_args(pair_data, run_dir / "checkpoint_final.pt", out),
        "missing_data_root": train_args(tmp / "nowhere", ldm, out),
        "no_pairs": train_args(empty, ldm, out),
        "unreadable_image": train_args(broken, ldm, out),
        "existing_run": train_args(pair_data, ldm, run_dir),
        "offline_vae": train_args(pair_data, ldm, out, "--vae_pretrained", "stabilityai/sd-vae-ft-mse"),
        "bad_image_size": train_args(pair_data, ldm, out, "--image_size", 18),
        "num_epochs_zero": train_args(pair_data, ldm, out, "--num_epochs", 0),
        "save_every_zero": train_args(pair_data, ldm, out, "--save_every", 0),
        "batch_size_negative": train_args(pair_data, ldm, out, "--batch_size", -2),
        "learning_rate_negative": train_args(pair_data, ldm, out, "--learning_rate", -1),
        "learning_rate_nan": train_args(pair_data, ldm, out, "--learning_rate", "nan"),
        "ema_decay_one": train_args(pair_data, ldm, out, "--ema_decay", 1),
        "ema_decay_two": train_args(pair_data, ldm, out, "--ema_decay", 2),
        "num_workers_negative": train_args(pair_data, ldm, out, "--num_workers", -1),
        "val_fraction_one": train_args(pair_data, ldm, out, "--val_fraction", 1),
        "lr_scheduler_unknown": train_args(pair_data, ldm, out, "--lr_scheduler", "warmup"),
        "bit_depth_zero": train_args(pair_data, ldm, out, "--bit_depth", 0),
        "intensity_range_reversed": train_args(pair_data, ldm, out, "--intensity_range", 1, 0),
        "bit_depth_on_float_images": train_args(floats, ldm, out, "--bit_depth", 12),
        "output_dir_is_file": train_args(pair_data, ldm, a_file),
        "output_dir_under_file": train_args(pair_data, ldm, a_file / "run"),
        "resume_missing": train_args(pair_data, ldm, out, "--resume", tmp / "missing.pt"),
        "truncated_validation_image": train_args(bad_val, ldm, tmp / "out_bad_val"),
        "truncated_mask": train_args(bad_mask, ldm, tmp / "out_bad_mask", "--mask_max_value", 255),
    }


def inference_cases(tmp, pair_data, ldm, run_dir):
    """Command lines of bad inference inputs (--output_dir tmp/generated unless they give their own)."""
    ckpt, mask = run_dir / "checkpoint_final.pt", pair_data / "masks" / "000.png"
    (tmp / "empty_masks").mkdir()
    base = ["--checkpoint", ckpt, "--mask", mask]
    a_file = tmp / "a_file"  # written by train_cases
    return {
        "ldm_as_checkpoint": ["--checkpoint", ldm, "--mask", mask],
        "empty_mask_folder": ["--checkpoint", ckpt, "--mask_folder", tmp / "empty_masks"],
        "class_name": [*base, "--class_name", "cat"],
        "class_label_range": [*base, "--class_label", 7],
        "mask_and_mask_folder": [*base, "--mask_folder", pair_data / "masks"],
        "controlnet_scale_nan": [*base, "--controlnet_scale", "nan"],
        "controlnet_scale_inf": [*base, "--controlnet-scale", "inf"],
        "guidance_scale_nan": [*base, "--guidance_scale", "nan"],
        "cfg_scale_inf": [*base, "--cfg_scale=-inf"],
        "num_images_zero": [*base, "--num_images", 0],
        "inference_batch_size_negative": [*base, "--batch_size", -2],
        "inference_output_dir_is_file": [*base, "--output_dir", a_file],
        "inference_output_dir_under_file": [*base, "--output_dir", a_file / "generated"],
        "comparison_dir_is_file": [*base, "--save_comparison", "--comparison_dir", a_file],
    }


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory, pair_data, ldm_checkpoint, trained_run):
    """All bad-input runs, started together; also records the finished run's files before them."""
    tmp = tmp_path_factory.mktemp("bad")
    run_dir = trained_run[0]
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    commands = {
        name: ("train.py", *args)
        for name, args in train_cases(tmp, pair_data, ldm_checkpoint, run_dir).items()
    }
    for name, args in inference_cases(tmp, pair_data, ldm_checkpoint, run_dir).items():
        commands[name] = ("inference.py", "--output_dir", tmp / "generated", *args)  # a later one wins
    commands["help"] = ("train.py", "--help")
    results = run_many(commands, workers=4, cwd=HERE.parent)  # as `python controlnet/train.py` from the root
    after = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    return results, before, after, tmp


@pytest.mark.parametrize("case", sorted({**TRAIN_CASES, **INFERENCE_CASES}))
def test_bad_input_is_one_clear_line(case, bad_runs):
    result = bad_runs[0][case]
    expected = {**TRAIN_CASES, **INFERENCE_CASES}[case]
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert result.stderr.count("error:") == 1, result.stderr


@pytest.mark.parametrize("case", ["truncated_validation_image", "truncated_mask"])
def test_broken_files_stop_the_run_before_training(case, bad_runs):
    out = bad_runs[3] / {"truncated_validation_image": "out_bad_val", "truncated_mask": "out_bad_mask"}[case]
    assert not list(out.rglob("*.pt")) and not (out / "logs").exists()


def test_failed_runs_leave_existing_files_alone(bad_runs):
    _, before, after, tmp = bad_runs
    assert before == after
    generated = tmp / "generated"
    assert not generated.exists() or not any(generated.rglob("*.png"))


def test_help_states_the_data_layout(bad_runs):
    result = bad_runs[0]["help"]
    assert result.returncode == 0
    assert "data_root/images/Img_001.png" in result.stdout and "--image-prefix" in result.stdout
