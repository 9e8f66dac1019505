"""The real-feature and scan cache: keyed by the drawn subset, and never a way to run code."""

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import features
import inputs
from conftest import PARALLEL, Evil, blob_image, read_json, run_script

FAST = ["--metrics", "fid", "--num-workers", "0"]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, data):
    """Real .npz of 12 labelled images with class_names (classes a and b, as the samplers write it)."""
    rng = np.random.default_rng(5)
    arrays = np.stack([blob_image(rng, 16, (40 * i, 90, 160)) for i in range(12)])
    path = str(tmp_path_factory.mktemp("npz") / "real.npz")
    np.savez(path, arrays, np.arange(12) % 2, class_names=np.array(["a", "b"]))
    return path


def test_cache_name_follows_the_drawn_npz_rows(labelled, weights):
    image_set = inputs.load_npz(labelled)
    first, second = (inputs.random_subset(image_set, 8, seed) for seed in (1, 2))
    assert first.indices != second.indices
    weight = {"path": weights[0]}
    name = features.real_cache_name(first, "inception", weight)
    assert name == features.real_cache_name(inputs.random_subset(image_set, 8, 1), "inception", weight)
    assert name != features.real_cache_name(second, "inception", weight)
    assert name != features.real_cache_name(image_set, "inception", weight)


def test_another_seed_draws_other_npz_rows_and_per_class_uses_their_labels(labelled, data, weights, tmp_path):
    """The cached run with --seed 2 equals an uncached one, after a --seed 1 run filled the cache."""
    cache = str(tmp_path / "cache")

    def run(name, seed, *extra):
        out = str(tmp_path / f"{name}.json")
        args = ["--real", labelled, "--gen", data["gen"], "--max-samples", "8", "--seed", seed, "--per-class"]
        args += ["--inception-weights", weights[0], "--json", out, *FAST, *extra]
        result = run_script(args, env=PARALLEL)
        assert result.returncode == 0, result.stderr[-2000:]
        return read_json(out)

    with ThreadPoolExecutor(max_workers=2) as pool:
        filled = pool.submit(run, "seed1", "1", "--cache-dir", cache)
        uncached = pool.submit(run, "uncached", "2", "--no-cache").result()
        filled.result()
    cached = run("seed2", "2", "--cache-dir", cache)
    assert cached["cache"]["extracted"]["real"]["inception"]["images"] == 8  # not the seed-1 features
    assert cached["metrics"]["fid"] == pytest.approx(uncached["metrics"]["fid"], rel=1e-6)
    for name in ("a", "b"):
        entry, expected = cached["per_class"][name], uncached["per_class"][name]
        assert entry["counts"] == expected["counts"]
        assert entry["metrics"]["fid"] == pytest.approx(expected["metrics"]["fid"], rel=1e-6)


def test_poisoned_cache_files_are_refused_not_run(data, weights, tmp_path):
    cache, marker = tmp_path / "cache", tmp_path / "ran"
    real, gen = os.path.join(data["real"], "b"), os.path.join(data["gen"], "b")
    args = ["--real", real, "--gen", gen, "--inception-weights", weights[0], "--cache-dir", str(cache), *FAST]
    assert run_script(args).returncode == 0
    features, scans = sorted(cache.glob("real-*.npz")), sorted(cache.glob("scan-*.json"))
    assert len(features) == 1 and len(scans) == 2  # the real features; the scans of both folders
    for poisoned in (features, scans):  # the features first, then the scans (read before them)
        for path in poisoned:
            torch.save(Evil(marker), path)
        result = run_script(args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert lines[-1].startswith("error: cache file") and "delete it, or pass --no-cache" in lines[-1]
        assert not marker.exists()
