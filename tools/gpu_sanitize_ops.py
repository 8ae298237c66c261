"""Small-size runs of the CUDA ops for compute-sanitizer (memcheck, racecheck, synccheck), each checked against the
CPU kernel. Run by benchmarks/run_gpu.sh as

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 tools/gpu_sanitize_ops.py

Sizes are tiny (the tools slow kernels down 10-100x) but cover every code path: granularity_cluster with its state
in shared memory and in global memory (large C), N = 2 and N = 256, ties (duplicated vectors), workspace chunking;
cluster_quantize with and without a prepared codebook, empty clusters, near ties rescored exactly, a partial tile.
Exit status 1 if a result differs from the CPU kernel; without CUDA it says so and exits 0 (nothing to check).
"""
import os
import sys

import torch


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_sanitize_ops: no CUDA device; nothing to check")
        return 0
    import nvg  # noqa: F401
    from nvg.ops import cluster_quantize, granularity_cluster, prepare_codebook

    g = torch.Generator().manual_seed(0)
    failures = []

    def check(name, got, expected):
        ok = torch.equal(got.cpu(), expected)
        print(f"{name}: {'ok' if ok else 'MISMATCH'}", flush=True)
        if not ok:
            failures.append(name)

    cases = [("gc-smem-N64-C8", torch.randn(3, 64, 8, generator=g)),
             ("gc-N2-C1", torch.randn(2, 2, 1, generator=g)),
             ("gc-global-N64-C512", torch.randn(2, 64, 512, generator=g)),
             ("gc-dup-N256-C4", torch.randint(-1, 2, (1, 16, 4), generator=g).float().repeat(1, 16, 1))]
    for name, f in cases:
        check(name, granularity_cluster(f.cuda()), granularity_cluster(f))
    os.environ["NVG_CLUSTER_WORKSPACE_MB"] = "0"  # one image per launch
    f = torch.randn(3, 32, 5, generator=g)
    check("gc-chunked", granularity_cluster(f.cuda(), validate=False), granularity_cluster(f))
    del os.environ["NVG_CLUSTER_WORKSPACE_MB"]

    for name, (B, N, C, n, V) in {"cq-small": (2, 16, 7, 8, 33), "cq-tiles": (3, 64, 32, 64, 300),
                                  "cq-empty": (2, 6, 4, 5, 9)}.items():
        res, E = torch.randn(B, N, C, generator=g), torch.randn(V, C, generator=g)
        labels = torch.randint(0, max(n // 2, 1), (B, N), generator=g)  # some clusters stay empty
        expected = cluster_quantize(res, labels, n, E)[0]
        check(name, cluster_quantize(res.cuda(), labels.cuda(), n, E.cuda())[0], expected)
        prepared = prepare_codebook(E.cuda())
        got = cluster_quantize(res.cuda(), labels.cuda(), n, E.cuda(), prepared, validate=False)[0]
        check(name + "-prepared", got, expected)
    code = torch.randint(-3, 4, (5, 3), generator=g).float() / 4  # exact ties: rescored in double
    res, labels = torch.randint(-3, 4, (2, 8, 3), generator=g).float() / 4, torch.arange(8).repeat(2, 1) % 4
    check("cq-ties", cluster_quantize(res.cuda(), labels.cuda(), 4, code.repeat(3, 1).cuda())[0],
          cluster_quantize(res, labels, 4, code.repeat(3, 1))[0])
    torch.cuda.synchronize()
    print(f"gpu_sanitize_ops: {len(failures)} mismatch(es) {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
