"""End-to-end demo: train the class-conditional DDPM on scikit-learn's handwritten digits and sample a grid.

Builds the 1797 8x8 digits as grayscale PNG class folders 0..9 (upscaled), trains ddpm/ for a fixed time
budget (a GPU simply gets through more steps in it), then samples every class with classifier-free guidance
and DDIM and writes the grid as a PNG. Everything goes under --output-dir.
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

DEMO_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(DEMO_DIR))

from build_digits import build_digits  # noqa: E402

DDPM_SCRIPT = DEMO_DIR.parent / "ddpm" / "ddpm_conditional_ddp.py"
RUN_NAME = "digits"
MIN_GOOD_STEPS = 800  # below this many steps the 16 px digits are still noisy
# Settings found to give recognisable 16 px digits within a few minutes on two CPU cores.
TRAIN_FLAGS = [
    "--base-channels",
    "16",
    "--time-dim",
    "64",
    "--batch-size",
    "32",
    "--lr",
    "1e-3",
    "--lr-warmup-steps",
    "100",
    "--ema-warmup-steps",
    "200",
    "--ema-decay",
    "0.995",
    "--save-interval",
    "20",
    "--preview-steps",
    "20",
    "--epochs",
    "100000",
]


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=5.0, help="total time budget of the demo")
    parser.add_argument(
        "--image-size",
        "--image_size",
        dest="image_size",
        type=int,
        default=16,
        choices=(16, 32),
        help="side of the upscaled digits",
    )
    parser.add_argument(
        "--output-dir",
        "--output_dir",
        dest="output_dir",
        default="demo_output",
        help="folder for the data, checkpoints, samples and grid",
    )
    parser.add_argument(
        "--samples-per-class",
        "--samples_per_class",
        dest="samples_per_class",
        type=int,
        default=8,
        help="rows of the grid",
    )
    parser.add_argument(
        "--sampling-steps", "--sampling_steps", dest="sampling_steps", type=int, default=50, help="DDIM steps"
    )
    parser.add_argument(
        "--cfg-scale",
        "--cfg_scale",
        dest="cfg_scale",
        type=float,
        default=3.0,
        help="classifier-free guidance scale",
    )
    parser.add_argument(
        "--eta",
        type=float,
        default=1.0,
        help="DDIM noise: 1 (stochastic) keeps a briefly trained model's samples clean, 0: deterministic",
    )
    parser.add_argument("--limit", type=int, default=None, help="use only the first N digits (quick checks)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of training and sampling")
    return parser.parse_args()


def run_step(title, cmd):
    """Run one stage as a subprocess, streaming its output; returns its wall time in seconds."""
    print(f"\n== {title}\n$ {' '.join(map(str, cmd))}", flush=True)
    start = time.perf_counter()
    if subprocess.run([str(c) for c in cmd]).returncode != 0:
        sys.exit(f"demo failed during: {title}")
    return time.perf_counter() - start


def main():
    args = parse_args()
    out = Path(args.output_dir).resolve()
    start = time.perf_counter()
    count = build_digits(out / "digits", args.image_size, args.limit)
    build_s = time.perf_counter() - start
    print(f"built {count} digit images ({args.image_size} px) in {out / 'digits'} in {build_s:.1f} s")
    # Leave about a tenth of the budget (and 20 s) for start-up, the final save and sampling.
    train_minutes = max(0.05, 0.9 * args.minutes - 20 / 60)
    train_cmd = [
        sys.executable,
        DDPM_SCRIPT,
        "--mode",
        "train",
        "--dataset-path",
        out / "digits",
        "--workdir",
        out,
        "--run-name",
        RUN_NAME,
        "--overwrite",
        "--image-size",
        args.image_size,
        "--max-minutes",
        f"{train_minutes:.3f}",
        "--seed",
        args.seed,
        "--num-workers",
        "0",
        *TRAIN_FLAGS,
    ]
    train_s = run_step(f"training for {train_minutes:.2f} minutes", train_cmd)
    ckpt = out / "models" / RUN_NAME / "ema_ckpt.pt"
    steps = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
    if steps < MIN_GOOD_STEPS:
        print(
            f"warning: only {steps} training steps fit in the budget ({MIN_GOOD_STEPS} give clear digits); "
            "the machine is slow or busy: try --minutes 10"
        )
    grid = out / "digits_grid.png"
    sample_cmd = [
        sys.executable,
        DDPM_SCRIPT,
        "--mode",
        "sample",
        "--ckpt",
        ckpt,
        "--num-samples",
        10 * args.samples_per_class,
        "--sampler",
        "ddim",
        "--steps",
        args.sampling_steps,
        "--eta",
        args.eta,
        "--cfg-scale",
        args.cfg_scale,
        "--batch-size",
        10 * args.samples_per_class,
        "--seed",
        args.seed,
        "--output-dir",
        out / "samples",
        "--overwrite",
        "--grid-path",
        grid,
    ]
    sample_s = run_step("sampling every class with CFG and DDIM", sample_cmd)
    total_s = time.perf_counter() - start
    print(f"\n== demo finished in {total_s:.1f} s")
    print(f"data:        {out / 'digits'} ({count} images in class folders 0..9)")
    print(f"checkpoints: {ckpt.parent} (ckpt.pt, ema_ckpt.pt, ckpt_best.pt, ckpt_final.pt, ...)")
    print(f"TensorBoard: {out / 'runs' / RUN_NAME}   training grids: {out / 'results' / RUN_NAME}")
    print(f"samples:     {out / 'samples'}")
    print(f"grid:        {grid} (one column per digit 0..9)")
    print(
        f"timing:      training {train_s:.1f} s for {steps} steps ({steps / train_s:.2f} steps/s), "
        f"sampling {sample_s:.1f} s, total {total_s:.1f} s"
    )


if __name__ == "__main__":
    main()
