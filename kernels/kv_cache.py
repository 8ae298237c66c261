"""A static key/value cache for block-structured attention at sampling time.

Per layer, keys and values live in preallocated [B, H, L_max, D] buffers. Each sampling step writes the new block
of keys and values at a given offset and lets the new queries attend over everything written so far, themselves
included, with `block_attention` on views of the buffers (the same kernel, a shorter key range). Nothing grows by
concatenation and no step allocates a cache tensor, so a whole step can be captured in a CUDA graph.

Modified from: gpt-fast's static KVCache (pytorch-labs/gpt-fast, model.py), with block ids in place of a causal mask.
"""
from bisect import bisect_right

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .block_attn import block_attention, block_mask, check_block_ids

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
        # Buffers move with the model (.to(device)) but are not saved in checkpoints. On the CPU they are laid out
        # position-major ([L_max, B, H, D] memory seen as [B, H, L_max, D]): the written prefix is then one
        # contiguous chunk, which SDPA reads faster. On CUDA the usual [B, H, L_max, D] layout.
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type == "cpu":
            k, v = (torch.zeros((max_len, batch_size, num_heads, head_dim), dtype=dtype).permute(1, 2, 0, 3)
                    for _ in range(2))
        else:
            k, v = (torch.zeros(shape, dtype=dtype, device=device) for _ in range(2))
        self.register_buffer("k", k, persistent=False)
        self.register_buffer("v", v, persistent=False)
        self.register_buffer("block_ids", block_ids.to(device), persistent=False)
        self._host_ids = block_ids.tolist()  # which keys a query range sees, without a device sync
        self._views: dict = {}  # (offset, end) -> buffer views and mask of that range, made once (see _range)

    def _apply(self, fn, recurse=True):
        self._views = {}  # .to() / .cuda() replace the buffers: the cached views would point at the old ones
        return super()._apply(fn, recurse)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def _check(self, name: str, x: Tensor, offset: int) -> None:
        # plain int / dtype comparisons first (this runs on every call of a sampling loop); messages only on failure
        k = self.k
        s, ks = x.shape, k.shape
        if (len(s) == 4 and s[0] == ks[0] and s[1] == ks[1] and s[3] == ks[3] and 0 <= offset
                and offset + s[2] <= ks[2] and x.dtype == k.dtype and x.get_device() == k.get_device()):
            return
        B, H, L_max, D = ks
        if x.dim() != 4 or x.shape[0] != B or x.shape[1] != H or x.shape[3] != D:
            raise ValueError(f"KVCache: {name} must be [{B}, {H}, L, {D}], got {tuple(x.shape)}")
        if x.dtype != k.dtype or x.device != k.device:
            raise ValueError(f"KVCache: {name} is {x.dtype} on {x.device}, the cache {k.dtype} on {k.device}")
        raise ValueError(f"KVCache: positions [{offset}, {offset + x.shape[2]}) of {name} fall outside [0, {L_max})")

    def _range(self, offset: int, end: int) -> tuple:
        """(k, v written at [offset, end), k, v read [0, end), CPU mask or None), made once per range: a sampling
        loop visits the same few ranges over and over, and slicing costs more than the copy at small sizes."""
        r = self._views.get((offset, end))
        if r is None:
            k, v = self.k, self.v
            mask = None
            # the first query of the range sees the fewest keys (ids are non-decreasing): if it sees all of
            # [0, end), every query does and no mask is needed (the common case: one block per call)
            if k.device.type != "cuda" and bisect_right(self._host_ids, self._host_ids[offset]) < end:
                mask = block_mask(self.block_ids[offset:end], self.block_ids[:end])
            r = (k[:, :, offset:end], v[:, :, offset:end], k[:, :, :end], v[:, :, :end], mask)
            self._views[(offset, end)] = r
        return r

    def append(self, k_new: Tensor, v_new: Tensor, offset: int) -> None:
        """Write k_new, v_new [B, H, L, D] at positions [offset, offset + L) (in place, no allocation)."""
        self._check("k_new", k_new, offset)
        if k_new.shape != v_new.shape or v_new.dtype != k_new.dtype or v_new.get_device() != k_new.get_device():
            self._check("v_new", v_new, offset)
            raise ValueError(f"KVCache: k_new {tuple(k_new.shape)} and v_new {tuple(v_new.shape)} differ")
        k_w, v_w = self._range(offset, offset + k_new.shape[2])[:2]
        k_w.copy_(k_new)
        v_w.copy_(v_new)

    def attend(self, q_new: Tensor, offset: int, scale: float | None = None) -> Tensor:
        """Attention of the queries at positions [offset, offset + L) over cached keys [0, offset + L).

        Args: q_new [B, H, L, D] in the cache's dtype; the keys and values at these positions must have been
        appended. Returns [B, H, L, D]. Equal to full recomputation over the sequence, restricted to the new rows.
        CUDA: the Triton block attention on views of the buffers. Elsewhere: SDPA over the written keys only, with a
        boolean mask only for the ranges that need one (made once per range).
        """
        self._check("q_new", q_new, offset)
        end = offset + q_new.shape[2]
        _, _, k, v, mask = self._range(offset, end)
        if q_new.device.type == "cuda":
            # block ids were checked at construction: skip the per-call host sync (and keep the step capturable)
            return block_attention(q_new, k, v, self.block_ids[offset:end], self.block_ids[:end], scale=scale,
                                   check=False)
        if q_new.dtype == torch.float32:
            return F.scaled_dot_product_attention(q_new, k, v, attn_mask=mask, scale=scale)
        return F.scaled_dot_product_attention(q_new.float(), k.float(), v.float(), attn_mask=mask,
                                              scale=scale).to(q_new.dtype)  # fp32 like the reference
