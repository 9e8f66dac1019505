"""A time-conditioned classifier of noisy images for classifier guidance (Dhariwal & Nichol 2021): the
encoder half of the UNet (its levels, middle and time embedding) followed by ADM's attention pooling,
and what sampling needs from it: loading a checkpoint, checking that it fits a DDPM, grad log p(y | x_t)."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules import (
    CHANNEL_MULT,
    Level,
    check_architecture,
    default_attn_resolutions,
    group_norm,
    level_resolutions,
    timestep_embedding,
)
from utils import UserError, load_checkpoint

CLASSIFIER_FORMAT = "ddpm-classifier-v1"
# What a classifier takes from its DDPM checkpoint: the images it sees and the noise they carry.
DIFFUSION_KEYS = ("image_size", "channels", "noise_steps", "beta_start", "beta_end")


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


class EncoderClassifier(nn.Module):
    """Logits of p(y | x_t) for noisy images x_t at timesteps t: (N, C, H, W), (N,) -> (N, classes)."""

    # The argument names are the "model_config" keys of a classifier checkpoint.
    def __init__(self, c_in=3, img_size=64, base_channels=64, time_dim=256, depth=2, attn_resolutions=None,
                 num_classes=10):  # fmt: skip
        super().__init__()
        if attn_resolutions is None:
            attn_resolutions = default_attn_resolutions(img_size)
        check_architecture(img_size, attn_resolutions)
        self.config = dict(
            c_in=c_in,
            img_size=img_size,
            base_channels=base_channels,
            time_dim=time_dim,
            depth=depth,
            attn_resolutions=sorted(int(r) for r in attn_resolutions),
            num_classes=num_classes,
        )
        self.c_in, self.img_size, self.num_classes = c_in, img_size, num_classes
        chans = [base_channels * m for m in CHANNEL_MULT]
        self.time_embed = nn.Sequential(
            nn.Linear(base_channels, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim)
        )
        self.conv_in = nn.Conv2d(c_in, chans[0], 3, padding=1)
        # `depth` UNet levels per resolution: the first changes the width, the others keep it.
        self.down, prev = nn.ModuleList(), chans[0]
        for ch, side in zip(chans, level_resolutions(img_size), strict=True):
            attn = side in attn_resolutions
            self.down.append(nn.ModuleList(Level(c, ch, time_dim, attn) for c in [prev] + [ch] * (depth - 1)))
            prev = ch
        self.mid = nn.ModuleList([Level(prev, prev, time_dim, True), Level(prev, prev, time_dim, False)])
        self.out = nn.Sequential(group_norm(prev), nn.SiLU())
        self.pool = AttentionPool(level_resolutions(img_size)[-1], prev, num_classes)

    def forward(self, x, t):
        emb = self.time_embed(timestep_embedding(t, self.config["base_channels"]))  # (N, D)
        h = self.conv_in(x)  # (N, C0, H, W)
        for i, levels in enumerate(self.down):
            h = h if i == 0 else F.avg_pool2d(h, 2)  # the same downsampling as the UNet's
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
        # Each image's log-probability depends on that image only, so the sum's gradient is per image.
        chosen = log_probs[torch.arange(len(y), device=y.device), y].sum()
        return torch.autograd.grad(chosen, x_in)[0]


def load_classifier(path):
    """The classifier of a train_classifier.py checkpoint (EMA weights) and the checkpoint."""
    ckpt = load_checkpoint(path, "--classifier")
    if ckpt.get("format") != CLASSIFIER_FORMAT:
        raise UserError(
            f"--classifier {path} is not a classifier checkpoint: pass the ema_ckpt.pt or ckpt.pt that "
            "train_classifier.py writes"
        )
    model = EncoderClassifier(**ckpt["model_config"])
    # ckpt.pt holds both weights; ema_ckpt.pt holds the EMA ones as its "model".
    model.load_state_dict(ckpt["ema"] if "ema" in ckpt else ckpt["model"])
    return model.eval().requires_grad_(False), ckpt


def check_fits(classifier_ckpt, config, class_names, conditional, path):
    """A UserError unless the classifier saw the images, noise and classes of the DDPM of config."""
    trained = classifier_ckpt["config"]
    for key in DIFFUSION_KEYS:
        if trained[key] != config.get(key):
            raise UserError(
                f"--classifier {path} was trained with {key}={trained[key]}, but the diffusion model has "
                f"{key}={config.get(key)}: train a classifier with --diffusion-checkpoint of this model"
            )
    # Labels are indices: a conditional DDPM and its classifier must mean the same class by each.
    if conditional and classifier_ckpt["class_names"] != list(class_names):
        raise UserError(
            f"--classifier {path} knows the classes {classifier_ckpt['class_names']}, but the diffusion "
            f"model has {list(class_names)}: train the classifier on the same class folders"
        )
