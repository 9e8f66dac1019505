"""Guidance of diffusion sampling.

Classifier-free guidance: the conditional and null halves run as one batch. Classifier guidance
(Dhariwal & Nichol 2021, "ADM"): a time-conditioned classifier of noisy samples x_t, the UNet's encoder
with ADM's attention pooling, for any (N, C, H, W) input (pixels or VAE latents), and the two ways its
gradient grad_x log p(y | x_t) enters a sampler step: the DDPM mean shift and the noise correction.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.blocks import Level, group_norm, timestep_embedding


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


# The classifier's width per level, relative to base_channels; three downsamplings by default.
CHANNEL_MULT = (1, 2, 4, 4)


class AttentionPool(nn.Module):
    """ADM's attention pooling: the mean of all positions, as one more token, attends over them all."""

    def __init__(self, side, channels, out_dim, head_dim=32):
        super().__init__()
        self.num_heads = max(1, channels // head_dim)
        # Learned positions for the H*W tokens and the mean token in front of them.
        self.pos = nn.Parameter(torch.randn(side * side + 1, channels) / channels**0.5)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, out_dim)

    def forward(self, x):
        n, c = x.shape[:2]
        tokens = x.flatten(2).transpose(1, 2)  # (N, HW, C)
        tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1) + self.pos  # (N, 1 + HW, C)
        qkv = self.qkv(tokens).reshape(n, -1, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (N, heads, 1 + HW, head_dim)
        # Only the mean token's query is needed: its output is the pooled feature.
        out = F.scaled_dot_product_attention(q[:, :, :1], k, v)  # (N, heads, 1, head_dim)
        return self.proj(out.reshape(n, c))  # (N, out_dim)


def level_resolutions(img_size, channel_mult=CHANNEL_MULT):
    """Feature-map side length at each encoder level."""
    return [img_size // 2**i for i in range(len(channel_mult))]


def default_attn_resolutions(img_size, channel_mult=CHANNEL_MULT):
    """Attention below the first level, but never above 32x32 (cost grows with tokens squared)."""
    return [r for r in level_resolutions(img_size, channel_mult)[1:] if r <= 32]


def check_classifier_shape(img_size, channel_mult, attn_resolutions):
    """Raise ValueError naming the bad value when the encoder cannot be built for this input size."""
    # Every halving must be exact, and the lowest level keeps at least 2x2 for its 3x3 convolutions.
    lowest = 2 ** (len(channel_mult) - 1)
    if img_size % lowest or img_size // lowest < 2:
        raise ValueError(
            f"input size {img_size} does not fit {len(channel_mult)} classifier levels: use a multiple of "
            f"{lowest} that is at least {2 * lowest}, or fewer levels"
        )
    unknown = sorted(set(attn_resolutions) - set(level_resolutions(img_size, channel_mult)))
    if unknown:
        raise ValueError(
            f"attention resolutions {unknown} are not classifier levels for input size {img_size}: "
            f"choose from {level_resolutions(img_size, channel_mult)}"
        )


class EncoderClassifier(nn.Module):
    """Logits of p(y | x_t) for noisy inputs x_t at timesteps t: (N, C, H, W), (N,) -> (N, classes)."""

    # The argument names are the "model_config" keys of a classifier checkpoint; checkpoints written
    # before channel_mult was a setting have none and get the default.
    def __init__(self, c_in=3, img_size=64, base_channels=64, time_dim=256, depth=2, attn_resolutions=None,
                 num_classes=10, channel_mult=CHANNEL_MULT):  # fmt: skip
        super().__init__()
        channel_mult = tuple(int(m) for m in channel_mult)
        if attn_resolutions is None:
            attn_resolutions = default_attn_resolutions(img_size, channel_mult)
        check_classifier_shape(img_size, channel_mult, attn_resolutions)
        self.config = dict(
            c_in=c_in,
            img_size=img_size,
            base_channels=base_channels,
            time_dim=time_dim,
            depth=depth,
            attn_resolutions=sorted(int(r) for r in attn_resolutions),
            num_classes=num_classes,
            channel_mult=list(channel_mult),
        )
        self.c_in, self.img_size, self.num_classes = c_in, img_size, num_classes
        chans = [base_channels * m for m in channel_mult]
        self.time_embed = nn.Sequential(
            nn.Linear(base_channels, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim)
        )
        self.conv_in = nn.Conv2d(c_in, chans[0], 3, padding=1)
        # `depth` levels per resolution: the first changes the width, the others keep it.
        self.down, prev = nn.ModuleList(), chans[0]
        for ch, side in zip(chans, level_resolutions(img_size, channel_mult), strict=True):
            attn = side in attn_resolutions
            self.down.append(nn.ModuleList(Level(c, ch, time_dim, attn) for c in [prev] + [ch] * (depth - 1)))
            prev = ch
        self.mid = nn.ModuleList([Level(prev, prev, time_dim, True), Level(prev, prev, time_dim, False)])
        self.out = nn.Sequential(group_norm(prev), nn.SiLU())
        self.pool = AttentionPool(level_resolutions(img_size, channel_mult)[-1], prev, num_classes)

    def forward(self, x, t):
        emb = self.time_embed(timestep_embedding(t, self.config["base_channels"]))  # (N, D)
        h = self.conv_in(x)  # (N, C0, H, W)
        for i, levels in enumerate(self.down):
            h = h if i == 0 else F.avg_pool2d(h, 2)
            for level in levels:
                h = level(h, emb)
        for level in self.mid:
            h = level(h, emb)
        return self.pool(self.out(h))  # (N, classes)

    def set_grad_checkpointing(self, enabled=True):
        for module in self.modules():
            if isinstance(module, Level):
                module.grad_checkpointing = enabled


def log_prob_gradient(classifier, x, t, y):
    """grad_x log p(y | x, t), summed over the batch: (N, C, H, W), in float32."""
    # Sampling runs under no_grad; the classifier's backward pass needs its own graph.
    with torch.enable_grad():
        x_in = x.detach().float().requires_grad_(True)
        log_probs = F.log_softmax(classifier(x_in, t).float(), dim=-1)  # (N, classes)
        # Each sample's log-probability depends on that sample only, so the sum's gradient is per sample.
        chosen = log_probs[torch.arange(len(y), device=y.device), y].sum()
        return torch.autograd.grad(chosen, x_in)[0]


def posterior_variance(alpha_bar, alpha_bar_prev):
    """Sigma of the DDPM step between cumulative alphas abar_t and abar_prev: its noise's variance."""
    # beta-tilde (Ho et al. 2020), for strided steps too: beta_t is 1 - abar_t / abar_prev there.
    return (1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)


def shift_mean(mean, variance, grad, scale):
    """The DDPM step's guided mean: mean + scale * Sigma * grad (ADM, Algorithm 1)."""
    return mean + scale * variance * grad


def condition_eps(eps, alpha_bar, grad, scale):
    """ADM's condition_score: eps - sqrt(1 - abar_t) * scale * grad, for DDIM and any eps-sampler."""
    # The score of x_t is -eps / sqrt(1 - abar_t); adding scale * grad to it is this correction of eps.
    return eps - (1 - alpha_bar) ** 0.5 * scale * grad


def condition_output(output, alpha_bar, grad, scale, prediction_type):
    """condition_eps for a model that predicts `prediction_type` ("epsilon" or "v_prediction")."""
    if prediction_type == "epsilon":
        return condition_eps(output, alpha_bar, grad, scale)
    if prediction_type == "v_prediction":
        # At fixed x_t, v = (eps - sqrt(1 - abar) x_t) / sqrt(abar) (Salimans & Ho 2022): correcting eps
        # by d changes v by d / sqrt(abar).
        return output - ((1 - alpha_bar) / alpha_bar) ** 0.5 * scale * grad
    raise ValueError(f"classifier guidance needs an epsilon or v_prediction model, not {prediction_type!r}")
