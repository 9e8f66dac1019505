"""Each trainer's time per epoch in this tree against another commit's code, as ratios in one run.

Every trainer trains the same tiny model on the same small data set (96 grayscale 16 px images in
3 classes; 96 image/mask pairs for the ControlNet) for 1 and for 1 + --extra-epochs epochs, with
both code versions, the runs interleaved so that a busy machine slows both alike. The difference
of the two wall times divided by the extra epochs is the time per epoch without start-up, data
scan and final saves. Held-out evaluation, sample grids and periodic checkpoints are switched off,
so what is timed is the loop itself: batch, loss, backward, step, EMA, logging.

    python bench/trainers.py                 # against 0a2aeff, the code before the shared core
    python bench/trainers.py --base HEAD~3   # against any other commit
Flags are the seed's spellings, which both versions accept.
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
ENV = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"}
LDM_FIXTURES = ROOT / "ldm" / "tests" / "fixtures"  # a tiny LDM and its VAE, written by 0a2aeff's code
DIT_VAE = ROOT / "dit" / "tests" / "fixtures" / "vae"
IMAGES, BATCH = 96, 4  # 24 steps per epoch


def write_data(root):
    """Class folders (bright bar at a class row) and image/mask pairs of the same images."""
    rng = np.random.default_rng(0)
    for i in range(IMAGES):
        c = i % 3
        image = rng.integers(0, 40, (16, 16), dtype=np.uint8)
        image[c * 5 : c * 5 + 3] = 230
        mask = (image > 128).astype(np.uint8) * 255
        for folder, array in ((root / "classes" / f"class_{c}", image), (root / "pairs" / "images", image)):
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(folder / f"{i:03d}.png")
        (root / "pairs" / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(root / "pairs" / "masks" / f"{i:03d}.png")


def commands(data, epochs, out):
    """{trainer: (folder, script and flags)} for a run of `epochs` epochs writing under out."""
    classes, pairs = data / "classes", data / "pairs"
    ldm, vae = LDM_FIXTURES / "ldm_checkpoint.pt", LDM_FIXTURES / "vae"
    return {
        "ddpm": ("ddpm", f"ddpm_conditional.py --dataset-path {classes} --num-classes 3 --workdir {out} "
                 f"--run-name b --epochs {epochs} --batch-size {BATCH} --image-size 16 --base-channels 8 "
                 "--time-dim 32 --num-workers 0 --save-interval 1000 --val-split 0 --preview-steps 0"),
        "ldm": ("ldm", f"train.py --data_root {classes} --output_dir {out} --vae_pretrained {vae} "
                f"--num_epochs {epochs} --image_size 16 --batch_size {BATCH} --unet_preset tiny "
                "--block_out_channels 8 8 --layers_per_block 1 --attention_heads 2 --cross_attention_dim 8 "
                "--num_workers 0 --save_every 1000 --sample_every 1000 --val_fraction 0"),
        "controlnet": ("controlnet", f"train.py --data_root {pairs} --ldm_checkpoint {ldm} "
                       f"--vae_pretrained {vae} --output_dir {out} --num_epochs {epochs} --image_size 16 "
                       f"--batch_size {BATCH} --num_workers 0 --save_every 1000 --sample_every 1000 "
                       "--val_fraction 0 --num_sample_masks 1 --sample_steps 1"),
        "dit": ("dit", f"train.py --data-path {classes} --results-dir {out} --vae {DIT_VAE} "
                "--model DiT-S/2 --depth 2 --hidden-size 32 --num-heads 2 --image-size 16 "
                f"--global-batch-size {BATCH} --epochs {epochs} --num-workers 0 --sample-every 0 "
                "--log-every 1000 --ckpt-every 100000 --val-fraction 0"),
    }  # fmt: skip


def timed_run(code, folder, command, cwd):
    """Wall seconds of one training run of the code tree `code`; exits on a failed run."""
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, *command.split()], cwd=code / folder, env=ENV, capture_output=True, text=True
    )
    if result.returncode != 0:
        sys.exit(f"error: {code / folder} {command.split()[0]} failed:\n{result.stderr[-2000:]}")
    return time.perf_counter() - start


def main():
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--base", default="0a2aeff", help="commit to compare with (default: %(default)s)")
    parser.add_argument("--extra-epochs", type=int, default=4, help="epochs beyond the first (default: 4)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each kind, median taken (default: 2)")
    parser.add_argument("--only", nargs="+", default=None, help="trainers to time (default: all four)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = tmp / "base"
        base.mkdir()
        archive = subprocess.run(["git", "archive", args.base], cwd=ROOT, capture_output=True)
        if archive.returncode != 0:  # e.g. a shallow clone, or a tree that is not a git checkout
            sys.exit(f"error: cannot read commit {args.base} with git archive: pass --base with one here")
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive.stdout, check=True)
        write_data(tmp / "data")
        trees = {"base": base, "now": ROOT}
        steps = f"{IMAGES // BATCH} steps of batch {BATCH}"
        print(f"time per epoch ({steps}, tiny models), {args.base} against this tree:", flush=True)
        for trainer in args.only or ("ddpm", "ldm", "controlnet", "dit"):
            # Each repeat times both trees back to back, so a load spike slows both of them alike;
            # (long - short) / extra epochs leaves out start-up, data scan and final saves.
            samples = {name: [] for name in trees}
            for repeat in range(args.repeats):
                for name, code in trees.items():
                    runs = []
                    for epochs in (1, 1 + args.extra_epochs):
                        out = tmp / f"{trainer}-{name}-{repeat}-{epochs}"
                        folder, command = commands(tmp / "data", epochs, out)[trainer]
                        runs.append(timed_run(code, folder, command, out))
                    samples[name].append((runs[1] - runs[0]) / args.extra_epochs)
            per_epoch = {name: statistics.median(found) for name, found in samples.items()}
            ratio = per_epoch["now"] / per_epoch["base"]
            print(
                f"  {trainer:<11} {args.base}: {per_epoch['base']:6.2f} s/epoch   "
                f"now: {per_epoch['now']:6.2f} s/epoch   now/{args.base}: {ratio:4.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
