"""Every bad input ends with one clear line on stderr and exit code 2, leaving the user's files alone."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import TINY, make_class_folders, run_script
from modules import UNet_conditional

SAMPLE = (
    "ddpm_conditional_ddp.py",
    "--mode",
    "sample",
    "--num-samples",
    "2",
    "--sampler",
    "ddim",
    "--steps",
    "2",
)


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, trained_run):
    """Build every broken input once; returns {case: (script and args, expected text)}."""
    root = tmp_path_factory.mktemp("bad")
    (root / "empty").mkdir()
    make_class_folders(root / "no_images", classes=2, per_class=2)
    for f in (root / "no_images" / "class_1").iterdir():
        f.unlink()
    flat = root / "flat"
    flat.mkdir()
    (flat / "a.png").write_bytes((trained_run / "results/tiny/final.png").read_bytes())
    broken = make_class_folders(root / "broken", classes=2, per_class=2)
    image = broken / "class_0" / "img_0.png"
    image.write_bytes(image.read_bytes()[:60])  # truncated PNG
    data = make_class_folders(root / "data", classes=3, per_class=2)
    (root / "garbage.pt").write_bytes(b"not a checkpoint")
    model = UNet_conditional(c_in=1, c_out=1, num_classes=3, img_size=16, base_channels=8, time_dim=32)
    torch.save(model.state_dict(), root / "bare.pt")
    ckpt, train = trained_run / "models/tiny/ckpt.pt", ("ddpm_conditional.py", *TINY)
    return {
        "default_path_conditional": (
            ("ddpm_conditional.py",),
            "dataset folder /path/to/dataset does not exist",
        ),
        "default_path_unconditional": (("ddpm.py",), "dataset folder /path/to/dataset does not exist"),
        "empty_folder": ((*train, "--dataset-path", root / "empty"), "no class folders"),
        "empty_folder_unconditional": (("ddpm.py", "--dataset-path", root / "empty"), "no images"),
        "images_but_no_class_folders": ((*train, "--dataset-path", flat), "no class folders"),
        "class_folder_without_images": ((*train, "--dataset-path", root / "no_images"), "has no images"),
        "truncated_image": ((*train, "--dataset-path", broken, "--num-classes", "2"), "img_0.png"),
        "wrong_num_classes": ((*train, "--dataset-path", data), "3 class folders but --num-classes is 10"),
        "bad_image_size": (
            (*train, "--dataset-path", data, "--num-classes", "3", "--image-size", "20"),
            "20",
        ),
        "bad_attention_resolution": (
            (*train, "--dataset-path", data, "--num-classes", "3", "--attn-resolutions", "5"),
            "attention resolutions [5]",
        ),
        "run_exists_without_resume": (
            (
                *train,
                "--dataset-path",
                data,
                "--num-classes",
                "3",
                "--run-name",
                "tiny",
                "--workdir",
                trained_run,
            ),
            "already holds a run",
        ),
        "resume_without_checkpoint": (
            (*train, "--dataset-path", data, "--resume", "--workdir", root),
            "--resume found no checkpoint",
        ),
        "resume_with_other_image_size": (
            ("ddpm_conditional.py", "--dataset-path", data, "--resume", ckpt, "--image-size", "32"),
            "image_size=16",
        ),
        "train_mode_under_torchrun": (
            ("ddpm_conditional_ddp.py", "--mode", "train", "--dataset-path", data, "--env-world-size-2"),
            "use --mode train_ddp",
        ),
        "cuda_requested_without_gpu": (
            (*train, "--dataset-path", data, "--device", "cuda"),
            "CUDA is not available",
        ),
        "sample_without_ckpt": (SAMPLE, "pass --ckpt"),
        "missing_ckpt": ((*SAMPLE, "--ckpt", root / "nope.pt"), "nope.pt does not exist"),
        "garbage_ckpt": ((*SAMPLE, "--ckpt", root / "garbage.pt"), "is not a PyTorch checkpoint"),
        "unknown_class_name": (
            (*SAMPLE, "--ckpt", ckpt, "--class-labels", "cat"),
            "'cat' is not in the checkpoint",
        ),
        "class_index_out_of_range": (
            (*SAMPLE, "--ckpt", ckpt, "--class-labels", "3"),
            "class index 3 is out of range",
        ),
        "num_samples_zero": (
            (*SAMPLE, "--ckpt", ckpt, "--num-samples", "0"),
            "--num-samples must be at least 1",
        ),
        "conflicting_architecture_flag": ((*SAMPLE, "--ckpt", ckpt, "--num-classes", "8"), "num_classes=3"),
        "bare_state_dict_without_flags": ((*SAMPLE, "--ckpt", root / "bare.pt"), "pass --num-classes"),
        "bare_state_dict_wrong_flags": (
            (*SAMPLE, "--ckpt", root / "bare.pt", "--num-classes", "3", "--image-size", "16"),
            "does not fit a UNet built from the flags",
        ),
        "bare_state_dict_with_ema": (
            (*SAMPLE, "--ckpt", root / "bare.pt", "--num-classes", "3", "--use-ema"),
            "drop --use-ema",
        ),
    }


@pytest.fixture(scope="module")
def outcomes(bad_inputs, tmp_path_factory):
    """Run all cases, a few at a time (each is a separate Python process)."""
    work = tmp_path_factory.mktemp("bad_runs")

    def run(item):
        name, (cmd, _) = item
        env = {"WORLD_SIZE": "2"} if "--env-world-size-2" in cmd else None
        cmd = [c for c in cmd if c != "--env-world-size-2"]
        return name, run_script(*cmd, cwd=work, env=env)

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(pool.map(run, bad_inputs.items()))


CASES = [
    "default_path_conditional",
    "default_path_unconditional",
    "empty_folder",
    "empty_folder_unconditional",
    "images_but_no_class_folders",
    "class_folder_without_images",
    "truncated_image",
    "wrong_num_classes",
    "bad_image_size",
    "bad_attention_resolution",
    "run_exists_without_resume",
    "resume_without_checkpoint",
    "resume_with_other_image_size",
    "train_mode_under_torchrun",
    "cuda_requested_without_gpu",
    "sample_without_ckpt",
    "missing_ckpt",
    "garbage_ckpt",
    "unknown_class_name",
    "class_index_out_of_range",
    "num_samples_zero",
    "conflicting_architecture_flag",
    "bare_state_dict_without_flags",
    "bare_state_dict_wrong_flags",
    "bare_state_dict_with_ema",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_clear_line_and_exit_code_2(case, bad_inputs, outcomes):
    result, expected = outcomes[case], bad_inputs[case][1]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[-1].startswith("error: ") and expected in lines[-1], lines
    assert sum(line.startswith("error: ") for line in lines) == 1


def test_every_case_is_checked(bad_inputs):
    assert sorted(CASES) == sorted(bad_inputs)


def test_failed_run_leaves_the_existing_checkpoint_untouched(trained_run, outcomes):
    before = (trained_run / "models/tiny/ckpt_final.pt").read_bytes()
    assert outcomes["run_exists_without_resume"].returncode == 2
    assert (trained_run / "models/tiny/ckpt.pt").read_bytes() == before


def test_bare_state_dict_samples_with_the_right_flags(tmp_path):
    model = UNet_conditional(c_in=1, c_out=1, num_classes=3, img_size=16, base_channels=8, time_dim=32)
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    flags = (
        "--num-classes",
        "3",
        "--image-size",
        "16",
        "--channels",
        "1",
        "--base-channels",
        "8",
        "--time-dim",
        "32",
    )
    result = run_script(
        *SAMPLE, "--ckpt", tmp_path / "bare.pt", *flags, "--output-dir", tmp_path / "s", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.parent.name for p in (tmp_path / "s").rglob("*.png")) == ["0", "1"]
