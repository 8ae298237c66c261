"""Adversarial loss for tokenizer training without pretrained weights: a small PatchGAN discriminator trained from
scratch, hinge loss for the discriminator and the non-saturating loss for the autoencoder (official NVG uses a frozen
DINO ViT-S/16 with trainable heads instead; that needs downloaded weights, so it is not the offline default).

Modified from: the PatchGAN of pix2pix / taming-transformers (GroupNorm instead of BatchNorm: the batch statistics
of BatchNorm differ between real and fake halves and across DDP ranks).
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class PatchDiscriminator(nn.Module):
    """Conv 4x4 stride 2 -> (Conv 4x4 stride 2 + GN + LeakyReLU) x (layers-1) -> Conv 4x4 stride 1 -> one logit per
    patch (B, 1, h', w')."""

    def __init__(self, in_channels: int = 3, channels: int = 32, layers: int = 2, groups: int = 8):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = channels
        for _ in range(layers - 1):
            mods += [nn.Conv2d(c, 2 * c, 4, 2, 1), nn.GroupNorm(groups, 2 * c), nn.LeakyReLU(0.2)]
            c *= 2
        mods += [nn.Conv2d(c, c, 3, 1, 1), nn.GroupNorm(groups, c), nn.LeakyReLU(0.2), nn.Conv2d(c, 1, 3, 1, 1)]
        self.net = nn.Sequential(*mods)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat))), halved."""
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def generator_loss(logits_fake: Tensor) -> Tensor:
    """Non-saturating loss softplus(-D(x_hat)) (official NVG `gen_loss_weight` term)."""
    return F.softplus(-logits_fake).mean()
