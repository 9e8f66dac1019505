"""precision_recall.py and evaluate.sh driven end to end as subprocesses, on random-weight networks."""

import os
import re
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch_fidelity
from PIL import Image

from conftest import FOLDER, PARALLEL, SCRIPT, read_json, run_script

SMALL = ["--kid-subset-size", "4", "--isc-splits", "2", "--num-workers", "0"]


def inception_run(data, weights, tmp, name, *extra, real=None, gen=None, env=None):
    """Run with Inception features only (precision/recall on Inception too, to keep the tests fast)."""
    out = os.path.join(tmp, f"{name}.json")
    args = ["--real", real or data["real"], "--gen", gen or data["gen"], "--pr-features", "inception"]
    args += ["--inception-weights", weights[0], "--cache-dir", os.path.join(tmp, "cache"), "--json", out]
    result = run_script(args + SMALL + list(extra), env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    return read_json(out), result


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return str(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def runs(data, weights, tmp):
    """The reference run first (it fills the real-feature cache), then the other runs two at a time."""
    reference = inception_run(data, weights, tmp, "reference", "--metrics", "fid,pr,kid,isc", "--per-class")
    shuffled = shuffled_copy(data["gen"], os.path.join(tmp, "gen_shuffled"))
    npz = write_npz(os.path.join(data["gen"], "b"), os.path.join(tmp, "gen_b.npz"))
    real_b = os.path.join(data["real"], "b")
    jobs = {
        "cached": lambda: inception_run(
            data,
            weights,
            tmp,
            "cached",
            "--batch-size",
            "3",
            "--num-workers",
            "2",
            "--metrics",
            "fid,pr",
            gen=shuffled,
            env=PARALLEL,
        ),
        "npz": lambda: inception_run(
            data, weights, tmp, "npz", "--metrics", "fid,pr", "--no-cache", real=real_b, gen=npz, env=PARALLEL
        ),
        "constants": lambda: constants_run(data, weights, tmp),
        "evaluate.sh": lambda: evaluate_sh_run(data, weights, tmp),
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        yield {"reference": reference, **futures}


def test_reference_run_reports_every_metric(runs, weights):
    result, process = runs["reference"]
    assert "FINAL EVALUATION REPORT" in process.stdout and "KID (InceptionV3):" in process.stdout
    assert set(result["metrics"]) == {
        "fid",
        "precision",
        "recall",
        "f_score",
        "kid_mean",
        "kid_std",
        "isc_mean",
        "isc_std",
    }
    assert result["failures"] == {}
    assert result["counts"] == {"real": 10, "gen": 11, "real_total": 10, "gen_total": 11}
    assert result["image_sizes"]["real"] == {"16x16": 9, "24x24": 1}  # mixed sizes in one folder
    assert result["metrics"]["fid"] > 0.01 and result["metrics"]["precision"] < 1.0  # informative features
    assert {c: e["counts"] for c, e in result["per_class"].items()} == {
        "a": {"real": 5, "gen": 6},
        "b": {"real": 5, "gen": 5},
    }
    assert result["weights"]["inception-v3-compat"]["path"] == weights[0]
    assert result["versions"]["torch_fidelity"] == torch_fidelity.__version__
    assert "299x299" in result["preprocessing"]["resize"]["inception-v3-compat"]
    assert result["cache"]["extracted"]["real"]["inception"]["images"] == 10


def shuffled_copy(source, target):
    """Copy a folder renaming the files so that their sorted order is reversed."""
    for folder, _, names in os.walk(source):
        destination = os.path.join(target, os.path.relpath(folder, source))
        os.makedirs(destination, exist_ok=True)
        for rank, name in enumerate(sorted(names)):
            shutil.copy(
                os.path.join(folder, name), os.path.join(destination, f"{len(names) - rank:03d}_{name}")
            )
    return target


def write_npz(folder, path):
    """The folder's images as arr_0 (N x H x W x C uint8) with labels 1 (class "b") as arr_1."""
    images = np.stack([np.asarray(Image.open(os.path.join(folder, n))) for n in sorted(os.listdir(folder))])
    np.savez(path, images, np.ones(len(images), dtype=np.int64))
    return path


def test_cached_run_with_other_file_order_and_batch_size_gives_same_numbers(runs):
    """Second run: real features come from the cache; generated files in another order, batch size 3."""
    reference = runs["reference"][0]["metrics"]
    result, process = runs["cached"].result()
    assert result["cache"]["extracted"]["real"]["inception"]["images"] == 0
    assert result["cache"]["extracted"]["gen"]["inception"]["images"] == 11
    assert "loaded from the cache" in process.stderr
    assert result["metrics"]["fid"] == pytest.approx(reference["fid"], rel=1e-4)
    assert result["metrics"]["precision"] == reference["precision"]
    assert result["metrics"]["recall"] == reference["recall"]


def test_npz_input_matches_the_same_images_in_a_folder(runs):
    result, _ = runs["npz"].result()
    assert result["counts"]["gen"] == 5
    per_class = runs["reference"][0]["per_class"]["b"][
        "metrics"
    ]  # the per-class split gives the same numbers
    assert result["metrics"]["fid"] == pytest.approx(per_class["fid"], rel=1e-4)
    assert result["metrics"]["precision"] == per_class["precision"]
    assert result["metrics"]["recall"] == per_class["recall"]


def test_numbers_equal_torch_fidelity_calculate_metrics(runs, data, weights):
    library = torch_fidelity.calculate_metrics(
        input1=os.path.join(data["gen"], "b"),
        input2=os.path.join(data["real"], "b"),
        kid=True,
        isc=True,
        prc=True,
        feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=weights[0],
        kid_subset_size=4,
        isc_splits=2,
        cuda=False,
        cache=False,
        save_cpu_ram=True,
        verbose=False,
    )
    ours = runs["reference"][0]["per_class"]["b"]["metrics"]
    assert ours["kid_mean"] == pytest.approx(library["kernel_inception_distance_mean"], rel=1e-3, abs=1e-6)
    assert ours["isc_mean"] == pytest.approx(library["inception_score_mean"], rel=1e-5)
    assert ours["precision"] == library["precision"] and ours["recall"] == library["recall"]


def report_value(stdout, label):
    return float(re.search(rf"^{re.escape(label)}\s+(-?[0-9.]+)", stdout, re.M).group(1))


def constants_run(data, weights, tmp):
    """A copy of the folder whose script has edited constants, run with no flags (weights from the
    environment): what a user who copied evaluation/ and edited the top of the script runs."""
    copy = os.path.join(tmp, "constants", "precision_recall.py")
    ignore = shutil.ignore_patterns("tests", "__pycache__", "*.npz")
    shutil.copytree(FOLDER, os.path.dirname(copy), ignore=ignore)  # with its modules and vendored core
    with open(SCRIPT) as handle:
        source = handle.read()
    source = re.sub(r'^REAL_IMAGES_DIR = ".*"$', f'REAL_IMAGES_DIR = "{data["real"]}"', source, flags=re.M)
    source = re.sub(r'^GEN_IMAGES_DIR = ".*"$', f'GEN_IMAGES_DIR = "{data["real"]}"', source, flags=re.M)
    source = re.sub(r"^BATCH_SIZE = 32$", "BATCH_SIZE = 4", source, flags=re.M)
    with open(copy, "w") as handle:
        handle.write(source)
    env = {
        "EVAL_INCEPTION_WEIGHTS": weights[0],
        "EVAL_VGG16_WEIGHTS": weights[1],
        "EVAL_CACHE_DIR": os.path.join(tmp, "cache"),
        **PARALLEL,
    }
    return run_script([], env=env, cwd=os.path.dirname(copy), script=copy)


def test_constants_mode_self_comparison_with_vgg(runs, data):
    """No flags: the edited constants are used; a folder against itself gives FID 0, P = R = 1."""
    result = runs["constants"].result()
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"Real Data: {data['real']}" in result.stdout and "batch size 4" in result.stderr
    assert abs(report_value(result.stdout, "FID (InceptionV3):")) < 0.01
    assert report_value(result.stdout, "Precision (VGG16):") == 1.0
    assert report_value(result.stdout, "Recall (VGG16):") == 1.0


def evaluate_sh_run(data, weights, tmp):
    """evaluate.sh with its variables set in the environment; returns (env, CompletedProcess)."""
    env = {
        "PYTHON": sys.executable,
        "REAL_DIR": os.path.join(data["real"], "b"),
        "GEN_DIR": os.path.join(data["gen"], "b"),
        "METRICS": "precision/recall",
        "PR_FEATURES": "inception",
        "BATCH_SIZE": "2",
        "NUM_WORKERS": "1",
        "JSON_OUT": os.path.join(tmp, "sh.json"),
        "CACHE_DIR": os.path.join(tmp, "cache_sh"),
        "INCEPTION_WEIGHTS": weights[0],
        **PARALLEL,
    }
    extra = ["--max-samples", "4", "--seed", "1"]  # flags after the script name are passed on too
    return env, run_script(extra, env=env, script=os.path.join(FOLDER, "evaluate.sh"), interpreter="bash")


def test_evaluate_sh_passes_its_variables_on(runs):
    env, result = runs["evaluate.sh"].result()
    assert result.returncode == 0, result.stderr[-2000:]
    report = read_json(env["JSON_OUT"])
    settings = report["settings"]
    assert (settings["batch_size"], settings["num_workers"], settings["metrics"]) == (2, 1, ["pr"])
    assert (settings["pr_features"], settings["max_samples"], settings["seed"]) == ("inception", 4, 1)
    assert settings["cache_dir"] == env["CACHE_DIR"] and os.listdir(env["CACHE_DIR"])
    assert report["counts"] == {"real": 4, "gen": 4, "real_total": 5, "gen_total": 5}
    assert set(report["metrics"]) == {"precision", "recall", "f_score"}
