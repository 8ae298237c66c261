"""Shared benchmark helpers: device-synchronised timing and speed ratios against a baseline of the same run.

Benchmarks in one group run the baseline first; `record_baseline` stores its median, and `report_ratio` writes
`speedup_vs_<baseline>` into the benchmark's extra_info (measured in this run, never a constant).
"""
import time

import pytest
import torch

_BASELINES: dict = {}


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, repeats=5):
    """Fallback timing when the baseline benchmark was deselected: median of `repeats` calls after a warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


@pytest.fixture
def record_baseline():
    def record(key, benchmark):
        if benchmark.stats is not None:  # None under --benchmark-disable (a smoke run)
            _BASELINES[key] = benchmark.stats.stats.median
    return record


@pytest.fixture
def report_ratio():
    def report(key, name, benchmark, baseline_fn):
        if benchmark.stats is None:  # --benchmark-disable: nothing was timed
            return
        base = _BASELINES.get(key)
        if base is None:
            base = median_seconds(baseline_fn, repeats=3)
        benchmark.extra_info[f"speedup_vs_{name}"] = round(base / benchmark.stats.stats.median, 2)
        benchmark.extra_info[f"{name}_median_s"] = base
    return report


def device_name():
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
