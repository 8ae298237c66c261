"""Tokenizer encode (encoder + granularity clustering + per-stage quantization) in images/s: the compiled ops
against their pure-PyTorch references (`nvg.ops.*_ref`), same run, same weights.

GPU: the official configuration (256 px, 16x16x32 latent, 4096 codes, 9 stages), batch 32.
CPU: 32 px images with the official quantizer shape (16x16x32 latent, 4096 codes, 9 stages) and a narrow CNN, so
that the clustering and quantization carry the weight they have at full size; batch 64.
"""
import types
from unittest import mock

import pytest
import torch

import nvg.quantizer
from nvg import ops
from nvg.tokenizer import Tokenizer, TokenizerConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REF_OPS = types.SimpleNamespace(
    granularity_cluster=lambda f: ops.granularity_cluster_ref(f, torch.float32),  # the official precision
    cluster_quantize=ops.cluster_quantize_ref,
)


def _setup():
    if DEVICE == "cuda":
        cfg, B = TokenizerConfig.from_name("nvg-ae-f16"), 32
    else:
        cfg, B = TokenizerConfig(image_size=32, latent_size=16, base_channels=16, channel_mult=(1, 2),
                                 num_res_blocks=1, latent_channels=32, codebook_size=4096, norm_groups=8), 64
    torch.manual_seed(0)
    tok = Tokenizer(cfg).to(DEVICE).eval()
    tok.quantize.embedding.weight.data.normal_(0, 0.5)  # a spread-out codebook, as after training
    x = torch.rand(B, 3, cfg.image_size, cfg.image_size, device=DEVICE) * 2 - 1
    return tok, x


def _encode_fn(tok, x, reference: bool):
    def fn():
        if reference:
            with mock.patch.object(nvg.quantizer, "ops", REF_OPS):
                out = tok.encode(x)
        else:
            out = tok.encode(x)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    return fn


@pytest.mark.parametrize("provider", ["ref", "nvg"])
@pytest.mark.benchmark(group="tokenizer_encode")
def test_tokenizer_encode(benchmark, record_baseline, report_ratio, provider):
    tok, x = _setup()
    ref_fn, nvg_fn = _encode_fn(tok, x, True), _encode_fn(tok, x, False)
    fn = ref_fn if provider == "ref" else nvg_fn
    benchmark.extra_info.update(device=DEVICE, batch=x.shape[0], image_size=x.shape[-1],
                                latent=f"{tok.config.latent_size}x{tok.config.latent_size}x{tok.config.latent_channels}",
                                codebook=tok.config.codebook_size, stages=tok.num_stages)
    vgs = benchmark.pedantic(fn, rounds=3 if DEVICE == "cpu" else 10, warmup_rounds=1)
    if benchmark.disabled:  # --benchmark-disable: a smoke run, no timings
        return
    benchmark.extra_info["images_per_s"] = round(x.shape[0] / benchmark.stats.stats.median, 1)
    if provider == "ref":
        record_baseline("tokenizer_encode", benchmark)
    else:
        report_ratio("tokenizer_encode", "pytorch_ref_ops", benchmark, ref_fn)
        ref_vgs = ref_fn()  # same answer from both paths (labels; tokens may differ only on exact float ties)
        assert torch.equal(vgs.labels, ref_vgs.labels)
