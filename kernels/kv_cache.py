"""A static key/value cache for block-structured attention at sampling time.

Per layer, keys and values live in preallocated [B, H, L_max, D] buffers. Each sampling step writes the new block
of keys and values at a given offset and lets the new queries attend over everything written so far, themselves
included, with `block_attention` on views of the buffers (the same kernel, a shorter key range). Nothing grows by
concatenation and no step allocates a cache tensor, so a whole step can be captured in a CUDA graph.

Modified from: gpt-fast's static KVCache (pytorch-labs/gpt-fast, model.py), with block ids in place of a causal mask.
"""
import torch
from torch import Tensor, nn

from .block_attn import block_attention, check_block_ids

__all__ = ["KVCache"]


class KVCache(nn.Module):
    """Keys and values of one attention layer for positions [0, max_len), with a block id per position.

    A query at position i may attend to the cached key at position j iff block_ids[j] <= block_ids[i] and j was
    written (j < offset + new length). block_ids default to arange(max_len), i.e. causal attention; VAR uses the
    scale index of each token, a prefix-LM uses 0 for the prefix and 1 for the rest.

    A new sampling run simply writes from offset 0 again: attention only reads positions below offset + length, so
    there is nothing to reset. Calls must use the full batch_size (allocate per batch size, CFG included).

    Args:
        batch_size, num_heads, max_len, head_dim: buffer shape [B, H, L_max, D].
        dtype, device: of the buffers (keys and values must be appended in this dtype).
        block_ids: int [max_len], non-decreasing; checked once here.
    """

    def __init__(self, batch_size: int, num_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 block_ids: Tensor | None = None):
        super().__init__()
        shape = (batch_size, num_heads, max_len, head_dim)
        if block_ids is None:
            block_ids = torch.arange(max_len)
        if block_ids.shape != (max_len,) or block_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"KVCache: block_ids must be int32/int64 of shape [{max_len}], "
                             f"got {block_ids.dtype} {tuple(block_ids.shape)}")
        check_block_ids(block_ids, block_ids)  # non-decreasing (every token then sees itself)
        # Buffers move with the model (.to(device)) but are not saved in checkpoints.
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("block_ids", block_ids.to(device), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def _check(self, name: str, x: Tensor, offset: int) -> None:
        B, H, L_max, D = self.k.shape
        if x.dim() != 4 or x.shape[0] != B or x.shape[1] != H or x.shape[3] != D:
            raise ValueError(f"KVCache: {name} must be [{B}, {H}, L, {D}], got {tuple(x.shape)}")
        if x.dtype != self.k.dtype or x.device != self.k.device:
            raise ValueError(f"KVCache: {name} is {x.dtype} on {x.device}, the cache {self.k.dtype} on {self.k.device}")
        if not 0 <= offset or offset + x.shape[2] > L_max:
            raise ValueError(f"KVCache: positions [{offset}, {offset + x.shape[2]}) of {name} fall outside "
                             f"[0, {L_max})")

    def append(self, k_new: Tensor, v_new: Tensor, offset: int) -> None:
        """Write k_new, v_new [B, H, L, D] at positions [offset, offset + L) (in place, no allocation)."""
        self._check("k_new", k_new, offset)
        self._check("v_new", v_new, offset)
        if k_new.shape != v_new.shape:
            raise ValueError(f"KVCache: k_new {tuple(k_new.shape)} and v_new {tuple(v_new.shape)} differ")
        end = offset + k_new.shape[2]
        self.k[:, :, offset:end].copy_(k_new)
        self.v[:, :, offset:end].copy_(v_new)

    def attend(self, q_new: Tensor, offset: int, scale: float | None = None) -> Tensor:
        """Attention of the queries at positions [offset, offset + L) over cached keys [0, offset + L).

        Args: q_new [B, H, L, D] in the cache's dtype; the keys and values at these positions must have been
        appended. Returns [B, H, L, D]. Equal to full recomputation over the sequence, restricted to the new rows.
        """
        self._check("q_new", q_new, offset)
        end = offset + q_new.shape[2]
        # block ids were checked at construction: skip the per-call host sync (and keep the step capturable)
        return block_attention(q_new, self.k[:, :, :end], self.v[:, :, :end], self.block_ids[offset:end],
                               self.block_ids[:end], scale=scale, check=False)
