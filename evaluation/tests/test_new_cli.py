"""sFID, density/coverage, FD-DINOv2, FRD and --write-reference through the command line: per class,
--max-samples, the cache, --json with each score's protocol."""

import hashlib
import os

import numpy as np
import pytest
import torch
from PIL import Image

import metrics
import weights as weights_module
from conftest import PARALLEL, frd_installed, read_json, run_script
from random_weights import write_random_dinov2

NEW = ["sfid", "density", "coverage", "fd_dinov2"]


@pytest.fixture(scope="module")
def dinov2_file(tmp_path_factory):
    return write_random_dinov2(str(tmp_path_factory.mktemp("dinov2")))


def sha256(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


@pytest.fixture(scope="module")
def runs(data, weights, dinov2_file, tmp_path_factory):
    """A per-class run with --max-samples filling the cache, then the same set cached (two networks)."""
    tmp = tmp_path_factory.mktemp("new_runs")
    common = [
        "--real",
        data["real"],
        "--gen",
        data["gen"],
        "--pr-features",
        "inception",
        "--num-workers",
        "0",
    ]
    common += ["--inception-weights", weights[0], "--dinov2-model", "dinov2-vit-s-14"]
    common += ["--dinov2-weights", dinov2_file, "--cache-dir", str(tmp / "cache"), "--max-samples", "8"]
    common += ["--seed", "1", "--metrics", "fid,sfid,dc,fd-dinov2"]

    def run(name, *extra):
        out = str(tmp / f"{name}.json")
        result = run_script([*common, "--json", out, *extra], env=PARALLEL)
        assert result.returncode == 0, result.stderr[-2000:]
        return read_json(out), result

    first = run("first", "--per-class", "--protocol", "sampler=ddim", "--protocol", "steps=50")
    return {"first": first, "cached": run("cached", "--protocol", "guidance=1.5")}


def test_new_metrics_per_class_with_max_samples(runs):
    result, process = runs["first"]
    assert set(NEW) <= set(result["metrics"]) and result["failures"] == {}
    assert result["counts"]["real"] == 8 and result["counts"]["gen"] == 8
    assert result["metrics"]["sfid"] > 0.01 and result["metrics"]["fd_dinov2"] > 1e-4
    assert 0 < result["metrics"]["coverage"] <= 1 and result["metrics"]["density"] > 0
    for entry in result["per_class"].values():
        assert set(NEW) <= set(entry["metrics"]) and entry["failures"] == {}
    assert sum(e["counts"]["real"] for e in result["per_class"].values()) == 8
    assert "sFID (InceptionV3):" in process.stdout and "Coverage (InceptionV3):" in process.stdout
    assert "FD (DINOv2 ViT-S/14):" in process.stdout


def test_every_score_carries_its_protocol(runs, weights, dinov2_file):
    result, _ = runs["first"]
    protocol = result["protocol"]
    assert set(protocol) == {"fid", "sfid", "dc", "fd-dinov2"}
    for entry in protocol.values():
        assert entry["counts"] == {"real": 8, "gen": 8} and entry["seed"] == 1
        assert entry["sampling"] == {"sampler": "ddim", "steps": 50}
        assert "float32" in entry["precision"] and entry["versions"]["torch_fidelity"]
    assert protocol["sfid"]["features"] == "inception-v3-compat:mixed_6/conv"
    assert "299x299" in protocol["sfid"]["resize"] and "224x224" in protocol["fd-dinov2"]["resize"]
    assert protocol["sfid"]["weights"]["sha256"] == sha256(weights[0])
    assert protocol["fd-dinov2"]["weights"]["sha256"] == sha256(dinov2_file)
    assert protocol["fd-dinov2"]["features"] == "dinov2-vit-s-14:dinov2"
    assert protocol["dc"]["settings"] == {"k": 3}


def test_cached_run_extracts_no_real_image_and_gives_the_same_numbers(runs):
    first, cached = runs["first"][0], runs["cached"][0]
    extracted = cached["cache"]["extracted"]["real"]
    assert extracted["inception"]["images"] == 0 and extracted["dinov2-vit-s-14"]["images"] == 0
    assert first["cache"]["extracted"]["real"]["dinov2-vit-s-14"]["images"] == 8
    for key in NEW:
        assert cached["metrics"][key] == pytest.approx(first["metrics"][key], rel=1e-5, abs=1e-6)
    assert cached["protocol"]["sfid"]["sampling"] == {"guidance": 1.5}


def test_write_reference_has_the_adm_evaluator_keys(data, weights, tmp_path):
    folder = os.path.join(data["real"], "b")
    out = str(tmp_path / "ref.npz")
    args = ["--real", folder, "--write-reference", out, "--inception-weights", weights[0], "--no-cache"]
    result = run_script(args + ["--num-workers", "0"])
    assert result.returncode == 0, result.stderr[-2000:]
    with np.load(out, allow_pickle=False) as ref:
        assert set(ref.files) == {"arr_0", "mu", "sigma", "mu_s", "sigma_s"}
        arrays = {k: ref[k] for k in ref.files}
    names = sorted(os.listdir(folder))
    expected = np.stack([np.asarray(Image.open(os.path.join(folder, n)).convert("RGB")) for n in names])
    assert arrays["arr_0"].dtype == np.uint8 and np.array_equal(arrays["arr_0"], expected)  # N x H x W x 3
    assert arrays["mu"].shape == (2048,) and arrays["sigma"].shape == (2048, 2048)
    assert arrays["mu_s"].shape == (2023,) and arrays["sigma_s"].shape == (2023, 2023)
    # The statistics are those of the Inception features of arr_0 itself (what ADM's evaluator would find).
    extractor = weights_module.build_extractor("inception", {"path": weights[0]}, torch.device("cpu"))
    with torch.no_grad():
        values = extractor(torch.from_numpy(arrays["arr_0"]).permute(0, 3, 1, 2).contiguous())
    found = dict(zip(extractor.get_requested_features_list(), values, strict=True))
    pool, spatial = found["2048"].double().numpy(), found[weights_module.SFID_LAYER].double().numpy()
    assert np.allclose(arrays["mu"], pool.mean(0), atol=1e-5)
    assert np.allclose(arrays["sigma"], np.cov(pool, rowvar=False), atol=1e-5)
    assert np.allclose(arrays["mu_s"], spatial.mean(0), atol=1e-5)
    assert np.allclose(arrays["sigma_s"], np.cov(spatial, rowvar=False), atol=1e-5)


@pytest.mark.skipif(not frd_installed(), reason="optional frd-score not installed; see the test below")
def test_frd_equals_frd_score_on_the_same_files_overall_and_per_class(data, tmp_path):
    """FRD of the --max-samples subset, overall and per class, equals frd-score's compute_frd on those
    files; stdout holds the report only."""
    from frd_score import compute_frd

    import inputs

    out = str(tmp_path / "frd.json")
    args = ["--real", data["real"], "--gen", data["gen"], "--metrics", "frd", "--json", out, "--per-class"]
    result = run_script(args + ["--max-samples", "8", "--seed", "3", "--num-workers", "1"])
    assert result.returncode == 0, result.stderr[-2000:]
    report = read_json(out)
    real, gen = (
        inputs.random_subset(inputs.open_image_set(data[side], side, ""), 8, 3) for side in ("real", "gen")
    )

    def frd(real_files, gen_files):
        files = [[os.path.join(s.path, f) for f in fs] for s, fs in ((real, real_files), (gen, gen_files))]
        return float(compute_frd(files, num_workers=1, verbose=False))

    # frd-score itself moves in the 4th digit from run to run on the same files: pyradiomics' SimpleITK
    # filters are multithreaded (measured: 7.44709 and 7.44765 on one pair of lists; 7.44532 with one ITK
    # thread). Another subset or class split changes FRD by far more than this tolerance.
    assert report["metrics"]["frd"] == pytest.approx(frd(real.files, gen.files), rel=1e-3)
    for name, (real_index, gen_index) in inputs.match_classes(real, gen).items():
        expected = frd([real.files[i] for i in real_index], [gen.files[i] for i in gen_index])
        assert report["per_class"][name]["metrics"]["frd"] == pytest.approx(expected, rel=1e-3)
    assert report["protocol"]["frd"]["versions"]["frd-score"] == "1.0.1"
    assert report["protocol"]["frd"]["counts"] == {"real": 8, "gen": 8}
    assert "FRD (radiomics):" in result.stdout and "FRD (v1)" not in result.stdout


@pytest.mark.skipif(frd_installed(), reason="frd-score is installed; the test above covers FRD")
def test_frd_without_the_optional_packages_is_one_line(data):
    result = run_script(["--real", data["real"], "--gen", data["gen"], "--metrics", "frd"])
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert lines[-1].startswith("error: --metrics frd needs the optional packages frd-score and pyradiomics")


def test_inception_metrics_share_one_pass(monkeypatch):
    """FID, sFID, IS, KID and Inception precision/recall and density/coverage: one network, one pass."""
    import precision_recall as pr

    args = pr.parse_args(["--metrics", "fid,sfid,pr,dc,kid,isc", "--pr-features", "inception"])
    assert pr.networks_used(args) == ["inception"]
    assert {metrics.network_of(m, args) for m in args.metrics} == {"inception"}
    args = pr.parse_args(["--metrics", "fid,fd-dinov2,frd", "--dinov2-model", "dinov2-vit-b-14"])
    assert pr.networks_used(args) == ["inception", "dinov2-vit-b-14"]
