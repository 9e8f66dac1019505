"""sFID, density/coverage and FD-DINOv2 on features and in-process extractors (random weights of the real
architectures), against independent computations: the prdc package, the Inception layers run by hand."""

import argparse

import numpy as np
import prdc
import pytest
import torch
import torch.nn.functional as F
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

import dinov2_vit
import metrics
import weights as weights_module
from conftest import blob_image
from random_weights import write_random_dinov2

CPU = torch.device("cpu")


def settings(**overrides):
    base = dict(pr_k=3, pr_chunk_size=7, pr_features="inception", dinov2_model="dinov2-vit-s-14", device=CPU)
    base.update(overrides)
    return argparse.Namespace(**base)


def images(count, size, seed):
    rng = np.random.default_rng(seed)
    batch = np.stack([blob_image(rng, size, (60 * i % 255, 120, 200)) for i in range(count)])
    return torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W) uint8


def with_noise(batch, sigma, seed):
    noise = torch.randn(batch.shape, generator=torch.Generator().manual_seed(seed)) * sigma
    return (batch.float() + noise).round().clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def inception(weights):
    return weights_module.build_extractor("inception", {"path": weights[0]}, CPU)


def extract(extractor, batch):
    with torch.no_grad():
        values = extractor(batch)
    return dict(zip(extractor.get_requested_features_list(), values, strict=True))


def test_sfid_features_are_mixed_6d_branch1x1_in_adm_layout(inception):
    """2023 = 17 x 17 x 7 values per image (any input size: resized to 299), equal to Mixed_6d's 1x1
    branch run by hand, first 7 channels, flattened height, width, channel as ADM's NHWC graph."""
    native = extract(inception, images(1, 299, 5))[weights_module.SFID_LAYER]
    assert native.shape == (1, 2023)  # 299 px input, as ADM's graph sees it
    batch = images(2, 40, 0)
    spatial = extract(inception, batch)[weights_module.SFID_LAYER]
    assert spatial.shape == (2, 17 * 17 * 7) and spatial.dtype == torch.float32
    net = inception.extractor
    with torch.no_grad():
        x = interpolate_bilinear_2d_like_tensorflow1x(batch.float(), size=(299, 299), align_corners=False)
        x = (x - 128) / 128
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1"):
            x = getattr(net, name)(x)
        for name in ("Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a"):
            x = getattr(net, name)(x)
        x = net.Mixed_6d.branch1x1(net.Mixed_6c(net.Mixed_6b(x)))  # (2, 192, 17, 17)
    assert x.shape == (2, 192, 17, 17)
    expected = x[:, :7].permute(0, 2, 3, 1).reshape(2, -1)
    assert torch.allclose(spatial, expected, atol=1e-5)
    assert spatial.min() >= 0  # after the ReLU


def test_the_sfid_hook_leaves_torch_fidelitys_outputs_unchanged(inception, weights):
    batch = images(2, 20, 4)
    alone = weights_module.create_feature_extractor(
        "inception-v3-compat",
        ["2048", "logits_unbiased"],
        cuda=False,
        feature_extractor_weights_path=weights[0],
    )
    with torch.no_grad():
        pool, logits = alone(batch)
    ours = extract(inception, batch)
    assert torch.equal(pool, ours["2048"]) and torch.equal(logits, ours["logits_unbiased"])


def test_sfid_of_a_set_with_itself_is_0_and_grows_with_noise(inception):
    clean = images(10, 24, 1)
    layer = weights_module.SFID_LAYER
    base = {layer: extract(inception, clean)[layer]}

    def sfid(batch):
        return metrics.metric_values(
            "sfid", base, {layer: extract(inception, batch)[layer]}, "inception", None
        )

    values = [sfid(clean)["sfid"]] + [sfid(with_noise(clean, sigma, 7))["sfid"] for sigma in (8, 40)]
    assert abs(values[0]) < 1e-3
    assert values[0] < values[1] < values[2], values
    assert values[1] > 1e-2


def test_sfid_is_the_frechet_distance_of_the_spatial_features():
    """metric 'sfid' reads the mixed_6/conv features and matches scipy's sqrtm formula."""
    import scipy.linalg

    rng = np.random.default_rng(3)
    real, gen = rng.normal(0, 1, (40, 9)), rng.normal(0.4, 1.2, (30, 9))
    layer = weights_module.SFID_LAYER
    value = metrics.metric_values(
        "sfid", {layer: torch.from_numpy(real)}, {layer: torch.from_numpy(gen)}, "inception", None
    )["sfid"]
    s1, s2 = np.cov(real, rowvar=False), np.cov(gen, rowvar=False)
    expected = ((real.mean(0) - gen.mean(0)) ** 2).sum() + np.trace(
        s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real
    )
    assert value == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_density_coverage_equal_prdc_with_chunks(k):
    rng = np.random.default_rng(k)
    real = rng.normal(0, 1, (50, 16)).astype(np.float32)
    gen = (rng.normal(0.3, 1.3, (37, 16))).astype(np.float32)
    values = metrics.metric_values(
        "dc", {"2048": torch.from_numpy(real)}, {"2048": torch.from_numpy(gen)}, "inception", settings(pr_k=k)
    )
    reference = prdc.compute_prdc(real_features=real, fake_features=gen, nearest_k=k)
    assert 0 < reference["coverage"] < 1  # a case where the balls and the counting matter
    assert values["density"] == pytest.approx(reference["density"], abs=1e-9)
    assert values["coverage"] == pytest.approx(reference["coverage"], abs=1e-9)


