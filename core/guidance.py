"""Classifier-free guidance: the conditional and null halves run as one batch."""

import torch


def combine(cond, uncond, scale):
    """uncond + scale * (cond - uncond): scale 0 is unconditional, 1 conditional, > 1 guided."""
    return torch.lerp(uncond, cond, scale) if torch.is_tensor(scale) else uncond + scale * (cond - uncond)


def guided(model, x, t, labels, null_labels, scale, **kwargs):
    """model(x, t, labels) under guidance: one batch of both halves; only one half at scale 0 or 1."""
    if scale == 1:
        return model(x, t, labels, **kwargs)
    if scale == 0:
        return model(x, t, null_labels, **kwargs)
    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null_labels]), **kwargs)
    cond, uncond = both.chunk(2)
    return combine(cond, uncond, scale)
