"""Gaussian diffusion: schedule, respacing, hybrid loss, DDPM / DDIM sampling, guidance."""

import math

import pytest
import torch

from diffusion import (
    GaussianDiffusion,
    classifier_free_guidance,
    create_diffusion,
    linear_betas,
    space_timesteps,
)
from models import DiT


def test_published_schedule():
    diffusion = create_diffusion()
    betas = diffusion.tables["betas"]
    assert diffusion.num_timesteps == 1000
    assert math.isclose(betas[0].item(), 1e-4, rel_tol=1e-6) and math.isclose(
        betas[-1].item(), 0.02, rel_tol=1e-6
    )
    acp = diffusion.tables["alphas_cumprod"]
    assert torch.all(acp[1:] < acp[:-1]) and acp[-1] < 1e-4


@pytest.mark.parametrize("count", [1, 2, 10, 250, 999, 1000])
def test_respacing_keeps_alphas_cumprod(count):
    steps = space_timesteps(1000, count)
    assert len(steps) == count
    assert steps[-1] == 999 and (count == 1 or steps[0] == 0)
    respaced = create_diffusion(count)
    base = create_diffusion().tables["alphas_cumprod"]
    assert torch.allclose(respaced.tables["alphas_cumprod"], base[steps], rtol=1e-5)
    assert respaced.timestep_map.tolist() == steps


def test_q_sample_is_the_closed_form():
    diffusion = create_diffusion()
    x0, noise, t = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8), torch.tensor([0, 10, 500, 999])
    acp = torch.cumprod(1 - linear_betas(), 0)[t].view(-1, 1, 1, 1)  # float64
    expected = acp.sqrt() * x0.double() + (1 - acp).sqrt() * noise.double()
    assert torch.allclose(diffusion.q_sample(x0, t, noise).double(), expected, atol=1e-6)


def oracle(diffusion_full, x0):
    """A model that knows the data is the single point x0: exact noise, variance at the posterior end."""

    def model(x, t, y):
        acp = diffusion_full.at("alphas_cumprod", t, x)
        eps = (x - acp.sqrt() * x0) / (1 - acp).sqrt()
        return torch.cat([eps, -torch.ones_like(eps)], dim=1)

    return model


def test_kl_vanishes_for_the_true_posterior():
    diffusion = create_diffusion()
    x0 = torch.rand(3, 4, 8, 8) * 2 - 1
    t, noise = torch.tensor([5, 300, 900]), torch.randn(3, 4, 8, 8)
    losses = diffusion.training_losses(oracle(diffusion, x0), x0, t, torch.zeros(3, dtype=torch.long), noise)
    assert losses["mse"].max() < 1e-8
    assert losses["vb"].abs().max() < 1e-4
    zero_t = diffusion.training_losses(
        oracle(diffusion, x0), x0, torch.zeros(3, dtype=torch.long), None, noise
    )
    assert torch.all(zero_t["vb"] > 0)  # decoder NLL in bits at t = 0


def test_vb_trains_only_the_variance_and_mse_only_the_mean():
    diffusion = create_diffusion()
    output = torch.randn(2, 8, 4, 4, requires_grad=True)
    x0, t, noise = torch.randn(2, 4, 4, 4), torch.tensor([3, 700]), torch.randn(2, 4, 4, 4)
    losses = diffusion.training_losses(lambda x, t, y: output, x0, t, None, noise)
    (grad_vb,) = torch.autograd.grad(losses["vb"].sum(), output, retain_graph=True)
    (grad_mse,) = torch.autograd.grad(losses["mse"].sum(), output)
    assert grad_vb[:, :4].abs().max() == 0 and grad_vb[:, 4:].abs().max() > 0
    assert grad_mse[:, 4:].abs().max() == 0 and grad_mse[:, :4].abs().max() > 0


@pytest.mark.parametrize(
    "sampler,steps", [("ddpm", 1000), ("ddpm", 25), ("ddim", 25), ("ddim", 7), ("ddpm", 1), ("ddim", 1)]
)
def test_samplers_recover_a_known_point(sampler, steps):
    """With an exact denoiser every (respaced) sampler must land on the data point."""
    x0 = torch.rand(2, 4, 6, 6) * 2 - 1
    model = oracle(create_diffusion(), x0)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 4, 6, 6, generator=generator)
    out = create_diffusion(steps).sample_loop(
        model, noise, torch.zeros(2, dtype=torch.long), sampler, 0.0, generator
    )
    assert torch.allclose(out, x0, atol=1e-3)


