"""In-training FID / KID (--eval-every): scores logged to TensorBoard and kept in the checkpoints, best.pt
by FID, and a resumed run that continues its history; the Inception file is a random one of the real
architecture, loaded through the same code as the real file."""

import pytest
import torch

from conftest import DIT_DIR, TINY, run_script
from core import files, inception, testing
from core.testing import scalars


def test_fid_during_training_is_logged_kept_and_resumed(workspace, tmp_path):
    weights = tmp_path / "inception.pth"
    files.atomic_save(inception.random_inception_state_dict(), weights)
    common = [*TINY, "--global-batch-size", 4, "--num-workers", 0, "--log-every", 2, "--sample-every", 0,
              "--eval-every", 2, "--eval-samples", 3, "--eval-inception-weights", weights, "--best-by", "fid",
              "--vae", workspace / "vae", "--data-path", workspace / "data"]  # fmt: skip
    run_script("train.py", *common, "--max-steps", 2, "--ckpt-every", 100, "--val-fraction", 0.2,
               "--results-dir", tmp_path / "results")  # fmt: skip
    run = tmp_path / "results" / "000-DiT-S-2"
    first = torch.load(run / "checkpoints" / "0000002.pt", weights_only=True)
    assert [entry["step"] for entry in first["eval_history"]] == [2]
    assert (run / "checkpoints" / "best.pt").is_file()  # the first FID is the best so far
    assert (run / "fid_reference.pt").is_file()
    result = run_script("train.py", *common, "--max-steps", 4, "--ckpt-every", 100,
                        "--resume", run / "checkpoints" / "0000002.pt")  # fmt: skip
    assert "FID (EMA, 3 samples)" in result.stdout
    last = torch.load(run / "checkpoints" / "0000004.pt", weights_only=True)
    history = last["eval_history"]
    assert [entry["step"] for entry in history] == [2, 4] and history[0] == first["eval_history"][0]
    assert all(entry["fid"] >= -1e-6 and {"kid", "kid_std"} <= entry.keys() for entry in history)
    logged = scalars(run / "tensorboard", "eval/fid")
    assert [step for step, _ in logged] == [2, 4]
    assert abs(logged[1][1] - history[1]["fid"]) < 1e-3 * max(1.0, history[1]["fid"])
    assert [step for step, _ in scalars(run / "tensorboard", "eval/kid")] == [2, 4]


BAD_EVAL = {
    "--best-by fid without --eval-every": (["--best-by", "fid"], ["--best_by fid needs --eval_every"]),
    "no held-out images": (["--eval-every", 2, "--eval-inception-weights", __file__],
                           ["--eval_every needs at least 2 held-out images", "--val_fraction"]),
    "missing weights": (["--eval-every", 2, "--eval-inception-weights", "none.pth"],
                        ["--eval_inception_weights", "no such file"]),
    "offline without weights": (["--eval-every", 2], ["offline", "--eval_inception_weights PATH"]),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_EVAL)
def test_bad_eval_settings_are_one_line(workspace, tmp_path, case):
    argv, fragments = BAD_EVAL[case]
    results = tmp_path / "results"
    base = [*TINY, "--data-path", workspace / "data", "--vae", workspace / "vae", "--results-dir", results]
    # An empty torch hub folder: the real Inception file may be cached on this machine.
    env = {"TORCH_HOME": str(tmp_path / "torch-home")}
    result = testing.run(DIT_DIR + "/train.py", *base, *argv, cwd=tmp_path, env=env)
    testing.assert_user_error(result, *fragments)
    assert not results.exists()  # refused before the run folder exists
