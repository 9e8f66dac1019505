"""Every bad input ends with one clear 'error: ...' line and exit code 2, before any work starts.

SUBPROCESS cases run each script the way a user types it (one per script and kind of mistake);
PARSE cases check further values of the same flags in-process, since each subprocess costs seconds
of imports."""

import os
import pickle
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import TRAIN_ARGS, run_script


class Evil:
    """A pickle that runs a command when loaded with weights_only=False."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, rgb_data, tiny_vae, trained_run):
    """{case: (script and args, expected text)}; later flags override the base commands' ones."""
    root = tmp_path_factory.mktemp("bad")
    a_file = root / "a_file"
    a_file.write_text("not a folder")
    evil = root / "evil.pt"
    evil.write_bytes(pickle.dumps(Evil(root / "pwned")))
    corrupt_run = root / "corrupt_run"
    corrupt_run.mkdir()
    (corrupt_run / "checkpoint_latest.pt").write_bytes(b"PK\x03\x04 cut short")
    (root / "npz_3x16x16x3.npz").mkdir()  # where --npz would write
    ckpt = trained_run[0] / "checkpoint_best.pt"
    train = ("train.py", "--data_root", rgb_data, "--vae_pretrained", tiny_vae, "--output_dir", root / "t")
    train = (*train, *TRAIN_ARGS, "--num_epochs", "1")
    vae = ("train_vae.py", "--data_root", rgb_data, "--output_dir", root / "v", "--image_size", "16")
    vae = (*vae, "--block_out_channels", "8", "8", "--norm_num_groups", "8", "--num_epochs", "1")
    sample = ("inference.py", "--checkpoint", ckpt, "--output_dir", root / "g", "--num_samples", "1")
    per_class = ("inference_per_class.py", "--checkpoint", ckpt, "--output_dir", root / "p")
    per_class = (*per_class, "--total_samples", "3", "--num_inference_steps", "1")
    # The same mistakes on both trainers; each takes one of the two spellings of --lr and --num_workers.
    cases = {}
    for name, base, lr, workers in (
        ("train", train, "--learning_rate", "--num_workers"),
        ("vae", vae, "--lr", "--num-workers"),
    ):
        cases |= {
            f"{name}_lr_negative": ((*base, lr, "-1"), "must be a number > 0, got -1"),
            f"{name}_num_workers_negative": ((*base, workers, "-1"), "an integer >= 0"),
            f"{name}_epochs_zero": ((*base, "--num_epochs", "0"), "--num-epochs: must be an integer >= 1"),
            f"{name}_batch_zero": ((*base, "--batch_size", "0"), "--batch-size: must be an integer >= 1"),
            f"{name}_val_fraction_one": ((*base, "--val_fraction", "1"), "a fraction in [0, 1)"),
            f"{name}_output_is_a_file": ((*base, "--output_dir", a_file), "is a file, not a folder"),
            f"{name}_output_under_a_file": ((*base, "--output_dir", a_file / "sub"), "is not writable"),
        }
    return cases | {
        "train_ema_decay_two": ((*train, "--ema-decay", "2"), "a fraction in [0, 1)"),
        "train_sample_cfg_nan": ((*train, "--sample_cfg_scale", "nan"), "finite"),
        "train_resume_pickled_code": (
            (*train, "--output_dir", root / "t2", "--resume", evil),
            "cannot load --resume",
        ),
        "vae_resume_pickled_code": (
            (*vae, "--output_dir", root / "v2", "--resume", evil),
            "cannot load --resume checkpoint",
        ),
        "vae_resume_corrupt_latest": (
            (*vae, "--output_dir", corrupt_run, "--resume"),
            "checkpoint_latest.pt",
        ),
        "sample_cfg_nan": ((*sample, "--cfg_scale", "nan"), "expected a finite number, got 'nan'"),
        "sample_batch_zero": ((*sample, "--batch_size", "0"), "an integer >= 1"),
        "sample_output_is_a_file": ((*sample, "--output_dir", a_file), "is a file, not a folder"),
        "sample_output_under_a_file": ((*sample, "--output_dir", a_file / "sub"), "is not writable"),
        "sample_grid_inside_samples": (
            (*sample, "--grid_path", root / "g" / "grid.png"),
            "inside --output_dir",
        ),
        "per_class_cfg_nan": ((*per_class, "--cfg_scale", "nan"), "finite"),
        "per_class_output_is_a_file": ((*per_class, "--output_dir", a_file), "is a file, not a folder"),
        "per_class_output_under_a_file": ((*per_class, "--output_dir", a_file / "sub"), "is not writable"),
        "per_class_npz_is_a_folder": (
            (*per_class, "--output_dir", root / "npz", "--npz", "--overwrite"),
            "--npz",
        ),
    }


