"""Classifier guidance on real data: an unconditional DDPM on scikit-learn's digits, steered to a digit.

Builds the 1797 digits as 16 px class folders 0..9 (demo/build_digits.py), trains an unconditional DDPM
(ddpm.py) and a noisy-image classifier (train_classifier.py) briefly on them, samples every digit with
classifier guidance at each --scales value, and reports the share of samples that a classifier of the real
8x8 digits (demo/recognise.py, independent of the guiding one) reads as the digit asked for. At scale 0
the labels only name the folders, so that share is about chance (10%). Everything goes under --output-dir;
a rerun reuses a model already trained there for the requested steps (to try other --scales, say).

    python ddpm/scripts/classifier_guidance_digits.py --output-dir /tmp/guided_digits
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

DDPM_DIR = Path(__file__).resolve().parents[1]
DEMO_DIR = DDPM_DIR.parent / "demo"
# The demo's settings for 16 px digits on a CPU: small networks, a high learning rate, a short EMA.
COMMON = "--num-workers 0 --batch-size 32 --lr 1e-3 --lr-warmup-steps 100 --ema-decay 0.995 --epochs 100000"
DDPM_FLAGS = (
    f"{COMMON} --image-size 16 --base-channels 16 --time-dim 64 --ema-warmup-steps 200 --preview-steps 0"
)
CLASSIFIER_FLAGS = f"{COMMON} --base-channels 16 --time-dim 64 --depth 1 --ema-warmup-steps 100"


def parse_args():
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    add = parser.add_argument
    add("--output-dir", "--output_dir", default="guided_digits", help="data, checkpoints and samples")
    add("--ddpm-steps", "--ddpm_steps", type=int, default=540, help="training steps of the DDPM")
    add("--classifier-steps", "--classifier_steps", type=int, default=300, help="steps of the classifier")
    add("--scales", type=float, nargs="+", default=[0.0, 10.0], help="classifier guidance scales to compare")
    add("--samples-per-class", "--samples_per_class", type=int, default=10, help="samples of each digit")
    add("--sampling-steps", "--sampling_steps", type=int, default=50, help="DDIM steps (eta 1)")
    add("--seed", type=int, default=0, help="seed of training and sampling")
    return parser.parse_args()


def run(title, *cmd):
    """Run one stage as a subprocess; prints the end of its output and returns all of it, or exits."""
    print(f"\n== {title}\n$ {' '.join(map(str, cmd))}", flush=True)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *map(str, cmd)], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed during {title}:\n{done.stderr[-2000:]}")
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    print("\n".join(lines[-4:]), f"\n({time.perf_counter() - start:.0f} s)", flush=True)
    return done.stdout


def train_once(out, run_name, steps, title, script, *flags):
    """Train <out>/models/<run_name> for `steps` steps unless it already holds a model that far along."""
    ckpt = out / "models" / run_name / "ckpt.pt"
    if ckpt.is_file() and torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] >= steps:
        print(f"\n== reusing {ckpt}")
    else:
        run(title, DDPM_DIR / script, *flags, "--run-name", run_name, "--max-steps", steps, "--overwrite")
    return out / "models" / run_name / "ema_ckpt.pt"


def main():
    args = parse_args()
    out = Path(args.output_dir).resolve()
    data, seed = out / "digits", ("--seed", args.seed)
    run("building the digits", DEMO_DIR / "build_digits.py", "--out-dir", data, "--size", 16)
    train = ("--dataset-path", data, "--workdir", out, *seed)
    ddpm = train_once(
        out, "ddpm", args.ddpm_steps, f"training an unconditional DDPM for {args.ddpm_steps} steps",
        "ddpm.py", *train, *DDPM_FLAGS.split(),
    )  # fmt: skip
    classifier = train_once(
        out, "classifier", args.classifier_steps, f"training a classifier for {args.classifier_steps} steps",
        "train_classifier.py", *train, "--diffusion-checkpoint", ddpm, *CLASSIFIER_FLAGS.split(),
    )  # fmt: skip
    n = 10 * args.samples_per_class
    sampling = ("--mode", "sample", "--ckpt", ddpm, "--classifier", classifier, "--num-samples", n)
    sampling += ("--batch-size", n, "--sampler", "ddim", "--steps", args.sampling_steps, "--eta", 1, *seed)
    reports = {}
    for scale in args.scales:
        samples, grid = out / f"samples_scale_{scale:g}", out / f"grid_scale_{scale:g}.png"
        run(
            f"sampling {n} digits with classifier scale {scale:g}",
            DDPM_DIR / "ddpm_conditional_ddp.py", *sampling, "--classifier-scale", scale,
            "--output-dir", samples, "--overwrite", "--grid-path", grid,
        )  # fmt: skip
        reports[scale] = run(
            f"recognising the samples of scale {scale:g}", DEMO_DIR / "recognise.py", samples
        )
    print("\n== classifier guidance of an unconditional DDPM on the digits")
    for scale, report in reports.items():
        print(f"scale {scale:g}:\n{report.rstrip()}")


if __name__ == "__main__":
    main()
