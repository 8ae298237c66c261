"""cluster_quantize: the compiled op against addmm + argmin + scatter-mean (the official formula), same run.

Shapes of the issue: B in {1, 64, 256}, N = 256 positions, n = 256 clusters (the finest stage, the most work),
C = 32, V = 4096. The baseline runs in float32 as the official code does (the float64 reference is the test oracle).
"""
import pytest
import torch

from nvg.ops import cluster_quantize, prepare_codebook

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BATCHES = [1, 64, 256]


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def addmm_argmin_scatter_mean(residual, labels, n, codebook):
    """The official per-stage step: scatter-mean of the residual, full distance matrix, argmin."""
    B, N, C = residual.shape
    sums = residual.new_zeros(B, n, C).scatter_add_(1, labels[..., None].expand(-1, -1, C), residual)
    counts = residual.new_zeros(B, n).scatter_add_(1, labels, residual.new_ones(B, N))
    means = sums / counts.clamp(min=1)[..., None]
    r = means.flatten(0, 1)
    d = (r.square().sum(1, keepdim=True) + codebook.square().sum(1)).addmm_(r, codebook.T, alpha=-2)
    return d.argmin(1).view(B, n), means


def _fns(B):
    g = torch.Generator(DEVICE).manual_seed(B)
    res = torch.randn(B, 256, 32, device=DEVICE, generator=g)
    labels = torch.randperm(256, device=DEVICE, generator=g).expand(B, -1).contiguous()
    E = torch.randn(4096, 32, device=DEVICE, generator=g) * 0.5

    def ref():
        out = addmm_argmin_scatter_mean(res, labels, 256, E)
        _sync()
        return out

    def nvg():
        out = cluster_quantize(res, labels, 256, E)
        _sync()
        return out

    prepared = prepare_codebook(E)

    def nvg_prepared():  # the quantizer's hot path: codebook prepared once, no validation (no host sync)
        out = cluster_quantize(res, labels, 256, E, prepared, validate=False)
        _sync()
        return out

    return ref, nvg, nvg_prepared


@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("provider", ["ref", "nvg", "nvg_prepared"])
@pytest.mark.benchmark(group="cluster_quantize")
def test_cluster_quantize(benchmark, record_baseline, report_ratio, provider, B):
    ref, nvg, nvg_prepared = _fns(B)
    benchmark.extra_info.update(device=DEVICE, B=B, N=256, n=256, C=32, V=4096, dtype="float32")
    rounds = 5 if DEVICE == "cpu" and B > 1 else 20
    if provider == "ref":
        benchmark.pedantic(ref, rounds=rounds, warmup_rounds=1)
        record_baseline(("cluster_quantize", B), benchmark)
    else:
        benchmark.pedantic(nvg if provider == "nvg" else nvg_prepared, rounds=rounds, warmup_rounds=1)
        report_ratio(("cluster_quantize", B), "addmm_argmin", benchmark, ref)
        if benchmark.stats is None:  # --benchmark-disable
            return
        flops = 2.0 * B * 256 * 4096 * 32
        benchmark.extra_info["GFLOP_per_s"] = round(flops / benchmark.stats.stats.median / 1e9, 1)
