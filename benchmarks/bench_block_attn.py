"""Block attention: nvg's Triton kernel against SDPA with a dense -inf bias, FlexAttention and SDPA without a mask.

    pytest benchmarks/bench_block_attn.py --benchmark-only

With CUDA: the H200 anchor shapes (../shared/spec/anchors.md), bf16, forward and forward + backward, providers
nvg, sdpa_dense_bias (the baseline, run first in each group), flex_attention (compiled, same block mask) and
sdpa_nomask (attends to every key: a speed reference, not the same result). Without CUDA: tiny shapes, fp32,
providers nvg (the Triton kernels in the interpreter) and reference (PyTorch SDPA + boolean mask); group names
say "cpu-tiny" and the times say nothing about GPU speed.

extra_info: TFLOP/s counting allowed (query, key) pairs only, 4·B·H·D·pairs for the forward (two matmuls) and
3.5× that for forward + backward (five more matmuls in the backward, P recomputed); speedup_vs_sdpa_dense_bias
(baseline median / this median, same run); on CUDA also triton.testing.do_bench's median (do_bench_ms).

test_kv_cache_sampling times one layer's attention over a whole VAR sampling run (append + attend per scale, B = 64
images x 2 for CFG on CUDA): the static KVCache against VAR's released torch.cat growth + SDPA. On the CPU the cache
attends only the written keys, without a mask when every written key is visible (KVCache._attend_cpu).
The results also go to .benchmarks/block_attn.md as a markdown table (printed with -s).
"""
import os

import pytest
import torch
import torch.nn.functional as F
from nvg.kernels import KVCache, block_attention, block_attention_ref, block_mask
from nvg.kernels.block_attn import block_attn_bwd_triton, block_attn_fwd_triton

# triton 3.6's interpreter converts 1-element numpy arrays to scalars, deprecated in numpy >= 1.25: noise only
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
VAR_SIDES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # VAR-d16 at 256 px: 680 tokens over 10 scales


def var_ids(sides):
    return torch.repeat_interleave(torch.arange(len(sides)), torch.tensor([n * n for n in sides]))


def prefix_ids(L, prefix):
    return (torch.arange(L) >= prefix).long()


if HAS_CUDA:
    DTYPE = torch.bfloat16
    SHAPES = {  # name: (B, H, D, block ids)
        "var-d16-train-B32-H16-L680": (32, 16, 64, var_ids(VAR_SIDES)),
        "nvg-structure-prefix-B224-H8-L513": (224, 8, 64, prefix_ids(513, 257)),
    }
    PROVIDERS = ["sdpa_dense_bias", "nvg", "flex_attention", "sdpa_nomask"]
    LABEL = ""
else:
    DTYPE = torch.float32
    SHAPES = {
        "var-tiny-B1-H2-L30": (1, 2, 32, var_ids((1, 2, 3, 4))),
        "prefix-tiny-B1-H2-L33": (1, 2, 32, prefix_ids(33, 17)),
    }
    PROVIDERS = ["reference", "nvg"]
    LABEL = " cpu-tiny (CPU, tiny, interpreter/reference)"
BASELINE = PROVIDERS[0]


def attention_fn(provider, ids, B, H, L):
    """A callable (q, k, v) -> out for the provider, with its mask built once, outside the timing."""
    if provider == "nvg" and HAS_CUDA:
        return lambda q, k, v: block_attention(q, k, v, ids, ids, check=False)
    if provider == "reference":
        return lambda q, k, v: block_attention_ref(q, k, v, ids, ids)
    if provider == "sdpa_dense_bias":
        bias = torch.zeros(L, L, device=DEVICE, dtype=DTYPE).masked_fill_(~block_mask(ids, ids), float("-inf"))
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None, None])
    if provider == "sdpa_nomask":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
    if provider == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def mask_mod(b, h, q_idx, kv_idx):
            return ids[kv_idx] <= ids[q_idx]

        mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=L, KV_LEN=L, device=DEVICE)
        flex = torch.compile(flex_attention, dynamic=False)
        return lambda q, k, v: flex(q, k, v, block_mask=mask)
    raise ValueError(provider)


