"""Bad input to every script: exit code 2, one clear line naming the problem, nothing overwritten."""

import pytest

from conftest import HERE, run_many, train_args, write_pairs

TRAIN_CASES = {
    "no_ldm": "--ldm_checkpoint is required",
    "wrong_model_type": "not of type 'ldm'",
    "missing_data_root": "--data_root",
    "no_pairs": "no image in",
    "unreadable_image": "001.png",
    "existing_run": "--resume latest",
    "offline_vae": "--vae_pretrained",
    "bad_image_size": "--image_size 18",
}
INFERENCE_CASES = {
    "ldm_as_checkpoint": "not of type 'controlnet'",
    "empty_mask_folder": "holds no images",
    "class_name": "'cat'",
    "class_label_range": "--class_label 7",
}


def train_cases(tmp, pair_data, ldm, run_dir):
    """Command lines of bad training inputs, run from the repository root."""
    empty, broken = tmp / "empty", write_pairs(tmp / "broken", 3)
    (empty / "images").mkdir(parents=True)
    (empty / "masks").mkdir()
    (broken / "images" / "001.png").write_bytes(b"\x89PNG truncated")
    out = tmp / "out"
    return {
        "no_ldm": ["--data_root", pair_data],
        "wrong_model_type": train_args(pair_data, run_dir / "checkpoint_final.pt", out),
        "missing_data_root": train_args(tmp / "nowhere", ldm, out),
        "no_pairs": train_args(empty, ldm, out),
        "unreadable_image": train_args(broken, ldm, out),
        "existing_run": train_args(pair_data, ldm, run_dir),
        "offline_vae": train_args(pair_data, ldm, out, "--vae_pretrained", "stabilityai/sd-vae-ft-mse"),
        "bad_image_size": train_args(pair_data, ldm, out, "--image_size", 18),
    }


def inference_cases(tmp, pair_data, ldm, run_dir):
    """Command lines of bad inference inputs."""
    ckpt, mask = run_dir / "checkpoint_final.pt", pair_data / "masks" / "000.png"
    (tmp / "empty_masks").mkdir()
    return {
        "ldm_as_checkpoint": ["--checkpoint", ldm, "--mask", mask],
        "empty_mask_folder": ["--checkpoint", ckpt, "--mask_folder", tmp / "empty_masks"],
        "class_name": ["--checkpoint", ckpt, "--mask", mask, "--class_name", "cat"],
        "class_label_range": ["--checkpoint", ckpt, "--mask", mask, "--class_label", 7],
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
        commands[name] = ("inference.py", *args, "--output_dir", tmp / "generated")
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


def test_failed_runs_leave_existing_files_alone(bad_runs):
    _, before, after, tmp = bad_runs
    assert before == after
    generated = tmp / "generated"
    assert not generated.exists() or not any(generated.rglob("*.png"))


def test_help_states_the_data_layout(bad_runs):
    result = bad_runs[0]["help"]
    assert result.returncode == 0
    assert "data_root/images/Img_001.png" in result.stdout and "--image-prefix" in result.stdout
