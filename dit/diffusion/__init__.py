"""Gaussian diffusion for DiT: 1000 linear steps, epsilon prediction, learned-range variance."""

from .gaussian_diffusion import GaussianDiffusion, linear_betas, space_timesteps
from .guidance import classifier_free_guidance

__all__ = [
    "GaussianDiffusion",
    "classifier_free_guidance",
    "create_diffusion",
    "linear_betas",
    "space_timesteps",
]


def create_diffusion(num_sampling_steps=None, num_timesteps=1000):
    """The published schedule, optionally respaced to `num_sampling_steps` evenly spaced steps."""
    betas = linear_betas(num_timesteps)
    if not num_sampling_steps or num_sampling_steps == num_timesteps:
        return GaussianDiffusion(betas)
    # Respaced from the trained 1000 steps, not a fresh shorter schedule: the network knows only those.
    return GaussianDiffusion.respaced(betas, space_timesteps(num_timesteps, num_sampling_steps))
