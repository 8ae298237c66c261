"""The main job's generator training step and the options it could use instead, measured in one run.

    pytest benchmarks/bench_train_step.py --benchmark-only

What `python -m nvg.train` spends its minutes on: one optimizer step (forward, loss, backward, AdamW) of the main job's
generator (`nvg-tiny` on the main job's tokenizer shapes: 8x8 latent, 16 channels, 256 codes) on token
sequences extracted beforehand. Random weights and tokens (speed does not depend on them).

Groups (the baseline runs first; extra_info has images_per_s, and speedup_vs_eager = baseline median / row median
(same batch), measured in the same run; the options group uses conftest's record_baseline / report_ratio, which time the
baseline themselves when it was deselected):
  train-step-b8     eager fp32 at batch 8 (the baseline: what the main job runs), bf16 autocast, torch.compile of
                    the forward + loss (its compile time, not in the median, is extra_info compile_s), and the fast
                    variant (`nvg-tiny-fast`, eager fp32)
  train-batch       eager fp32 at batch 4, 8 (baseline) and 16: speedup_vs_batch8 = images/s against batch 8
On a GPU the same rows run (bf16 is then the trainer's default); the main job is a CPU job.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import pytest
import torch

from nvg.model import GeneratorConfig, NVGGenerator, generator_loss
from nvg.tokenizer import Tokenizer

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# the official model on the main job's tokenizer (the fast_variant row times the main job's own preset, nvg-tiny-fast,
# since commit a0ec228)
PRESET, TOKENIZER = "nvg-tiny", "tiny-ae-32px-8x8-v256"
_BATCH8: dict = {}  # images/s of the batch-8 row of this run


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def make_step(batch: int, mode: str = "eager", preset: str = PRESET):
    """(one training step, setup seconds): `mode` is "eager", "bf16" (autocast) or "compile" (torch.compile of the
    forward + loss; structure noise and times drawn outside, as a compiled trainer would)."""
    torch.manual_seed(0)
    tok = Tokenizer(TOKENIZER).to(DEVICE).eval()
    tc = tok.config
    cfg = GeneratorConfig.from_name(preset, latent_hw=(tc.latent_size,) * 2, latent_dim=tc.latent_channels,
                                    vocab_size=tc.codebook_size, num_classes=10)
    gen = NVGGenerator(cfg).to(DEVICE).train()
    opt = torch.optim.AdamW(gen.parameters(), lr=1e-3, betas=(0.9, 0.95))
    with torch.no_grad():
        vgs = tok.encode(torch.rand(batch, 3, tc.image_size, tc.image_size, device=DEVICE) * 2 - 1)
    y = torch.arange(batch, device=DEVICE) % 10
    eps = torch.randn(batch, cfg.num_positions, cfg.K, device=DEVICE)
    t = torch.sigmoid(torch.randn(batch, cfg.num_stages - 2, device=DEVICE))

    def loss_fn(canvas, labels, y, eps, t):
        out = gen(canvas, labels, y, eps, t)
        return generator_loss(out, vgs.f_hat, vgs.tokens)[0]

    fn = torch.compile(loss_fn) if mode == "compile" else loss_fn
    ctx = (lambda: torch.autocast(DEVICE.type, dtype=torch.bfloat16)) if mode == "bf16" else nullcontext

    def step():
        with ctx():
            loss = fn(vgs.canvas, vgs.labels, y, eps, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gen.parameters(), 1.0)
        opt.step()
        sync()

    t0 = time.perf_counter()
    step()  # warm-up (compiles in "compile" mode)
    step()
    return step, time.perf_counter() - t0


def images_per_s(benchmark, batch: int) -> float | None:
    """images/s of the row into extra_info (None under --benchmark-disable: nothing timed)."""
    if benchmark.stats is None:
        return None
    benchmark.extra_info["images_per_s"] = round(batch / benchmark.stats.stats.median, 1)
    return batch / benchmark.stats.stats.median


@pytest.mark.parametrize("mode", ["eager", "bf16", "compile", "fast_variant"])
def test_train_step_options(benchmark, record_baseline, report_ratio, mode):
    benchmark.group = "train-step-b8"
    preset = PRESET + "-fast" if mode == "fast_variant" else PRESET
    step, setup = make_step(8, "eager" if mode == "fast_variant" else mode, preset)
    benchmark.extra_info.update(preset=preset, batch=8, mode=mode, device=str(DEVICE))
    if mode == "compile":
        benchmark.extra_info["compile_s"] = round(setup, 1)
    benchmark.pedantic(step, rounds=20, warmup_rounds=2)
    images_per_s(benchmark, 8)
    if mode == "eager":
        record_baseline("train-step-b8", benchmark)
    else:
        report_ratio("train-step-b8", "eager", benchmark, make_step(8)[0])


@pytest.mark.parametrize("batch", [8, 4, 16])  # the baseline first
def test_train_batch(benchmark, batch):
    benchmark.group = "train-batch"
    step, _ = make_step(batch)
    benchmark.extra_info.update(preset=PRESET, batch=batch, device=str(DEVICE))
    benchmark.pedantic(step, rounds=max(5, 160 // batch), warmup_rounds=2)
    rate = images_per_s(benchmark, batch)
    if rate is not None and batch == 8:
        _BATCH8["images_per_s"] = rate
    elif rate is not None and _BATCH8:  # per image, so not conftest's per-call report_ratio
        benchmark.extra_info["speedup_vs_batch8"] = round(rate / _BATCH8["images_per_s"], 2)
