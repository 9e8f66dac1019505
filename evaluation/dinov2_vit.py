"""The DINOv2 ViT-{S,B,L,g}/14 backbones (Oquab et al. 2023), module for module as facebookresearch/dinov2's
hub models build them, so its released `dinov2_vit?14_pretrain.pth` files load with strict key checking.

torch-fidelity 0.4's DINOv2 extractor builds its network with torch.hub.load('facebookresearch/dinov2'),
which fetches and runs that repository's code from GitHub, and it refuses a local weights file
(NotImplementedError). This file is the offline replacement of that one step: weights.py hands the model
built here to torch-fidelity's extractor, which still does its own resize to 224 and normalisation, so the
features are torch-fidelity's.

Facts taken from the dinov2 hub code (dinov2/hub/backbones.py, models/vision_transformer.py, layers/):
patch 14, image size 518 (37 x 37 position embeddings, bicubically resized to the input's grid with the
+0.1 offset of the original code), LayerNorm eps 1e-6, layer scale, biases everywhere, no register tokens,
GELU MLP of ratio 4 (SwiGLU with hidden (int(4d * 2/3) + 7) // 8 * 8 for ViT-g); the output is the
normalised class token.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# name -> (embedding width, depth, heads, feed-forward kind); torch-fidelity's extractor names.
ARCHITECTURES = {
    "dinov2-vit-s-14": (384, 12, 6, "mlp"),
    "dinov2-vit-b-14": (768, 12, 12, "mlp"),
    "dinov2-vit-l-14": (1024, 24, 16, "mlp"),
    "dinov2-vit-g-14": (1536, 40, 24, "swiglu"),
}
# The hub's file names: <hub name>/<hub name>_pretrain.pth under this address.
HUB_NAMES = {
    "dinov2-vit-s-14": "dinov2_vits14",
    "dinov2-vit-b-14": "dinov2_vitb14",
    "dinov2-vit-l-14": "dinov2_vitl14",
    "dinov2-vit-g-14": "dinov2_vitg14",
}
BASE_URL = "https://dl.fbaipublicfiles.com/dinov2"
PATCH, GRID = 14, 37  # 518 / 14 = 37 position embeddings per side


def weights_url(name):
    hub = HUB_NAMES[name]
    return f"{BASE_URL}/{hub}/{hub}_pretrain.pth"


class PatchEmbed(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=PATCH, stride=PATCH)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, patches, dim)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d_head)) v, as the original
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLU(nn.Module):
    def __init__(self, dim):
        super().__init__()
        hidden = (int(4 * dim * 2 / 3) + 7) // 8 * 8  # the hub's SwiGLUFFNFused width
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim, heads, ffn):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.mlp = SwiGLU(dim) if ffn == "swiglu" else Mlp(dim)
        self.ls1, self.ls2 = LayerScale(dim), LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoVisionTransformer(nn.Module):
    """The backbone; forward(x) -> (B, dim) normalised class tokens, as the hub model's forward."""

    def __init__(self, name):
        super().__init__()
        dim, depth, heads, ffn = ARCHITECTURES[name]
        self.patch_embed = PatchEmbed(dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, GRID * GRID + 1, dim))
        # Used only in training (masked tokens); kept so the released files load with strict=True.
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, ffn) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def position_embedding(self, height, width):
        """The 37 x 37 embeddings resized to the input's patch grid, as the original code does it."""
        rows, cols = height // PATCH, width // PATCH
        if rows == cols == GRID:
            return self.pos_embed
        embed = self.pos_embed.float()
        grid = embed[:, 1:].reshape(1, GRID, GRID, -1).permute(0, 3, 1, 2)
        # The original passes a scale factor with 0.1 added (a workaround of facebookresearch/dino#8) instead
        # of the output size; the bicubic weights depend on it, so it is kept for the same numbers.
        scale = ((rows + 0.1) / math.sqrt(GRID * GRID), (cols + 0.1) / math.sqrt(GRID * GRID))
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
        return torch.cat([embed[:, :1], grid], dim=1).to(self.pos_embed.dtype)

    def forward(self, x):
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1)
        tokens = tokens + self.position_embedding(x.shape[2], x.shape[3])
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]


def build(name, state_dict):
    """The backbone `name` holding `state_dict` (keys and shapes checked strictly)."""
    model = DinoVisionTransformer(name)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()
