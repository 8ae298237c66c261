"""DINOv2 ViT encoder for REPA targets (training only), loaded from a user-supplied weight file; nothing is downloaded.

Paper: DINOv2 (Oquab et al., arXiv 2304.07193); REPA (Yu et al., arXiv 2410.06940); NVG aligns content block 8 with
DINOv2-ViT-B/14 `x_norm_patchtokens` (spec §3.3). Modified from: github.com/facebookresearch/dinov2
(`DinoVisionTransformer`, `NestedTensorBlock`, `interpolate_pos_encoding`). Key names follow the released
`dinov2_vit{s,b,l}14` state_dicts (`patch_embed.proj.*`, `blocks.{i}.attn.qkv.*`, `blocks.{i}.ls1.gamma`, ...).
Not checked against the released weights here (no network); the layout and forward follow the reference code.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, C))


class _Mlp(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn, self.mlp = _Attention(dim, heads), _Mlp(dim)
        self.ls1, self.ls2 = _LayerScale(dim), _LayerScale(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)


class DINOv2(nn.Module):
    """ViT with a class token, learned position embedding (resampled to the input grid) and LayerScale blocks."""

    def __init__(self, dim: int = 768, depth: int = 12, heads: int = 12, patch: int = 14, pretrain_grid: int = 37):
        super().__init__()
        self.dim, self.patch = dim, patch
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pretrain_grid**2, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.patch_embed = PatchEmbed(dim, patch)
        self.blocks = nn.ModuleList([_Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    @classmethod
    def from_file(cls, path: str) -> DINOv2:
        """Build from a released DINOv2 ViT-*/14 state_dict (.pth/.pt or .safetensors); size read from the shapes."""
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        if "pos_embed" not in sd or "patch_embed.proj.weight" not in sd:
            raise KeyError(f"{path} does not look like a DINOv2 state_dict (no pos_embed / patch_embed.proj.weight)")
        dim, _, patch, _ = sd["patch_embed.proj.weight"].shape
        depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        grid = int(round((sd["pos_embed"].shape[1] - 1) ** 0.5))
        model = cls(dim, depth, dim // 64, patch, grid)
        model.load_state_dict(sd, strict=True)
        return model.eval().requires_grad_(False)

    def _pos_embed(self, n: int) -> Tensor:
        # NVG's REPA resamples the pretrained grid to the patch grid once (timm `resample_abs_pos_embed`: bicubic with
        # antialiasing); DINOv2's own interpolation then leaves it unchanged
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        M = int(round(patch_pos.shape[1] ** 0.5))
        if n == M:
            return self.pos_embed
        grid = patch_pos.reshape(1, M, M, self.dim).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=(n, n), mode="bicubic", antialias=True)
        return torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(1, n * n, self.dim).to(cls_pos.dtype)], 1)

    @torch.no_grad()
    def patch_features(self, images: Tensor, grid: int) -> Tensor:
        """Normalised patch tokens (B, grid*grid, dim) of images (B, 3, H, W) in [-1, 1] (`x_norm_patchtokens`).

        REPA's preprocessing: (x + 1) / 2, ImageNet normalisation, bicubic resize to grid * patch (224 for 16x16).
        """
        mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
        x = ((images.float() + 1) / 2 - mean) / std
        x = F.interpolate(x, size=(grid * self.patch,) * 2, mode="bicubic")
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, grid^2, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self._pos_embed(grid)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 1:]
