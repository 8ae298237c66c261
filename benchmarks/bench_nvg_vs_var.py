"""NVG against VAR at equal size, in one run: sampling latency and throughput, training step, decode, memory.

    pytest benchmarks/bench_nvg_vs_var.py --benchmark-only [--benchmark-json=.benchmarks/nvg_vs_var.json]
    NVG_BENCH_SIZES=d16 pytest benchmarks/bench_nvg_vs_var.py --benchmark-only     # one size only
    NVG_BENCH_ROUNDS=1:5,64:2 ...                                                   # rounds per batch (sampling)

Sizes: on a CPU the tiny presets (nvg-tiny + tiny-ae-32px-8x8 against var-tiny + var-vae-tiny, 32 px, ~1.3M
transformer parameters each); on a GPU d16, d20 and d24 with random weights (nvg-d{n} + nvg-ae-f16 against
var-d{n} + var-vae-ch160, 256 px), bf16 autocast, NVG's compiled sampler (`Sampler(fast=True)`: CUDA graphs).

Groups (one table each; VAR, the baseline, runs first; NVG's extra_info has speedup_vs_var = VAR median / NVG
median, measured in the same run):
  sample-b1-<size>     latency of one image, class-conditional, CFG on, tokens -> image (VAE decode included);
                       rows var, nvg (faithful: official structure transformer, 25 Euler steps) and nvg_fast (the
                       -fast preset, cached prefix, its default: 2 Euler steps) and nvg_2step (the official model
                       with 2 Euler steps, as the main job's checkpoint samples by default); their extra_info also has
                       speedup_vs_nvg = NVG faithful median / their median (same run)
  sample-b16/b64-...   throughput (images_per_s in extra_info); on a GPU also `var_graphs`: VAR with one CUDA graph
                       per scale (`VARSampler(graphs=True)`, nvg.baselines.var.graphs)
  decode-b16-<size>    the VAE decoder alone (latent -> image), reported separately
  train-b<n>-<size>    one optimizer step of the generator / transformer on tokens extracted beforehand (the
                       tokenizer's encoder is not timed: both methods can pre-extract); images_per_s in extra_info
extra_info also holds the parameter counts (generator, tokenizer) and, on a GPU, the peak memory of the call
(torch.cuda.max_memory_allocated, MiB). On the GPU the VAR-d16 sampling figures are also compared with the released
code's anchors (../shared/spec/anchors.md: 0.200 s at batch 1, 141 images/s at batch 64).
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from nvg.baselines.var.model import VAR, VARConfig
from nvg.baselines.var.sample import VARSampleConfig
from nvg.baselines.var.sampler import VARSampler
from nvg.baselines.var.vqvae import VQVAE, VQVAEConfig
from nvg.model import GeneratorConfig, NVGGenerator, generator_loss
from nvg.sample import SampleConfig, Sampler
from nvg.tokenizer import Tokenizer

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
AMP_DTYPE = torch.bfloat16 if HAS_CUDA else None
SIZES = os.environ.get("NVG_BENCH_SIZES", "d16,d20,d24" if HAS_CUDA else "tiny").split(",")
PRESETS = {  # size: (nvg generator, nvg tokenizer, var transformer, var tokenizer)
    "tiny": ("nvg-tiny", "tiny-ae-32px-8x8", "var-tiny", "var-vae-tiny"),
    **{f"d{n}": (f"nvg-d{n}", "nvg-ae-f16", f"var-d{n}", "var-vae-ch160") for n in (16, 20, 24)},
}
TRAIN_BATCH = 32 if HAS_CUDA else 16
ROUNDS = {1: 10, 16: 5, 64: 3} if HAS_CUDA else {1: 5, 16: 3, 64: 3}  # CPU: medians of 3 at least, the VM drifts


def rounds_from_env(text: str, rounds: dict[int, int]) -> dict[int, int]:
    """NVG_BENCH_ROUNDS="1:5,64:2" (batch:rounds, comma-separated) overrides ROUNDS for those batches."""
    out = dict(rounds)
    for item in filter(None, text.replace(" ", "").split(",")):
        batch, sep, n = item.partition(":")
        if not (sep and batch.isdigit() and n.isdigit() and int(batch) in rounds and int(n) >= 1):
            raise ValueError(f"NVG_BENCH_ROUNDS: expected batch:rounds pairs with batch in {sorted(rounds)} and "
                             f"rounds >= 1, got {item!r}")
        out[int(batch)] = int(n)
    return out


ROUNDS = rounds_from_env(os.environ.get("NVG_BENCH_ROUNDS", ""), ROUNDS)
RELEASED_VAR_D16 = {1: 0.200, 64: 64 / 141}  # seconds per call of the released code on an H200 (anchors.md)
MODELS = ["var", "nvg"]  # the baseline first
# sampling also runs VAR with one CUDA graph per scale on a GPU (the baseline stays the eager static-cache VAR) and
# NVG's fast variant (the <preset>-fast generator: prefix-cacheable structure transformer, few structure steps)
SAMPLE_MODELS = (["var", "var_graphs"] if HAS_CUDA else ["var"]) + ["nvg", "nvg_fast", "nvg_2step"]
# nvg and nvg_fast sample with nvg.sample's defaults for their preset: the official 25 Euler steps for faithful, the
# fast variant's default (nvg.sample.sampler.DEFAULT_STRUCTURE_SAMPLING, chosen from the README's quality table) for
# fast; nvg_2step is the official model (the same weights as nvg) with 2 Euler steps, what the main job records


def nvg_config(model: str) -> SampleConfig:
    """The NVG row's settings: nvg.sample's defaults for its preset, or 2 Euler steps for nvg_2step."""
    return SampleConfig(structure_steps=2, structure_solver="euler") if model == "nvg_2step" else SampleConfig()


def sync():
    if HAS_CUDA:
        torch.cuda.synchronize()


def amp():
    return torch.autocast(DEVICE.type, dtype=AMP_DTYPE) if AMP_DTYPE else nullcontext()


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


_CACHE: dict = {}


def build(size: str, model: str):
    """(generator, tokenizer) of `model` at `size`, random weights, eval mode, built once per run."""
    model = "var" if model.startswith("var") else "nvg" if model == "nvg_2step" else model
    nvg_fast = model == "nvg_fast"
    key = (size, model)
    if key not in _CACHE:
        for other in [k for k in _CACHE if k[0] != size]:  # one size in memory at a time
            del _CACHE[other]
        torch.manual_seed(0)
        nvg_name, nvg_tok, var_name, var_tok = PRESETS[size]
        if model == "var":
            tok = VQVAE(VQVAEConfig.from_name(var_tok))
            gen = VAR(VARConfig.from_name(var_name))
        else:
            tok = Tokenizer(nvg_tok)
            cfg = GeneratorConfig.from_name(nvg_name + ("-fast" if nvg_fast else ""), latent_dim=tok.config.latent_channels,
                                            vocab_size=tok.config.vocab_size)
            gen = NVGGenerator(cfg)
        _CACHE[key] = (gen.to(DEVICE).eval(), tok.to(DEVICE).eval())
    return _CACHE[key]


def sampler_fn(size: str, model: str, batch: int):
    """A callable that samples `batch` images (tokens -> image) and synchronises."""
    gen, tok = build(size, model)
    labels = torch.arange(batch, device=DEVICE) % 10
    if model.startswith("var"):  # released FID settings; the sampler keeps its caches / graphs between calls
        sampler = VARSampler(gen, tok, graphs=model == "var_graphs", autocast_dtype=AMP_DTYPE)
        config = VARSampleConfig()
    else:
        sampler = Sampler(gen, tok, fast=HAS_CUDA)
        config = nvg_config(model)

    def run():
        with torch.no_grad(), amp():
            sampler.sample(labels, config, seed=0)
        sync()
    return run


def describe(benchmark, size, model):
    gen, tok = build(size, model)
    benchmark.extra_info.update(size=size, device=torch.cuda.get_device_name() if HAS_CUDA else "cpu",
                                generator_params=count(gen), tokenizer_params=count(tok),
                                dtype=str(AMP_DTYPE or torch.float32))


def timed(benchmark) -> bool:
    """False under --benchmark-disable (a smoke run: no statistics to report)."""
    return benchmark.stats is not None


def measure_peak(benchmark, fn):
    if HAS_CUDA:
        torch.cuda.reset_peak_memory_stats()
        fn()
        benchmark.extra_info["peak_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)


@pytest.mark.parametrize("model", SAMPLE_MODELS)
@pytest.mark.parametrize("batch", [1, 16, 64])
@pytest.mark.parametrize("size", SIZES)
def test_sample(benchmark, record_baseline, report_ratio, size, batch, model):
    benchmark.group = f"sample-b{batch}-{size}"
    fn = sampler_fn(size, model, batch)
    fn()  # warm-up: compilation, CUDA graphs, allocator
    describe(benchmark, size, model)
    measure_peak(benchmark, fn)
    benchmark.pedantic(fn, rounds=ROUNDS[batch], warmup_rounds=1 if HAS_CUDA else 0)
    if not timed(benchmark):
        return
    benchmark.extra_info["images_per_s"] = round(batch / benchmark.stats.stats.median, 2)
    key = ("sample", size, batch)
    if HAS_CUDA and model.startswith("var") and size == "d16" and batch in RELEASED_VAR_D16:
        benchmark.extra_info["speedup_vs_released_var_anchor"] = round(
            RELEASED_VAR_D16[batch] / benchmark.stats.stats.median, 2)
    if model == "var":
        record_baseline(key, benchmark)
    else:
        report_ratio(key, "var", benchmark, sampler_fn(size, "var", batch))
    if model == "nvg":
        record_baseline(key + ("nvg",), benchmark)
    if model in ("nvg_fast", "nvg_2step"):
        report_ratio(key + ("nvg",), "nvg", benchmark, sampler_fn(size, "nvg", batch))
        sc = nvg_config(model).resolved(build(size, model)[0].config)
        benchmark.extra_info["sample_config"] = dict(structure_steps=sc.structure_steps,
                                                     structure_solver=sc.structure_solver)


def decode_fn(size: str, model: str, batch: int):
    gen, tok = build(size, model)
    if model == "var":
        c = tok.config
        f_hat = torch.randn(batch, c.latent_channels, c.patch_nums[-1], c.patch_nums[-1], device=DEVICE)
    else:
        c = gen.config
        f_hat = torch.randn(batch, c.num_positions, c.latent_dim, device=DEVICE)
    decode = tok.decode  # a latent f_hat -> images, on both tokenizers

    def run():
        with torch.no_grad(), amp():
            decode(f_hat)
        sync()
    return run


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("size", SIZES)
def test_decode(benchmark, record_baseline, report_ratio, size, model):
    batch = 16
    benchmark.group = f"decode-b{batch}-{size}"
    fn = decode_fn(size, model, batch)
    fn()
    describe(benchmark, size, model)
    measure_peak(benchmark, fn)
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
    if not timed(benchmark):
        return
    benchmark.extra_info["images_per_s"] = round(batch / benchmark.stats.stats.median, 2)
    if model == "var":
        record_baseline(("decode", size), benchmark)
    else:
        report_ratio(("decode", size), "var", benchmark, decode_fn(size, "var", batch))


def train_step_fn(size: str, model: str, batch: int):
    """One optimizer step on tokens extracted beforehand from random images."""
    gen, tok = build(size, model)
    gen.train()
    opt = torch.optim.AdamW(gen.parameters(), lr=1e-4, betas=(0.9, 0.95))
    side = tok.config.image_size if model == "var" else tok.config.image_size
    x = torch.rand(batch, 3, side, side, device=DEVICE) * 2 - 1
    labels = torch.arange(batch, device=DEVICE) % 10
    with torch.no_grad():
        if model == "var":
            idx = tok.encode(x)
            x_BLCv, target = tok.quantize.indices_to_var_input(idx), torch.cat(idx, 1)
        else:
            vgs = tok.encode(x)

    def run():
        with amp():
            if model == "var":
                logits = gen(labels, x_BLCv)
                loss = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())
            else:
                out = gen(vgs.canvas, vgs.labels, labels)
                loss = generator_loss(out, vgs.f_hat, vgs.tokens)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
    return run


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("size", SIZES)
def test_train_step(benchmark, record_baseline, report_ratio, size, model):
    batch = TRAIN_BATCH
    benchmark.group = f"train-b{batch}-{size}"
    fn = train_step_fn(size, model, batch)
    fn()
    describe(benchmark, size, model)
    measure_peak(benchmark, fn)
    benchmark.pedantic(fn, rounds=5 if HAS_CUDA else 3, warmup_rounds=1)
    build(size, model)[0].eval()
    if not timed(benchmark):
        return
    benchmark.extra_info["images_per_s"] = round(batch / benchmark.stats.stats.median, 2)
    if model == "var":
        record_baseline(("train", size), benchmark)
    else:
        report_ratio(("train", size), "var", benchmark, train_step_fn(size, "var", batch))
        build(size, "var")[0].eval()
