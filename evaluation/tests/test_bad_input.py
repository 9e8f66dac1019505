"""Every bad-input case ends with one clear line on stderr and exit code 2, without a traceback."""

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PARALLEL, run_script


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
    fid = ["--metrics", "fid"]
    return {
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
        "constants not edited": ([], {}, "REAL_IMAGES_DIR"),
    }


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, weights):
    """Run all cases, two at a time (most of each run is starting Python and importing torch)."""
    root = str(tmp_path_factory.mktemp("bad"))
    cases = build_cases(root, weights)
    clean_env = {"EVAL_INCEPTION_WEIGHTS": "", "EVAL_VGG16_WEIGHTS": "", **PARALLEL}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {n: pool.submit(run_script, a, {**clean_env, **e}) for n, (a, e, _) in cases.items()}
    return {name: (futures[name].result(), cases[name][2]) for name in cases}


CASES = [
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
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_line_and_exit_2(outcomes, case):
    result, expected = outcomes[case]
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert expected in lines[-1]
    assert "FINAL EVALUATION REPORT" not in result.stdout


def test_cases_list_is_complete(outcomes):
    assert sorted(CASES) == sorted(outcomes)


def test_failing_run_leaves_an_existing_json_untouched(tmp_path, weights):
    folder = good_images(str(tmp_path / "images"), 5)
    report = tmp_path / "report.json"
    report.write_text("earlier results")
    args = ["--real", folder, "--gen", str(tmp_path / "missing"), "--json", str(report)]
    result = run_script(args + ["--inception-weights", weights[0], "--metrics", "fid"])
    assert result.returncode == 2 and report.read_text() == "earlier results"
