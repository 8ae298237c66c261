"""Class-conditional VAR sampling: next-scale prediction with a static KV cache and ramped classifier-free guidance.

Modified from: github.com/FoundationVision/VAR models/var.py (`autoregressive_infer_cfg`) and models/helpers.py
(`sample_with_top_k_top_p_`). Differences from the released code, none of which changes the result:
  - keys and values go into preallocated caches (no torch.cat per step);
  - the AdaLN modulations of the (constant) class condition are computed once per call, not once per step;
  - top_k == 1 takes the argmax directly instead of a multinomial over a one-hot distribution.

Per scale k = 0..K-1, with a batch of 2B sequences (B conditional, B with the null class):
    logits = VAR(tokens of scale k | cache)                    (2B, pn_k^2, V)
    t = cfg * k / (K - 1)                                      guidance ramps from 0 to cfg
    logits = (1 + t) logits_cond - t logits_uncond
    r_k ~ softmax(top-k / top-p filtered logits)
    f_hat += phi_k(up(E[r_k])); next input = word_embed(area_down(f_hat, pn_{k+1})) + level/position embedding
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor

from .attention import KVCache
from .model import VAR
from .quant import MultiScaleQuantizer
from .vqvae import VQVAE


def filter_top_k_top_p(logits_BlV: Tensor, top_k: int = 0, top_p: float = 0.0) -> Tensor:
    """Sets to -inf the logits outside the top_k largest (top_k > 0) and outside the smallest set whose
    probability reaches top_p (0 < top_p); the most likely token is always kept. Returns a new tensor."""
    V = logits_BlV.shape[-1]
    if top_k > 0:
        kth_Bl1 = logits_BlV.topk(min(top_k, V), dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
        logits_BlV = logits_BlV.masked_fill(logits_BlV < kth_Bl1, -torch.inf)
    if top_p > 0:
        sorted_BlV, order_BlV = logits_BlV.sort(dim=-1, descending=False)
        remove_sorted = sorted_BlV.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove_sorted[..., -1:] = False
        logits_BlV = logits_BlV.masked_fill(remove_sorted.scatter(-1, order_BlV, remove_sorted), -torch.inf)
    return logits_BlV


def sample_tokens(logits_BlV: Tensor, top_k: int = 0, top_p: float = 0.0,
                  generator: torch.Generator | None = None) -> Tensor:
    """One token per row, long (B, l): argmax when top_k == 1, else multinomial over the filtered softmax."""
    if top_k == 1:
        return logits_BlV.argmax(dim=-1)
    B, l, V = logits_BlV.shape
    probs_NV = filter_top_k_top_p(logits_BlV, top_k, top_p).softmax(dim=-1).view(-1, V)
    return torch.multinomial(probs_NV, 1, generator=generator).view(B, l)


def check_pair(var: VAR, quantizer: MultiScaleQuantizer) -> None:
    c = var.config
    if (c.vocab_size, c.latent_channels, c.patch_nums) != (quantizer.vocab_size, quantizer.channels,
                                                           quantizer.patch_nums):
        raise ValueError(f"VAR (V={c.vocab_size}, Cvae={c.latent_channels}, scales {c.patch_nums}) does not fit the "
                         f"tokenizer (V={quantizer.vocab_size}, Cvae={quantizer.channels}, "
                         f"scales {quantizer.patch_nums})")


def make_caches(var: VAR, batch: int, device, dtype: torch.dtype) -> list[KVCache]:
    """One static cache per block for `batch` sequences (2B with guidance), block ids = scale ids."""
    c = var.config
    return [KVCache(batch, c.num_heads, c.seq_len, c.width // c.num_heads, dtype=dtype, device=device,
                    block_ids=var.lvl_1L[0]) for _ in range(c.depth)]


@torch.no_grad()
def sample_indices(var: VAR, quantizer: MultiScaleQuantizer, labels_B: Tensor, cfg: float = 1.5, top_k: int = 0,
                   top_p: float = 0.0, generator: torch.Generator | None = None,
                   autocast_dtype: torch.dtype | None = None, caches: list[KVCache] | None = None,
                   ) -> tuple[list[Tensor], Tensor]:
    """Samples the token maps of all scales.

    Args:
        labels_B: long (B,) class ids in [0, num_classes] (num_classes = unconditional).
        cfg: guidance at the last scale (linear ramp from 0 at the first scale).
        top_k, top_p: filtering (0 = off); top_k=1 is deterministic argmax.
        generator: random generator on the model's device (seeded by the caller), or None.
        autocast_dtype: e.g. torch.bfloat16 to run the blocks under autocast; None for full precision.
        caches: preallocated caches from `make_caches(var, 2B, ...)` to reuse across calls.
    Returns: (token maps, each long (B, pn_k^2); f_hat (B, Cvae, h, w) fp32).
    """
    check_pair(var, quantizer)
    check_labels(var, labels_B)
    c = var.config
    device = var.pos_1LC.device
    labels_B = labels_B.to(device)
    B = labels_B.shape[0]
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    cache_dtype = autocast_dtype or var.pos_1LC.dtype
    if caches is None:
        caches = make_caches(var, 2 * B, device, cache_dtype)
    elif len(caches) != c.depth or caches[0].k.shape[0] != 2 * B or caches[0].k.dtype != cache_dtype:
        raise ValueError(f"caches must be make_caches(var, {2 * B}, device, {cache_dtype})")

    cond_2BD = var.class_emb(torch.cat((labels_B, torch.full_like(labels_B, c.num_classes))))
    with amp:
        mods = [block.modulation(cond_2BD) for block in var.blocks]

    def run_scale(k: int, x_2BlC: Tensor, cond_2BD: Tensor) -> Tensor:
        with amp:
            return var.forward_scale(x_2BlC, k, cond_2BD, mods, caches)

    return scale_loop(var, quantizer, labels_B, cfg, top_k, top_p, generator, run_scale)


def check_labels(var: VAR, labels_B: Tensor) -> None:
    if labels_B.ndim != 1 or labels_B.dtype != torch.long:
        raise ValueError(f"labels must be long (B,), got {labels_B.dtype} {tuple(labels_B.shape)}")
    if labels_B.numel() == 0 or labels_B.min() < 0 or labels_B.max() > var.config.num_classes:
        raise ValueError(f"labels must be non-empty class ids in [0, {var.config.num_classes}]")


def scale_loop(var: VAR, quantizer: MultiScaleQuantizer, labels_B: Tensor, cfg: float, top_k: int, top_p: float,
               generator: torch.Generator | None, run_scale) -> tuple[list[Tensor], Tensor]:
    """The next-scale loop around `run_scale(k, x_2BlC, cond_2BD) -> fp32 logits (2B, pn_k^2, V)`, which runs
    the transformer on scale k's input tokens (eagerly, or by replaying a captured graph)."""
    c = var.config
    B, K = labels_B.shape[0], len(c.patch_nums)
    cond_2BD = var.class_emb(torch.cat((labels_B, torch.full_like(labels_B, c.num_classes))))
    level_pos_1LC = var.level_position(0, c.seq_len)
    x_2BlC = cond_2BD[:, None] + var.pos_start + level_pos_1LC[:, : var.first_len]
    f_hat = torch.zeros(B, quantizer.channels, quantizer.side, quantizer.side, device=labels_B.device)
    idx_list = []
    for k in range(K):
        logits_2BlV = run_scale(k, x_2BlC, cond_2BD)
        t = cfg * k / (K - 1)
        logits_BlV = (1 + t) * logits_2BlV[:B] - t * logits_2BlV[B:]
        idx_Bl = sample_tokens(logits_BlV, top_k, top_p, generator)
        idx_list.append(idx_Bl)
        f_hat, next_BChw = quantizer.next_input(k, f_hat, quantizer.indices_to_embedding(idx_Bl))
        if k + 1 < K:
            start, stop = var.begin_ends[k + 1]
            x_BlC = var.word_embed(next_BChw.flatten(2).transpose(1, 2)) + level_pos_1LC[:, start:stop]
            x_2BlC = x_BlC.repeat(2, 1, 1)
    return idx_list, f_hat


