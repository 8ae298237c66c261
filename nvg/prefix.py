"""Prefix-cacheable structure transformer (the fast variant, GeneratorConfig(structure_attention="prefix")).

Not in the official release: a project variant of the structure transformer f_s whose step-invariant part can be
computed once per stage. The sequence is [class token, N canvas tokens | N noisy structure tokens], block ids 0 | 1:
  - the class and canvas tokens (block 0) attend only to each other; the structure tokens attend to everything
    (`nvg.kernels.block_attention`: Triton forward and backward on CUDA, the SDPA reference on CPU);
  - block 0 is modulated by the class + stage vector alone, block 1 by class + stage + time (same AdaLN weights).
Block 0 is then the same at every step of the flow: the sampler runs it once per stage and keeps its keys and values
in one static `nvg.kernels.KVCache` per block (`PrefixCache`); each step runs only the N structure tokens.

The parameters are exactly the official ones (same names and shapes), but they compute another function: weights of
one variant do not work in the other.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .blocks import ParallelBlock, timestep_embedding
from .kernels import KVCache, block_attention


def prefix_block_ids(prefix: int, length: int, device) -> Tensor:
    """Block ids (length,): 0 for the first `prefix` positions, 1 after."""
    return (torch.arange(length, device=device) >= prefix).to(torch.int32)


def prefix_block(block: ParallelBlock, x_pre: Tensor, vec_pre: Tensor, x_str: Tensor, vec_str: Tensor,
                 freqs: Tensor, ids: Tensor, last: bool = False) -> tuple[Tensor | None, Tensor]:
    """One structure block over [prefix | structure] tokens, recomputed in full (training, and the reference of the
    cached sampler). Returns the new (x_pre, x_str); x_pre is None for the `last` block (its prefix output feeds
    nothing).

    Both parts go through `block_attention` with the variant's block ids, one call each: the prefix queries (block 0)
    see the prefix keys, the structure queries (block 1) see the prefix and the structure keys. Drop path is drawn for
    each part apart.
    """
    P = x_pre.shape[1]
    q0, k0, v0, h0, g0 = block.project(x_pre, vec_pre, freqs[:, :, :P])
    q1, k1, v1, h1, g1 = block.project(x_str, vec_str, freqs[:, :, P:])
    x_pre_out = None
    if not last:
        x_pre_out = block.output(x_pre, block_attention(q0, k0, v0, ids[:P], ids[:P], check=False), h0, g0)
    attn = block_attention(q1, torch.cat([k0, k1], 2), torch.cat([v0, v1], 2), ids[P:], ids, check=False)
    return x_pre_out, block.output(x_str, attn, h1, g1)


def forward_structure_prefix(model, sc, z_BNK: Tensor, t_B: Tensor) -> Tensor:
    """Velocity (B, N, K) of the prefix variant, whole sequence recomputed (`NVGGenerator.forward_structure`)."""
    vec_pre = sc.class_vec_BC
    vec_str = vec_pre + model.structure_time_embed(timestep_embedding(t_B, 64).to(z_BNK.dtype))
    x_pre, x_str = sc.tokens_BLC, model.structure_embed(z_BNK)
    P = x_pre.shape[1]
    ids = prefix_block_ids(P, P + x_str.shape[1], z_BNK.device)
    blocks = model.structure_blocks
    for i, block in enumerate(blocks):
        x_pre, x_str = prefix_block(block, x_pre, vec_pre, x_str, vec_str, sc.freqs, ids, last=i + 1 == len(blocks))
    return model.structure_head(x_str, vec_str)


class PrefixCache(nn.Module):
    """Keys and values of the class + canvas prefix in every structure block, for one batch size (CFG included).

        cache = PrefixCache(model, batch=2 * B)
        cache.fill(sc)              # once per stage: the prefix through all blocks
        v = cache.velocity(z, t)    # every flow step: only the N structure tokens

    `velocity` equals `forward_structure_prefix` on the same inputs. `graph=True` (CUDA only) captures the per-step
    pass in a CUDA graph on its first call after a fill; later calls replay it (inputs are copied into static buffers;
    the returned tensor is overwritten by the next call).
    """

    def __init__(self, model, batch: int, dtype: torch.dtype | None = None, device=None, graph: bool = False):
        super().__init__()
        cfg = model.config
        if cfg.structure_attention != "prefix":
            raise ValueError(f"PrefixCache needs a generator with structure_attention='prefix', got "
                             f"{cfg.structure_attention!r}")
        device = torch.device(device) if device is not None else next(model.parameters()).device
        if graph and device.type != "cuda":
            raise ValueError("PrefixCache: graph=True needs a CUDA device")
        self.model, self.batch, self.graph = model, batch, graph
        N = cfg.num_positions
        self.P, self.N = 1 + N, N
        ids = prefix_block_ids(self.P, self.P + N, device)
        H, D = cfg.structure_heads, cfg.structure_width // cfg.structure_heads
        dtype = dtype or torch.float32
        self.caches = nn.ModuleList([KVCache(batch, H, self.P + N, D, dtype, device, ids)
                                     for _ in model.structure_blocks])
        self._static = None  # (vec, freqs, z, t) inputs of the captured step
        self._cuda_graph = None
        self._out = None

    @property
    def dtype(self) -> torch.dtype:
        return self.caches[0].k.dtype

    def fill(self, sc) -> None:
        """Run the class + canvas prefix of one stage through the blocks, keeping every block's keys and values."""
        x, vec = sc.tokens_BLC, sc.class_vec_BC
        if x.shape[:2] != (self.batch, self.P):
            raise ValueError(f"PrefixCache: prefix tokens must be ({self.batch}, {self.P}, C), got {tuple(x.shape)}")
        freqs = sc.freqs[:, :, :self.P]
        blocks = self.model.structure_blocks
        for i, (block, cache) in enumerate(zip(blocks, self.caches)):
            q, k, v, h, gate = block.project(x, vec, freqs)
            cache.append(k, v, 0)
            if i + 1 < len(blocks):  # the last block's prefix output feeds nothing
                x = block.output(x, cache.attend(q, 0), h, gate)
        freqs_str = sc.freqs[:, :, self.P:]
        if not self.graph:
            self._static = (vec, freqs_str)
            return
        if self._static is None:
            self._static = (vec.clone(), freqs_str.clone())
        else:
            self._static[0].copy_(vec)
            self._static[1].copy_(freqs_str)

    def _step(self, vec_pre: Tensor, freqs: Tensor, z_BNK: Tensor, t_B: Tensor) -> Tensor:
        m = self.model
        vec = vec_pre + m.structure_time_embed(timestep_embedding(t_B, 64).to(z_BNK.dtype))
        x = m.structure_embed(z_BNK)
        for block, cache in zip(m.structure_blocks, self.caches):
            q, k, v, h, gate = block.project(x, vec, freqs)
            cache.append(k, v, self.P)
            x = block.output(x, cache.attend(q, self.P), h, gate)
        return m.structure_head(x, vec)

    def velocity(self, z_BNK: Tensor, t_B: Tensor) -> Tensor:
        """Velocity (B, N, K) of the structure tokens z at times t, against the prefix of the last `fill`."""
        if self._static is None:
            raise RuntimeError("PrefixCache.velocity before fill")
        if not self.graph:
            return self._step(*self._static, z_BNK, t_B)
        if self._cuda_graph is None:
            self._z, self._t = z_BNK.clone(), t_B.clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up outside the capture (allocations, Triton compilation)
                self._step(*self._static, self._z, self._t)
            torch.cuda.current_stream().wait_stream(stream)
            self._cuda_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._cuda_graph):
                self._out = self._step(*self._static, self._z, self._t)
        self._z.copy_(z_BNK)
        self._t.copy_(t_B)
        self._cuda_graph.replay()
        return self._out
