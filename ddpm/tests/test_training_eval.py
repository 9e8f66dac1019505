"""In-training FID / KID (--eval-every): scores in TensorBoard and in the checkpoints, ckpt_best.pt by FID,
and a resumed run that continues its history. The Inception file is a random one of the real
architecture, loaded through the code that loads the real one."""

import torch

from conftest import TINY, run_script
from core import files, inception
from core.testing import scalars


def test_fid_during_training_is_logged_kept_and_resumed(gray_data, tmp_path):
    weights = tmp_path / "inception.pth"
    files.atomic_save(inception.random_inception_state_dict(), weights)
    common = ["--dataset-path", gray_data, *TINY, "--num-classes", 3, "--batch-size", 4, "--val-split", 0.25,
              "--save-interval", 10, "--eval-every", 1, "--eval-samples", 3, "--best-by", "fid",
              "--eval-inception-weights", weights, "--run-name", "fid"]  # fmt: skip
    result = run_script("ddpm_conditional.py", *common, "--epochs", 1, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    models = tmp_path / "models" / "fid"
    first = torch.load(models / "ckpt.pt", weights_only=True)["eval_history"]
    assert [entry["epoch"] for entry in first] == [1]
    assert (models / "ckpt_best.pt").is_file() and (models / "fid_reference.pt").is_file()
    result = run_script("ddpm_conditional.py", *common, "--epochs", 3, "--resume", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "FID (EMA, 3 held-out images, 3 samples)" in result.stdout + result.stderr
    ckpt = torch.load(models / "ckpt.pt", weights_only=True)
    history = ckpt["eval_history"]
    assert [entry["epoch"] for entry in history] == [1, 2, 3] and history[0] == first[0]
    assert all(entry["fid"] >= -1e-6 and {"kid", "kid_std", "step"} <= entry.keys() for entry in history)
    assert ckpt["best_metric"] == min(entry["fid"] for entry in history)
    logged = scalars(tmp_path / "runs" / "fid", "eval/fid")
    assert [step for step, _ in logged] == [entry["step"] for entry in history]
    assert [step for step, _ in scalars(tmp_path / "runs" / "fid", "eval/kid")] == [
        e["step"] for e in history
    ]
    # ckpt_best.pt holds the lowest-FID weights.
    best = torch.load(models / "ckpt_best.pt", weights_only=True)
    assert best["global_step"] == min(history, key=lambda entry: entry["fid"])["step"]
