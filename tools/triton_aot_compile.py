"""Compile, ahead of time and without a GPU, every Triton kernel variant the GPU tests will ask for; print how many
and how long it took. This is the compile part of the GPU check's time budget (benchmarks/run_gpu.sh).

    python tools/triton_aot_compile.py [--limit N] [--list] [--json PATH] [--jobs J]

Under NVG_TRITON_AUTOTUNE=0 (the GPU check's test phase) each kernel has one config (TEST_BLOCKS), and Triton
compiles one binary per distinct (kernel, signature, constexprs, argument specialization). The script replays the
Triton launches of tests/test_kernels_*.py with the same shapes, dtypes, strides and views on CPU tensors, with
`wrap_triton` replaced by a recorder: no kernel runs, each launch's specialization is computed by Triton's own
`native_specialize_impl` (ints equal to 1 become constants, ints and pointers divisible by 16 get the divisibility
attribute), and the distinct variants are compiled for sm_90 with triton.compile(ASTSource, GPUTarget("cuda", 90,
32)) in a fresh cache. Not counted: the variants torch.compile's Inductor builds for the one compile test.
--limit N compiles only the first N variants (CI smoke run); --list counts them without compiling.
"""
import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)  # the real compiler, never the interpreter
os.environ.setdefault("NVG_TRITON_AUTOTUNE", "0")

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


def _recorder(variants):
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    from nvg.kernels.block_attn_kernels import TEST_BLOCKS

    names = {"_block_attn_fwd_kernel": "fwd", "_block_attn_bwd_dkdv_kernel": "dkdv",
             "_block_attn_bwd_dq_kernel": "dq"}

    def wrap(kernel):
        fn = kernel.fn if hasattr(kernel, "configs") else kernel  # the autotuner wraps the JIT function
        options = dict(num_warps=4, num_stages=3)
        consts = {}
        if fn.__name__ in names:
            bm, bn, warps, stages = TEST_BLOCKS[names[fn.__name__]]
            consts.update(BM=bm, BN=bn)
            options = dict(num_warps=warps, num_stages=stages)

        class Launch:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    bound = dict(zip(fn.arg_names, args))
                    bound.update(kwargs, **consts)
                    signature, constexprs, attrs = {}, {}, {}
                    for i, p in enumerate(fn.params):
                        value = bound[p.name]
                        if p.is_constexpr:
                            signature[p.name], constexprs[(i,)] = "constexpr", value
                            continue
                        ty, attr = native_specialize_impl(BaseBackend, value, False, True, True)
                        signature[p.name] = ty
                        if ty == "constexpr":
                            constexprs[(i,)] = attr
                        elif isinstance(attr, str) and attr:
                            attrs[(i,)] = BaseBackend.parse_attr(attr)
                    key = (fn.__name__, tuple(signature.items()), tuple(sorted(constexprs.items())),
                           tuple(sorted((k, str(v)) for k, v in attrs.items())), tuple(sorted(options.items())))
                    variants.setdefault(key, (fn.__name__, signature, constexprs, attrs, options))
                return launch

        return Launch()

    return wrap


def _qkv(B, H, Lq, Lk, D, dtype, g):
    return [torch.randn(B, H, L, D, generator=g).to(dtype) for L in (Lq, Lk, Lk)]


