"""VAR's multi-scale VQVAE: CNN encoder -> quant_conv -> multi-scale residual VQ -> post_quant_conv -> CNN decoder.

Paper: Tian et al., "Visual Autoregressive Modeling", arXiv 2404.02905, §3.2.
Modified from: github.com/FoundationVision/VAR models/vqvae.py.
The released tokenizer `vae_ch160v4096z32.pth` is `VQVAEConfig()` (ch 160, V 4096, Cvae 32) and loads with
`nvg.baselines.var.checkpoint.load_vqvae`. The width `channels` and the scales are parameters, so narrower
configurations (the reference outputs use ch 32) share the same layout and key names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from .autoencoder import Decoder, Encoder
from .quant import MultiScaleQuantizer


@dataclass
class VQVAEConfig:
    channels: int = 160  # base width of the CNN (released: 160); a multiple of 32 (GroupNorm groups)
    channel_multipliers: tuple[int, ...] = (1, 1, 2, 2, 4)  # one level each; all but the last halve the resolution
    num_res_blocks: int = 2  # per encoder level (the decoder has one more)
    vocab_size: int = 4096  # one codebook shared by all scales
    latent_channels: int = 32  # code vector width (VAR's Cvae)
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # token-map sides; last = latent side
    phi_count: int = 4  # convs shared by the scales (released share_quant_resi = 4)
    phi_ratio: float = 0.5  # phi(h) = (1 - ratio) h + ratio conv(h)
    beta: float = 0.25  # commitment weight of the VQ loss

    def __post_init__(self):
        self.channel_multipliers = tuple(self.channel_multipliers)
        self.patch_nums = tuple(self.patch_nums)
        if any(self.channels * m % 32 for m in self.channel_multipliers):
            raise ValueError(f"channels * multiplier must be a multiple of 32 (GroupNorm), got {self.channels} "
                             f"x {self.channel_multipliers}")
        if list(self.patch_nums) != sorted(self.patch_nums) or len(self.patch_nums) < 2:
            raise ValueError(f"patch_nums must increase and have at least 2 scales, got {self.patch_nums}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_multipliers) - 1)

    @property
    def image_size(self) -> int:
        """Image side whose latent side equals the last patch number."""
        return self.patch_nums[-1] * self.downsample

    @classmethod
    def from_name(cls, name: str, **overrides) -> VQVAEConfig:
        """The preset `name` of VQVAE_PRESETS with `overrides` applied (as TokenizerConfig.from_name)."""
        if name not in VQVAE_PRESETS:
            raise ValueError(f"unknown VQVAE preset {name!r}; choose one of {sorted(VQVAE_PRESETS)}")
        return cls(**{**VQVAE_PRESETS[name], **overrides})


VQVAE_PRESETS: dict[str, dict] = {
    # released tokenizer, 256 px, ~109M parameters
    "var-vae-ch160": dict(),
    # the configuration of the reference outputs (same layout, narrower), 256 px, ~4.5M parameters
    "var-vae-ch32": dict(channels=32),
    # CPU-sized tokenizer for 32 px images (8x8 latent, 6 scales); widths, blocks, codebook and latent width as
    # NVG's tiny-ae-32px-8x8, ~1.0M parameters
    "var-vae-tiny": dict(channels=32, channel_multipliers=(1, 2, 2), num_res_blocks=1, vocab_size=1024,
                         latent_channels=16, patch_nums=(1, 2, 3, 4, 6, 8)),
}


class VQVAE(nn.Module):
    def __init__(self, config: VQVAEConfig | None = None):
        super().__init__()
        self.config = config = config or VQVAEConfig()
        widths = dict(channels=config.channels, channel_multipliers=config.channel_multipliers,
                      num_res_blocks=config.num_res_blocks, latent_channels=config.latent_channels)
        self.encoder = Encoder(**widths)
        self.decoder = Decoder(**widths)
        self.quantize = MultiScaleQuantizer(config.vocab_size, config.latent_channels, config.patch_nums,
                                            config.phi_count, config.phi_ratio, config.beta)
        self.quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 3, padding=1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 3, padding=1)

    def _check_image(self, img_B3HW: Tensor) -> None:
        side = self.config.image_size
        if img_B3HW.ndim != 4 or img_B3HW.shape[1:] != (3, side, side):
            raise ValueError(f"images must be (B, 3, {side}, {side}) in [-1, 1], got {tuple(img_B3HW.shape)}")
        if not img_B3HW.is_floating_point():
            raise TypeError(f"images must be floating point in [-1, 1], got {img_B3HW.dtype}")

    def encode_latent(self, img_B3HW: Tensor) -> Tensor:
        """Continuous latent f = quant_conv(encoder(img)), (B, Cvae, h, w)."""
        self._check_image(img_B3HW)
        return self.quant_conv(self.encoder(img_B3HW))

    @torch.no_grad()
    def encode(self, img_B3HW: Tensor) -> list[Tensor]:
        """Images in [-1, 1] -> token maps r_1..r_K, each long (B, pn_k^2) (released `img_to_idxBl`)."""
        return self.quantize.encode(self.encode_latent(img_B3HW))[0]

    def decode_latent(self, f_hat_BChw: Tensor) -> Tensor:
        """Quantized latent f_hat (B, Cvae, h, w) -> images in [-1, 1] (clamped)."""
        return self.decoder(self.post_quant_conv(f_hat_BChw)).clamp(-1, 1)

    @torch.no_grad()
    def decode(self, indices_or_fhat: list[Tensor] | Tensor) -> Tensor:
        """Token maps of all scales (decoded from the codebook; released `idxBl_to_img(same_shape=True,
        last_one=True)`) or a quantized latent f_hat -> images in [-1, 1] (as `Tokenizer.decode`)."""
        if isinstance(indices_or_fhat, Tensor):
            return self.decode_latent(indices_or_fhat)
        return self.decode_latent(self.quantize.indices_to_fhat(list(indices_or_fhat)))

    @torch.no_grad()
    def reconstruct(self, img_B3HW: Tensor, up_to_scale: int | None = None) -> Tensor:
        """Tokenize and decode, optionally keeping only the first `up_to_scale` scales (coarse reconstruction)."""
        _, f_hat_list = self.quantize.encode(self.encode_latent(img_B3HW))
        return self.decode_latent(f_hat_list[(up_to_scale or len(f_hat_list)) - 1])

    def forward(self, img_B3HW: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """VAE training forward: (reconstruction (B, 3, H, W) not clamped, VQ loss (), code hits per scale (K, V))."""
        f_hat_st, vq_loss, hits_SV = self.quantize(self.encode_latent(img_B3HW))
        return self.decoder(self.post_quant_conv(f_hat_st)), vq_loss, hits_SV
