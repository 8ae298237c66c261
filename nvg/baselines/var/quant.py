"""Multi-scale residual vector quantizer of VAR (paper §3.2, Algorithms 1 and 2).

Modified from: github.com/FoundationVision/VAR models/quant.py (VectorQuantizer2, Phi, PhiPartiallyShared).
State-dict keys follow the released checkpoint: `embedding.weight`, `quant_resi.qresi_ls.{i}.weight/bias`,
`ema_vocab_hit_SV`.

A latent f (B, C, H, H) is quantized in K = len(patch_nums) residual steps, from a 1x1 token map up to H x H:
    r_k  = argmin_v || area_down(f - f_hat, pn_k) - e_v ||^2            (B, pn_k^2) token ids
    h_k  = phi_k(bicubic_up(E[r_k], H))                                 (the last scale is not resized)
    f_hat += h_k
The same codebook E (V, C) serves every scale. phi(h) = (1 - a) h + a conv3x3(h), a = 0.5; the K scales share
`phi_count` convs: scale k uses the conv whose tick is nearest to k / (K - 1).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class Phi(nn.Conv2d):
    """phi(h) = (1 - ratio) * h + ratio * conv3x3(h), channels preserved."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, kernel_size=3, padding=1)
        self.ratio = ratio

    def forward(self, h_BChw: Tensor) -> Tensor:
        return h_BChw.mul(1 - self.ratio) + super().forward(h_BChw).mul(self.ratio)


def phi_index_per_scale(num_scales: int, phi_count: int) -> list[int]:
    """Index of the shared phi conv used at each scale (released rule; [0,0,1,1,1,2,2,3,3,3] for 10 scales, 4 convs).

    The ticks are linspace(1/(3K), 1 - 1/(3K), K) for K = 4 convs and linspace(1/(2K), 1 - 1/(2K), K) otherwise;
    scale k picks argmin |tick - k/(num_scales-1)|. Evaluated with numpy float64, as released, because some scales
    sit exactly halfway between two ticks and the rounding decides.
    """
    K = phi_count
    ticks = np.linspace(1 / 3 / K, 1 - 1 / 3 / K, K) if K == 4 else np.linspace(1 / 2 / K, 1 - 1 / 2 / K, K)
    return [int(np.argmin(np.abs(ticks - k / (num_scales - 1)))) for k in range(num_scales)]


class PhiPartiallyShared(nn.Module):
    """Holds the `phi_count` convs (key `qresi_ls`); `self[k]` is the conv used at scale k."""

    def __init__(self, channels: int, ratio: float, phi_count: int, num_scales: int):
        super().__init__()
        self.qresi_ls = nn.ModuleList([Phi(channels, ratio) for _ in range(phi_count)])
        self.index_per_scale = phi_index_per_scale(num_scales, phi_count)

    def __getitem__(self, scale: int) -> Phi:
        return self.qresi_ls[self.index_per_scale[scale]]