def tiny_model(num_classes=3):
    torch.manual_seed(0)
    return DiT(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=num_classes)


def test_tiny_model_sampling_ddpm_and_ddim():
    model = tiny_model().eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    diffusion = create_diffusion(10)
    noise, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 1, 2])

    def run(sampler, seed, eta=0.0):
        generator = torch.Generator().manual_seed(seed)
        return diffusion.sample_loop(model, noise, y, sampler, eta, generator)

    assert torch.equal(run("ddpm", 1), run("ddpm", 1)) and not torch.allclose(run("ddpm", 1), run("ddpm", 2))
    assert torch.equal(run("ddim", 1), run("ddim", 2))  # eta = 0 is deterministic
    assert not torch.allclose(run("ddim", 1, eta=1.0), run("ddim", 2, eta=1.0))
    assert torch.isfinite(run("ddpm", 1)).all() and run("ddim", 1).shape == (3, 4, 8, 8)


def test_hybrid_loss_falls_on_a_tiny_latent_set():
    model = tiny_model()
    diffusion = create_diffusion()
    torch.manual_seed(0)
    latents, labels = torch.randn(4, 4, 8, 8) * 0.5, torch.tensor([0, 1, 2, 0])
    t_eval, noise_eval = torch.randint(0, 1000, (64,)), torch.randn(64, 4, 8, 8)

    def eval_loss():
        with torch.no_grad():
            x0, y = latents.repeat(16, 1, 1, 1), labels.repeat(16)
            return diffusion.training_losses(model, x0, t_eval, y, noise_eval)["loss"].mean().item()

    before = eval_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(60):
        t = torch.randint(0, 1000, (16,))
        loss = diffusion.training_losses(
            model, latents.repeat(4, 1, 1, 1), t, labels.repeat(4), torch.randn(16, 4, 8, 8)
        )
        optimizer.zero_grad()
        loss["loss"].mean().backward()
        optimizer.step()
    assert eval_loss() < 0.8 * before


class LabelEcho(torch.nn.Module):
    """Fake denoiser: every output channel c is label + 10 * c; counts its calls and batch sizes."""

    null_class = 9

    def __init__(self):
        super().__init__()
        self.batches = []

    def forward(self, x, t, y):
        self.batches.append(len(y))
        channels = torch.arange(2 * x.shape[1], dtype=torch.float32).view(1, -1, 1, 1)
        return (y.float().view(-1, 1, 1, 1) + 10 * channels).expand(-1, -1, *x.shape[2:])


def guide(scale, channels=None):
    model = LabelEcho()
    fn = classifier_free_guidance(model, scale, model.null_class, channels)
    return fn(torch.zeros(2, 4, 2, 2), torch.zeros(2, dtype=torch.long), torch.tensor([1, 2])), model.batches


def test_guidance_scale_one_and_zero_run_a_single_half():
    out, batches = guide(1.0)
    assert batches == [2] and torch.equal(out[:, 0, 0, 0], torch.tensor([1.0, 2.0]))
    out, batches = guide(0.0)
    assert batches == [2] and torch.all(out[:, 0] == 9)  # exactly the unconditional (null-class) model


def test_guidance_all_channels_vs_published_three():
    scale = 4.0
    out_all, batches = guide(scale)
    assert batches == [4]  # conditional and null halves in one batch
    guided = lambda y: 9 + scale * (y - 9)  # noqa: E731
    expect_guided = torch.tensor([guided(1.0), guided(2.0)])
    assert torch.allclose(out_all[:, 3, 0, 0], expect_guided + 30)
    out_three, _ = guide(scale, channels=3)
    assert torch.allclose(out_three[:, 2, 0, 0], expect_guided + 20)
    assert torch.equal(out_three[:, 3, 0, 0], torch.tensor([31.0, 32.0]))  # 4th channel: conditional only
    # The learned variance always comes from the conditional half.
    assert torch.equal(out_all[:, 4:], out_three[:, 4:]) and torch.equal(
        out_all[:, 4, 0, 0], torch.tensor([41.0, 42.0])
    )


def test_respaced_model_sees_original_timesteps():
    seen = []
    diffusion = GaussianDiffusion.respaced(linear_betas(), [0, 500, 999])

    def model(x, t, y):
        seen.append(t[0].item())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    diffusion.sample_loop(model, torch.randn(1, 4, 2, 2), torch.zeros(1, dtype=torch.long), "ddim")
    assert seen == [999, 500, 0]