def replay_gpu_tests():
    """The Triton launches of the GPU runs of tests/test_kernels_block_attn.py and tests/test_kernels_kv_cache.py."""
    import test_kernels_block_attn as tba
    import test_kernels_kv_cache as tkv

    from nvg.kernels import block_attn as ba

    fwd, bwd = ba.block_attn_fwd_triton, ba.block_attn_bwd_triton
    g = torch.Generator().manual_seed(0)

    def fwd_bwd(q, k, v, qb, kb, scale=None):
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        out, lse = fwd(q, k, v, qb, kb, scale)
        bwd(torch.randn_like(out), q, k, v, out, lse, qb, kb, scale)

    for dtype in (torch.float32, torch.float16, torch.bfloat16):  # test_triton_fwd_bwd_match_reference
        for case in tba.CASES:
            fwd_bwd(*tba.sample_inputs(case, "cpu", dtype))
    for case in (tba.CASES[1], tba.CASES[3], tba.CASES[5]):  # op, grads, opcheck (fp32)
        fwd_bwd(*tba.sample_inputs(case, "cpu", torch.float32, seed=1))
    B, L, H, D = 2, 21, 2, 32  # per-batch ids, transposed views
    q, k, v = (torch.randn(B, L, H, D, generator=g).transpose(1, 2) for _ in range(3))
    per_batch = torch.stack([tba.block_ids("prefix", L, 5), tba.block_ids("causal", L)])
    shared = tba.block_ids("causal", L)
    for qb, kb in ((per_batch, per_batch), (per_batch, shared), (shared, per_batch)):
        fwd_bwd(q, k, v, qb, kb, 0.3)
    kb = torch.cat([torch.zeros(13, dtype=torch.long), torch.ones(137, dtype=torch.long)])  # masked key tiles
    fwd_bwd(*_qkv(1, 1, 5, 150, 32, torch.float32, g), torch.zeros(5, dtype=torch.long), kb)
    for kind, L in (("var", 680), ("prefix", 513), ("causal", 300), ("full", 257)):  # bf16 error budget
        ids = tba.var_ids((1, 2, 3, 4, 5, 6, 8, 10, 13, 16)) if kind == "var" else tba.block_ids(kind, L, 257)
        fwd_bwd(*_qkv(2, 4, L, L, 64, torch.bfloat16, g), ids, ids)
    fwd_bwd(*_qkv(2, 3, 37, 37, 64, torch.float32, g), torch.arange(37) // 4, torch.arange(37) // 4)  # two GPUs

    def cache_steps(B, H, Lmax, D, dtype, ids, steps, scale=None):  # KVCache.attend = fwd on views of the cache
        kc = torch.zeros(B, H, Lmax, D, dtype=dtype)
        q = torch.randn(B, H, Lmax, D, generator=g).to(dtype)
        for offset, end in steps:
            fwd(q[:, :, offset:end], kc[:, :, :end], kc[:, :, :end], ids[offset:end], ids[:end],
                D**-0.5 if scale is None else scale)

    for sides in ((1, 2, 3, 4), (1, 2, 3, 5)):
        ids, steps = tkv.var_steps(sides)
        ids = torch.cat([ids, ids.new_full((3,), len(sides))])
        cache_steps(2, 2, len(ids), 32, torch.float32, ids, [(o, o + n) for o, n in steps])
    ids, steps = tkv.var_steps((1, 2, 3, 4))
    cache_steps(1, 2, 40, 32, torch.float32, torch.cat([ids, ids.new_full((10,), 9)]),
                [(o, o + n) for o, n in steps])
    cache_steps(1, 3, 20, 64, torch.float32, (torch.arange(20) >= 7).long(), [(0, 7), (7, 12), (12, 20)], 0.5)
    cache_steps(1, 1, 9, 32, torch.float32, torch.arange(9), [(t, t + 1) for t in range(9)])
    ids, steps = tkv.var_steps((1, 2, 3, 4, 5))
    cache_steps(4, 4, len(ids), 64, torch.bfloat16, ids, [(steps[-1][0], len(ids))])  # CUDA-graph step


def collect():
    from nvg.kernels import block_attn as ba

    variants = {}
    real = ba.wrap_triton
    ba.wrap_triton = _recorder(variants)
    try:
        replay_gpu_tests()
    finally:
        ba.wrap_triton = real
    return list(variants.values())


def compile_one(variant):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from nvg.kernels import block_attn_kernels as bk

    name, signature, constexprs, attrs, options = variant
    kernel = getattr(bk, name)
    fn = kernel.fn if hasattr(kernel, "configs") else kernel
    t = time.perf_counter()
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options=dict(options))
    return name, time.perf_counter() - t, compiled.metadata.shared


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=None, help="compile only the first N variants")
    ap.add_argument("--list", action="store_true", help="count the variants, compile nothing")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--json", default=None, help="write the summary here")
    args = ap.parse_args(argv)
    variants = collect()
    per_kernel = {}
    for v in variants:
        per_kernel[v[0]] = per_kernel.get(v[0], 0) + 1
    print(f"[aot] {len(variants)} Triton variants for the GPU tests (NVG_TRITON_AUTOTUNE=0): {per_kernel}")
    summary = dict(variants=len(variants), per_kernel=per_kernel, compiled=0, compile_s_total=0.0, wall_s=0.0)
    if not args.list:
        todo = variants if args.limit is None else variants[: args.limit]
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="nvg-aot-cache-")  # fresh: real compile times
        t0 = time.perf_counter()
        with ProcessPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
            results = list(pool.map(compile_one, todo))
        wall = time.perf_counter() - t0
        total = sum(r[1] for r in results)
        too_big = [r for r in results if r[2] > 227 * 1024]
        summary.update(compiled=len(results), compile_s_total=round(total, 1), wall_s=round(wall, 1),
                       max_shared_bytes=max((r[2] for r in results), default=0), over_shared_limit=len(too_big))
        print(f"[aot] compiled {len(results)} for sm_90: {total:.1f} s of compile time in total, {wall:.1f} s wall "
              f"with {args.jobs} process(es); largest shared memory {summary['max_shared_bytes']} bytes")
        if len(results) < len(variants):
            est = total / max(len(results), 1) * len(variants)
            summary["estimated_s_all"] = round(est, 1)
            print(f"[aot] estimate for all {len(variants)}: {est:.0f} s (one process)")
        if too_big:
            print(f"[aot] FAILED: {len(too_big)} variant(s) exceed 227 KiB of shared memory")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 1 if summary.get("over_shared_limit") else 0


if __name__ == "__main__":
    sys.exit(main())
