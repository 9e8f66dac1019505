"""Benchmark of precision_recall.py: feature-extraction speed and what the real-feature cache saves.

Runs the script twice as a user would (default metrics: FID + VGG16 precision/recall), against the
same real folder with two different generated folders ("two checkpoints"). The second run reads the
real features from the cache. Networks have random weights of the real architectures (the real
files cannot be downloaded here), so the speed is real and the metric values are meaningless.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from core.cli import Parser, positive_int
from core.errors import run_cli
from random_weights import write_random_weights

FOLDER = os.path.dirname(os.path.abspath(__file__))


def write_images(folder, count, size, seed):
    """`count` random smooth RGB PNGs of size x size."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder)
    for i in range(count):
        coarse = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
        image = Image.fromarray(coarse).resize((size, size), Image.BILINEAR)
        image.save(os.path.join(folder, f"{i:06d}.png"))
    return folder


def evaluate(real, gen, weights, cache, out, batch_size):
    """One run of precision_recall.py; returns (wall seconds, its json)."""
    command = [sys.executable, os.path.join(FOLDER, "precision_recall.py"), "--real", real, "--gen", gen]
    command += ["--inception-weights", weights[0], "--vgg-weights", weights[1], "--cache-dir", cache]
    command += ["--json", out, "--batch-size", str(batch_size)]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    with open(out) as handle:
        return seconds, json.load(handle)


def rate(run, side, network):
    entry = run["cache"]["extracted"][side][network]
    return entry["images"] / entry["seconds"] if entry["seconds"] else float("nan")


def main():
    parser = Parser(description=__doc__.splitlines()[0])
    # At least 4 images: precision/recall with k=3 needs k+1 per side.
    parser.add_argument("--images", type=positive_int, default=32, help="images per folder, >= 4")
    parser.add_argument("--size", type=positive_int, default=32, help="image side in pixels")
    parser.add_argument("--batch-size", "--batch_size", type=positive_int, default=32, help="batch size")
    args = parser.parse_args()
    if args.images < 4:
        parser.error(f"--images must be at least 4 (precision/recall with k=3 needs k+1), got {args.images}")
    with tempfile.TemporaryDirectory(prefix="eval_bench_") as tmp:
        weights = write_random_weights(os.path.join(tmp, "weights"))
        real = write_images(os.path.join(tmp, "real"), args.images, args.size, 0)
        gens = [write_images(os.path.join(tmp, f"gen{i}"), args.images, args.size, i + 1) for i in range(2)]
        cache = os.path.join(tmp, "cache")
        first_s, first = evaluate(real, gens[0], weights, cache, os.path.join(tmp, "1.json"), args.batch_size)
        second_s, second = evaluate(
            real, gens[1], weights, cache, os.path.join(tmp, "2.json"), args.batch_size
        )
    device = first["settings"]["device"]
    print("precision_recall.py benchmark (random-weight Inception-v3 and VGG16 of the real architectures;")
    print("speeds are real, metric values meaningless)")
    print(
        f"device {device}, {args.images} real + {args.images} generated images of {args.size}x{args.size} px"
    )
    print(
        f"  Inception-v3 feature extraction: {rate(first, 'gen', 'inception'):8.1f} images/s (resized to 299)"
    )
    print(f"  VGG16 feature extraction:        {rate(first, 'gen', 'vgg16'):8.1f} images/s (resized to 224)")
    real_s = [
        sum(e["seconds"] for e in run["cache"]["extracted"]["real"].values()) for run in (first, second)
    ]
    real_again = sum(e["images"] for e in second["cache"]["extracted"]["real"].values())
    print(f"  1st evaluation (cold cache):     {first_s:8.1f} s  (real-feature extraction {real_s[0]:.1f} s)")
    print(f"  2nd evaluation, same real set:   {second_s:8.1f} s  (real images re-extracted: {real_again})")
    print(f"  ratio 2nd / 1st:                 {second_s / first_s:8.2f}")


if __name__ == "__main__":
    run_cli(main)
