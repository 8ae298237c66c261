"""VAR's self-attention: L2-normalised q and k with a learned per-head scale, BEiT-style q/v biases.

Modified from: github.com/FoundationVision/VAR models/basic_var.py (SelfAttention, attn_l2_norm=True).
Keys follow the released checkpoints: `mat_qkv.weight` (no bias), `q_bias`, `v_bias`, `zero_k_bias` (buffer),
`scale_mul_1H11`, `proj.weight/bias`.

    q, k, v = x W_qkv + (q_bias, 0, v_bias)
    q <- normalize(q) * exp(min(scale_mul, ln 100))      per head, initialised to 4
    k <- normalize(k)
    out = softmax(q k^T + mask) v                         softmax scale 1 (the learned scale replaces 1/sqrt(d))

Training attends block-causally (position i sees j iff scale(j) <= scale(i)) through `block_attention`; sampling
writes each scale's k, v into a static `KVCache` (block ids = scale ids) and attends to the filled prefix.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def block_attention(q_BHLD: Tensor, k_BHSD: Tensor, v_BHSD: Tensor, q_block_L: Tensor, k_block_S: Tensor,
                    scale: float | None = None, check: bool = True) -> Tensor:
    """softmax(scale * q k^T + bias) v with bias[i, j] = 0 if k_block[j] <= q_block[i] else -inf.

    Stand-in with the signature of nvg.kernels.block_attention (PyTorch SDPA with a boolean mask) until the
    kernel package is committed; `check` is accepted for the same signature.
    """
    mask_LS = k_block_S[None, :] <= q_block_L[:, None]
    return F.scaled_dot_product_attention(q_BHLD, k_BHSD, v_BHSD, attn_mask=mask_LS, scale=scale)


class KVCache(nn.Module):
    """Stand-in with the interface of nvg.kernels.KVCache: static (B, H, max_len, D) keys and values."""

    def __init__(self, batch_size: int, num_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device=None, block_ids: Tensor | None = None):
        super().__init__()
        shape = (batch_size, num_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        ids = torch.arange(max_len) if block_ids is None else block_ids
        self.register_buffer("block_ids", ids.to(device), persistent=False)

    def append(self, k_new: Tensor, v_new: Tensor, offset: int) -> None:
        """Writes k_new, v_new (B, H, l, D) at positions [offset, offset + l)."""
        stop = offset + k_new.shape[2]
        if k_new.shape[:2] != self.k.shape[:2] or k_new.shape[3] != self.k.shape[3] or stop > self.k.shape[2]:
            raise ValueError(f"KVCache of shape {tuple(self.k.shape)} cannot take {tuple(k_new.shape)} at "
                             f"positions [{offset}, {stop})")
        self.k[:, :, offset:stop].copy_(k_new)
        self.v[:, :, offset:stop].copy_(v_new)

    def attend(self, q_new: Tensor, offset: int, scale: float | None = None) -> Tensor:
        """Queries at positions [offset, offset + l) over the cached keys [0, offset + l), block-causally."""
        stop = offset + q_new.shape[2]
        return block_attention(q_new, self.k[:, :, :stop], self.v[:, :, :stop], self.block_ids[offset:stop],
                               self.block_ids[:stop], scale=scale, check=False)


class SelfAttention(nn.Module):
    def __init__(self, width: int, num_heads: int):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.mat_qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width))  # no key bias; kept as a buffer (checkpoint key)
        # log of the per-head scale that multiplies the unit-norm q; exp is capped at 100
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
        self.max_log_scale = math.log(100.0)
        self.proj = nn.Linear(width, width)

    def forward(self, x_BLC: Tensor, q_block_L: Tensor | None = None, k_block_L: Tensor | None = None,
                cache: KVCache | None = None, start: int = 0) -> Tensor:
        """Block-causal attention over x (training: give q_block_L and k_block_L), or one scale against the cache
        (sampling: give `cache` and the position `start` of x's first token)."""
        B, L, C = x_BLC.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv_BL3HD = F.linear(x_BLC, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q_BHLD, k_BHLD, v_BHLD = qkv_BL3HD.permute(2, 0, 3, 1, 4).unbind(0)
        # normalize computes in fp32 under autocast; cast back so q, k, v share the compute dtype
        head_scale_1H11 = self.scale_mul_1H11.clamp(max=self.max_log_scale).exp()
        q_BHLD = F.normalize(q_BHLD, dim=-1).mul(head_scale_1H11).to(v_BHLD.dtype)
        k_BHLD = F.normalize(k_BHLD, dim=-1).to(v_BHLD.dtype)
        if cache is not None:
            cache.append(k_BHLD, v_BHLD, start)
            o_BHLD = cache.attend(q_BHLD, start, scale=1.0)
        else:  # block ids come from the model's own buffer: valid by construction, no per-call check
            o_BHLD = block_attention(q_BHLD, k_BHLD, v_BHLD, q_block_L, k_block_L, scale=1.0, check=False)
        return self.proj(o_BHLD.transpose(1, 2).reshape(B, L, C))
