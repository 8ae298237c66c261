"""Cached structure velocity of the prefix variant (GeneratorConfig(structure_attention="prefix"), nvg/prefix.py).

The sampler (nvg/sample/sampler.py) uses it automatically for such a generator: per structure stage, the class +
canvas prefix of the whole (CFG-doubled) batch runs once through the structure blocks into one static KVCache per
block; every solver step then runs only the N structure tokens. With `graphs=True` on CUDA the per-step pass is
captured once per batch size in a CUDA graph and replayed.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..prefix import PrefixCache


class PrefixVelocity:
    """Velocity functions of the prefix structure transformer, one `PrefixCache` per (batch size, dtype)."""

    def __init__(self, model, graphs: bool = False):
        self.model, self.graphs = model, graphs
        self._caches: dict = {}

    def stage(self, sc) -> Callable[[Tensor, float], Tensor]:
        """Fill the caches with the prefix of one stage; returns velocity(z (B, N, K), t float) -> (B, N, K)."""
        x = sc.tokens_BLC
        dev = x.device
        dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else x.dtype
        key = (x.shape[0], dtype, dev)
        cache = self._caches.get(key)
        if cache is None:
            cache = PrefixCache(self.model, x.shape[0], dtype, dev, graph=self.graphs and dev.type == "cuda")
            self._caches[key] = cache
        cache.fill(sc)

        def velocity(z_BNK: Tensor, t: float) -> Tensor:
            out = cache.velocity(z_BNK, torch.full((z_BNK.shape[0],), t, device=dev))
            return out.clone() if cache.graph else out  # a graph replay overwrites its output

        return velocity
