"""NVG multi-granularity quantized autoencoder (spec §2; official `VQAE`, config vq-f16-d32).

Image (B, 3, H, W) in [-1, 1] -> CNN encoder -> latent f (B, C, h, w) -> multi-granularity quantizer -> VGS;
f_hat -> CNN decoder -> image clamped to [-1, 1]. Encoder and decoder are the Open-MAGVIT2-style 2-D CNNs of the
official code without attention: GroupNorm(32, eps 1e-6) + swish ResBlocks, stride-2 convs down, nearest x2 + conv up.

Modified from: github.com/Yikai-Wang/nvg (nvg/modules/vqvae/ae.py, nvg/models/downsample.py). Module names and the
order in which modules are built follow the official code, so state dicts load as-is and a seed gives the same
random weights.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .quantizer import VGS, MultiGranularityQuantizer


@dataclass
class TokenizerConfig:
    image_size: int = 256
    latent_size: int = 16  # h = w of the latent; h*w must be a power of two (it fixes K+1 = log2(h*w)+1 stages)
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4, 4)  # one entry per resolution level
    num_res_blocks: int = 2  # per encoder level; the decoder has one more per level (official)
    latent_channels: int = 32
    codebook_size: int = 4096
    beta: float = 0.25  # commitment weight of the VQ loss
    phi_ratio: float = 0.5  # phi(h) = h + phi_ratio * conv3x3(h)
    in_channels: int = 3
    norm_groups: int = 32  # GroupNorm groups (official: 32); every level's width must be divisible by it

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)
        ratio = self.image_size / self.latent_size
        down = math.log2(ratio) if ratio >= 1 else -1
        if down != int(down) or down < 0:
            raise ValueError(f"image_size / latent_size must be a power of two, "
                             f"got {self.image_size}/{self.latent_size}")
        if int(down) > len(self.channel_mult) - 1:
            raise ValueError(f"downsampling x{int(ratio)} needs at least {int(down) + 1} channel_mult levels, "
                             f"got {len(self.channel_mult)}")
        n = self.latent_size**2
        if n & (n - 1):
            raise ValueError(f"latent_size**2 must be a power of two, got latent_size={self.latent_size}")
        for w in [self.base_channels * m for m in self.channel_mult]:
            if w % self.norm_groups:
                raise ValueError(f"channel width {w} is not divisible by norm_groups={self.norm_groups}")

    @property
    def num_down(self) -> int:
        return int(math.log2(self.image_size // self.latent_size))

    @property
    def num_stages(self) -> int:
        return int(math.log2(self.latent_size**2)) + 1

    @property
    def vocab_size(self) -> int:
        """The codebook size, under the name VAR's VQVAEConfig and both generators' configs use."""
        return self.codebook_size

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TokenizerConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown TokenizerConfig fields: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_name(cls, name: str, **overrides) -> TokenizerConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown tokenizer preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict] = {
    # official vq-f16-d32: 256 px, 16x16x32 latent, 9 stages, 110.33M parameters
    "nvg-ae-f16": dict(),
    # CPU presets: 32 px images (Fashion-MNIST is padded 28 -> 32), narrow channels (GroupNorm(8)), 1 ResBlock per
    # encoder level; about 1 CPU-second per training step of 32 images
    "tiny-ae-32px-8x8": dict(image_size=32, latent_size=8, base_channels=16, channel_mult=(1, 2, 4),
                             num_res_blocks=1, latent_channels=16, codebook_size=1024, norm_groups=8),
    # the main job's tokenizer: the same network with a 256-code codebook (Fashion-MNIST needs far fewer than 1024
    # codes; a small vocabulary makes the generator's token classification easier in a few CPU-minutes)
    "tiny-ae-32px-8x8-v256": dict(image_size=32, latent_size=8, base_channels=16, channel_mult=(1, 2, 4),
                                  num_res_blocks=1, latent_channels=16, codebook_size=256, norm_groups=8),
    "tiny-ae-32px-16x16": dict(image_size=32, latent_size=16, base_channels=16, channel_mult=(1, 2),
                               num_res_blocks=1, latent_channels=16, codebook_size=1024, norm_groups=8),
    # for tests: 16 px, 4x4 latent (5 stages), about 20k parameters
    "test-ae-16px-4x4": dict(image_size=16, latent_size=4, base_channels=8, channel_mult=(1, 2, 2),
                             num_res_blocks=1, latent_channels=8, codebook_size=64, norm_groups=4),
}


# ----------------------------------------------------------------------------- blocks
class Conv(nn.Module):
    """nn.Conv2d under `.conv` (official key layout `*.conv.weight`)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Norm(nn.Module):
    """GroupNorm(eps 1e-6) under `.norm` (official key layout `*.norm.weight`)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6, affine=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x)


class ResBlock(nn.Module):
    """GN -> swish -> conv3x3 -> GN -> swish -> conv3x3, plus a 1x1 shortcut when the width changes."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = Norm(cin, groups)
        self.conv1 = Conv(cin, cout, 3, padding=1)
        self.norm2 = Norm(cout, groups)
        self.conv2 = Conv(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = Conv(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv with asymmetric zero padding (right/bottom only), as official."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Level(nn.Module):
    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)


class Mid(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResBlock(channels, channels, groups)
        self.block_2 = ResBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.block_1(x))


# ----------------------------------------------------------------------------- encoder / decoder
class Encoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        ch, mult, g = cfg.base_channels, cfg.channel_mult, cfg.norm_groups
        self.conv_in = Conv(cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = ch
        for i, m in enumerate(mult):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(cin, ch * m, g))
                cin = ch * m
            level = Level(blocks)
            if i < cfg.num_down:  # the first num_down levels end with a stride-2 conv
                level.downsample = Downsample(cin)
            self.down.append(level)
        self.mid = Mid(cin, g)
        self.norm_out = Norm(cin, g)
        self.conv_out = Conv(cin, cfg.latent_channels, 3, padding=1)

    def forward(self, x_B3HW: Tensor) -> Tensor:
        h = self.conv_in(x_B3HW)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, C, h, w)


class Decoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        ch, mult, g = cfg.base_channels, cfg.channel_mult, cfg.norm_groups
        cin = ch * mult[-1]
        self.conv_in = Conv(cfg.latent_channels, cin, 3, padding=1)
        self.mid = Mid(cin, g)
        # levels are built from the coarsest (official order, which fixes the RNG draws) and stored by index
        levels = []
        for i in reversed(range(len(mult))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResBlock(cin, ch * mult[i], g))
                cin = ch * mult[i]
            level = Level(blocks)
            if 1 <= i <= cfg.num_down:  # levels num_down..1 end with an x2 upsample
                level.upsample = Upsample(cin)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = Norm(cin, g)
        self.conv_out = Conv(cin, cfg.in_channels, 3, padding=1)

    def forward(self, z_BChw: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z_BChw))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # raw (unclamped) image


# ----------------------------------------------------------------------------- tokenizer
class Tokenizer(nn.Module):
    """Encoder + multi-granularity quantizer + decoder. State-dict keys: encoder.*, decoder.*, quantize.*."""

    def __init__(self, cfg: TokenizerConfig | str = "nvg-ae-f16"):
        super().__init__()
        self.config = TokenizerConfig.from_name(cfg) if isinstance(cfg, str) else cfg
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.quantize = MultiGranularityQuantizer(self.config.codebook_size, self.config.latent_channels,
                                                  (self.config.latent_size,) * 2, self.config.beta, self.config.phi_ratio)

    @property
    def num_stages(self) -> int:
        return self.quantize.num_stages

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, ema: bool | None = None, device="cpu") -> Tokenizer:
        """A tokenizer written by `python -m nvg.train tokenizer`, in eval mode: a checkpoint directory or a run
        directory (its newest valid checkpoint); EMA weights when the run kept them (unless ema=False)."""
        from . import checkpoint

        return checkpoint.load_model(path, "tokenizer", lambda m: cls(TokenizerConfig.from_dict(m)), ema, device)[0]

    def check_images(self, x: Tensor) -> None:
        """Raise a clear error unless x is a finite float batch (B, in_channels, image_size, image_size)."""
        c, s = self.config.in_channels, self.config.image_size
        if not torch.is_tensor(x) or x.dim() != 4:
            raise ValueError(f"expected images (B, {c}, {s}, {s}), got {getattr(x, 'shape', type(x))}")
        if x.shape[1] != c:
            raise ValueError(f"expected {c} image channels, got {x.shape[1]} (shape {tuple(x.shape)})")
        if tuple(x.shape[2:]) != (s, s):
            raise ValueError(f"this tokenizer takes {s}x{s} images, got {x.shape[2]}x{x.shape[3]}; "
                             "resize or crop them, or use a preset built for that size")
        if not x.dtype.is_floating_point:
            raise TypeError(f"expected float images in [-1, 1], got dtype {x.dtype} (convert uint8 with x/127.5-1)")
        if not torch.isfinite(x).all():
            raise ValueError("images contain NaN or Inf values")

    def encode_latent(self, x: Tensor) -> Tensor:
        """Continuous encoder output f (B, C, h, w)."""
        self.check_images(x)
        return self.encoder(x)

    @torch.no_grad()
    def encode(self, x: Tensor) -> VGS:
        """Images (B, 3, H, W) in [-1, 1] -> visual granularity sequence (tokens, label maps, canvases, f_hat)."""
        return self.quantize.encode(self.encode_latent(x))

    def decode_latent(self, f: Tensor) -> Tensor:
        """Latent (B, C, h, w) or (B, N, C) -> images (B, 3, H, W) clamped to [-1, 1]."""
        C, s = self.config.latent_channels, self.config.latent_size
        if f.dim() == 3:
            if f.shape[1:] != (s * s, C):
                raise ValueError(f"expected a latent (B, {s * s}, {C}), got {tuple(f.shape)}")
            f = f.transpose(1, 2).reshape(f.shape[0], C, s, s)
        if f.dim() != 4 or f.shape[1:] != (C, s, s):
            raise ValueError(f"expected a latent (B, {C}, {s}, {s}) or (B, {s * s}, {C}), got {tuple(f.shape)}")
        return self.decoder(f).clamp(-1, 1)

    @torch.no_grad()
    def decode(self, vgs_or_fhat: VGS | Tensor) -> Tensor:
        """A VGS (decoded from its tokens) or a latent f_hat -> images in [-1, 1]."""
        if isinstance(vgs_or_fhat, VGS):
            f_hat = self.quantize.decode_tokens(vgs_or_fhat.tokens, vgs_or_fhat.labels)
            return self.decode_latent(f_hat)
        return self.decode_latent(vgs_or_fhat)

    @torch.no_grad()
    def decode_stages(self, vgs: VGS) -> list[Tensor]:
        """Images decoded after stage 0, 1, ..., K (the canvas after each stage): K+1 tensors (B, 3, H, W)."""
        outs = [self.decode_latent(vgs.canvas[:, i]) for i in range(1, vgs.num_stages)]
        return outs + [self.decode_latent(vgs.f_hat)]

    def forward(self, x: Tensor, ibq: bool = False) -> tuple[Tensor, Tensor, dict]:
        """Training pass: (reconstruction in [-1, 1], vq_loss, quantizer info incl. `latent` f)."""
        f = self.encode_latent(x)
        f_hat_st, vq_loss, info = self.quantize(f, ibq=ibq)
        info["latent"] = f
        return self.decode_latent(f_hat_st.to(f.dtype)), vq_loss, info


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["TokenizerConfig", "PRESETS", "Tokenizer", "VGS", "Encoder", "Decoder", "count_parameters"]
