"""VARSampler: VAR's sampler object, with the call of NVG's `Sampler(model, tokenizer)` (generate / sample).

The scale loop and its pieces are in sample.py; the static-buffer (CUDA-graph) variant in graphs.py.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor

from .attention import KVCache
from .graphs import GraphedSampler
from .model import VAR
from .sample import VARSampleConfig, check_labels, check_pair, make_caches, scale_loop
from .vqvae import VQVAE


class VARSampler:
    """VAR's sampler, with the call of NVG's `Sampler(model, tokenizer)`.

    Args:
        model, tokenizer: the transformer and its VQVAE (on the same device).
        graphs: run the static-buffer sampler of graphs.py (one CUDA graph per scale on a CUDA device, the same
            static buffers run eagerly elsewhere); built once per batch size. Same tokens as the plain path.
        autocast_dtype: e.g. torch.bfloat16 to run the blocks and the decoder under autocast; None for full
            precision.
    The KV caches of the last batch size are kept for the next call.
    """

    def __init__(self, model: VAR, tokenizer: VQVAE, *, graphs: bool = False,
                 autocast_dtype: torch.dtype | None = None):
        check_pair(model, tokenizer.quantize)
        self.model, self.tokenizer = model, tokenizer
        self.graphs, self.autocast_dtype = graphs, autocast_dtype
        self._caches: list[KVCache] | None = None
        self._graphed: dict = {}  # batch -> GraphedSampler

    @property
    def device(self) -> torch.device:
        return self.model.pos_1LC.device

    def _amp(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _generator(self, seed: int | None, generator: torch.Generator | None) -> torch.Generator | None:
        if generator is None and seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        return generator  # None: the global random state

    @torch.no_grad()
    def generate_with_latent(self, labels_B: Tensor, config: VARSampleConfig | None = None, *,
                             seed: int | None = None, generator: torch.Generator | None = None
                             ) -> tuple[list[Tensor], Tensor]:
        """(token maps, each long (B, pn_k^2); their latent f_hat (B, Cvae, h, w) fp32)."""
        config = config or VARSampleConfig()
        var, quantizer = self.model, self.tokenizer.quantize
        labels_B = torch.as_tensor(labels_B)
        check_labels(var, labels_B)
        labels_B = labels_B.to(self.device)
        generator = self._generator(seed, generator)
        B = labels_B.shape[0]
        if self.graphs:
            if B not in self._graphed:
                self._graphed[B] = GraphedSampler(var, quantizer, B, self.autocast_dtype)
            return self._graphed[B](labels_B, config, generator)
        cache_dtype = self.autocast_dtype or var.pos_1LC.dtype
        caches = self._caches
        if caches is None or caches[0].k.shape[0] != 2 * B or caches[0].k.dtype != cache_dtype:
            self._caches = caches = None  # free the old ones first
            self._caches = caches = make_caches(var, 2 * B, self.device, cache_dtype)
        cond_2BD = var.class_emb(torch.cat((labels_B, torch.full_like(labels_B, var.config.num_classes))))
        with self._amp():
            mods = [block.modulation(cond_2BD) for block in var.blocks]

        def run_scale(k: int, x_2BlC: Tensor, cond_2BD: Tensor) -> Tensor:
            with self._amp():
                return var.forward_scale(x_2BlC, k, cond_2BD, mods, caches)

        return scale_loop(var, quantizer, labels_B, config, generator, run_scale)

    def generate(self, labels_B: Tensor, config: VARSampleConfig | None = None, *, seed: int | None = None,
                 generator: torch.Generator | None = None) -> list[Tensor]:
        """Token maps of all scales, each long (B, pn_k^2), for class ids labels_B (B,) in [0, num_classes]
        (num_classes = unconditional). Same seed, same tokens."""
        return self.generate_with_latent(labels_B, config, seed=seed, generator=generator)[0]

    @torch.no_grad()
    def sample(self, labels_B: Tensor, config: VARSampleConfig | None = None, *, seed: int | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """Class-conditional images (B, 3, H, W) in [-1, 1], fp32 (tokens decoded by the tokenizer)."""
        _, f_hat = self.generate_with_latent(labels_B, config, seed=seed, generator=generator)
        with self._amp():
            return self.tokenizer.decode(f_hat).float()
