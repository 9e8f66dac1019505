"""Classifier-free guidance as a wrapper around the denoiser."""

import torch

from core.guidance import combine


def classifier_free_guidance(model, scale, null_class, channels=None):
    """Wrap model(x, t, y) so its noise prediction is guided by the null class at `scale`.

    Conditional and null halves run as one batch. `channels` limits guidance to the first k noise
    channels (3 reproduces the published DiT sampler); the rest, and the learned variance, are taken
    from the conditional half. Scale 1 is the plain conditional model and scale 0 the plain null-class
    model, each run without the other half.
    """
    if scale == 1:
        return model

    def null_labels(y):
        return torch.full_like(y, null_class)

    if scale == 0:
        return lambda x, t, y: model(x, t, null_labels(y))

    def guided(x, t, y):
        latent_channels = x.shape[1]
        k = latent_channels if channels is None else channels
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null_labels(y)]))
        cond, uncond = out.chunk(2)  # (N, 2C, H, W) each
        eps = combine(cond[:, :k], uncond[:, :k], scale)
        return torch.cat([eps, cond[:, k:]], dim=1)

    return guided
