"""VAR's self-attention: L2-normalised q and k with a learned per-head scale, BEiT-style q/v biases.

Modified from: github.com/FoundationVision/VAR models/basic_var.py (SelfAttention, attn_l2_norm=True).
Keys follow the released checkpoints: `mat_qkv.weight` (no bias), `q_bias`, `v_bias`, `zero_k_bias` (buffer),
`scale_mul_1H11`, `proj.weight/bias`.

    q, k, v = x W_qkv + (q_bias, 0, v_bias)
    q <- normalize(q) * exp(min(scale_mul, ln 100))      per head, initialised to 4
    k <- normalize(k)
    out = softmax(q k^T + mask) v                         softmax scale 1 (the learned scale replaces 1/sqrt(d))

Training attends block-causally (position i sees j iff scale(j) <= scale(i)) through `block_attention`; sampling
writes each scale's k, v into the static `nvg.kernels.KVCache` (block ids = scale ids) and attends to the filled
prefix. Both go through the project's Triton block-attention kernel on a GPU (its PyTorch reference on the CPU).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from nvg.kernels import KVCache, block_attention


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
