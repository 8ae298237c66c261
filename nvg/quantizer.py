"""Multi-granularity residual quantizer of NVG (spec §1.2, §2.2; official `VQ2` in nvg/modules/vqvae/quantize.py).

The encoder latent f (B, C, h, w), N = h*w = 2**K positions, is clustered once into K+1 nested label maps
(stage i: 2**i equal-size clusters). Stage i then quantizes the per-cluster mean of the current residual to its
nearest code, paints the code back onto every member position, refines it with a per-stage 3x3 conv phi_i and
adds it to the canvas. The visual granularity sequence (VGS) is the list of per-stage tokens plus the label maps.

Modified from: github.com/Yikai-Wang/nvg (VQ2, Phi, PhiNonShared), itself built on VAR's multi-scale quantizer.
State-dict keys match the official ones: `embedding.weight`, `quant_resi.{i}.weight/bias`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .ops import NonFiniteError


@dataclass
class VGS:
    """Visual granularity sequence of a batch, K+1 stages, N = 2**K latent positions, C latent channels."""

    tokens: list[Tensor]  # stage i: long [B, 2**i], token id of each cluster (slot = cluster label)
    labels: Tensor  # long [B, K+1, N] nested label maps (labels[:, i] // 2 == labels[:, i-1])
    canvas: Tensor  # float [B, K+1, N, C] generator input of stage i = sum of stages < i (canvas[:, 0] = 0)
    f_hat: Tensor  # float [B, N, C] final quantized latent (sum of all stages)

    @property
    def num_stages(self) -> int:
        return len(self.tokens)

    def token_map(self) -> Tensor:
        """Token id of every position at every stage: long [B, K+1, N] (tokens gathered by the label maps)."""
        return torch.stack([t.gather(1, self.labels[:, i]) for i, t in enumerate(self.tokens)], 1)

    def tokens_cat(self) -> Tensor:
        """All stages' cluster tokens concatenated: long [B, 2**(K+1) - 1]; stage i at [2**i - 1, 2**(i+1) - 1)."""
        return torch.cat(self.tokens, 1)

    def to(self, device) -> VGS:
        return VGS([t.to(device) for t in self.tokens], self.labels.to(device), self.canvas.to(device),
                   self.f_hat.to(device))


class Phi(nn.Conv2d):
    """Stage refiner phi(h) = h + ratio * conv3x3(h) (VAR's `Phi`; ratio 0.5 in NVG)."""

    def __init__(self, dim: int, ratio: float = 0.5):
        super().__init__(dim, dim, kernel_size=3, stride=1, padding=1)
        self.ratio = ratio

    def forward(self, h_BChw: Tensor) -> Tensor:
        return h_BChw + super().forward(h_BChw) * self.ratio


def cluster_mean(x_BNC: Tensor, labels_BN: Tensor, n: int) -> Tensor:
    """Per-cluster mean of x (differentiable): float [B, n, C]; empty clusters get 0."""
    B, N, C = x_BNC.shape
    sums = x_BNC.new_zeros(B, n, C).scatter_add(1, labels_BN.unsqueeze(-1).expand(B, N, C), x_BNC)
    counts = torch.zeros(B, n, 1, device=x_BNC.device, dtype=x_BNC.dtype)
    counts = counts.scatter_add(1, labels_BN.unsqueeze(-1), torch.ones_like(x_BNC[..., :1]))
    return sums / counts.clamp(min=1)


