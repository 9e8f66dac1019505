"""Metrics from features against independent brute-force computations (numpy / scipy)."""

import argparse

import numpy as np
import pytest
import scipy.linalg
import torch
from scipy.spatial.distance import cdist

import metrics
import precision_recall as pr
import report


def settings(**overrides):
    base = dict(pr_k=3, pr_chunk_size=7, kid_subsets=10, kid_subset_size=5, isc_splits=2, seed=2020)
    base.update(pr_features="inception", device=torch.device("cpu"))
    base.update(overrides)
    return argparse.Namespace(**base)


def features(n, dim, shift, seed):
    rng = np.random.default_rng(seed)
    return rng.normal(shift, 1.0, (n, dim))


def reference_precision_recall(real, gen, k):
    """Kynkaanniemi et al. by brute force: a sample is inside a set's manifold if it lies within the
    k-th nearest-neighbour radius of any of its members."""
    real_radius = np.sort(cdist(real, real), axis=1)[:, k]  # column 0 is the point itself
    gen_radius = np.sort(cdist(gen, gen), axis=1)[:, k]
    gen_to_real = cdist(gen, real)  # (G, R)
    precision = (gen_to_real <= real_radius[None, :]).any(axis=1).mean()
    recall = (gen_to_real.T <= gen_radius[None, :]).any(axis=1).mean()
    return precision, recall


def reference_fid(real, gen):
    """Frechet distance with scipy's matrix square root."""
    mu1, mu2 = real.mean(0), gen.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(gen, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def as_features(array):
    return {"2048": torch.from_numpy(array.astype(np.float32))}


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_matches_brute_force_with_chunks(monkeypatch, k):
    real, gen = features(60, 12, 0.0, 0), features(45, 12, 0.7, 1)[:, :] * 1.5
    blocks = []
    original_cdist = torch.cdist

    def recording_cdist(a, b, *args, **kwargs):
        blocks.append((len(a), len(b)))
        return original_cdist(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "cdist", recording_cdist)
    values = metrics.metric_values("pr", as_features(real), as_features(gen), "inception", settings(pr_k=k))
    precision, recall = reference_precision_recall(real, gen, k)
    assert 0.0 < precision < 1.0 and 0.0 < recall < 1.0  # a case where swapping the sides would show
    assert values["precision"] == pytest.approx(precision, abs=1e-6)
    assert values["recall"] == pytest.approx(recall, abs=1e-6)
    assert max(max(b) for b in blocks) <= 7  # distances computed in chunks of --pr-chunk-size


def test_fid_matches_scipy_sqrtm():
    real, gen = features(80, 6, 0.0, 2), features(70, 6, 0.5, 3) * 1.3
    value = metrics.metric_values("fid", as_features(real), as_features(gen), "inception", settings())["fid"]
    assert value == pytest.approx(reference_fid(real, gen), rel=1e-4)
    assert value > 0.5


def test_failed_metric_is_reported_not_hidden():
    real, gen = features(6, 4, 0.0, 4), features(6, 4, 0.0, 5)
    gen[0, 0] = np.nan
    values, failures = metrics.compute_metrics(
        ["fid", "kid"], as_features(real), as_features(gen), "inception", settings(kid_subset_size=50)
    )
    assert set(failures) == {"fid", "kid"} and values == {}
    lines = report.metric_lines(values, failures, ["fid", "kid"], settings())
    assert lines[0].startswith("FID (InceptionV3):") and "FAILED" in lines[0] and "FAILED" in lines[1]


def test_report_block_matches_the_seed_layout(capsys):
    args = settings(pr_features="vgg16", real="real_images", gen="generated_images")
    result = {"metrics": {"fid": 12.34564, "precision": 0.85214, "recall": 0.78344}, "failures": {}}
    report.print_report(result, ["fid", "pr"], args)
    assert capsys.readouterr().out.splitlines() == [
        "=" * 40,
        "FINAL EVALUATION REPORT",
        "Real Data: real_images",
        "Gen Data:  generated_images",
        "=" * 40,
        "FID (InceptionV3):     12.3456",
        "Precision (VGG16):     0.8521",
        "Recall (VGG16):        0.7834",
        "=" * 40,
    ]


def test_main_exits_1_and_shows_the_failure(monkeypatch, capsys, data, weights):
    """A metric that fails after the features were extracted: report shows it, exit code 1."""
    log = {"extracted": {"real": {}, "gen": {}}}
    failed = {"metrics": {}, "failures": {"fid": "LinAlgError: broken"}, "per_class": {}, "image_sizes": {}}
    monkeypatch.setattr(pr, "evaluate", lambda *args: (failed, log))
    argv = [
        "--real",
        data["real"],
        "--gen",
        data["gen"],
        "--metrics",
        "fid",
        "--inception-weights",
        weights[0],
    ]
    assert pr.main(argv) == 1
    assert "FID (InceptionV3):     FAILED (LinAlgError: broken)" in capsys.readouterr().out
