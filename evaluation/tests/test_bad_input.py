"""Every bad-input case ends with one clear line on stderr and exit code 2, without a traceback.

Each case runs as a subprocess, the way a user types it.
"""

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PARALLEL, Evil, frd_installed, run_script


def good_images(folder, count):
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        Image.fromarray(np.full((8, 8, 3), 30 * i, np.uint8)).save(os.path.join(folder, f"{i}.png"))
    return folder


def build_cases(root, weights):
    """{name: (args, extra env, text the last stderr line must contain)}."""
    flags = [
        "--inception-weights",
        weights[0],
        "--vgg-weights",
        weights[1],
        "--no-cache",
        "--num-workers",
        "0",
    ]
    good = good_images(os.path.join(root, "good"), 5)
    empty, no_images = os.path.join(root, "empty"), os.path.join(root, "no_images")
    os.makedirs(empty)
    os.makedirs(no_images)
    open(os.path.join(no_images, "notes.txt"), "w").close()
    broken = good_images(os.path.join(root, "broken"), 4)
    with open(os.path.join(broken, "4.png"), "wb") as handle:
        handle.write(b"not an image at all")
    truncated = good_images(os.path.join(root, "truncated"), 4)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(
        os.path.join(truncated, "4.png")
    )
    with open(os.path.join(truncated, "4.png"), "r+b") as handle:
        handle.truncate(600)
    np.savez(os.path.join(root, "no_arr0.npz"), images=np.zeros((4, 8, 8, 3), np.uint8))
    np.savez(os.path.join(root, "float.npz"), np.zeros((4, 8, 8, 3), np.float32))
    torch.save({"conv.weight": torch.zeros(1)}, os.path.join(root, "bogus.pth"))
    for network in ("inception", "vgg"):
        torch.save(Evil(os.path.join(root, f"ran-{network}")), os.path.join(root, f"evil-{network}.pt"))
    classes = os.path.join(root, "classes")
    for name in ("a", "b"):
        good_images(os.path.join(classes, name), 5)
    three_labels = np.arange(10) % 3
    np.savez(os.path.join(root, "bare_labels.npz"), np.zeros((10, 8, 8, 3), np.uint8), three_labels)
    np.savez(
        os.path.join(root, "short_names.npz"),
        np.zeros((10, 8, 8, 3), np.uint8),
        three_labels,
        class_names=np.array(["a", "b"]),
    )
    floats = good_images(os.path.join(root, "floats"), 4)
    Image.fromarray(np.zeros((8, 8), np.float32)).save(os.path.join(floats, "4.tif"))
    only_floats = os.path.join(root, "only_floats")
    os.makedirs(only_floats)
    for i in range(5):
        Image.fromarray(np.full((8, 8), i / 5, np.float32)).save(os.path.join(only_floats, f"{i}.tif"))
    a_file = os.path.join(root, "a_file")
    open(a_file, "w").close()
    fid = ["--metrics", "fid"]
    base = ["--real", good, "--gen", good, *fid, *flags]

    mixed = good_images(os.path.join(root, "mixed_sizes"), 3)
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(os.path.join(mixed, "3.png"))
    one = good_images(os.path.join(root, "one"), 1)
    three = good_images(os.path.join(root, "three_dc"), 3)
    # FRD reads files: an .npz input is refused, or (without the optional packages) FRD itself is.
    frd_text = "is an .npz: pass a folder" if frd_installed() else "needs the optional packages"

    def metric(real, gen, name, text, *extra):
        """A case of one metric on the given sides: (args, env, text)."""
        return (["--real", real, "--gen", gen, "--metrics", name, *extra, *flags], {}, text)

    def value(*args):
        """A case of one bad flag value on otherwise good input: (args, env, text)."""
        return ([*base, *args[:-1]], {}, args[-1])

    return {
        "zero batch size": value("--batch-size", "0", "must be an integer >= 1, got 0"),
        "negative batch size": value("--batch_size", "-2", "must be an integer >= 1, got -2"),
        "zero max samples": value(
            "--max-samples", "0", "--max-samples/--max_samples: must be an integer >= 1"
        ),
        "zero kid subset size": value(
            "--kid-subset-size", "0", "--kid-subset-size/--kid_subset_size: must be"
        ),
        "zero kid subsets": value("--kid_subsets", "0", "--kid-subsets/--kid_subsets: must be"),
        "zero nearest neighbours": value("--pr-k", "0", "--pr-k/--pr_k: must be an integer >= 1"),
        "NaN chunk size": value("--pr-chunk-size", "nan", "expected an integer, got 'nan'"),
        "zero IS splits": value("--isc-splits", "0", "--isc-splits/--isc_splits: must be"),
        "negative workers": value("--num-workers", "-1", "must be an integer >= 0, got -1"),
        "negative seed": value("--seed", "-1", "--seed: must be an integer >= 0"),
        "seed too large": value("--seed", str(2**32), "must be below 2^32"),
        "bit depth 0": value("--bit-depth", "0", "a bit depth from 1 to 32"),
        "bit depth not a number": value("--bit_depth", "twelve", "expected an integer, got 'twelve'"),
        "intensity range reversed": value("--intensity-range", "1", "0", "needs LOW < HIGH"),
        "intensity range NaN": value("--intensity_range", "nan", "1", "expected a finite number, got 'nan'"),
        "intensity range one value": value("--intensity-range", "1", "expected 2 arguments"),
        "bit depth of float images": (
            ["--real", only_floats, "--gen", good, "--bit-depth", "12", *fid, *flags],
            {},
            "applies to integer images",
        ),
        "float and integer images mixed": (
            ["--real", floats, "--gen", good, *fid, *flags],
            {},
            "mixes float ('F') and integer images",
        ),
        "json is a folder": value("--json", root, "is a folder: pass a file path"),
        "json under a file": value("--json", os.path.join(a_file, "r.json"), "is a file, not a folder"),
        "cache folder is a file": (
            ["--real", good, "--gen", good, *fid, "--inception-weights", weights[0], "--cache-dir", a_file],
            {},
            "--cache-dir",
        ),
        "pickled code as inception weights": (
            [
                "--real",
                good,
                "--gen",
                good,
                *fid,
                "--inception-weights",
                os.path.join(root, "evil-inception.pt"),
            ],
            {},
            "cannot load InceptionV3 weights file (--inception-weights)",
        ),
        "pickled code as vgg weights": (
            ["--real", good, "--gen", good, "--no-cache", "--inception-weights", weights[0]]
            + ["--vgg-weights", os.path.join(root, "evil-vgg.pt")],
            {},
            "cannot load VGG16 weights file (--vgg-weights)",
        ),
        "npz labels without names, other class count": (
            ["--real", classes, "--gen", os.path.join(root, "bare_labels.npz"), "--per-class", *fid, *flags],
            {},
            "which label is which class is ambiguous",
        ),
        "npz class_names too short": (
            ["--real", classes, "--gen", os.path.join(root, "short_names.npz"), *fid, *flags],
            {},
            "class_names must list a name (str) for every label 0..2",
        ),
        "missing folder": (
            ["--real", os.path.join(root, "nope"), "--gen", good, *fid, *flags],
            {},
            "not found",
        ),
        "empty folder": (["--real", empty, "--gen", good, *fid, *flags], {}, "is empty"),
        "no images": (
            ["--real", good, "--gen", no_images, *fid, *flags],
            {},
            "has no images (read: .png .jpg",
        ),
        "unreadable image": (["--real", broken, "--gen", good, *fid, *flags], {}, "cannot read image"),
        "truncated image": (["--real", truncated, "--gen", good, *fid, *flags], {}, "cannot read image"),
        "fewer than k+1": (
            ["--real", good_images(os.path.join(root, "three"), 3), "--gen", good, *flags],
            {},
            "k+1",
        ),
        "fewer than KID subset": (
            ["--real", good, "--gen", good, "--metrics", "kid", *flags],
            {},
            "kid-subset-size",
        ),
        "npz without arr_0": (
            ["--real", good, "--gen", os.path.join(root, "no_arr0.npz"), *fid],
            {},
            "no arr_0",
        ),
        "npz not uint8": (
            ["--real", good, "--gen", os.path.join(root, "float.npz"), *fid, *flags],
            {},
            "uint8",
        ),
        "offline without weights": (
            ["--real", good, "--gen", good, *fid, "--no-cache"],
            {"TORCH_HOME": os.path.join(root, "torch_home")},
            "6726825d.pth elsewhere and pass the file with --inception-weights",
        ),
        "missing vgg file": (
            [
                "--real",
                good,
                "--gen",
                good,
                "--inception-weights",
                weights[0],
                "--vgg-weights",
                root + "/x.pth",
            ],
            {},
            "VGG16 weights file not found",
        ),
        "wrong weights file": (
            ["--real", good, "--gen", good, *fid, "--inception-weights", os.path.join(root, "bogus.pth")],
            {},
            "--inception-weights",
        ),
        "per-class without classes": (
            ["--real", good, "--gen", good, "--per-class", *fid, *flags],
            {},
            "--per-class",
        ),
        "unknown metric": (
            ["--real", good, "--gen", good, "--metrics", "fid,sharpness"],
            {},
            "unknown metric",
        ),
        "bad device": (["--real", good, "--gen", good, "--device", "gpu0", *flags], {}, "--device gpu0"),
        "unknown DINOv2 model": value("--dinov2-model", "dinov2-vit-x-14", "--dinov2-model/--dinov2_model"),
        "DINOv2 weights missing offline": (
            ["--real", good, "--gen", good, "--metrics", "fd-dinov2", *flags],
            {"TORCH_HOME": os.path.join(root, "torch_home")},
            "dinov2_vitl14_pretrain.pth elsewhere and pass the file with --dinov2-weights",
        ),
        "missing DINOv2 file": (
            ["--real", good, "--gen", good, "--metrics", "fd-dinov2", "--dinov2-weights", root + "/x.pth"],
            {},
            "DINOv2 ViT-L/14 weights file not found",
        ),
        "DINOv2 file of another network": metric(
            good,
            good,
            "fd-dinov2",
            "pass the right file with --dinov2-weights",
            "--dinov2-weights",
            weights[0],
        ),
        "too few images for sFID": metric(good, one, "sfid", "sFID needs at least 2 images per side"),
        "too few real images for density/coverage": metric(
            three, good, "dc", "density/coverage with k=3 needs k+1 real images"
        ),
        "too few images for FD-DINOv2": metric(
            one, good, "fd-dinov2", "FD-DINOv2 needs at least 2 images per side"
        ),
        "write-reference of mixed sizes": (
            ["--real", mixed, "--write-reference", os.path.join(root, "ref.npz"), *flags],
            {},
            "--write-reference needs images of one size",
        ),
        "write-reference not an npz name": value(
            "--write-reference", os.path.join(root, "ref.txt"), "end in .npz"
        ),
        "protocol without a value": value("--protocol", "sampler", "expected KEY=VALUE"),
        "FRD of an npz or without its packages": metric(
            good, os.path.join(root, "bare_labels.npz"), "frd", frd_text
        ),
        "constants not edited": ([], {}, "REAL_IMAGES_DIR"),
    }


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("bad"))


