"""Token draws from a filtered softmax by inverse CDF: one uniform per row and a binary search, no multinomial.

Both samplers (NVG's `nvg.sample.sampler.sample_tokens`, VAR's `nvg.baselines.var.sample.sample_tokens`) sort the
logits once for their top-k / top-p rule, as the official code does; the sorted probabilities' running sum is then
the CDF of the filtered distribution over a contiguous run [start, stop) of the sorted order, and a draw is a
`searchsorted` of `cum[start - 1] + u (cum[stop - 1] - cum[start - 1])`, u ~ U[0, 1). That replaces the mask scatter,
the second softmax and `torch.multinomial` (which draws one exponential per vocabulary entry: on a CPU a third of
VAR's sampling time at batch 64). The distribution is the same; the random stream is not (other draws than the
`_ref` samplers' for one seed).
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_top_k_top_p(top_k: int, top_p: float) -> None:
    """The samplers' filter settings: top_k >= 0 (0 = off, 1 = argmax), top_p in (0, 1] (1.0 = off)."""
    if top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need top_k >= 0 (0 = off) and top_p in (0, 1] (1.0 = off), got {top_k}, {top_p}")


def draw_from_cdf(cum_RV: Tensor, start_R: Tensor | int, stop_R: Tensor | int,
                  generator: torch.Generator | None = None) -> Tensor:
    """Index i in [start, stop) of each row, drawn with probability (cum[i] - cum[i-1]) / (cum[stop-1] - cum[start-1]).

    Args:
        cum_RV: float (R, V) non-decreasing running sums of non-negative weights (cum[-1] read as 0).
        start_R, stop_R: long (R,) or ints, 0 <= start < stop <= V; the run must hold positive weight.
    Returns:
        long (R,) indices into the last dimension.
    """
    R, V = cum_RV.shape
    dev = cum_RV.device
    if R:  # torch.multinomial refuses these too: an error on the CPU, a device-side assert (no host sync) on a GPU
        finite = torch.isfinite(cum_RV[:, -1]).all()
        if dev.type == "cpu" and not finite:
            raise ValueError("token draw: the probabilities are not finite (NaN or infinite logits)")
        if dev.type != "cpu":
            torch._assert_async(finite, "token draw: the probabilities are not finite (NaN or infinite logits)")
    start = torch.as_tensor(start_R, device=dev).expand(R).long()
    stop = torch.as_tensor(stop_R, device=dev).expand(R).long()
    lo = cum_RV.gather(1, (start - 1).clamp(min=0)[:, None]) * (start > 0)[:, None]  # cum[start - 1], 0 at start 0
    hi = cum_RV.gather(1, (stop - 1)[:, None])
    u = torch.rand(R, 1, generator=generator, device=dev, dtype=cum_RV.dtype)
    idx = torch.searchsorted(cum_RV, lo + u * (hi - lo), right=True)  # first i with cum[i] > target: weight > 0
    return torch.minimum(torch.maximum(idx[:, 0], start), stop - 1)  # rounding guard at both ends
