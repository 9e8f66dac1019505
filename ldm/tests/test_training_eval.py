"""In-training FID / KID (--eval_every): scores in TensorBoard and in the checkpoints' progress, best by FID,
a resumed run that continues its history, and the settings that cannot score. The Inception file is a
random one of the real architecture, loaded through the code that loads the real one."""

import pytest
import torch

from conftest import LDM_DIR, TRAIN_ARGS, run_script
from core import files, inception, testing
from core.testing import scalars


def test_fid_during_training_is_logged_kept_and_resumed(gray_data, tiny_vae, tmp_path):
    weights = tmp_path / "inception.pth"
    files.atomic_save(inception.random_inception_state_dict(), weights)
    out = tmp_path / "run"
    common = ["--data_root", gray_data, "--vae_pretrained", tiny_vae, "--output_dir", out, *TRAIN_ARGS,
              "--val_fraction", 0.4, "--sample_every", 100, "--eval_every", 1, "--eval_samples", 3,
              "--eval_inception_weights", weights, "--best_by", "fid"]  # fmt: skip
    run_script("train.py", *common, "--num_epochs", 1)
    first = torch.load(out / "checkpoint_latest.pt", weights_only=True)
    assert [entry["epoch"] for entry in first["progress"]["eval_history"]] == [1]
    assert (out / "checkpoint_best.pt").is_file() and (out / "fid_reference.pt").is_file()
    result = run_script("train.py", *common, "--num_epochs", 2, "--resume")
    assert "FID (EMA, 4 held-out images, 3 samples)" in result.stdout
    history = torch.load(out / "checkpoint_latest.pt", weights_only=True)["progress"]["eval_history"]
    assert [entry["epoch"] for entry in history] == [1, 2] and history[0] == first["progress"][
        "eval_history"
    ][0]
    assert all(entry["fid"] >= -1e-6 and {"kid", "kid_std", "step"} <= entry.keys() for entry in history)
    logged = scalars(out / "logs", "eval/fid")
    assert [step for step, _ in logged] == [entry["step"] for entry in history]
    assert abs(logged[1][1] - history[1]["fid"]) < 1e-3 * max(1.0, history[1]["fid"])
    # checkpoint_best.pt is the lowest-FID model of the two evaluations.
    best = torch.load(out / "checkpoint_best.pt", weights_only=True)
    lowest = min(history, key=lambda entry: entry["fid"])
    assert best["global_step"] == lowest["step"]


BAD_EVAL = {
    "--best_by fid without --eval_every": (["--best_by", "fid"], ["--best_by fid needs --eval_every"]),
    "no held-out images": (["--eval_every", 1, "--val_fraction", 0, "--eval_inception_weights", __file__],
                           ["--eval_every needs at least 2 held-out images", "--val_fraction"]),
    "missing weights": (["--eval_every", 1, "--eval_inception_weights", "none.pth"],
                        ["--eval_inception_weights", "no such file"]),
    "offline without weights": (["--eval_every", 1], ["offline", "--eval_inception_weights PATH"]),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_EVAL)
def test_bad_eval_settings_are_one_line(rgb_data, tiny_vae, tmp_path, case):
    argv, fragments = BAD_EVAL[case]
    out = tmp_path / "run"
    base = ["--data_root", rgb_data, "--vae_pretrained", tiny_vae, "--output_dir", out, *TRAIN_ARGS]
    # An empty torch hub folder: the real Inception file may be cached on this machine.
    env = {"TORCH_HOME": str(tmp_path / "torch-home"), "HF_HUB_OFFLINE": "1"}
    result = testing.run(LDM_DIR / "train.py", *base, *argv, cwd=tmp_path, env=env)
    testing.assert_user_error(result, *fragments)
    assert not any(out.glob("*.pt"))  # nothing was trained or saved