def test_density_coverage_of_a_set_with_itself():
    """Every sample lies in its own ball: coverage 1; density = mean ball count / k (>= 1/k each)."""
    real = torch.from_numpy(np.random.default_rng(9).normal(0, 1, (30, 8)).astype(np.float32))
    values = metrics.metric_values("dc", {"2048": real}, {"2048": real}, "inception", settings())
    reference = prdc.compute_prdc(real.numpy(), real.numpy(), 3)
    assert values["coverage"] == reference["coverage"] == 1.0
    assert values["density"] == pytest.approx(reference["density"], abs=1e-9)


def test_dinov2_architecture_has_the_hub_files_keys_and_shapes():
    """The keys and shapes of the released dinov2_vit?14_pretrain.pth files (strict loading needs them)."""
    with torch.device("meta"):  # no memory: ViT-g has 1.1 billion parameters
        shapes = {
            n: tuple(p.shape)
            for n, p in dinov2_vit.DinoVisionTransformer("dinov2-vit-g-14").state_dict().items()
        }
        small = {
            n: tuple(p.shape)
            for n, p in dinov2_vit.DinoVisionTransformer("dinov2-vit-s-14").state_dict().items()
        }
    assert small["pos_embed"] == (1, 1370, 384) and small["patch_embed.proj.weight"] == (384, 3, 14, 14)
    assert small["mask_token"] == (1, 384) and small["blocks.11.ls2.gamma"] == (384,)
    assert small["blocks.0.mlp.fc1.weight"] == (1536, 384) and "blocks.12.norm1.weight" not in small
    assert sum(np.prod(s) for s in small.values()) == pytest.approx(22.06e6, rel=0.01)  # ViT-S/14: 22M
    assert shapes["blocks.39.mlp.w12.weight"] == (8192, 1536) and shapes["blocks.0.mlp.w3.weight"] == (
        1536,
        4096,
    )
    assert sum(np.prod(s) for s in shapes.values()) == pytest.approx(1.136e9, rel=0.01)  # ViT-g/14: 1.1B


@pytest.fixture(scope="module")
def dinov2_file(tmp_path_factory):
    return write_random_dinov2(str(tmp_path_factory.mktemp("dinov2")))


def test_local_dinov2_file_loads_into_torch_fidelitys_extractor(dinov2_file):
    """The local file loads through the users' path; the features are torch-fidelity's preprocessing
    (TF-compatible resize to 224, ImageNet normalisation) followed by the backbone."""
    extractor = weights_module.build_extractor("dinov2-vit-s-14", {"path": dinov2_file}, CPU)
    assert type(extractor).__name__ == "FeatureExtractorDinoV2"
    batch = images(3, 30, 2)
    with torch.no_grad():
        (features,) = extractor(batch)
        x = interpolate_bilinear_2d_like_tensorflow1x(batch.float(), size=(224, 224), align_corners=False)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
        expected = extractor.model((x - mean) / std)
    assert features.shape == (3, 384) and torch.allclose(features, expected, atol=1e-5)
    assert features.std(0).mean() > 1e-3  # informative: images differ in feature space
    values = metrics.metric_values(
        "fd-dinov2", {"dinov2": features}, {"dinov2": features}, "dinov2-vit-s-14", None
    )
    assert abs(values["fd_dinov2"]) < 1e-3


def test_dinov2_position_embeddings_follow_the_input_grid():
    model = dinov2_vit.DinoVisionTransformer("dinov2-vit-s-14")
    with torch.no_grad():
        model.pos_embed.normal_(generator=torch.Generator().manual_seed(0))
    assert model.position_embedding(518, 518) is model.pos_embed  # the 37 x 37 grid as stored
    assert model.position_embedding(224, 224).shape == (1, 16 * 16 + 1, 384)
    # The class token's embedding is never resized.
    assert torch.equal(model.position_embedding(224, 224)[:, 0], model.pos_embed[:, 0])
    grid = model.pos_embed[:, 1:].reshape(1, 37, 37, 384).permute(0, 3, 1, 2)
    plain = F.interpolate(grid, size=(16, 16), mode="bicubic").permute(0, 2, 3, 1).reshape(1, 256, 384)
    assert not torch.equal(model.position_embedding(224, 224)[:, 1:], plain)  # the +0.1 scale factor