def interpreter_fns(ids, scale):
    # CPU: the Triton launchers themselves (interpreter); the op would dispatch to the reference on CPU tensors.
    def fwd(q, k, v):
        return block_attn_fwd_triton(q, k, v, ids, ids, scale)[0]

    def fwd_bwd(q, k, v, grad_out):
        out, lse = block_attn_fwd_triton(q, k, v, ids, ids, scale)
        return block_attn_bwd_triton(grad_out, q, k, v, out, lse, ids, ids, scale)

    return fwd, fwd_bwd


def sync():
    if HAS_CUDA:
        torch.cuda.synchronize()


ROWS = []


@pytest.fixture(scope="module", autouse=True)
def markdown_table():
    """After the run, write the results as a markdown table to .benchmarks/block_attn.md (and print it with -s)."""
    yield
    if not ROWS:
        return
    head = f"Device: {ROWS[0]['device']}, {ROWS[0]['dtype']}. Speedup = {BASELINE} median / median (same run).\n\n"
    lines = ["| shape | pass | provider | ms | TFLOP/s (allowed pairs) | speedup vs " + BASELINE + " | do_bench ms |",
             "|---|---|---|---|---|---|---|"]
    for r in ROWS:
        lines.append(f"| {r['shape']} | {r['mode']} | {r['provider']} | {r['ms']} | {r['TFLOP_per_s']} | "
                     f"{r.get('speedup_vs_' + BASELINE, '1.0 (baseline)')} | {r.get('do_bench_ms', '-')} |")
    text = head + "\n".join(lines) + "\n"
    os.makedirs(".benchmarks", exist_ok=True)
    with open(os.path.join(".benchmarks", "block_attn.md"), "w") as f:
        f.write(text)
    print("\n" + text)


def make_timed(provider, shape, mode):
    """The timed call (ends with a device sync) of one provider on one shape, inputs built here."""
    B, H, D, ids = SHAPES[shape]
    L = len(ids)
    ids = ids.to(DEVICE)
    g = torch.Generator(DEVICE).manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, device=DEVICE, dtype=DTYPE, generator=g) for _ in range(3))
    grad_out = torch.randn_like(q)
    if provider == "nvg" and not HAS_CUDA:
        fwd_i, fwd_bwd_i = interpreter_fns(ids, D**-0.5)
        fn = (lambda: fwd_i(q, k, v)) if mode == "fwd" else (lambda: fwd_bwd_i(q, k, v, grad_out))
    else:
        attn = attention_fn(provider, ids, B, H, L)
        qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))

        def fn():
            if mode == "fwd":
                with torch.no_grad():
                    return attn(q, k, v)
            return torch.autograd.grad(attn(qg, kg, vg), (qg, kg, vg), grad_out)

    def timed():
        out = fn()
        sync()
        return out

    timed()  # compile / autotune before any timing
    return timed, fn, (q, k, v, ids)


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_block_attn(benchmark, record_baseline, report_ratio, provider, shape, mode):
    B, H, D, ids = SHAPES[shape]
    L = len(ids)
    benchmark.group = f"block_attn {shape} {mode}{LABEL}"
    timed, fn, (q, k, v, ids) = make_timed(provider, shape, mode)
    if mode == "fwd" and provider != "sdpa_nomask":  # every masked provider computes the same attention
        expected = block_attention_ref(q[:2], k[:2], v[:2], ids, ids)
        torch.testing.assert_close(fn()[:2].float(), expected.float(), atol=3e-2, rtol=2e-2)
    rounds, iterations = (30, 10) if HAS_CUDA else (3, 1)
    benchmark.pedantic(timed, rounds=rounds, iterations=iterations, warmup_rounds=1)

    if benchmark.stats is None:  # --benchmark-disable: a smoke run, no timings
        return
    pairs = int(block_mask(ids, ids).sum())
    flops = 4.0 * B * H * D * pairs * (1.0 if mode == "fwd" else 3.5)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(device=torch.cuda.get_device_name() if HAS_CUDA else "cpu (interpreter/reference)",
                                dtype=str(DTYPE), B=B, H=H, L=L, D=D, allowed_fraction=round(pairs / L**2, 4),
                                ms=round(median * 1e3, 4), TFLOP_per_s=round(flops / median / 1e12, 3))
    if HAS_CUDA:
        import triton.testing

        do_bench_ms = triton.testing.do_bench(fn, warmup=25, rep=200)
        benchmark.extra_info.update(do_bench_ms=round(do_bench_ms, 4),
                                    do_bench_TFLOP_per_s=round(flops / do_bench_ms / 1e9, 2))
    key = ("block_attn", shape, mode)
    if provider == BASELINE:
        record_baseline(key, benchmark)
    else:
        built = []  # the baseline is built only if its own benchmark was deselected

        def baseline():
            built or built.append(make_timed(BASELINE, shape, mode)[0])
            return built[0]()

        report_ratio(key, BASELINE, benchmark, baseline)
    ROWS.append(dict(benchmark.extra_info, shape=shape, mode=mode, provider=provider))


