"""granularity_cluster: the compiled op against the batched PyTorch reference (the official loop), same run.

Shapes of the issue: B in {1, 64, 256}, N = 256, C = 32. The baseline is the reference in float32, the official
code's precision (the float64 reference, the test oracle, is slower still).
"""
import pytest
import torch

from nvg.ops import granularity_cluster, granularity_cluster_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BATCHES = [1, 64, 256]


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _fns(B):
    f = torch.randn(B, 256, 32, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(B))

    def ref():
        out = granularity_cluster_ref(f, dtype=torch.float32)
        _sync()
        return out

    def nvg():
        out = granularity_cluster(f)
        _sync()
        return out

    return ref, nvg


@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("provider", ["ref", "nvg"])
@pytest.mark.benchmark(group="granularity_cluster")
def test_granularity_cluster(benchmark, record_baseline, report_ratio, provider, B):
    ref, nvg = _fns(B)
    rounds = 3 if (provider == "ref" and DEVICE == "cpu" and B > 1) else 10
    benchmark.extra_info.update(device=DEVICE, B=B, N=256, C=32, dtype="float32 input")
    if provider == "ref":
        benchmark.pedantic(ref, rounds=rounds, warmup_rounds=1)
        record_baseline(("granularity_cluster", B), benchmark)
    else:
        benchmark.pedantic(nvg, rounds=rounds, warmup_rounds=1)
        report_ratio(("granularity_cluster", B), "ref_fp32", benchmark, ref)
        if benchmark.stats is None:  # --benchmark-disable
            return
        benchmark.extra_info["images_per_s"] = round(B / benchmark.stats.stats.median, 1)
