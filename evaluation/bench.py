"""Benchmark of precision_recall.py: feature-extraction speed, what the real-feature cache saves, and
what one shared Inception pass saves.

Runs the script twice as a user would (default metrics: FID + VGG16 precision/recall), against the
same real folder with two different generated folders ("two checkpoints"). The second run reads the
real features from the cache. Then it times, in this process, one Inception-v3 pass that yields the
features of FID + sFID + IS + Inception precision/recall at once against one pass per metric (what
running the metrics one by one costs), and prints the ratio. Networks have random weights of the real
architectures (the real files cannot be downloaded here), so the speed is real and the metric values
are meaningless.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torch_fidelity.utils import create_feature_extractor

from core.cli import Parser, positive_int
from core.errors import run_cli
from features import extract_features
from inputs import open_image_set
from random_weights import write_random_weights
from weights import WithSpatialFeatures

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


def inception(path, layers, spatial=False):
    """torch-fidelity's Inception-v3 with `layers`, wrapped for sFID's spatial features if asked."""
    net = create_feature_extractor(
        "inception-v3-compat", layers, cuda=False, feature_extractor_weights_path=path, verbose=False
    )
    return WithSpatialFeatures(net) if spatial else net


def pass_seconds(image_set, extractor, settings):
    start = time.perf_counter()
    extract_features(image_set, extractor.to(settings.device), settings, "bench pass")
    return time.perf_counter() - start


def shared_pass_ratio(folder, path, batch_size):
    """(shared seconds, separate seconds) over the images in `folder`."""
    image_set = open_image_set(folder, "gen", "GEN_IMAGES_DIR")
    image_set.intensity = {"kind": "integer", "bit_depth": 8}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    settings = argparse.Namespace(batch_size=batch_size, num_workers=0, device=device)
    shared = pass_seconds(image_set, inception(path, ["2048", "logits_unbiased"], spatial=True), settings)
    # One pass per metric, each stopping where torch-fidelity can (its forward ends at the last layer asked):
    # FID and precision/recall at pool3, IS at the logits, sFID at Mixed_6e's pooled output (768).
    separate = sum(
        pass_seconds(image_set, inception(path, layers, spatial), settings)
        for layers, spatial in (
            (["2048"], False),
            (["768"], True),
            (["logits_unbiased"], False),
            (["2048"], False),
        )
    )
    return shared, separate


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
        shared_s, separate_s = shared_pass_ratio(gens[0], weights[0], args.batch_size)
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
    count = args.images
    print("  Inception features of FID + sFID + IS + precision/recall (Inception):")
    print(f"    one shared pass:               {count / shared_s:8.1f} images/s")
    print(f"    a pass per metric (4 passes):  {count / separate_s:8.1f} images/s")
    print(f"    speed-up of the shared pass:   {separate_s / shared_s:8.2f} x")


if __name__ == "__main__":
    run_cli(main)
