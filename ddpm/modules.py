"""Self-attention UNet for pixel-space DDPM: unconditional (UNet) and class-conditional (UNet_conditional)."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CHANNEL_MULT = (1, 2, 4, 4)  # three downsamplings, so image sizes must be divisible by 8
# At 16 px the lowest level is already 2x2; smaller images leave nothing for its 3x3 convolutions.
MIN_IMAGE_SIZE = 16


def default_attn_resolutions(img_size):
    """Attention at the three lower UNet levels, but never above 32x32 (cost grows with tokens squared)."""
    return [r for r in level_resolutions(img_size)[1:] if r <= 32]


def level_resolutions(img_size):
    """Feature-map side length at each UNet level."""
    return [img_size // 2**i for i in range(len(CHANNEL_MULT))]


def check_architecture(img_size, attn_resolutions):
    """Raise ValueError naming the bad value when the UNet cannot be built for this size."""
    if img_size < MIN_IMAGE_SIZE or img_size % 8:
        raise ValueError(f"image size {img_size} is not supported: use a multiple of 8 that is at least 16")
    unknown = sorted(set(attn_resolutions) - set(level_resolutions(img_size)))
    if unknown:
        raise ValueError(
            f"attention resolutions {unknown} are not UNet levels for image size {img_size}: "
            f"choose from {level_resolutions(img_size)}"
        )


def count_parameters(model):
    """Total, trainable and frozen parameter counts of a module."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable, "frozen": total - trainable}


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


class UNet(nn.Module):
    """Unconditional UNet predicting the noise in x_t; works on any device it is moved to."""

    # The argument names are the "model_config" keys of every checkpoint, which build_model() passes back.
    def __init__(self, c_in=3, c_out=3, time_dim=256, img_size=64, base_channels=64, attn_resolutions=None,
                 num_classes=None):  # fmt: skip
        super().__init__()
        attn_resolutions = (
            default_attn_resolutions(img_size) if attn_resolutions is None else attn_resolutions
        )
        check_architecture(img_size, attn_resolutions)
        self.config = dict(
            c_in=c_in,
            c_out=c_out,
            time_dim=time_dim,
            img_size=img_size,
            base_channels=base_channels,
            attn_resolutions=sorted(int(r) for r in attn_resolutions),
            num_classes=num_classes,
        )
        self.c_in, self.img_size, self.num_classes = c_in, img_size, num_classes
        chans = [base_channels * m for m in CHANNEL_MULT]
        uses_attn = [r in attn_resolutions for r in level_resolutions(img_size)]
        # The sinusoidal embedding has base_channels dimensions; the MLP widens it to time_dim.
        self.time_embed = nn.Sequential(
            nn.Linear(base_channels, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim)
        )
        self.conv_in = nn.Conv2d(c_in, chans[0], 3, padding=1)
        # The down path keeps one skip per level; the up path concatenates it back, hence prev + ch inputs.
        self.down = nn.ModuleList()
        prev = chans[0]
        for ch, attn in zip(chans, uses_attn, strict=True):
            self.down.append(Level(prev, ch, time_dim, attn))
            prev = ch
        # The bottleneck always attends, whatever attn_resolutions says: global context is cheapest there.
        self.mid = nn.ModuleList([Level(prev, prev, time_dim, True), Level(prev, prev, time_dim, False)])
        self.up = nn.ModuleList()
        for ch, attn in reversed(list(zip(chans, uses_attn, strict=True))):
            self.up.append(Level(prev + ch, ch, time_dim, attn))
            prev = ch
        self.out = nn.Sequential(group_norm(prev), nn.SiLU(), nn.Conv2d(prev, c_out, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)  # a fresh model predicts zero noise: stable early loss
        nn.init.zeros_(self.out[-1].bias)

    def embed(self, t, y):
        """Conditioning vector from timesteps (and class labels in the conditional model): (N, time_dim)."""
        return self.time_embed(timestep_embedding(t, self.config["base_channels"]))

    def forward(self, x, t, y=None):
        emb = self.embed(t, y)  # (N, D)
        h = self.conv_in(x)  # (N, C0, H, W)
        skips = []
        for i, level in enumerate(self.down):
            # Downsample between levels, not before the first: level 0 runs at full resolution.
            h = level(h if i == 0 else F.avg_pool2d(h, 2), emb)
            skips.append(h)
        for level in self.mid:
            h = level(h, emb)
        # Mirror of the down path: upsample before every level but the first, then join the matching skip.
        for i, level in enumerate(self.up):
            h = h if i == 0 else F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = level(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)  # (N, C_out, H, W)

    def set_grad_checkpointing(self, enabled=True):
        """Recompute activations in the backward pass to save memory on large images."""
        for module in self.modules():
            if isinstance(module, Level):
                module.grad_checkpointing = enabled

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """Load a bare state_dict or a checkpoint file's dict written by this project's training."""
        # A training checkpoint holds the weights under "model" beside "model_config": unwrap it.
        if "model" in state_dict and "model_config" in state_dict:
            state_dict = state_dict["model"]
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


class UNet_conditional(UNet):
    """Class-conditional UNet; label index num_classes is the learned null class used by CFG."""

    def __init__(self, c_in=3, c_out=3, time_dim=256, num_classes=None, img_size=64, **kwargs):
        if not num_classes or num_classes < 1:
            raise ValueError("UNet_conditional needs num_classes >= 1")
        super().__init__(c_in, c_out, time_dim, img_size=img_size, num_classes=num_classes, **kwargs)
        # One row more than the classes: the last is the null label that training's label dropout uses.
        self.label_emb = nn.Embedding(num_classes + 1, time_dim)

    def null_labels(self, n, device):
        """Labels of the null (unconditional) class: (n,)."""
        return torch.full((n,), self.num_classes, dtype=torch.long, device=device)

    def embed(self, t, y):
        # y=None is the unconditional branch, embedded as the null class so both branches share one path.
        y = self.null_labels(t.shape[0], t.device) if y is None else y
        return super().embed(t, y) + self.label_emb(y)


def build_model(config):
    """Rebuild UNet or UNet_conditional from the config dict stored in a checkpoint."""
    # num_classes None or 0 marks an unconditional checkpoint.
    cls = UNet_conditional if config.get("num_classes") else UNet
    return cls(**config)
