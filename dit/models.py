"""Diffusion Transformer (DiT) with adaLN-Zero conditioning.

The module names and parameter shapes follow the published DiT checkpoints exactly, so the official
DiT-XL-2-256x256.pt / DiT-XL-2-512x512.pt files load with a strict load_state_dict.
"""

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def modulate(x, shift, scale):
    """Apply a per-sample affine modulation to a token sequence.

    shift and scale are (N, D), one pair per sample, broadcast over the T tokens. The 1 + scale form makes a
    zero-initialised adaLN layer the identity, which is what adaLN-Zero relies on.
    """
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def plain_attention(q, k, v):
    """Textbook softmax attention; the reference that SDPA is checked and benchmarked against."""
    weights = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (N, H, T, T)
    return weights.softmax(dim=-1) @ v


ATTENTION = {"sdpa": F.scaled_dot_product_attention, "plain": plain_attention}
POSITION_EMBEDDINGS = ("sincos", "rope")


def sincos_1d(dim, positions):
    """Sin-cos features of 1-D positions, laid out [sin, cos]."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double()[:, None] * omega[None]  # (T, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def rope_tables(grid_size, head_dim, device=None, base=10000.0):
    """cos and sin (2, T, head_dim / 4) of 2-D axial RoPE on a square grid: [0] for rows, [1] for columns."""
    if head_dim % 4:
        raise ValueError(f"rope needs a head size divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    # Each axis gets half the head dims, i.e. head_dim / 4 rotated pairs, with the standard frequencies.
    freqs = base ** (-torch.arange(quarter, dtype=torch.float64, device=device) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    positions = torch.stack([rows.flatten(), cols.flatten()]).to(device)  # (2, T)
    angles = (positions.double()[..., None] * freqs).float()  # (2, T, head_dim/4)
    return angles.cos(), angles.sin()


def rotate_pairs(x, cos, sin):
    """Rotate the pairs (x[i], x[i + k]) of x (..., T, 2k) by the angles whose cos and sin are (T, k)."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


def apply_rope(x, rope):
    """2-D RoPE on queries or keys (N, H, T, D/H): the first half of the head dims turns with the patch
    row, the second half with the column, so q.k depends on positions only through their difference."""
    cos, sin = rope
    rows, cols = x.float().chunk(2, dim=-1)
    rotated = torch.cat([rotate_pairs(rows, cos[0], sin[0]), rotate_pairs(cols, cos[1], sin[1])], dim=-1)
    return rotated.to(x.dtype)  # autocast's dtype: SDPA wants q, k and v alike


def sincos_2d(dim, grid_size):
    """Fixed 2-D sin-cos table for a square token grid: first half encodes the column, second the row."""
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    # Column first, as the published table: swapped, the weights still load but every position is transposed.
    table = torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1)
    return table.float().unsqueeze(0)  # (1, T, dim)


class PatchEmbed(nn.Module):
    """Split a latent into p x p patches and project each to the hidden size."""

    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D)


class TimestepEmbedder(nn.Module):
    """Embed scalar timesteps: sinusoidal features followed by a two-layer MLP."""

    def __init__(self, hidden_size, frequency_size=256, max_period=10000):
        super().__init__()
        self.frequency_size = frequency_size
        self.max_period = max_period
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def sinusoid(self, t):
        """Sinusoidal timestep features laid out [cos, sin], as the published weights expect."""
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t.device) / half)
        angles = t.float()[:, None] * freqs[None]  # (N, half)
        return torch.cat([angles.cos(), angles.sin()], dim=1)

    def forward(self, t):
        features = self.sinusoid(t).to(self.mlp[0].weight.dtype)
        return self.mlp(features)  # (N, D)