# ---------------------------------------------------------------------------------------------------------------------
# One layer's attention over a whole VAR sampling run: the static cache against VAR's released torch.cat growth.
# B = 64 images x 2 (CFG): VAR-d16 on a GPU; on the CPU var-tiny (2 heads of 64, 6 scales), the shape the CPU
# sampling benchmark (bench_nvg_vs_var.py, batch 64) runs
CACHE_SHAPE = (128, 16, 64, VAR_SIDES) if HAS_CUDA else (128, 2, 64, (1, 2, 3, 4, 6, 8))
CACHE_PROVIDERS = ["cat_sdpa", "nvg_static_cache"]


def sampling_run(provider):
    B, H, D, sides = CACHE_SHAPE
    ids = var_ids(sides)
    L = len(ids)
    g = torch.Generator(DEVICE).manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, device=DEVICE, dtype=DTYPE, generator=g) for _ in range(3))
    steps = [(int(o), n * n) for o, n in zip(torch.tensor([0] + [n * n for n in sides]).cumsum(0), sides)]
    cache = KVCache(B, H, L, D, dtype=DTYPE, device=DEVICE, block_ids=ids)

    def run():
        if provider == "nvg_static_cache":
            for offset, n in steps:
                s = slice(offset, offset + n)
                cache.append(k[:, :, s], v[:, :, s], offset)
                cache.attend(q[:, :, s], offset)
        else:  # VAR as released: keys and values grow by concatenation, each scale attends to all of them
            k_all = v_all = None
            for offset, n in steps:
                s = slice(offset, offset + n)
                k_all = k[:, :, s] if k_all is None else torch.cat((k_all, k[:, :, s]), dim=2)
                v_all = v[:, :, s] if v_all is None else torch.cat((v_all, v[:, :, s]), dim=2)
                F.scaled_dot_product_attention(q[:, :, s], k_all, v_all)
        sync()

    return run


@pytest.mark.parametrize("provider", CACHE_PROVIDERS)
def test_kv_cache_sampling(benchmark, record_baseline, report_ratio, provider):
    B, H, D, sides = CACHE_SHAPE
    benchmark.group = f"kv_cache VAR sampling, one layer, B{B}-H{H}-D{D}-{len(sides)} scales{LABEL}"
    run = sampling_run(provider)
    run()  # compile / autotune every scale's shape
    with torch.no_grad():
        benchmark.pedantic(run, rounds=30, iterations=5, warmup_rounds=1)  # short calls: many rounds on CPU too
    if benchmark.stats is None:  # --benchmark-disable
        return
    benchmark.extra_info.update(ms=round(benchmark.stats.stats.median * 1e3, 4), dtype=str(DTYPE))
    key = ("kv_cache", CACHE_SHAPE)
    if provider == CACHE_PROVIDERS[0]:
        record_baseline(key, benchmark)
    else:
        report_ratio(key, CACHE_PROVIDERS[0], benchmark, sampling_run(CACHE_PROVIDERS[0]))
    speedup = benchmark.extra_info.get(f"speedup_vs_{CACHE_PROVIDERS[0]}", "1.0 (baseline)")
    ROWS.append(dict(shape=f"VAR sampling, one layer, B={B}, H={H}, D={D}, {len(sides)} scales",
                     mode=f"{len(sides)} steps",
                     provider=provider, ms=benchmark.extra_info["ms"], TFLOP_per_s="-",
                     device=ROWS[0]["device"] if ROWS else DEVICE, dtype=str(DTYPE),
                     **{f"speedup_vs_{BASELINE}": f"{speedup} vs {CACHE_PROVIDERS[0]}"}))
