"""The DINOv2 vision transformer (inference only), written so that Meta's published checkpoints load.

The module and parameter names follow the official state dicts (``dinov2_vitl14_pretrain.pth``):
``cls_token``, ``pos_embed``, ``mask_token``, ``patch_embed.proj.*``, ``blocks.{i}.norm1.*``,
``blocks.{i}.attn.qkv.*``, ``blocks.{i}.attn.proj.*``, ``blocks.{i}.ls1.gamma``,
``blocks.{i}.norm2.*``, ``blocks.{i}.mlp.fc1.*``, ``blocks.{i}.mlp.fc2.*``, ``blocks.{i}.ls2.gamma``,
``norm.*``. The forward pass returns the final-norm CLS token, the feature FD_DINOv2 uses.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DinoVisionTransformer", "dinov2_vitl14"]


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [N, H/p * W/p, dim]


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head_dim)
        return self.proj(y.transpose(1, 2).reshape(n, t, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, init_values: float, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, init_values)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoVisionTransformer(nn.Module):
    """A DINOv2 ViT without registers. Defaults are ViT-L/14 as published (trained at 518x518).

    Args:
        img_size: training resolution; sets the size of ``pos_embed`` ((img_size/patch)^2 + 1 tokens).
        interpolate_offset: DINOv2 resizes the position embeddings with bicubic interpolation using the
            scale factor ``(grid + offset) / trained_grid``; 0.1 reproduces the official features.
    """

    def __init__(self, img_size: int = 518, patch_size: int = 14, in_chans: int = 3, embed_dim: int = 1024,
                 depth: int = 24, num_heads: int = 16, mlp_ratio: float = 4.0, init_values: float = 1e-5,
                 interpolate_offset: float = 0.1, eps: float = 1e-6):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.interpolate_offset = interpolate_offset
        num_patches = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # only used in training; kept for loading
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, init_values, eps) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=eps)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    def interpolate_pos_encoding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Position embeddings [1, 1 + grid_h * grid_w, dim] for a grid of patches."""
        pos = self.pos_embed
        trained = pos.shape[1] - 1
        side = math.isqrt(trained)
        if grid_h == grid_w == side:
            return pos
        patch_pos = pos[:, 1:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
        if self.interpolate_offset:
            scale = ((grid_h + self.interpolate_offset) / side, (grid_w + self.interpolate_offset) / side)
            patch_pos = F.interpolate(patch_pos, scale_factor=scale, mode="bicubic")
        else:
            patch_pos = F.interpolate(patch_pos, size=(grid_h, grid_w), mode="bicubic")
        if patch_pos.shape[-2:] != (grid_h, grid_w):
            raise RuntimeError(f"position-embedding interpolation gave {tuple(patch_pos.shape[-2:])}, "
                               f"expected {(grid_h, grid_w)}")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1).to(pos.dtype)
        return torch.cat([pos[:, :1], patch_pos], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images [N, 3, H, W] (H, W multiples of the patch size) -> CLS features [N, dim]."""
        _, _, h, w = x.shape
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {self.patch_size}")
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        tokens = tokens + self.interpolate_pos_encoding(h // self.patch_size, w // self.patch_size)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]


def dinov2_vitl14(**overrides) -> DinoVisionTransformer:
    """The ViT-L/14 of ``dinov2_vitl14_pretrain.pth`` (1024-d, 24 blocks, 16 heads, 518x518 training)."""
    config = dict(img_size=518, patch_size=14, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0)
    config.update(overrides)
    return DinoVisionTransformer(**config)