@pytest.fixture(scope="module")
def outcomes(bad_inputs):
    """Every case's result, two at a time (each is a Python process of its own; the machines have 2 cores)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = pool.map(lambda case: run_script(*case[0], check=False), bad_inputs.values())
        return dict(zip(bad_inputs, results, strict=True))


SUBPROCESS = [
    "train_lr_negative",
    "train_num_workers_negative",
    "train_ema_decay_two",
    "train_sample_cfg_nan",
    "train_epochs_zero",
    "train_batch_zero",
    "train_val_fraction_one",
    "train_output_is_a_file",
    "train_output_under_a_file",
    "train_resume_pickled_code",
    "vae_lr_negative",
    "vae_num_workers_negative",
    "vae_epochs_zero",
    "vae_batch_zero",
    "vae_val_fraction_one",
    "vae_output_is_a_file",
    "vae_output_under_a_file",
    "vae_resume_pickled_code",
    "vae_resume_corrupt_latest",
    "sample_cfg_nan",
    "sample_batch_zero",
    "sample_output_is_a_file",
    "sample_output_under_a_file",
    "sample_grid_inside_samples",
    "per_class_cfg_nan",
    "per_class_output_is_a_file",
    "per_class_output_under_a_file",
    "per_class_npz_is_a_folder",
]


def assert_one_error_line(returncode, stderr, expected):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert returncode == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    assert lines[-1].startswith("error: ") and expected in lines[-1], lines
    assert sum(line.startswith("error: ") for line in lines) == 1


@pytest.mark.parametrize("case", SUBPROCESS)
def test_bad_input_gives_one_clear_line_and_exit_code_2(case, bad_inputs, outcomes):
    result = outcomes[case]
    assert_one_error_line(result.returncode, result.stderr, bad_inputs[case][1])


def test_every_case_is_checked(bad_inputs):
    assert sorted(SUBPROCESS) == sorted(bad_inputs)


def test_no_pickled_code_ran_and_no_work_was_done(bad_inputs, outcomes):
    root = bad_inputs["train_output_is_a_file"][0][-1].parent
    assert not (root / "pwned").exists()
    for name in ("t", "v", "g", "p"):  # refused before any work: no output folder was made
        assert not (root / name).exists(), name


TRAIN = ["--data_root", "d"]
SAMPLE = ["--checkpoint", "c.pt"]
PARSE = [
    ("train", [*TRAIN, "--ema_decay", "1"], "a fraction in [0, 1)"),
    ("train", [*TRAIN, "--ema_decay", "-0.5"], "a fraction in [0, 1)"),
    ("train", [*TRAIN, "--ema_decay", "nan"], "finite"),
    ("train", [*TRAIN, "--num_epochs", "-3"], "must be an integer >= 1, got -3"),
    ("train", [*TRAIN, "--lr", "nan"], "expected a finite number, got 'nan'"),
    ("train", [*TRAIN, "--learning_rate", "inf"], "finite"),
    ("train", [*TRAIN, "--val_fraction", "-0.1"], "a fraction in [0, 1)"),
    ("train", [*TRAIN, "--cfg_dropout", "1.5"], "a number in [0, 1]"),
    ("train", [*TRAIN, "--bit_depth", "0"], "a bit depth from 1 to 32"),
    ("train", [*TRAIN, "--image_size", "0"], "an integer >= 1"),
    ("train", [*TRAIN, "--save_every", "0"], "an integer >= 1"),
    ("train", [*TRAIN, "--checkpoints_total_limit", "0"], "an integer >= 1"),
    ("train", [*TRAIN, "--seed", "-1"], "an integer >= 0"),
    ("train_vae", [*TRAIN, "--num_epochs", "-1"], "an integer >= 1"),
    ("train_vae", [*TRAIN, "--val_fraction", "-0.5"], "a fraction in [0, 1)"),
    ("train_vae", [*TRAIN, "--learning_rate", "nan"], "finite"),
    ("train_vae", [*TRAIN, "--kl_weight", "nan"], "finite"),
    ("train_vae", [*TRAIN, "--bit-depth", "40"], "a bit depth from 1 to 32"),
    ("inference", [*SAMPLE, "--cfg-scale", "inf"], "expected a finite number, got 'inf'"),
    ("inference", [*SAMPLE, "--cfg_scale", "-1"], "a number >= 0"),
    ("inference", [*SAMPLE, "--num_samples", "0"], "--num-samples: must be an integer >= 1"),
    ("inference", [*SAMPLE, "--num_inference_steps", "0"], "an integer >= 1"),
    ("inference_per_class", [*SAMPLE, "--total_samples", "0"], "an integer >= 1"),
    ("inference_per_class", [*SAMPLE, "--cfg_scale", "inf"], "finite"),
]


@pytest.mark.parametrize(
    ("script", "argv", "expected"), PARSE, ids=[f"{c[0]} {' '.join(c[1][2:])}" for c in PARSE]
)
def test_more_bad_values_are_refused_at_parse_time(script, argv, expected, capsys):
    module = __import__(script)
    with pytest.raises(SystemExit) as stopped:
        module.parse_args(argv)
    assert_one_error_line(stopped.value.code, capsys.readouterr().err, expected)


@pytest.mark.parametrize("script", ["train", "train_vae"])
def test_reversed_intensity_range_is_refused_before_the_scan(script):
    from core.errors import UserError

    with pytest.raises(UserError, match="needs low < high"):
        __import__(script).parse_args([*TRAIN, "--intensity_range", "1", "0"])


def test_other_refused_outputs_and_checkpoints(tmp_path):
    import inference
    from core.errors import UserError

    args = inference.parse_args(
        [*SAMPLE, "--output_dir", str(tmp_path / "g"), "--grid_path", str(tmp_path), "--overwrite"]
    )
    with pytest.raises(UserError, match="is a folder"):
        inference.grid_destination(args)
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(Evil(tmp_path / "pwned")))
    with pytest.raises(UserError, match="cannot load --checkpoint"):
        inference.load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()
