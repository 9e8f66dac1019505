"""Self-attention UNet for pixel-space DDPM: unconditional (UNet) and class-conditional (UNet_conditional)."""

import torch
import torch.nn as nn
import torch.nn.functional as F

# The blocks are core's (core/guidance.py's classifier is built of them too); bench.py and tests take
# Level and SelfAttention from here.
from core.blocks import Level, SelfAttention, group_norm, timestep_embedding  # noqa: F401

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
