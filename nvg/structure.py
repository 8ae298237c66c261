"""Hierarchical structure embedding of NVG label maps (paper App. A.3, Eq. 6-7; official `structure_int_to_feat`).

A label s at stage i (s in [0, 2**i)) is the path from the root of the cluster tree written in i bits, MSB first:
bit j is the split decision taken when going from stage j to stage j+1. The embedding spends one channel per
split (K channels for K+1 stages): 2 for a set bit, 0 for a clear bit, and 1 (the midpoint) for splits not made
yet. It is integer-valued (usable directly as RoPE position ids) and a child's embedding equals its parent's plus
one more decided channel.
"""

from __future__ import annotations

import torch
from torch import Tensor


def structure_embedding(labels_BN: Tensor, stage: int, K: int) -> Tensor:
    """Bit-style structure embedding of the labels of stage `stage`: se_j = 2*bit_{stage-1-j}(s) for j < stage, else 1.

    Args:
        labels_BN: integer label map (..., N) with values in [0, 2**stage).
        stage: the stage the labels belong to, 0 <= stage <= K (stage 0: all ones).
        K: number of channels = number of splits (stages - 1; 8 for a 16x16 latent).
    Returns:
        long (..., N, K) with values in {0, 1, 2}.
    """
    if labels_BN.dtype.is_floating_point or labels_BN.dtype == torch.bool:
        raise TypeError(f"structure_embedding: labels must be an integer tensor, got {labels_BN.dtype}")
    if not 0 <= stage <= K:
        raise ValueError(f"structure_embedding: stage must be in [0, K={K}], got {stage}")
    s = labels_BN.long()
    # shift of channel j is stage-1-j (MSB first); channels j >= stage are padding
    j = torch.arange(K, device=s.device)
    shift = (stage - 1 - j).clamp(min=0)
    bits = (s.unsqueeze(-1) >> shift) & 1
    return torch.where(j < stage, 2 * bits, torch.ones_like(bits))


def labels_from_structure(embedding_BNK: Tensor, stage: int) -> Tensor:
    """Inverse of `structure_embedding`: s = sum_{j<stage} (se_j / 2) * 2**(stage-1-j) (paper Eq. 7).

    Args:
        embedding_BNK: (..., N, K) embedding with channels in {0, 1, 2} (integer or float); only channels j < stage
            are read, a channel counts as a set bit when it is > 1.
        stage: the stage to decode, 0 <= stage <= K.
    Returns:
        long (..., N) labels in [0, 2**stage).
    """
    K = embedding_BNK.shape[-1]
    if not 0 <= stage <= K:
        raise ValueError(f"labels_from_structure: stage must be in [0, K={K}], got {stage}")
    bits = (embedding_BNK[..., :stage] > 1).long()
    weights = 2 ** torch.arange(stage - 1, -1, -1, device=embedding_BNK.device)
    return (bits * weights).sum(-1)


# ----------------------------------------------------------------------------------------------------------------------
# Label-map functions used by the generator and sampler: nesting checks, RoPE ids, balanced splits.