class MultiGranularityQuantizer(nn.Module):
    """Codebook (V, C) shared by all stages + one non-shared refiner phi_i per stage.

    Args:
        codebook_size: V (4096 in NVG).
        dim: C, the latent channels (32 in NVG).
        latent_hw: (h, w) of the latent; h*w must be a power of two, it fixes K = log2(h*w) and K+1 stages.
        beta: weight of the commitment term (sg(f_hat) vs f).
        phi_ratio: the 0.5 in phi(h) = h + 0.5 conv(h).
    """

    def __init__(self, codebook_size: int = 4096, dim: int = 32, latent_hw: tuple[int, int] = (16, 16),
                 beta: float = 0.25, phi_ratio: float = 0.5):
        super().__init__()
        h, w = latent_hw
        N = h * w
        if N < 1 or N & (N - 1):
            raise ValueError(f"latent h*w must be a power of two for the pairwise clustering, got {h}x{w} = {N}")
        self.codebook_size, self.dim, self.latent_hw, self.beta = codebook_size, dim, (h, w), beta
        self.K = int(math.log2(N))
        self.num_stages = self.K + 1
        # construction order as official (refiners, then codebook): same RNG draws for the same seed
        self.quant_resi = nn.ModuleList([Phi(dim, phi_ratio) for _ in range(self.num_stages)])
        self.embedding = nn.Embedding(codebook_size, dim)
        self.embedding.weight.data.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)

    # ------------------------------------------------------------------ helpers
    def _check_latent(self, f_BChw: Tensor) -> None:
        if f_BChw.dim() != 4:
            raise ValueError(f"quantizer expects a latent (B, C, h, w), got shape {tuple(f_BChw.shape)}")
        B, C, H, W = f_BChw.shape
        if C != self.dim or (H, W) != self.latent_hw:
            raise ValueError(f"quantizer expects (B, {self.dim}, {self.latent_hw[0]}, {self.latent_hw[1]}) latents, "
                             f"got {tuple(f_BChw.shape)}")
        if not f_BChw.dtype.is_floating_point:
            raise TypeError(f"quantizer expects a float latent, got {f_BChw.dtype}")

    def _to_BChw(self, x_BNC: Tensor) -> Tensor:
        B, N, C = x_BNC.shape
        return x_BNC.transpose(1, 2).reshape(B, C, *self.latent_hw)

    def _to_BNC(self, x_BChw: Tensor) -> Tensor:
        B, C = x_BChw.shape[:2]
        return x_BChw.reshape(B, C, -1).transpose(1, 2)

    def _phi(self, stage: int, h_BNC: Tensor) -> Tensor:
        return self._to_BNC(self.quant_resi[stage](self._to_BChw(h_BNC)))

    def embed_stage(self, stage: int, ids_Bn: Tensor, labels_BN: Tensor) -> Tensor:
        """Content of one stage painted on the latent grid: phi_stage(E[ids[labels]]), float [B, N, C].

        Args:
            stage: 0..K.
            ids_Bn: long [B, 2**stage] token id of each cluster.
            labels_BN: long [B, N] label map of this stage (values in [0, 2**stage)).
        """
        if not 0 <= stage < self.num_stages:
            raise ValueError(f"stage must be in [0, {self.num_stages - 1}], got {stage}")
        code_BnC = self.embedding(ids_Bn)
        code_BNC = code_BnC.gather(1, labels_BN.unsqueeze(-1).expand(-1, -1, self.dim))
        return self._phi(stage, code_BNC)

    # ------------------------------------------------------------------ training
    def forward(self, f_BChw: Tensor, ibq: bool = False, validate: bool = True) -> tuple[Tensor, Tensor, dict]:
        """Quantize for training.

        Returns (f_hat_st, vq_loss, info): f_hat_st (B, C, h, w) = f + sg(f_hat - f) (straight-through: the decoder's
        gradient reaches the encoder, not the codebook); vq_loss = mean over stages of
        beta * mse(sg(f_hat_<=i), f) + mse(f_hat_<=i, sg(f)); info: `stage_losses` (K+1,), `tokens` (list of
        [B, 2**i]), `labels` [B, K+1, N].
        With `ibq` (first-epoch codebook warm-up), each cluster's code is a straight-through one-hot of
        softmax(max(d) - d) over the code distances d, so every code receives gradient.
        `validate` checks once that the latent is finite (one host sync); the ops then skip their own checks.
        """
        self._check_latent(f_BChw)
        with torch.autocast(f_BChw.device.type, enabled=False):
            f = f_BChw.float()
            f_ng = f.detach()
            if validate:
                self._check_finite(f_ng)
            B, C = f.shape[:2]
            f_ng_BNC = self._to_BNC(f_ng).contiguous()
            labels = ops.granularity_cluster(f_ng_BNC, validate=False)
            E = self.embedding.weight
            prepared = None if ibq else ops.prepare_codebook(E.detach())  # once for the K+1 stages
            rest_BNC = f_ng_BNC.clone()
            f_hat = torch.zeros_like(f)
            losses, tokens = [], []
            for si in range(self.num_stages):
                lab = labels[:, si].contiguous()
                n = 2**si
                if ibq:
                    mean_BnC = cluster_mean(rest_BNC, lab, n)
                    d_BnV = mean_BnC.square().sum(-1, keepdim=True) + E.square().sum(-1) - 2 * mean_BnC @ E.T
                    prob = F.softmax(d_BnV.amax(-1, keepdim=True) - d_BnV, dim=-1)
                    ids = prob.argmax(-1)
                    one_hot = F.one_hot(ids, self.codebook_size).to(prob.dtype) - prob.detach() + prob
                    code_BnC = one_hot @ E
                else:
                    ids, _ = ops.cluster_quantize(rest_BNC.detach(), lab, n, E.detach(), prepared, validate=False)
                    code_BnC = self.embedding(ids)
                tokens.append(ids)
                h_BNC = self._phi(si, code_BnC.gather(1, lab.unsqueeze(-1).expand(-1, -1, C)))
                f_hat = f_hat + self._to_BChw(h_BNC)
                # the argmin path has no gradient through the residual; IBQ's softmax does
                rest_BNC = rest_BNC - (h_BNC if ibq else h_BNC.detach())
                losses.append(F.mse_loss(f_hat.detach(), f) * self.beta + F.mse_loss(f_hat, f_ng))
            stage_losses = torch.stack(losses)
            f_hat_st = (f_hat.detach() - f_ng) + f
        return f_hat_st, stage_losses.mean(), {"stage_losses": stage_losses.detach(), "tokens": tokens,
                                               "labels": labels}

    # ------------------------------------------------------------------ inference
    @staticmethod
    def _check_finite(f: Tensor) -> None:
        if not torch.isfinite(f).all():
            raise NonFiniteError("quantizer: the latent contains NaN or Inf values")

    @torch.no_grad()
    def encode(self, f_BChw: Tensor, validate: bool = True) -> VGS:
        """Latent (B, C, h, w) -> visual granularity sequence (clustering + per-stage residual quantization).

        `validate` checks once that the latent is finite (one host sync); the ops skip their own checks, so with
        validate=False the whole encode has no host sync and can be captured in a CUDA graph.
        """
        self._check_latent(f_BChw)
        with torch.autocast(f_BChw.device.type, enabled=False):
            f_BNC = self._to_BNC(f_BChw.float()).contiguous()
            if validate:
                self._check_finite(f_BNC)
            B, N, C = f_BNC.shape
            labels = ops.granularity_cluster(f_BNC, validate=False)
            E = self.embedding.weight.float()
            prepared = ops.prepare_codebook(E)  # once for the K+1 stages
            rest = f_BNC.clone()
            f_hat = torch.zeros_like(f_BNC)
            canvas = f_BNC.new_empty(B, self.num_stages, N, C)
            tokens = []
            for si in range(self.num_stages):
                canvas[:, si] = f_hat
                lab = labels[:, si].contiguous()
                ids, _ = ops.cluster_quantize(rest, lab, 2**si, E, prepared, validate=False)
                h = self.embed_stage(si, ids, lab)
                f_hat += h
                rest -= h
                tokens.append(ids)
        return VGS(tokens=tokens, labels=labels, canvas=canvas, f_hat=f_hat)

    @torch.no_grad()
    def decode_tokens(self, tokens: list[Tensor], labels: Tensor, num_stages: int | None = None) -> Tensor:
        """Sum of the stages' contents: f_hat float [B, N, C]. `num_stages` < K+1 stops early (coarser latent)."""
        S = self.num_stages if num_stages is None else num_stages
        if len(tokens) != self.num_stages or labels.shape[1] != self.num_stages:
            raise ValueError(f"expected {self.num_stages} stages of tokens and label maps, got {len(tokens)} and "
                             f"{labels.shape[1]}")
        if not 0 <= S <= self.num_stages:
            raise ValueError(f"num_stages must be in [0, {self.num_stages}], got {S}")
        for i, t in enumerate(tokens):
            if t.shape[1] != 2**i:
                raise ValueError(f"stage {i} must have {2**i} tokens per image, got shape {tuple(t.shape)}")
            if t.numel() and (t.min() < 0 or t.max() >= self.codebook_size):
                raise ValueError(f"stage {i} has token ids outside [0, {self.codebook_size})")
        B, N = labels.shape[0], labels.shape[2]
        f_hat = torch.zeros(B, N, self.dim, device=labels.device, dtype=self.embedding.weight.dtype)
        for si in range(S):
            f_hat += self.embed_stage(si, tokens[si], labels[:, si])
        return f_hat
