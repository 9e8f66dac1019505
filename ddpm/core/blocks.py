"""UNet building blocks shared by ddpm/'s UNet and the classifier of core/guidance.py: the sinusoidal
timestep embedding, GroupNorm, the residual block with a conditioning embedding, multi-head
self-attention and a level (block + optional attention, gradient checkpointing on request).

Their module names are the state_dict keys of every ddpm checkpoint and classifier: renaming one breaks
loading them.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of (possibly fractional) timesteps t: (N,) -> (N, dim)."""
    # Geometric frequencies from 1 down toward 1/max_period, as in the Transformer's position encoding
    # (Vaswani et al. 2017); float t lets continuous-time objectives use the same embedding.
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # (N, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def group_norm(channels):
    """GroupNorm with up to 32 groups that divide the channel count."""
    # 32 groups is the usual UNet choice (Wu & He 2018); the gcd keeps narrow test models valid.
    return nn.GroupNorm(math.gcd(32, channels), channels)


class ResBlock(nn.Module):
    """Two 3x3 convolutions with the conditioning embedding added in between."""

    def __init__(self, c_in, c_out, emb_dim):
        super().__init__()
        self.in_layers = nn.Sequential(group_norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1))
        self.emb_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, c_out))
        self.out_layers = nn.Sequential(group_norm(c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.in_layers(x)  # (N, C_out, H, W)
        # The embedding acts as a per-channel bias between the two convolutions, as in Ho et al. 2020's UNet.
        h = h + self.emb_proj(emb)[:, :, None, None]
        return self.skip(x) + self.out_layers(h)


class SelfAttention(nn.Module):
    """Multi-head self-attention over all pixels, computed with scaled_dot_product_attention."""

    def __init__(self, channels, head_dim=32):
        super().__init__()
        self.num_heads = max(1, channels // head_dim)
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        n, c, h, w = x.shape
        # One 1x1 conv gives q, k and v; every pixel is a token, so the cost grows with (H*W)^2.
        qkv = self.qkv(self.norm(x)).reshape(n, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (N, heads, HW, head_dim)
        # SDPA scales by 1/sqrt(head_dim) and picks a fused kernel where the device has one.
        out = F.scaled_dot_product_attention(q, k, v)  # (N, heads, HW, head_dim)
        return x + self.proj(out.transpose(-1, -2).reshape(n, c, h, w))


class Level(nn.Module):
    """One UNet level: a residual block, optionally followed by self-attention."""

    def __init__(self, c_in, c_out, emb_dim, attention):
        super().__init__()
        self.res = ResBlock(c_in, c_out, emb_dim)
        self.attn = SelfAttention(c_out) if attention else nn.Identity()
        self.grad_checkpointing = False

    def forward(self, x, emb):
        # Only while training: eval and sampling run without gradients, so there is nothing to save.
        # The non-reentrant variant is the one torch recommends; it also accepts inputs that need no grad.
        if self.grad_checkpointing and self.training:
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x, emb):
        return self.attn(self.res(x, emb))