class MultiScaleQuantizer(nn.Module):
    """Residual quantizer over the scales `patch_nums` (the last one must equal the latent side)."""

    def __init__(self, vocab_size: int, channels: int, patch_nums: tuple[int, ...], phi_count: int = 4,
                 phi_ratio: float = 0.5, beta: float = 0.25):
        super().__init__()
        self.vocab_size, self.channels, self.patch_nums = vocab_size, channels, tuple(patch_nums)
        self.beta = beta  # commitment weight of the VQ loss (VAE training only)
        self.embedding = nn.Embedding(vocab_size, channels)
        self.quant_resi = PhiPartiallyShared(channels, phi_ratio, phi_count, len(self.patch_nums))
        # Per-scale codebook usage (kept by VAE training; stored in the released checkpoint).
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.patch_nums), vocab_size))

    @property
    def side(self) -> int:
        return self.patch_nums[-1]

    # ---------------------------------------------------------------------------------------------------------
    # helpers
    def nearest_code(self, z_NC: Tensor) -> Tensor:
        """argmin_v ||z - e_v||^2 per row, long (N,). Same expression and summation order as released (ties)."""
        E_VC = self.embedding.weight.detach()
        d_NV = z_NC.square().sum(1, keepdim=True) + E_VC.square().sum(1)
        d_NV.addmm_(z_NC, E_VC.T, alpha=-2, beta=1)
        return d_NV.argmin(1)

    def _upsampled_residual(self, scale: int, h_BChw: Tensor) -> Tensor:
        """phi_k(bicubic_up(h)) at the full latent side; the last scale is already full size."""
        if scale != len(self.patch_nums) - 1:
            h_BChw = F.interpolate(h_BChw, size=(self.side, self.side), mode="bicubic")
        return self.quant_resi[scale](h_BChw)

    def indices_to_embedding(self, idx_Bl: Tensor) -> Tensor:
        """Token ids (B, pn^2) -> code vectors (B, C, pn, pn)."""
        B, l = idx_Bl.shape
        pn = round(l**0.5)
        if pn * pn != l:
            raise ValueError(f"token map of length {l} is not square")
        return self.embedding(idx_Bl).transpose(1, 2).reshape(B, self.channels, pn, pn)

    def _check_latent(self, f_BChw: Tensor) -> None:
        if f_BChw.ndim != 4 or f_BChw.shape[1] != self.channels or f_BChw.shape[2:] != (self.side, self.side):
            raise ValueError(f"latent must be (B, {self.channels}, {self.side}, {self.side}), "
                             f"got {tuple(f_BChw.shape)}")

    def _check_indices(self, idx_list: list[Tensor], count: int) -> None:
        if len(idx_list) < count:
            raise ValueError(f"expected {count} token maps, got {len(idx_list)}")
        for k, idx_Bl in enumerate(idx_list[:count]):
            if idx_Bl.ndim != 2 or idx_Bl.shape[1] != self.patch_nums[k] ** 2:
                raise ValueError(f"token map {k} must be (B, {self.patch_nums[k] ** 2}), got {tuple(idx_Bl.shape)}")

    # ---------------------------------------------------------------------------------------------------------
    # encode / decode
    @torch.no_grad()
    def encode(self, f_BChw: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Latent -> (token maps r_1..r_K as (B, pn_k^2) long, cumulative f_hat after each scale (B, C, H, H))."""
        self._check_latent(f_BChw)
        f_rest = f_BChw.detach().float().clone()
        f_hat = torch.zeros_like(f_rest)
        idx_list, f_hat_list = [], []
        B, C, last = f_rest.shape[0], self.channels, len(self.patch_nums) - 1
        for k, pn in enumerate(self.patch_nums):
            z_BChw = F.interpolate(f_rest, size=(pn, pn), mode="area") if k != last else f_rest
            idx_N = self.nearest_code(z_BChw.permute(0, 2, 3, 1).reshape(-1, C))
            idx_Bl = idx_N.view(B, pn * pn)
            h_BChw = self._upsampled_residual(k, self.indices_to_embedding(idx_Bl))
            f_hat.add_(h_BChw)
            f_rest.sub_(h_BChw)
            idx_list.append(idx_Bl)
            f_hat_list.append(f_hat.clone())
        return idx_list, f_hat_list

    def indices_to_fhat(self, idx_list: list[Tensor]) -> Tensor:
        """Token maps of all K scales -> f_hat = sum_k phi_k(up(E[r_k])), (B, C, H, H) fp32."""
        self._check_indices(idx_list, len(self.patch_nums))
        f_hat = torch.zeros(idx_list[0].shape[0], self.channels, self.side, self.side,
                            device=idx_list[0].device, dtype=torch.float32)
        for k, idx_Bl in enumerate(idx_list[: len(self.patch_nums)]):
            f_hat.add_(self._upsampled_residual(k, self.indices_to_embedding(idx_Bl)))
        return f_hat

    def indices_to_var_input(self, idx_list: list[Tensor]) -> Tensor:
        """Teacher-forcing input of the transformer: (B, L - pn_1^2, C) fp32.

        For k = 0..K-2: f_hat += phi_k(up(E[r_k])); append area_down(f_hat, pn_{k+1}) flattened row-major.
        The input of scale k+1 is the cumulative reconstruction, not the residual of scale k alone.
        """
        self._check_indices(idx_list, len(self.patch_nums) - 1)
        B = idx_list[0].shape[0]
        f_hat = torch.zeros(B, self.channels, self.side, self.side, device=idx_list[0].device, dtype=torch.float32)
        inputs = []
        for k in range(len(self.patch_nums) - 1):
            f_hat.add_(self._upsampled_residual(k, self.indices_to_embedding(idx_list[k])))
            pn_next = self.patch_nums[k + 1]
            inputs.append(F.interpolate(f_hat, size=(pn_next, pn_next), mode="area").flatten(2).transpose(1, 2))
        return torch.cat(inputs, 1)

    def next_input(self, scale: int, f_hat: Tensor, h_BChw: Tensor) -> tuple[Tensor, Tensor]:
        """Sampling step: f_hat += phi_k(up(h)); returns (f_hat, area_down(f_hat, pn_{k+1}) or f_hat at the end).

        f_hat (B, C, H, H) is updated in place; h (B, C, pn_k, pn_k) is the code map sampled at scale k.
        """
        f_hat.add_(self._upsampled_residual(scale, h_BChw))
        if scale == len(self.patch_nums) - 1:
            return f_hat, f_hat
        pn_next = self.patch_nums[scale + 1]
        return f_hat, F.interpolate(f_hat, size=(pn_next, pn_next), mode="area")

    # ---------------------------------------------------------------------------------------------------------
    # VAE training
    def forward(self, f_BChw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Training forward: (straight-through f_hat (B, C, H, H), VQ loss (), code hits per scale (K, V)).

        VQ loss = mean over scales k of  beta * mse(sg(f_hat_k), f) + mse(f_hat_k, sg(f)), f_hat_k the cumulative
        reconstruction after scale k. Gradients reach the codebook and the phi convs through the second term and
        the encoder through the straight-through estimator f_hat_st = sg(f_hat - f) + f.
        """
        self._check_latent(f_BChw)
        f = f_BChw.float()
        f_no_grad = f.detach()
        f_rest = f_no_grad.clone()
        f_hat = torch.zeros_like(f_rest)
        B, C, last = f.shape[0], self.channels, len(self.patch_nums) - 1
        loss = f.new_zeros(())
        hits_SV = f.new_zeros(len(self.patch_nums), self.vocab_size)
        for k, pn in enumerate(self.patch_nums):
            z_BChw = F.interpolate(f_rest, size=(pn, pn), mode="area") if k != last else f_rest
            idx_N = self.nearest_code(z_BChw.permute(0, 2, 3, 1).reshape(-1, C))
            hits_SV[k] = idx_N.bincount(minlength=self.vocab_size).float()
            h_BChw = self._upsampled_residual(k, self.indices_to_embedding(idx_N.view(B, pn * pn)))
            f_hat = f_hat + h_BChw
            f_rest = f_rest - h_BChw.detach()
            loss = loss + self.beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f_no_grad)
        loss = loss / len(self.patch_nums)
        f_hat_st = (f_hat.detach() - f_no_grad) + f
        return f_hat_st, loss, hits_SV
