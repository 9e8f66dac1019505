"""Bad input ends with one clear line and exit code 2; train_vae.py output feeds train.py."""

import re
import time

import pytest
import torch

from conftest import LDM_DIR, TRAIN_ARGS, depth_set, random_images, run_script


def assert_user_error(result, *fragments):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0]


def train(data, vae, out, *extra):
    return run_script(
        "train.py",
        "--data_root",
        data,
        "--vae_pretrained",
        vae,
        "--output_dir",
        out,
        *TRAIN_ARGS,
        "--num_epochs",
        "1",
        *extra,
        check=False,
    )


def test_missing_data_root(tiny_vae, tmp_path):
    assert_user_error(train(tmp_path / "absent", tiny_vae, tmp_path / "o"), "--data_root", "absent")


def test_folder_without_class_folders(tiny_vae, tmp_path):
    random_images(tmp_path / "flat", 2, 16, "RGB", 0)
    assert_user_error(train(tmp_path / "flat", tiny_vae, tmp_path / "o"), "no class sub-folders")


def test_unreadable_image(tiny_vae, tmp_path):
    random_images(tmp_path / "d" / "a", 3, 16, "RGB", 0)
    (tmp_path / "d" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert_user_error(train(tmp_path / "d", tiny_vae, tmp_path / "o"), "broken.png")


def test_vae_not_available_offline_fails_fast(rgb_data, tmp_path):
    start = time.time()
    result = train(rgb_data, "stabilityai/sd-vae-ft-mse", tmp_path / "o")
    assert_user_error(result, "--vae_pretrained", "sd-vae-ft-mse")
    assert time.time() - start < 120  # no network retries (generous: the test machines are shared)


def test_missing_vae_folder_and_checkpoint_name_the_flag(tmp_path):
    from core.errors import UserError
    from models import load_checkpoint, load_vae

    with pytest.raises(UserError, match="--vae_pretrained .*no such folder"):
        load_vae(str(tmp_path / "no_such_vae"))
    with pytest.raises(UserError, match="--checkpoint .*none.pt: file not found"):
        load_checkpoint(tmp_path / "none.pt")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "bare.pt")
    with pytest.raises(UserError, match="not an LDM checkpoint .no model_type"):
        load_checkpoint(tmp_path / "bare.pt")


def test_bad_image_size_and_existing_run(rgb_data, tiny_vae, trained_run, tmp_path):
    assert_user_error(train(rgb_data, tiny_vae, tmp_path / "o", "--image_size", "18"), "--image_size 18")
    out = trained_run[0]
    before = (out / "checkpoint_best.pt").stat().st_mtime_ns
    assert_user_error(train(rgb_data, tiny_vae, out), "--resume")
    assert (out / "checkpoint_best.pt").stat().st_mtime_ns == before  # nothing overwritten


def test_inference_rejects_wrong_checkpoints_and_classes(trained_run, tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"model_type": "controlnet"}, other)
    common = ["--output_dir", tmp_path / "gen", "--num_samples", "1", "--num_inference_steps", "1"]
    assert_user_error(run_script("inference.py", "--checkpoint", other, *common, check=False), "not an LDM")
    ckpt = trained_run[0] / "checkpoint_best.pt"
    assert_user_error(
        run_script("inference.py", "--checkpoint", ckpt, "--class_label", "zebra", *common, check=False),
        "zebra",
        "cat",
    )
    assert not (tmp_path / "gen").exists()


def test_class_index_out_of_range():
    from core.errors import UserError
    from inference import resolve_classes

    assert resolve_classes(["b", "0"], ["a", "b"]) == [1, 0]
    assert resolve_classes(None, ["a", "b"]) == [0, 1]
    with pytest.raises(UserError, match="out of range"):
        resolve_classes(["2"], ["a", "b"])


def test_train_vae_writes_loadable_folders(trained_vae):
    from models import load_vae

    for folder in ("best", "final"):
        vae = load_vae(str(trained_vae.parent / folder))
        assert vae.config.in_channels == 3 and vae.config.scaling_factor > 0


def test_non_finite_loss_stops_with_a_message(rgb_data, tiny_vae, tmp_path):
    result = train(rgb_data, tiny_vae, tmp_path / "o", "--learning_rate", "1e30", "--lr_warmup_steps", "0")
    assert result.returncode == 1
    assert "loss became non-finite" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o" / "checkpoint_final.pt").exists()


# Runs train_vae.py under torchrun and prints each process's parameter checksum before validation:
# DDP only averages gradients of what runs through its wrapper's forward, so replicas that drift
# apart mean the step bypassed it.
RANK_CHECKSUMS = f"""
import os, sys
sys.path.insert(0, {str(LDM_DIR)!r})
import train_vae
from core.errors import run_cli

validate = train_vae.validate
def checked(vae, loader, device):
    total = sum(p.double().sum().item() for p in vae.parameters())
    print(f"rank {{os.environ['RANK']}} checksum {{total:.12f}}", flush=True)
    return validate(vae, loader, device)
train_vae.validate = checked
run_cli(train_vae.main)
"""


def test_train_vae_two_processes_keep_replicas_identical(tmp_path):
    script = tmp_path / "vae_ranks.py"
    script.write_text(RANK_CHECKSUMS)
    data = depth_set(tmp_path / "data", "12")
    out = tmp_path / "vae"
    (out / ".best.tmp").mkdir(parents=True)  # what a run killed while saving leaves behind
    (out / ".checkpoint_latest.pt.tmp-999").write_bytes(b"partial")
    flags = "--image_size 8 --block_out_channels 8 8 --norm_num_groups 8 --layers_per_block 1".split()
    flags += "--batch_size 1 --num_epochs 2 --num_workers 0 --lr_warmup_steps 0".split()
    result = run_script(script, "--data_root", data, "--output_dir", out, *flags, nproc=2)
    assert "processes 2" in result.stdout
    # (rank, checksum) pairs; the two processes' lines may interleave on the shared pipe
    sums = re.findall(r"rank (\d) checksum (-?\d+\.\d{12})", result.stdout)
    assert len(sums) == 4, result.stdout  # two epochs on two processes
    for epoch in (sums[:2], sums[2:]):
        assert {rank for rank, _ in epoch} == {"0", "1"} and epoch[0][1] == epoch[1][1], sums
    assert sums[0][1] != sums[2][1]  # and they did train
    ckpt = torch.load(out / "checkpoint_latest.pt", map_location="cpu", weights_only=True)
    assert ckpt["intensity"] == {"kind": "integer", "bit_depth": 12} and ckpt["channels"] == 1
    assert len(ckpt["rng"]) == 2 and ckpt["progress"]["epoch"] == 2
    assert (out / "best" / "config.json").is_file() and (out / "final" / "config.json").is_file()
    assert not list(out.glob(".*"))