@pytest.fixture(scope="module")
def outcomes(root, weights):
    """Run all cases, two at a time (most of each run is starting Python and importing torch)."""
    cases = build_cases(root, weights)
    clean_env = {"EVAL_INCEPTION_WEIGHTS": "", "EVAL_VGG16_WEIGHTS": "", **PARALLEL}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {n: pool.submit(run_script, a, {**clean_env, **e}) for n, (a, e, _) in cases.items()}
    return {name: (futures[name].result(), cases[name][2]) for name in cases}


CASES = [
    "zero batch size",
    "negative batch size",
    "zero max samples",
    "zero kid subset size",
    "zero kid subsets",
    "zero nearest neighbours",
    "NaN chunk size",
    "zero IS splits",
    "negative workers",
    "negative seed",
    "seed too large",
    "bit depth 0",
    "bit depth not a number",
    "intensity range reversed",
    "intensity range NaN",
    "intensity range one value",
    "bit depth of float images",
    "float and integer images mixed",
    "json is a folder",
    "json under a file",
    "cache folder is a file",
    "pickled code as inception weights",
    "pickled code as vgg weights",
    "npz labels without names, other class count",
    "npz class_names too short",
    "missing folder",
    "empty folder",
    "no images",
    "unreadable image",
    "truncated image",
    "fewer than k+1",
    "fewer than KID subset",
    "npz without arr_0",
    "npz not uint8",
    "offline without weights",
    "missing vgg file",
    "wrong weights file",
    "per-class without classes",
    "unknown metric",
    "bad device",
    "constants not edited",
    "unknown DINOv2 model",
    "DINOv2 weights missing offline",
    "missing DINOv2 file",
    "DINOv2 file of another network",
    "too few images for sFID",
    "too few real images for density/coverage",
    "too few images for FD-DINOv2",
    "write-reference of mixed sizes",
    "write-reference not an npz name",
    "protocol without a value",
    "FRD of an npz or without its packages",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_line_and_exit_2(outcomes, case):
    result, expected = outcomes[case]
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert lines[-1].startswith("error: ") and expected in lines[-1], lines[-1]
    assert sum(line.startswith("error:") for line in lines) == 1
    assert "FINAL EVALUATION REPORT" not in result.stdout
    assert " features (" not in result.stderr  # refused before any feature extraction


def test_pickled_weights_never_run(outcomes, root):
    """The 'pickled code as ...' cases refused the files without running what they hide."""
    assert outcomes["pickled code as vgg weights"][0].returncode == 2
    assert not os.path.exists(os.path.join(root, "ran-inception"))
    assert not os.path.exists(os.path.join(root, "ran-vgg"))


def test_cases_list_is_complete(outcomes):
    assert sorted(CASES) == sorted(outcomes)


def test_failing_run_leaves_an_existing_json_untouched(tmp_path, weights):
    folder = good_images(str(tmp_path / "images"), 5)
    report = tmp_path / "report.json"
    report.write_text("earlier results")
    args = ["--real", folder, "--gen", str(tmp_path / "missing"), "--json", str(report)]
    result = run_script(args + ["--inception-weights", weights[0], "--metrics", "fid"])
    assert result.returncode == 2 and report.read_text() == "earlier results"
