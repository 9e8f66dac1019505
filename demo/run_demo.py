"""End-to-end demo: train the class-conditional DDPM on scikit-learn's handwritten digits and sample a grid.

Builds the 1797 8x8 digits as grayscale PNG class folders 0..9 (upscaled), trains ddpm/ for a fixed time
budget (a GPU simply gets through more steps in it) but never fewer than --min-steps steps, then samples
every class with classifier-free guidance and DDIM, writes the grid as a PNG and reports the share of
samples that a classifier of the real digits recognises as the digit asked for. Everything goes under
--output-dir.
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

from build_digits import build_digits
from recognise import describe, score_folder

DEMO_DIR = Path(__file__).resolve().parent

DDPM_SCRIPT = DEMO_DIR.parent / "ddpm" / "ddpm_conditional_ddp.py"
RUN_NAME = "digits"
# Share of 400 samples (seed 0) that the classifier recognises after N training steps, at guidance 3 / 5:
# 216 steps 77% / 83%, 324: 92% / 99%, 800: 97% / 99%, 1080: 98% / 99.8%, 5000: 100% / 100%.
# The classifier is lenient early on (by eye, 324 steps give about 80% clear digits, 800 nearly all), so
# the floor sits where both agree; an idle 2-core machine gets about 5000 steps in the default budget.
MIN_STEPS = 800
# Settings found to give recognisable 16 px digits within a few minutes on two CPU cores: a small UNet,
# a high constant learning rate after a short warm-up, and a short EMA (0.995 averages ~200 steps, so
# the EMA weights are already good after a few hundred steps rather than after thousands).
TRAIN_FLAGS = (
    "--base-channels 16 --time-dim 64 --batch-size 32 --lr 1e-3 --lr-warmup-steps 100 "
    "--ema-warmup-steps 200 --ema-decay 0.995 --save-interval 20 --preview-steps 20 --epochs 100000"
).split()


def nonnegative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def parse_args():
    formatter = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    add = parser.add_argument
    add("--minutes", type=float, default=5.0, help="total time budget of the demo")
    add("--min-steps", "--min_steps", type=nonnegative_int, default=MIN_STEPS, help="train at least this")
    add("--image-size", "--image_size", type=int, default=16, choices=(16, 32), help="side of the digits")
    add("--output-dir", "--output_dir", default="demo_output", help="folder for data, checkpoints, samples")
    add("--samples-per-class", "--samples_per_class", type=int, default=8, help="rows of the grid")
    add("--sampling-steps", "--sampling_steps", type=int, default=50, help="DDIM steps")
    # 5 rather than 3, and eta 1 rather than 0: both keep a briefly trained model's digits clean.
    add("--cfg-scale", "--cfg_scale", type=float, default=5.0, help="classifier-free guidance scale")
    add("--eta", type=float, default=1.0, help="DDIM noise: 1 stochastic, 0 deterministic")
    add("--limit", type=int, default=None, help="use only the first N digits (quick checks)")
    add("--seed", type=int, default=0, help="random seed of training and sampling")
    # The continuous-time objectives sample with the probability-flow ODE (Heun) instead of DDIM.
    add(
        "--objective",
        default="ddpm",
        choices=("ddpm", "vp", "subvp", "ve", "flow"),
        help="training objective",
    )
    return parser.parse_args()


def run_step(title, cmd):
    """Run one stage as a subprocess, streaming its output; returns its wall time in seconds."""
    print(f"\n== {title}\n$ {' '.join(map(str, cmd))}", flush=True)
    start = time.perf_counter()
    if subprocess.run([str(c) for c in cmd]).returncode != 0:
        sys.exit(f"demo failed during: {title}")
    return time.perf_counter() - start


def trained_steps(ckpt):
    return torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]


def train(args, out, minutes):
    """Train for `minutes`, then on to --min-steps if the budget gave fewer; returns (seconds, steps)."""
    # The seed's spellings of ddpm_conditional_ddp.py, as a user would type them.
    data = ["--dataset-path", out / "digits", "--workdir", out, "--run-name", RUN_NAME]
    setup = [
        "--image-size",
        args.image_size,
        "--seed",
        args.seed,
        "--num-workers",
        "0",
        "--objective",
        args.objective,
    ]
    train_cmd = [sys.executable, DDPM_SCRIPT, "--mode", "train", *data, *setup, *TRAIN_FLAGS]
    latest = out / "models" / RUN_NAME / "ckpt.pt"
    seconds = run_step(
        f"training for {minutes:.2f} minutes", [*train_cmd, "--overwrite", "--max-minutes", f"{minutes:.3f}"]
    )
    steps = trained_steps(latest)
    if steps < args.min_steps:
        # The learning rate is constant after warm-up, so resuming continues the same run as one longer one.
        print(
            f"\nthe budget gave {steps} training steps, fewer than --min-steps {args.min_steps} "
            "(the machine is slow or busy): training on to that floor"
        )
        seconds += run_step(
            f"training on to {args.min_steps} steps",
            [*train_cmd, "--resume", latest, "--max-steps", args.min_steps],
        )
        steps = trained_steps(latest)
    return seconds, steps


def main():
    args = parse_args()
    out = Path(args.output_dir).resolve()
    start = time.perf_counter()
    count = build_digits(out / "digits", args.image_size, args.limit)
    build_s = time.perf_counter() - start
    print(f"built {count} digit images ({args.image_size} px) in {out / 'digits'} in {build_s:.1f} s")
    # Leave about a tenth of the budget (and 20 s) for start-up, the final save and sampling.
    train_s, steps = train(args, out, max(0.05, 0.9 * args.minutes - 20 / 60))
    ckpt = out / "models" / RUN_NAME / "ema_ckpt.pt"
    grid = out / "digits_grid.png"
    num_samples = 10 * args.samples_per_class
    # DDIM with CFG, the whole grid as one batch: the fastest way to every class on a CPU. The ODE of the
    # continuous objectives takes Heun steps: half as many steps for the same number of network evaluations.
    sampler = ["--sampler", "ddim", "--steps", args.sampling_steps, "--eta", args.eta]
    if args.objective != "ddpm":
        sampler = ["--sampler", "heun", "--steps", max(1, args.sampling_steps // 2)]
    outputs = ["--output-dir", out / "samples", "--overwrite", "--grid-path", grid]
    sample_cmd = [sys.executable, DDPM_SCRIPT, "--mode", "sample", "--ckpt", ckpt]
    sample_cmd += ["--num-samples", num_samples, "--batch-size", num_samples, "--seed", args.seed]
    sample_cmd += [*sampler, "--cfg-scale", args.cfg_scale, *outputs]
    sample_s = run_step(f"sampling every class with CFG and {sampler[1]}", sample_cmd)
    share, per_class, classifier_accuracy = score_folder(out / "samples", args.seed)
    total_s = time.perf_counter() - start
    print(f"\n== demo finished in {total_s:.1f} s")
    print(f"data:        {out / 'digits'} ({count} images in class folders 0..9)")
    print(f"checkpoints: {ckpt.parent} (ckpt.pt, ema_ckpt.pt, ckpt_best.pt, ckpt_final.pt, ...)")
    print(f"TensorBoard: {out / 'runs' / RUN_NAME}   training grids: {out / 'results' / RUN_NAME}")
    print(f"samples:     {out / 'samples'}")
    print(f"grid:        {grid} (one column per digit 0..9)")
    print(
        f"timing:      training {train_s:.1f} s for {steps} steps ({steps / train_s:.2f} steps/s), "
        f"sampling {num_samples} images in {sample_s:.1f} s ({num_samples / sample_s:.2f} images/s), "
        f"total {total_s:.1f} s"
    )
    print(describe(share, per_class, classifier_accuracy))


if __name__ == "__main__":
    main()
