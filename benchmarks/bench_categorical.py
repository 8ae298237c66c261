"""Token draws: both samplers' `sample_tokens` (inverse CDF over the filter's sort, nvg.categorical) against their
`sample_tokens_ref` (the official filter + torch.multinomial), same run.

    pytest benchmarks/bench_categorical.py --benchmark-only

Shapes: the largest draw of one batch-64 sampling call of the tiny presets (vocabulary 1024): NVG's last stage,
64 images x 64 clusters, top-p 0.5 (the default schedule's end), no top-k; VAR's last scale, 64 images x 64 tokens,
its released top-k 900 and top-p 0.96. extra_info: speedup_vs_ref = reference median / row median (same run).
"""
import pytest
import torch

from nvg.baselines.var import sample as var_sample
from nvg.sample import sampler as nvg_sample

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = {  # name: (module, rows (B, n), vocabulary, top_k, top_p, call(fn, logits, generator))
    "nvg": (nvg_sample, (64, 64), 1024, 0, 0.5, lambda f, x, g: f(x, 1.0, 0, 0.5, g)),
    "var": (var_sample, (64, 64), 1024, 900, 0.96, lambda f, x, g: f(x, 900, 0.96, 1.0, g)),
}


def _fn(case, provider):
    module, (B, n), V, _, _, call = CASES[case]
    g = torch.Generator(DEVICE).manual_seed(0)
    logits = torch.randn(B, n, V, device=DEVICE, generator=g) * 2
    fn = getattr(module, "sample_tokens" if provider == "nvg" else "sample_tokens_ref")

    def run():
        out = call(fn, logits, g)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out
    return run


@pytest.mark.parametrize("provider", ["ref", "nvg"])  # the reference first: the ratio's baseline
@pytest.mark.parametrize("case", list(CASES))
def test_sample_tokens(benchmark, record_baseline, report_ratio, case, provider):
    module, (B, n), V, top_k, top_p, _ = CASES[case]
    benchmark.group = f"sample_tokens-{case}"
    benchmark.extra_info.update(device=DEVICE, rows=B * n, V=V, top_k=top_k, top_p=top_p)
    fn = _fn(case, provider)
    benchmark.pedantic(fn, rounds=10, warmup_rounds=2)
    if provider == "ref":
        record_baseline(("sample_tokens", case), benchmark)
    else:
        report_ratio(("sample_tokens", case), "ref", benchmark, _fn(case, "ref"))
