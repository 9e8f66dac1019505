"""Numerical properties of the controlled UNet, guidance and the mask-faithfulness measure."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import IMAGE_SIZE
from core import images
from core.errors import UserError
from core.training import parameter_table
from mask_metrics import dice_iou, otsu_threshold, score
from models import (
    SCHEDULERS,
    ControlledUNet,
    build_controlnet,
    guided_prediction,
    load_ldm,
    make_scheduler,
    sample_latents,
)


@pytest.fixture(scope="module")
def ldm(contract_ldm):
    return load_ldm(contract_ldm)


@pytest.fixture(scope="module")
def inputs(ldm):
    """Latents, timesteps, null tokens and a binary mask batch."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, IMAGE_SIZE // 2, IMAGE_SIZE // 2, generator=g)  # (N, c, h, w)
    mask = (torch.rand(2, 1, IMAGE_SIZE, IMAGE_SIZE, generator=g) > 0.5).float()  # (N, 1, H, W)
    tokens = ldm.class_embedder(torch.full((2,), ldm.null_label))  # (N, 1, D)
    return latents, torch.tensor([10, 70]), tokens, mask


def unet_only(ldm, latents, t, tokens):
    return ldm.unet(latents, t, encoder_hidden_states=tokens).sample


@torch.no_grad()
def test_fresh_controlnet_changes_nothing(ldm, inputs):
    latents, t, tokens, mask = inputs
    model = ControlledUNet(build_controlnet(ldm.unet, 1, 2), ldm.unet)
    torch.testing.assert_close(
        model(latents, t, tokens, mask), unet_only(ldm, latents, t, tokens), rtol=0, atol=0
    )


@torch.no_grad()
def test_trained_controlnet_follows_mask_and_scale_zero_ignores_it(ldm, inputs):
    latents, t, tokens, mask = inputs
    controlnet = build_controlnet(ldm.unet, 1, 2)
    torch.manual_seed(3)
    zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    for conv in [*zero_convs, controlnet.controlnet_cond_embedding.conv_out]:
        torch.nn.init.normal_(conv.weight, std=0.1)  # as if trained: the zero convolutions are no longer zero
    model = ControlledUNet(controlnet, ldm.unet)
    plain = unet_only(ldm, latents, t, tokens)
    assert (model(latents, t, tokens, mask) - plain).abs().max() > 1e-3
    assert (model(latents, t, tokens, mask) - model(latents, t, tokens, 1 - mask)).abs().max() > 1e-4
    torch.testing.assert_close(model(latents, t, tokens, mask, conditioning_scale=0.0), plain)


def test_conditioning_channels_follow_mask_channels(ldm):
    for channels in (1, 3):
        controlnet = build_controlnet(ldm.unet, channels, 2)
        assert controlnet.controlnet_cond_embedding.conv_in.in_channels == channels
        strides = [m.stride[0] for m in controlnet.controlnet_cond_embedding.blocks]
        assert np.prod(strides) == 2  # mask pixels -> latent resolution


def test_non_power_of_two_downsampling_is_a_user_error(ldm):
    with pytest.raises(UserError):
        build_controlnet(ldm.unet, 1, 3)


@torch.no_grad()
def test_guidance_scales_zero_and_one(ldm, inputs):
    latents, t, _, mask = inputs
    model = ControlledUNet(build_controlnet(ldm.unet, 1, 2), ldm.unet)
    cond = ldm.class_embedder(torch.tensor([0, 1]))
    null = ldm.class_embedder(torch.full((2,), ldm.null_label))
    assert not torch.allclose(cond, null)
    for scale, expected in ((0.0, null), (1.0, cond)):
        out = guided_prediction(model, latents, t, cond, null, mask, scale, 1.0)
        torch.testing.assert_close(out, model(latents, t, expected, mask))
    doubled = guided_prediction(model, latents, t, cond, null, mask, 3.0, 1.0)
    by_hand = model(latents, t, null, mask) + 3.0 * (
        model(latents, t, cond, mask) - model(latents, t, null, mask)
    )
    torch.testing.assert_close(doubled, by_hand, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_scheduler_samples_with_the_ldm_schedule(ldm, inputs, name):
    latents, _, tokens, mask = inputs
    model = ControlledUNet(build_controlnet(ldm.unet, 1, 2), ldm.unet)
    scheduler = make_scheduler(name, ldm.scheduler_config)
    out = sample_latents(model, scheduler, latents, mask, tokens, steps=3)
    assert out.shape == latents.shape and torch.isfinite(out).all()
    assert len(scheduler.timesteps) == 3 and scheduler.config.num_train_timesteps == 100


def test_parameter_table_counts_frozen_and_trainable():
    frozen, trainable = torch.nn.Linear(2, 3).requires_grad_(False), torch.nn.Linear(3, 1)
    rows = parameter_table({"frozen": frozen, "trained": trainable}).splitlines()
    assert rows[1].split() == ["frozen", "9", "0", "9"]
    assert rows[2].split() == ["trained", "4", "4", "0"]
    assert rows[3].split() == ["total", "13", "4", "9"]


def test_otsu_dice_iou():
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 2:10] = 1
    image = (mask * 200 + 20).astype(np.uint8)
    assert 20 <= otsu_threshold(image) < 220
    assert score(Image.fromarray(mask * 255), Image.fromarray(image)) == (1.0, 1.0)
    assert score(Image.fromarray(mask), Image.fromarray(255 - image), "dark") == (1.0, 1.0)
    assert score(Image.fromarray(mask), Image.fromarray(255 - image)) == (0.0, 0.0)
    assert score(Image.fromarray(mask * 0), Image.fromarray(image)) is None
    half = np.zeros_like(mask, dtype=bool)
    half[4:12, 2:6] = True
    dice, iou = dice_iou(mask.astype(bool), half)
    assert dice == pytest.approx(2 * 32 / (64 + 32)) and iou == pytest.approx(0.5)


def test_perfect_generation_of_a_non_square_mask_scores_one():
    mask = np.zeros((IMAGE_SIZE, 2 * IMAGE_SIZE), np.uint8)  # wider than high: the centre crop cuts the sides
    mask[4:12, IMAGE_SIZE - 2 : 2 * IMAGE_SIZE - 2] = 255
    seen = mask[:, IMAGE_SIZE // 2 : IMAGE_SIZE // 2 + IMAGE_SIZE] > 0  # what the ControlNet is given
    perfect = Image.fromarray((seen * 200 + 20).astype(np.uint8))
    assert score(Image.fromarray(mask), perfect) == (1.0, 1.0)
    deep = {"kind": "integer", "bit_depth": 12}  # the same generation written as 12-bit data
    assert score(
        Image.fromarray(mask), images.encode(torch.from_numpy(seen * 0.8 + 0.1)[None], deep), intensity=deep
    ) == (1.0, 1.0)