@torch.no_grad()
def sample(var: VAR, vae: VQVAE, labels_B: Tensor, cfg: float = 1.5, top_k: int = 900, top_p: float = 0.96,
           seed: int | None = None, autocast_dtype: torch.dtype | None = None) -> Tensor:
    """Class-conditional images in [-1, 1], (B, 3, H, W). Defaults are the released FID settings."""
    device = var.pos_1LC.device
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    _, f_hat = sample_indices(var, vae.quantize, labels_B, cfg, top_k, top_p, generator, autocast_dtype)
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    with amp:
        return vae.fhat_to_img(f_hat).float()


@torch.no_grad()
def sample_indices_recompute(var: VAR, quantizer: MultiScaleQuantizer, labels_B: Tensor, cfg: float = 1.5
                             ) -> list[Tensor]:
    """Argmax sampling without a cache: every scale recomputes the whole sequence with the block-causal mask
    through the training forward (future scales are filled with token 0; the mask hides them). For tests."""
    check_pair(var, quantizer)
    if var.training:
        raise ValueError("sample_indices_recompute needs var.eval() (training drops class labels at random)")
    c = var.config
    B, K = labels_B.shape[0], len(c.patch_nums)
    labels_2B = torch.cat((labels_B, torch.full_like(labels_B, c.num_classes)))
    idx_list = [torch.zeros(B, pn * pn, dtype=torch.long, device=labels_B.device) for pn in c.patch_nums]
    for k in range(K):
        x_BLCv = quantizer.indices_to_var_input(idx_list)
        start, stop = var.begin_ends[k]
        logits_2BlV = var(labels_2B, x_BLCv.repeat(2, 1, 1))[:, start:stop]
        t = cfg * k / (K - 1)
        idx_list[k] = ((1 + t) * logits_2BlV[:B] - t * logits_2BlV[B:]).argmax(dim=-1)
    return idx_list

