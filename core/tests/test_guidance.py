"""Classifier guidance of core/guidance.py against closed forms with a linear classifier, whose
grad log p(y | x) is known exactly; and the encoder classifier on pixel- and latent-shaped inputs."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from core import guidance
from core.testing import LinearClassifier, closed_form_gradient, linear_betas_alpha_bar


@pytest.fixture
def case():
    """A linear classifier of 3 classes on latent-shaped inputs (4 channels, 4x4), x_t, eps and labels."""
    torch.manual_seed(0)
    weight, x, eps = torch.randn(3, 4 * 4 * 4), torch.randn(5, 4, 4, 4), torch.randn(5, 4, 4, 4)
    return LinearClassifier(weight), weight, x, eps, torch.tensor([0, 1, 2, 1, 0])


def test_log_prob_gradient_is_the_closed_form_also_under_no_grad(case):
    classifier, weight, x, _, y = case
    with torch.no_grad():  # as during sampling
        grad = guidance.log_prob_gradient(classifier, x, torch.zeros(5), y)
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad, closed_form_gradient(weight, x, y), rtol=1e-5, atol=1e-6)


def test_posterior_variance_is_beta_tilde_and_diffusers_fixed_small():
    betas, alpha_bar = linear_betas_alpha_bar()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type="fixed_small")
    scheduler.set_timesteps(1000)
    for t in (1, 10, 500, 999):
        sigma = guidance.posterior_variance(alpha_bar[t], alpha_bar[t - 1])
        assert sigma == pytest.approx(betas[t] * (1 - alpha_bar[t - 1]) / (1 - alpha_bar[t]), rel=1e-12)
        assert sigma == pytest.approx(float(scheduler._get_variance(t)), rel=1e-3)  # float32 cumprod


def test_guided_ddpm_mean_is_the_mean_plus_scale_sigma_gradient(case):
    classifier, weight, x, eps, y = case
    # Python floats: the arithmetic below stays float32 tensors.
    alpha_bar = linear_betas_alpha_bar()[1].tolist()
    t, scale = 400, 2.5
    # The DDPM posterior mean from x_t and eps, written out (Ho et al. 2020, eq. 11).
    beta = 1 - alpha_bar[t] / alpha_bar[t - 1]
    mean = (x - beta / np.sqrt(1 - alpha_bar[t]) * eps) / np.sqrt(1 - beta)
    sigma = guidance.posterior_variance(alpha_bar[t], alpha_bar[t - 1])
    grad = guidance.log_prob_gradient(classifier, x, torch.full((5,), t), y)
    shifted = guidance.shift_mean(mean, sigma, grad, scale)
    expected = mean + scale * beta * (1 - alpha_bar[t - 1]) / (1 - alpha_bar[t]) * closed_form_gradient(
        weight, x, y
    )
    torch.testing.assert_close(shifted, expected, rtol=1e-5, atol=1e-7)


def test_corrected_eps_gives_the_guided_posterior_mean_of_x0(case):
    """With eps' = condition_eps(eps), x0 = (x_t - sqrt(1 - abar) eps') / sqrt(abar) is Tweedie's formula
    for the score plus scale * grad: x0 + (1 - abar) / sqrt(abar) * scale * grad."""
    classifier, weight, x, eps, y = case
    alpha_bar = linear_betas_alpha_bar()[1].tolist()
    for t, scale in ((50, 1.0), (700, 4.0)):
        a = alpha_bar[t]
        grad = guidance.log_prob_gradient(classifier, x, torch.full((5,), t), y)
        corrected = guidance.condition_eps(eps, a, grad, scale)
        x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
        guided_x0 = (x - np.sqrt(1 - a) * corrected) / np.sqrt(a)
        expected = x0 + (1 - a) / np.sqrt(a) * scale * closed_form_gradient(weight, x, y)
        torch.testing.assert_close(guided_x0, expected, rtol=1e-5, atol=1e-7)


def test_v_prediction_correction_steps_like_the_eps_correction(case):
    classifier, _, x, eps, y = case
    schedulers = {
        kind: DDIMScheduler(num_train_timesteps=1000, prediction_type=kind, clip_sample=False)
        for kind in ("epsilon", "v_prediction")
    }
    for scheduler in schedulers.values():
        scheduler.set_timesteps(10)
    t = schedulers["epsilon"].timesteps[3]
    a = schedulers["epsilon"].alphas_cumprod[t]
    v = (eps - (1 - a).sqrt() * x) / a.sqrt()  # the v that a v-model would predict for this eps
    grad = guidance.log_prob_gradient(classifier, x, t.expand(5), y)
    by_eps = guidance.condition_output(eps, a, grad, 3.0, "epsilon")
    by_v = guidance.condition_output(v, a, grad, 3.0, "v_prediction")
    torch.testing.assert_close(by_eps, guidance.condition_eps(eps, a, grad, 3.0))
    outputs = {"epsilon": by_eps, "v_prediction": by_v}
    step = {kind: scheduler.step(outputs[kind], t, x).prev_sample for kind, scheduler in schedulers.items()}
    torch.testing.assert_close(step["v_prediction"], step["epsilon"], rtol=1e-4, atol=1e-5)
    # The guidance really moved the step: without it the two would agree with each other, not with these.
    assert not torch.allclose(schedulers["epsilon"].step(eps, t, x).prev_sample, step["epsilon"], atol=1e-3)
    with pytest.raises(ValueError, match="epsilon or v_prediction"):
        guidance.condition_output(x, a, grad, 1.0, "sample")


def test_encoder_classifier_on_pixels_and_latents():
    pixels = guidance.EncoderClassifier(
        c_in=1, img_size=16, base_channels=8, time_dim=32, depth=1, num_classes=5
    )
    assert pixels(torch.randn(2, 1, 16, 16), torch.tensor([0, 999])).shape == (2, 5)
    # 4-channel 8x8 latents with two levels; attention at the 4x4 level by default.
    latents = guidance.EncoderClassifier(
        c_in=4, img_size=8, base_channels=8, time_dim=32, depth=2, num_classes=3, channel_mult=(1, 2)
    )
    assert latents.config["attn_resolutions"] == [4] and latents.config["channel_mult"] == [1, 2]
    assert latents(torch.randn(3, 4, 8, 8), torch.tensor([0, 10, 999])).shape == (3, 3)
    rebuilt = guidance.EncoderClassifier(**latents.config)
    assert rebuilt.config == latents.config
    assert rebuilt.state_dict().keys() == latents.state_dict().keys()


def test_config_without_channel_mult_is_the_default_three_downsamplings():
    """Checkpoints written before channel_mult was a setting rebuild the network they were trained with."""
    old = dict(
        c_in=1, img_size=16, base_channels=8, time_dim=32, depth=1, attn_resolutions=[4, 8], num_classes=3
    )
    model = guidance.EncoderClassifier(**old)
    assert len(model.down) == 4 and model.pool.pos.shape == (2 * 2 + 1, 32)
    assert {k.split(".")[0] for k in model.state_dict()} == {
        "time_embed",
        "conv_in",
        "down",
        "mid",
        "out",
        "pool",
    }


@pytest.mark.parametrize(
    ("size", "mult", "attn", "message"),
    [(12, (1, 2, 4, 4), None, "multiple of 8"), (4, (1, 2, 4), None, "at least 8"), (8, (1, 2), [2], "[2]")],
)
def test_encoder_classifier_refuses_sizes_it_cannot_build(size, mult, attn, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        guidance.EncoderClassifier(
            c_in=4, img_size=size, base_channels=8, channel_mult=mult, attn_resolutions=attn
        )