def check_nested(labels_BSN: Tensor, name: str = "labels") -> None:
    """Raise a clear ValueError unless `labels_BSN` (B, S, N) are nested equal-size label maps of stages 0..S-1.

    Stage i must have values in [0, 2**i), every cluster exactly N / 2**i positions, and labels[:, i] // 2 ==
    labels[:, i-1] (child 2p / 2p+1 of parent p). N must be a power of two with N >= 2**(S-1).
    """
    if labels_BSN.dim() != 3:
        raise ValueError(f"{name} must be (B, stages, N), got shape {tuple(labels_BSN.shape)}")
    if labels_BSN.dtype.is_floating_point or labels_BSN.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {labels_BSN.dtype}")
    B, S, N = labels_BSN.shape
    if N & (N - 1) or N < 2 ** (S - 1):
        raise ValueError(f"{name}: N = {N} positions cannot hold {S} stages of equal halves")
    lab = labels_BSN.long()
    for i in range(S):
        n = 2**i
        li = lab[:, i]
        if li.min() < 0 or li.max() >= n:
            raise ValueError(f"{name}: stage {i} has labels outside [0, {n}) (min {li.min().item()}, max "
                             f"{li.max().item()})")
        counts = torch.zeros(B, n, dtype=torch.long, device=li.device).scatter_add_(1, li, torch.ones_like(li))
        if (counts != N // n).any():
            b, c = (counts != N // n).nonzero()[0].tolist()
            raise ValueError(f"{name}: stage {i} is not equal-sized: cluster {c} of sample {b} has "
                             f"{counts[b, c].item()} positions, expected {N // n}")
        if i > 0 and (li // 2 != lab[:, i - 1]).any():
            b, p = (li // 2 != lab[:, i - 1]).nonzero()[0].tolist()
            raise ValueError(f"{name}: stage {i} is not nested in stage {i - 1}: sample {b}, position {p} has label "
                             f"{li[b, p].item()} but its parent label is {lab[b, i - 1, p].item()} (need label // 2)")


def rope_ids_content(labels_BN: Tensor, stage: int, K: int, grid_hw: tuple[int, int]) -> Tensor:
    """RoPE ids of the content pass (B, 1+N, K+3): row 0 (class token) all 1; rows 1..N = [0, se(s, stage), row,
    col]."""
    B, N = labels_BN.shape
    h, w = grid_hw
    if h * w != N:
        raise ValueError(f"label map has {N} positions, grid is {h}x{w}")
    p = torch.arange(N, device=labels_BN.device)
    ids = torch.ones(B, N + 1, K + 3, dtype=torch.long, device=labels_BN.device)
    ids[:, 1:, 0] = 0
    ids[:, 1:, 1:K + 1] = structure_embedding(labels_BN, stage, K)
    ids[:, 1:, K + 1] = p // w
    ids[:, 1:, K + 2] = p % w
    return ids


def rope_ids_structure(content_ids_BLA: Tensor) -> Tensor:
    """RoPE ids of the structure pass (B, 1+2N, K+3) from the content ids of the same stage: class token, canvas tokens
    (type 2) and noisy-structure tokens (type 0), both with the stage's structure ids and grid positions."""
    ids = torch.cat([content_ids_BLA, content_ids_BLA[:, 1:]], 1)
    N = content_ids_BLA.shape[1] - 1
    ids[:, 1:N + 1, 0] = 2
    return ids


def split_clusters(labels_BN: Tensor, values_BN: Tensor, stage: int, gumbel: bool = False,
                   generator: torch.Generator | None = None) -> Tensor:
    """Split every cluster of stage `stage` into two equal halves: child 2p+1 = the half of parent p's positions with
    the largest scores, child 2p = the rest (official `cluster` / `gumbel_topk`).

    Scores: p_j = (clamp(v_j, -1, 1) + 1) normalised over the parent's positions; with `gumbel`, log(p_j + 1e-8)
    + Gumbel noise (sampled from `generator`). Positions are grouped by a stable sort of the labels.
    Args:
        labels_BN: long (B, N) nested labels of stage `stage` (2**stage equal clusters).
        values_BN: float (B, N) predicted structure channel `stage` (about -1 .. 1).
    Returns:
        long (B, N) labels of stage + 1.
    """
    B, N = labels_BN.shape
    n = 2**stage
    if values_BN.shape != labels_BN.shape:
        raise ValueError(f"split_clusters: values {tuple(values_BN.shape)} and labels {tuple(labels_BN.shape)} differ")
    if N % (2 * n):
        raise ValueError(f"split_clusters: {N} positions cannot be split into {2 * n} equal clusters")
    order_BN = torch.argsort(labels_BN, dim=-1, stable=True)
    vals = values_BN.float().gather(1, order_BN).view(B, n, N // n)
    probs = vals.clamp(-1, 1) + 1
    probs = probs / probs.sum(-1, keepdim=True)
    if gumbel:
        u = torch.rand(probs.shape, generator=generator, device=probs.device)
        scores = torch.log(probs + 1e-8) - torch.log(-torch.log(u + 1e-8) + 1e-8)
    else:
        scores = probs
    top = torch.topk(scores, N // (2 * n), dim=-1).indices
    bit = torch.zeros_like(top, dtype=torch.long).new_zeros(B, n, N // n).scatter_(-1, top, 1)
    children = (2 * torch.arange(n, device=labels_BN.device)).view(1, n, 1) + bit
    return torch.empty_like(labels_BN).scatter_(1, order_BN, children.view(B, N))
