"""VAR sampling with static buffers and, on a GPU, one CUDA graph per scale.

At batch 1 VAR's sampling is launch-bound: 10 scales x depth blocks x ~20 small kernels. All shapes of a sampling
run are fixed by the batch size (scale k always has pn_k^2 queries and a cache prefix of the same length), and the
KV cache is static, so each scale's transformer pass (all blocks + head) can be captured once and replayed. The
AdaLN modulations of the class condition are one more graph, replayed once per call. Sampling, the CFG mix and
the tokenizer update stay outside the graphs (they are cheap and the random generator stays in eager PyTorch).

Without CUDA (use_graphs=False) the same static-buffer path runs eagerly, which is what the CPU tests check.
Use it through `VARSampler(var, vae, graphs=True)` (sample.py), which builds one per batch size.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor

from .model import VAR
from .quant import MultiScaleQuantizer
from .sample import VARSampleConfig, check_labels, check_pair, make_caches, scale_loop


class GraphedSampler:
    """Samples token maps for batches of exactly `batch` labels (same result as `VARSampler(graphs=False)`).

    Args:
        var, quantizer: the transformer and its tokenizer's quantizer (on the same device).
        batch: images per call (the graphs hold 2 * batch sequences for guidance).
        autocast_dtype: e.g. torch.bfloat16 (the caches take this dtype); None for full precision.
        use_graphs: capture CUDA graphs (default: when the model is on a CUDA device).
    """

    def __init__(self, var: VAR, quantizer: MultiScaleQuantizer, batch: int,
                 autocast_dtype: torch.dtype | None = None, use_graphs: bool | None = None):
        check_pair(var, quantizer)
        self.var, self.quantizer, self.batch, self.autocast_dtype = var, quantizer, batch, autocast_dtype
        self.device = var.pos_1LC.device
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        if self.use_graphs and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, it is on {self.device}")
        c, B2 = var.config, 2 * batch
        dtype = autocast_dtype or var.pos_1LC.dtype
        self.caches = make_caches(var, B2, self.device, dtype)
        self.cond_2BD = torch.zeros(B2, c.width, device=self.device)
        self.mods = [torch.zeros(B2, 6, 1, c.width, device=self.device, dtype=dtype) for _ in var.blocks]
        self.x_in = [torch.zeros(B2, pn * pn, c.width, device=self.device) for pn in c.patch_nums]
        self.logits_out: list[Tensor | None] = [None] * len(c.patch_nums)
        self.graphs: list = []
        if self.use_graphs:
            self._capture()

    def _amp(self):
        # the autocast weight cache must be off while capturing: cached casts would be freed after capture
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=False)

    def _modulations(self) -> None:
        with self._amp():
            for block, mod in zip(self.var.blocks, self.mods):
                mod.copy_(block.modulation(self.cond_2BD))

    def _scale(self, k: int) -> None:
        with self._amp():
            self.logits_out[k] = self.var.forward_scale(self.x_in[k], k, self.cond_2BD, self.mods, self.caches)

    @torch.no_grad()
    def _capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: Triton compilation, cuBLAS handles, allocator
            for _ in range(2):
                self._modulations()
                for k in range(len(self.x_in)):
                    self._scale(k)
        torch.cuda.current_stream().wait_stream(stream)
        pool = torch.cuda.graph_pool_handle()  # replayed in capture order, never concurrently
        for k in range(-1, len(self.x_in)):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                if k < 0:
                    self._modulations()
                else:
                    self._scale(k)
            self.graphs.append(graph)

    def run_scale(self, k: int, x_2BlC: Tensor, cond_2BD: Tensor) -> Tensor:
        """Scale k's logits: copies the inputs into the static buffers, then replays (or runs) the pass."""
        if k == 0:
            self.cond_2BD.copy_(cond_2BD)
            if self.use_graphs:
                self.graphs[0].replay()
            else:
                self._modulations()
        self.x_in[k].copy_(x_2BlC)
        if self.use_graphs:
            self.graphs[k + 1].replay()
        else:
            self._scale(k)
        return self.logits_out[k]

    @torch.no_grad()
    def __call__(self, labels_B: Tensor, config: VARSampleConfig | None = None,
                 generator: torch.Generator | None = None) -> tuple[list[Tensor], Tensor]:
        """(token maps, each long (B, pn_k^2); f_hat (B, Cvae, h, w)), as `VARSampler.generate_with_latent`."""
        check_labels(self.var, labels_B)
        if labels_B.shape[0] != self.batch:
            raise ValueError(f"this sampler was built for batch {self.batch}, got {labels_B.shape[0]} labels")
        labels_B = labels_B.to(self.device)
        return scale_loop(self.var, self.quantizer, labels_B, config or VARSampleConfig(), generator,
                          self.run_scale)
