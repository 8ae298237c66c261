"""Convolutional encoder and decoder of VAR's multi-scale VQVAE (the taming/LDM "vq-f16" CNN).

Paper: Tian et al., "Visual Autoregressive Modeling", arXiv 2404.02905 (NeurIPS 2024).
Modified from: github.com/FoundationVision/VAR models/basic_vae.py (itself from CompVis latent-diffusion).
Module and parameter names follow the released checkpoint `vae_ch160v4096z32.pth`, so its state_dict loads as is:
`encoder.down.{level}.block.{i}`, `.attn.{i}`, `.downsample.conv`, `encoder.mid.{block_1,attn_1,block_2}`, ...

Layout: the encoder has `num_res_blocks` residual blocks per level, the decoder one more; self-attention runs
only at the lowest resolution (the last level) and in the middle block. Every level but the last halves (encoder)
or doubles (decoder) the resolution, so the latent side is image_side / 2**(len(channel_multipliers) - 1).
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def group_norm(channels: int) -> nn.GroupNorm:
    # 32 groups and eps 1e-6 as in the released code; channels must be a multiple of 32.
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """x -> x' + conv(silu(norm(conv(silu(norm(x)))))), with a 1x1 conv shortcut x' when the width changes."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x_BChw: Tensor) -> Tensor:
        h_BChw = self.conv1(F.silu(self.norm1(x_BChw)))
        h_BChw = self.conv2(F.silu(self.norm2(h_BChw)))
        return self.nin_shortcut(x_BChw) + h_BChw


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions: x + proj(softmax(q k^T / sqrt(C)) v)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)  # one 1x1 conv for q, k, v (checkpoint key `qkv`)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x_BChw: Tensor) -> Tensor:
        B, C, h, w = x_BChw.shape
        qkv_B3CN = self.qkv(self.norm(x_BChw)).reshape(B, 3, C, h * w)
        q_BNC, k_BNC, v_BNC = (t.transpose(1, 2) for t in qkv_B3CN.unbind(1))
        o_BNC = F.scaled_dot_product_attention(q_BNC, k_BNC, v_BNC)  # default scale 1/sqrt(C), one head
        return x_BChw + self.proj_out(o_BNC.transpose(1, 2).reshape(B, C, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one pixel on the right and bottom only (taming's asymmetric padding)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x_BChw: Tensor) -> Tensor:
        return self.conv(F.pad(x_BChw, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x_BChw: Tensor) -> Tensor:
        return self.conv(F.interpolate(x_BChw, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: residual blocks, optional attention after each block, optional resampling.

    Plain container so that the state_dict keys read `down.{level}.block.{i}` / `.attn.{i}` / `.downsample.conv`.
    """

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module], resample_name: str | None, resample=None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)  # empty, or one attention block after each residual block
        self.resample_name = resample_name
        if resample_name is not None:
            setattr(self, resample_name, resample)

    def forward(self, x_BChw: Tensor) -> Tensor:
        for i, block in enumerate(self.block):
            x_BChw = block(x_BChw)
            if len(self.attn):
                x_BChw = self.attn[i](x_BChw)
        if self.resample_name is not None:
            x_BChw = getattr(self, self.resample_name)(x_BChw)
        return x_BChw


class _Middle(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x_BChw: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x_BChw)))


class Encoder(nn.Module):
    """Image (B, 3, H, W) in [-1, 1] -> latent (B, latent_channels, H/2**(n-1), W/2**(n-1)), n = len(mults)."""

    def __init__(self, channels: int, channel_multipliers: tuple[int, ...], num_res_blocks: int, latent_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(3, channels, 3, padding=1)
        widths_in = (1,) + tuple(channel_multipliers)
        last = len(channel_multipliers) - 1
        self.down = nn.ModuleList()
        for level, mult in enumerate(channel_multipliers):
            width_in, width = channels * widths_in[level], channels * mult
            blocks = [ResnetBlock(width_in if i == 0 else width, width) for i in range(num_res_blocks)]
            attns = [AttnBlock(width) for _ in range(num_res_blocks)] if level == last else []
            resample = Downsample(width) if level != last else None
            self.down.append(_Level(blocks, attns, "downsample" if resample else None, resample))
        width = channels * channel_multipliers[-1]
        self.mid = _Middle(width)
        self.norm_out = group_norm(width)
        self.conv_out = nn.Conv2d(width, latent_channels, 3, padding=1)

    def forward(self, img_B3HW: Tensor) -> Tensor:
        h_BChw = self.conv_in(img_B3HW)
        for level in self.down:
            h_BChw = level(h_BChw)
        h_BChw = self.mid(h_BChw)
        return self.conv_out(F.silu(self.norm_out(h_BChw)))


class Decoder(nn.Module):
    """Latent (B, latent_channels, h, w) -> image (B, 3, h*2**(n-1), w*2**(n-1)), not clamped."""

    def __init__(self, channels: int, channel_multipliers: tuple[int, ...], num_res_blocks: int, latent_channels: int):
        super().__init__()
        last = len(channel_multipliers) - 1
        width = channels * channel_multipliers[-1]
        self.conv_in = nn.Conv2d(latent_channels, width, 3, padding=1)
        self.mid = _Middle(width)
        levels = []
        for level in reversed(range(len(channel_multipliers))):  # built from the lowest resolution up
            width_out = channels * channel_multipliers[level]
            blocks = [ResnetBlock(width if i == 0 else width_out, width_out) for i in range(num_res_blocks + 1)]
            attns = [AttnBlock(width_out) for _ in range(num_res_blocks + 1)] if level == last else []
            resample = Upsample(width_out) if level != 0 else None
            levels.insert(0, _Level(blocks, attns, "upsample" if resample else None, resample))
            width = width_out
        self.up = nn.ModuleList(levels)  # up[0] is the full-resolution level, as in the checkpoint
        self.norm_out = group_norm(width)
        self.conv_out = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, z_BChw: Tensor) -> Tensor:
        h_BChw = self.mid(self.conv_in(z_BChw))
        for level in reversed(self.up):
            h_BChw = level(h_BChw)
        return self.conv_out(F.silu(self.norm_out(h_BChw)))
