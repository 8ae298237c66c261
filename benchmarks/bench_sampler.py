"""Speed of the faithful NVG sampler: plain eager path vs the compiled path (`Sampler(fast=True)`).

Random weights, CFG on (official schedules), 25 structure Euler steps, argmax tokens (top_k=1) so the two paths can
be compared token for token (`same_tokens` in extra_info).
  * GPU: NVG-d16 (255M + 64M), 16x16x32 latent, V=4096, bf16 autocast, batch 1 and 64. The official release runs
    this in 2.56 s (batch 1) and 13.6 s (batch 64) on an H200: `speedup_vs_official` = that time / ours.
  * CPU: the tiny preset, batch 4.
Run: pytest benchmarks/bench_sampler.py --benchmark-only
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import nvg  # noqa: F401
from conftest import device_name, sync
from nvg.model import GeneratorConfig, NVGGenerator
from nvg.sample import SampleConfig, Sampler
from nvg.tokenizer import Tokenizer, TokenizerConfig

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
OFFICIAL_H200_SECONDS = {1: 2.56, 64: 13.6}  # official code as released, NVG-d16, bf16, CFG on, 25 steps
CASES = [("nvg-d16", 1), ("nvg-d16", 64)] if HAS_CUDA else [("nvg-tiny", 4)]


def build(preset: str):
    torch.manual_seed(0)
    cfg = GeneratorConfig.from_name(preset)
    model = NVGGenerator(cfg).to(DEVICE).eval()
    side = cfg.latent_hw[0]  # a small tokenizer whose quantizer fits (generate does not decode)
    tok = Tokenizer(TokenizerConfig(image_size=4 * side, latent_size=side, base_channels=8, channel_mult=(1, 1, 1),
                                    num_res_blocks=1, latent_channels=cfg.latent_dim, codebook_size=cfg.vocab_size,
                                    norm_groups=4)).to(DEVICE).eval()
    tok.quantize.embedding.weight.data.normal_()
    return model, tok


def run(sampler: Sampler, batch: int, num_classes: int):
    y = torch.arange(batch, device=DEVICE) % num_classes
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if HAS_CUDA else contextlib.nullcontext()
    with amp:
        vgs = sampler.generate(y, SampleConfig(top_k=1), seed=0)
    sync(DEVICE)
    return vgs


@pytest.mark.benchmark(group="nvg_sampler")
@pytest.mark.parametrize("preset,batch", CASES, ids=[f"{p}-b{b}" for p, b in CASES])
@pytest.mark.parametrize("path", ["plain", "fast"])
def test_sampler(benchmark, record_baseline, report_ratio, preset, batch, path):
    model, tok = build(preset)
    sampler = Sampler(model, tok, fast=(path == "fast"))
    reference = run(Sampler(model, tok), batch, model.config.num_classes) if path == "fast" else None
    out = run(sampler, batch, model.config.num_classes)  # warm-up (compilation, CUDA graph capture)
    benchmark.pedantic(run, args=(sampler, batch, model.config.num_classes), rounds=3, warmup_rounds=1)
    key = (preset, batch)
    benchmark.extra_info.update(device=device_name(), preset=preset, batch=batch, structure_steps=25, cfg=True)
    if path == "plain":
        record_baseline(key, benchmark)
    else:
        report_ratio(key, "plain", benchmark, lambda: run(Sampler(model, tok), batch, model.config.num_classes))
        benchmark.extra_info["same_tokens"] = bool(torch.equal(out.tokens_cat(), reference.tokens_cat())
                                                   and torch.equal(out.labels, reference.labels))
    if HAS_CUDA and preset == "nvg-d16" and benchmark.stats is not None:
        benchmark.extra_info["speedup_vs_official"] = round(OFFICIAL_H200_SECONDS[batch] /
                                                            benchmark.stats.stats.median, 2)
