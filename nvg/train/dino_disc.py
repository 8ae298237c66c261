"""DINO discriminator of the official NVG/VAR tokenizer loss (spec §2.3), built from a weight file the user supplies
(`dino_deitsmall16_pretrain.pth`, the DINO ViT-S/16 checkpoint); nothing is downloaded.

A frozen ViT-S/16 (k-bias zeroed as official) sees the image resized to 224 px; its patch tokens + cls readout after
the patch embedding and after blocks (2, 5, 8, 11) feed 5 trainable heads:
[SpectralConv1d k=1 + BatchNormLocal + LeakyReLU(0.2)] -> residual [SpectralConv1d k=9 circular + BN + LReLU] / sqrt2
-> SpectralConv1d -> one logit per token. DiffAug (color, translation 1/8, cutout 0.2) is applied to real and fake;
the discriminator loss is hinge + 0.001 LeCAM (EMA 0.999).
Modified from: github.com/Yikai-Wang/nvg (nvg/modules/losses/dinodisc.py, diffaug.py, vqperceptual.py), after VAR.
Verified here only with random weights (shapes, key layout, gradients), not against the official numerics.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.parametrizations import spectral_norm


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, L, C = x.shape
        q, k, v = self.attn.qkv(self.norm1(x)).view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, C))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x)), approximate="tanh"))


class FrozenViT(nn.Module):
    """DINO ViT-S/16 (384 wide, 6 heads) returning (B, C, L) readouts after the patch embedding and `key_depths`."""

    def __init__(self, depth: int = 12, key_depths=(2, 5, 8, 11), dim: int = 384, heads: int = 6):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, 16, 16)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 14 * 14 + 1, dim))
        self.blocks = nn.ModuleList([_Block(dim, heads) for _ in range(depth)])
        self.key_depths = tuple(d for d in key_depths if d < depth)
        mean, std = torch.tensor((0.485, 0.456, 0.406)), torch.tensor((0.229, 0.224, 0.225))
        self.register_buffer("x_scale", (0.5 / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("x_shift", ((0.5 - mean) / std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)

    def forward(self, x_pm1: Tensor) -> list[Tensor]:
        x = self.x_scale * x_pm1.float() + self.x_shift
        H, W = x.shape[-2:]
        if H > 224 and W > 224 and torch.rand(()) < 0.5:  # random 224 crop
            i, j = (int(torch.randint(0, s - 223, ())) for s in (H, W))
            x = x[..., i : i + 224, j : j + 224]
        elif (H, W) != (224, 224):
            x = F.interpolate(x, size=(224, 224), mode="area" if H > 224 else "bicubic")
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        acts = [(x[:, 1:] + x[:, :1]).transpose(1, 2)]
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in self.key_depths:
                acts.append((x[:, 1:] + x[:, :1]).transpose(1, 2))
        return acts


class BatchNormLocal(nn.Module):
    """Batch norm over groups of `virtual_bs` samples (and tokens), no running statistics (official default)."""

    def __init__(self, channels: int, virtual_bs: int = 8, eps: float = 1e-6):
        super().__init__()
        self.virtual_bs, self.eps = virtual_bs, eps
        self.weight, self.bias = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.float().view(math.ceil(x.shape[0] / self.virtual_bs), -1, x.shape[-2], x.shape[-1])
        x = (x - x.mean([1, 3], keepdim=True)) / (x.var([1, 3], keepdim=True, unbiased=False) + self.eps).sqrt()
        return (x * self.weight[None, :, None] + self.bias[None, :, None]).view(shape)


def _block(c: int, k: int) -> nn.Sequential:
    conv = spectral_norm(nn.Conv1d(c, c, k, padding=k // 2, padding_mode="circular"), eps=1e-12)
    return nn.Sequential(conv, BatchNormLocal(c), nn.LeakyReLU(0.2))


class _Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return (self.fn(x) + x) / math.sqrt(2)


class DinoDiscriminator(nn.Module):
    """Frozen DINO ViT-S/16 + 5 trainable heads -> logits (B, 5 * 196)."""

    def __init__(self, depth: int = 12, key_depths=(2, 5, 8, 11), kernel_size: int = 9):
        super().__init__()
        self.dino = FrozenViT(depth, key_depths)
        C = 384
        self.heads = nn.ModuleList([
            nn.Sequential(_block(C, 1), _Residual(_block(C, kernel_size)), spectral_norm(nn.Conv1d(C, 1, 1)))
            for _ in range(len(self.dino.key_depths) + 1)
        ])

    @classmethod
    def from_file(cls, path: str, key_depths=(2, 5, 8, 11)) -> DinoDiscriminator:
        """Load the ViT from a DINO ViT-S/16 state dict (timm/DINO key layout; its depth is read from the blocks it
        holds, 12 for the real checkpoint); raises naming a missing or wrong-shaped key."""
        sd = torch.load(path, map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd)
        blocks = [int(k.split(".")[1]) for k in sd if k.startswith("blocks.")]
        if not blocks:
            raise KeyError(f"{path!r} holds no ViT blocks (blocks.*): not a DINO ViT-S/16 state dict")
        model = cls(max(blocks) + 1, key_depths)
        expected = model.dino.state_dict()
        missing = [k for k in expected if k not in sd]
        if missing:
            raise KeyError(f"DINO weights in {path!r} lack {len(missing)} tensors, e.g. {missing[0]!r}")
        for k, v in expected.items():
            if sd[k].shape != v.shape:
                raise ValueError(f"DINO weight {k!r}: shape {tuple(sd[k].shape)} != expected {tuple(v.shape)}")
        sd = {k: sd[k].clone() for k in expected}
        for k in sd:
            if k.endswith("attn.qkv.bias"):  # official: the key bias is zeroed (it cancels in softmax anyway)
                C = sd[k].numel() // 3
                sd[k][C : 2 * C] = 0
        model.dino.load_state_dict(sd)
        return model

    def forward(self, x_pm1: Tensor) -> Tensor:
        B = x_pm1.shape[0]
        return torch.cat([h(a).view(B, -1) for h, a in zip(self.heads, self.dino(x_pm1))], 1)


def diff_augment(x: Tensor, translation: float = 0.125, cutout: float = 0.2) -> Tensor:
    """DiffAugment (Zhao et al. 2020) 'color,translation,cutout', differentiable, one draw per image."""
    B, _, H, W = x.shape
    dev = x.device
    x = x + (torch.rand(B, 1, 1, 1, device=dev) - 0.5)  # brightness
    m = x.mean(1, keepdim=True)
    x = (x - m) * (torch.rand(B, 1, 1, 1, device=dev) * 2) + m  # saturation
    m = x.mean([1, 2, 3], keepdim=True)
    x = (x - m) * (torch.rand(B, 1, 1, 1, device=dev) + 0.5) + m  # contrast
    sh, sw = int(H * translation + 0.5), int(W * translation + 0.5)
    ty = torch.randint(-sh, sh + 1, (B, 1, 1), device=dev)
    tx = torch.randint(-sw, sw + 1, (B, 1, 1), device=dev)
    gy = (torch.arange(H, device=dev).view(1, H, 1) + ty + 1).clamp(0, H + 1)
    gx = (torch.arange(W, device=dev).view(1, 1, W) + tx + 1).clamp(0, W + 1)
    padded = F.pad(x, (1, 1, 1, 1))
    x = padded.permute(0, 2, 3, 1)[torch.arange(B, device=dev).view(B, 1, 1), gy, gx].permute(0, 3, 1, 2)
    ch, cw = int(H * cutout + 0.5), int(W * cutout + 0.5)
    oy = torch.randint(0, H + (1 - ch % 2), (B, 1, 1), device=dev)
    ox = torch.randint(0, W + (1 - cw % 2), (B, 1, 1), device=dev)
    ys = torch.arange(H, device=dev).view(1, H, 1)
    xs = torch.arange(W, device=dev).view(1, 1, W)
    keep = ~(((ys - oy + ch // 2) >= 0) & ((ys - oy + ch // 2) < ch) & ((xs - ox + cw // 2) >= 0)
             & ((xs - ox + cw // 2) < cw))
    return x * keep.unsqueeze(1)


class LeCAM:
    """LeCAM regulariser: mean(relu(D(x) - ema_fake)^2) + mean(relu(ema_real - D(x_hat))^2), EMA decay 0.999."""

    def __init__(self, decay: float = 0.999):
        self.decay, self.ema_real, self.ema_fake = decay, 0.0, 0.0

    def __call__(self, logits_real: Tensor, logits_fake: Tensor) -> Tensor:
        d = self.decay
        self.ema_real = d * self.ema_real + (1 - d) * logits_real.detach().mean().item()
        self.ema_fake = d * self.ema_fake + (1 - d) * logits_fake.detach().mean().item()
        return F.relu(logits_real - self.ema_fake).square().mean() + F.relu(self.ema_real - logits_fake).square().mean()

    def state_dict(self) -> dict:
        return {"ema_real": self.ema_real, "ema_fake": self.ema_fake}

    def load_state_dict(self, sd: dict) -> None:
        self.ema_real, self.ema_fake = sd["ema_real"], sd["ema_fake"]