class LabelEmbedder(nn.Module):
    """Class-label table with one extra row, the null class used for classifier-free guidance."""

    def __init__(self, num_classes, hidden_size):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels):
        return self.embedding_table(labels)  # (N, D)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, dim, num_heads, attention="sdpa"):
        super().__init__()
        self.num_heads = num_heads
        self.attend = ATTENTION[attention]
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope=None):
        n, t, d = x.shape
        # (3, heads, head_dim) per token is the published qkv weight's layout; q, k, v: (N, H, T, D/H) each.
        q, k, v = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = self.attend(q, k, v)  # (N, H, T, D/H)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    """Two-layer feed-forward network with tanh-approximated GELU."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """Transformer block whose norms are modulated, and whose residual branches gated, by c."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, attention="sdpa"):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, attention)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c, rope=None):
        # The published weight fixes this order: reordered, it would still load but feed shifts in as gates.
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, 1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """Modulated norm and a linear map from tokens back to patch values."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p*p*C)


class DiT(nn.Module):
    """Diffusion Transformer predicting noise and a variance interpolation for each latent channel (or,
    with learn_sigma=False, only the noise or velocity that a continuous-time objective regresses).

    pos_embed "sincos" adds the published fixed table to the tokens; "rope" rotates queries and keys
    instead and has no table, so the model runs at any latent size.
    """

    def __init__(
        self,
        input_size=32,
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        num_classes=1000,
        learn_sigma=True,
        attention="sdpa",
        pos_embed="sincos",
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"latent size {input_size} is not a multiple of the patch size {patch_size}")
        if pos_embed not in POSITION_EMBEDDINGS:
            raise ValueError(f"unknown pos_embed {pos_embed!r}; choose one of {POSITION_EMBEDDINGS}")
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.gradient_checkpointing = False
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.head_dim = hidden_size // num_heads
        # Stored as a frozen parameter (not a buffer) so it is counted and saved like the published model.
        grid = input_size // patch_size
        self.pos_embed = None
        if pos_embed == "sincos":
            self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, hidden_size), requires_grad=False)
        else:
            rope_tables(grid, self.head_dim)  # a head size that RoPE cannot split fails here, not later
        self.blocks = nn.ModuleList(
            [DiTBlock(hidden_size, num_heads, mlp_ratio, attention) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """adaLN-Zero: every modulation layer and the output layer start at zero, so the model outputs 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # Meta tensors (the tests size DiT-XL that way) have no storage for the table and the inits below.
        if self.x_embedder.proj.weight.device.type == "meta":
            return
        if self.pos_embed is not None:
            grid = int(self.pos_embed.shape[1] ** 0.5)
            self.pos_embed.data.copy_(sincos_2d(self.pos_embed.shape[-1], grid))
        proj = self.x_embedder.proj
        # Xavier on the (D, C*p*p) view, as the published DiT: on the 4-D weight fan-out would be D*p*p.
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zero_layers = [block.adaLN_modulation[-1] for block in self.blocks]
        zero_layers += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for layer in zero_layers:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def null_class(self):
        """Label index of the unconditional (null) class."""
        return self.num_classes

    def unpatchify(self, x):
        """(N, T, p*p*C) tokens -> (N, C, H, W) latents; patch values are ordered (row, col, channel)."""
        p, c = self.patch_size, self.out_channels
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y):
        """x: (N, C, H, W) noisy latents, t: (N,) timesteps, y: (N,) labels (null_class = unconditional)."""
        x = self.x_embedder(x)  # (N, T, D)
        rope = None
        if self.pos_embed is None:  # rope: the tables follow the grid of this input, whatever its size
            rope = rope_tables(int(x.shape[1] ** 0.5), self.head_dim, x.device)
        else:
            x = x + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)  # (N, D)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, c, rope, use_reentrant=False)
            else:
                x = block(x, c, rope)
        return self.unpatchify(self.final_layer(x, c))  # (N, out_channels, H, W)


SIZES = {  # depth, hidden size, heads
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}


VARIANTS = [f"DiT-{size}/{patch}" for size in SIZES for patch in (2, 4, 8)]


def variant_config(name):
    """Architecture numbers of a named variant, e.g. 'DiT-B/2'."""
    if name not in VARIANTS:
        raise KeyError(f"unknown DiT variant {name!r}; choose one of {VARIANTS}")
    size, patch = name.removeprefix("DiT-").split("/")
    depth, hidden_size, num_heads = SIZES[size]
    return dict(depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=int(patch))


def build_variant(name, **kwargs):
    """Build a named variant; keyword arguments (input_size, num_classes, depth, ...) override its numbers."""
    return DiT(**{**variant_config(name), **kwargs})


DiT_models = {name: functools.partial(build_variant, name) for name in VARIANTS}
