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
