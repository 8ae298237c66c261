"""Class-conditional VAR sampling: next-scale prediction with a static KV cache and ramped classifier-free guidance.

Modified from: github.com/FoundationVision/VAR models/var.py (`autoregressive_infer_cfg`) and models/helpers.py
(`sample_with_top_k_top_p_`). Differences from the released code, none of which changes the distribution of the
samples:
  - keys and values go into preallocated caches (no torch.cat per step);
  - the AdaLN modulations of the (constant) class condition are computed once per call, not once per step;
  - top_k == 1 takes the argmax directly instead of a multinomial over a one-hot distribution;
  - tokens are drawn by inverse CDF over the filter's own sort (`nvg.categorical`), not by `torch.multinomial`: the
    same distribution, another random stream (`sample_tokens_ref` is the released way).
Settings use NVG's conventions (`nvg.sample.SampleConfig`): the guidance is a scale s (1 = off) ramped linearly over
the scales, `content_cfg=(1.0, 1 + cfg)` for the released `cfg`; top_p = 1.0 is off (released: 0 = off).

Per scale k = 0..K-1, with a batch of 2B sequences (B conditional, B with the null class):
    logits = VAR(tokens of scale k | cache)                    (2B, pn_k^2, V)
    t = s_k - 1, s_k linear from content_cfg[0] to [1]         released: t = cfg * k / (K - 1)
    logits = (1 + t) logits_cond - t logits_uncond
    r_k ~ softmax(top-k / top-p filtered logits / temperature)
    f_hat += phi_k(up(E[r_k])); next input = word_embed(area_down(f_hat, pn_{k+1})) + level/position embedding

    sampler = VARSampler(var, vae)      # sampler.py; graphs=True: one CUDA graph per scale (graphs.py)
    images = sampler.sample(labels, VARSampleConfig(), seed=0)    # (B, 3, H, W) in [-1, 1]
    tokens = sampler.generate(labels, VARSampleConfig(), seed=0)  # K token maps, long (B, pn_k^2)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from nvg.categorical import check_top_k_top_p, draw_from_cdf

from .attention import KVCache
from .model import VAR
from .quant import MultiScaleQuantizer


@dataclass
class VARSampleConfig:
    """VAR's sampling settings, named and scaled as NVG's `SampleConfig`. Defaults: the released FID settings
    (cfg 1.5, top_k 900, top_p 0.96)."""

    content_cfg: tuple[float, float] = (1.0, 2.5)  # CFG scale on the logits, linear over the scales (released cfg 1.5)
    top_k: int = 900  # 0 = off; 1 = argmax (deterministic, ignores temperature and top-p)
    top_p: float = 0.96  # nucleus mass in (0, 1]; 1.0 = off
    temperature: float = 1.0

    def __post_init__(self):
        self.content_cfg = tuple(float(c) for c in self.content_cfg)
        if len(self.content_cfg) != 2:
            raise ValueError(f"content_cfg must be (first scale, last scale), got {self.content_cfg}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        check_top_k_top_p(self.top_k, self.top_p)


def guidance_schedule(content_cfg: tuple[float, float], num_scales: int) -> list[float]:
    """t_k = s_k - 1 for the scales s_k linear from content_cfg[0] to content_cfg[1]; the logits are mixed as
    (1 + t) cond - t uncond. content_cfg = (1, 1 + cfg) gives the released t_k = cfg * k / (K - 1) exactly."""
    first, last = content_cfg
    return [(first - 1) + (last - first) * k / max(num_scales - 1, 1) for k in range(num_scales)]


def filter_top_k_top_p(logits_BlV: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Sets to -inf the logits outside the top_k largest (top_k > 0) and outside the smallest set whose
    probability reaches top_p (top_p < 1, released rule); the most likely token is always kept. Returns a new
    tensor. top_k = 0 and top_p = 1.0 are off; top_p must be in (0, 1]."""
    check_top_k_top_p(top_k, top_p)
    V = logits_BlV.shape[-1]
    if top_k > 0:
        kth_Bl1 = logits_BlV.topk(min(top_k, V), dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
        logits_BlV = logits_BlV.masked_fill(logits_BlV < kth_Bl1, -torch.inf)
    if top_p < 1.0:
        sorted_BlV, order_BlV = logits_BlV.sort(dim=-1, descending=False)
        remove_sorted = sorted_BlV.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove_sorted[..., -1:] = False
        logits_BlV = logits_BlV.masked_fill(remove_sorted.scatter(-1, order_BlV, remove_sorted), -torch.inf)
    return logits_BlV


def sample_tokens(logits_BlV: Tensor, top_k: int = 0, top_p: float = 1.0, temperature: float = 1.0,
                  generator: torch.Generator | None = None) -> Tensor:
    """One token per row, long (B, l): argmax when top_k == 1, else a draw from the filtered softmax.

    The distribution of `sample_tokens_ref`, drawn by inverse CDF over the released rule's ascending sort
    (`nvg.categorical`): the tokens top-p removes are the leading run of that sort, found with the same sorted softmax
    and running sum as `filter_top_k_top_p` (fp32 here).
    """
    if top_k == 1:
        return logits_BlV.argmax(dim=-1)
    check_top_k_top_p(top_k, top_p)
    B, l, V = logits_BlV.shape
    x_NV = logits_BlV.float().reshape(B * l, V)
    if temperature != 1.0:
        x_NV = x_NV / temperature
    if top_k == 0 and top_p == 1.0:
        return draw_from_cdf(x_NV.softmax(dim=-1).cumsum(dim=-1), 0, V, generator).view(B, l)
    x_NV, order_NV = x_NV.sort(dim=-1, descending=False)
    removed_N = torch.zeros(B * l, dtype=torch.long, device=x_NV.device)
    if top_k > 0:  # the filter removes every logit < the k-th largest: a leading run of the ascending sort
        k = min(top_k, V)
        removed_N = (x_NV < x_NV[:, V - k:V - k + 1]).sum(dim=-1)
        x_NV = x_NV.masked_fill(torch.arange(V, device=x_NV.device) < removed_N[:, None], -torch.inf)
    cum_NV = x_NV.softmax(dim=-1).cumsum(dim=-1)
    if top_p < 1.0:  # the least likely tokens whose running mass is <= 1 - top_p; the most likely one stays
        removed_N = torch.maximum(removed_N, (cum_NV[:, :-1] <= (1 - top_p)).sum(dim=-1))
    return order_NV.gather(1, draw_from_cdf(cum_NV, removed_N, V, generator)[:, None]).view(B, l)


def sample_tokens_ref(logits_BlV: Tensor, top_k: int = 0, top_p: float = 1.0, temperature: float = 1.0,
                      generator: torch.Generator | None = None) -> Tensor:
    """Reference of `sample_tokens` (the released way): multinomial over softmax(filter_top_k_top_p(logits / T))."""
    if top_k == 1:
        return logits_BlV.argmax(dim=-1)
    B, l, V = logits_BlV.shape
    if temperature != 1.0:
        logits_BlV = logits_BlV / temperature
    probs_NV = filter_top_k_top_p(logits_BlV, top_k, top_p).softmax(dim=-1).view(-1, V)
    return torch.multinomial(probs_NV, 1, generator=generator).view(B, l)


def check_pair(var: VAR, quantizer: MultiScaleQuantizer) -> None:
    c = var.config
    if (c.vocab_size, c.latent_channels, c.patch_nums) != (quantizer.vocab_size, quantizer.channels,
                                                           quantizer.patch_nums):
        raise ValueError(f"VAR (V={c.vocab_size}, Cvae={c.latent_channels}, scales {c.patch_nums}) does not fit the "
                         f"tokenizer (V={quantizer.vocab_size}, Cvae={quantizer.channels}, "
                         f"scales {quantizer.patch_nums})")


def check_labels(var: VAR, labels_B: Tensor) -> None:
    if labels_B.ndim != 1 or labels_B.dtype != torch.long:
        raise ValueError(f"labels must be long (B,), got {labels_B.dtype} {tuple(labels_B.shape)}")
    if labels_B.numel() == 0 or labels_B.min() < 0 or labels_B.max() > var.config.num_classes:
        raise ValueError(f"labels must be non-empty class ids in [0, {var.config.num_classes}]")


def make_caches(var: VAR, batch: int, device, dtype: torch.dtype) -> list[KVCache]:
    """One static cache per block for `batch` sequences (2B with guidance), block ids = scale ids."""
    c = var.config
    return [KVCache(batch, c.num_heads, c.seq_len, c.width // c.num_heads, dtype=dtype, device=device,
                    block_ids=var.lvl_1L[0]) for _ in range(c.depth)]


def scale_loop(var: VAR, quantizer: MultiScaleQuantizer, labels_B: Tensor, config: VARSampleConfig,
               generator: torch.Generator | None, run_scale) -> tuple[list[Tensor], Tensor]:
    """The next-scale loop around `run_scale(k, x_2BlC, cond_2BD) -> fp32 logits (2B, pn_k^2, V)`, which runs
    the transformer on scale k's input tokens (eagerly, or by replaying a captured graph)."""
    c = var.config
    B, K = labels_B.shape[0], len(c.patch_nums)
    guidance = guidance_schedule(config.content_cfg, K)
    cond_2BD = var.class_emb(torch.cat((labels_B, torch.full_like(labels_B, c.num_classes))))
    level_pos_1LC = var.level_position(0, c.seq_len)
    x_2BlC = cond_2BD[:, None] + var.pos_start + level_pos_1LC[:, : var.first_len]
    f_hat = torch.zeros(B, quantizer.channels, quantizer.side, quantizer.side, device=labels_B.device)
    idx_list = []
    for k in range(K):
        logits_2BlV = run_scale(k, x_2BlC, cond_2BD)
        t = guidance[k]
        logits_BlV = (1 + t) * logits_2BlV[:B] - t * logits_2BlV[B:]
        idx_Bl = sample_tokens(logits_BlV, config.top_k, config.top_p, config.temperature, generator)
        idx_list.append(idx_Bl)
        f_hat, next_BChw = quantizer.next_input(k, f_hat, quantizer.indices_to_embedding(idx_Bl))
        if k + 1 < K:
            start, stop = var.begin_ends[k + 1]
            x_BlC = var.word_embed(next_BChw.flatten(2).transpose(1, 2)) + level_pos_1LC[:, start:stop]
            x_2BlC = x_BlC.repeat(2, 1, 1)
    return idx_list, f_hat


@torch.no_grad()
def sample_indices_recompute(var: VAR, quantizer: MultiScaleQuantizer, labels_B: Tensor,
                             content_cfg: tuple[float, float] = (1.0, 2.5)) -> list[Tensor]:
    """Argmax sampling without a cache: every scale recomputes the whole sequence with the block-causal mask
    through the training forward (future scales are filled with token 0; the mask hides them). For tests."""
    check_pair(var, quantizer)
    if var.training:
        raise ValueError("sample_indices_recompute needs var.eval() (training drops class labels at random)")
    c = var.config
    B, K = labels_B.shape[0], len(c.patch_nums)
    guidance = guidance_schedule(content_cfg, K)
    labels_2B = torch.cat((labels_B, torch.full_like(labels_B, c.num_classes)))
    idx_list = [torch.zeros(B, pn * pn, dtype=torch.long, device=labels_B.device) for pn in c.patch_nums]
    for k in range(K):
        x_BLCv = quantizer.indices_to_var_input(idx_list)
        start, stop = var.begin_ends[k]
        logits_2BlV = var(labels_2B, x_BLCv.repeat(2, 1, 1))[:, start:stop]
        t = guidance[k]
        idx_list[k] = ((1 + t) * logits_2BlV[:B] - t * logits_2BlV[B:]).argmax(dim=-1)
    return idx_list
