"""granularity_cluster: compiled kernels against the reference, the official outputs, and bad inputs."""
import pytest
import torch

from nvg.ops import granularity_cluster, granularity_cluster_ref


def sample_inputs(device):
    """(id, f) pairs: random and awkward shapes, duplicated vectors (exact ties), integer grids, large magnitudes."""
    g = torch.Generator().manual_seed(0)
    cases = []
    for B, N, C in [(1, 2, 1), (3, 4, 5), (1, 1, 3), (2, 16, 7), (5, 32, 3), (2, 256, 32), (1, 256, 13)]:
        cases.append((f"randn-B{B}-N{N}-C{C}", torch.randn(B, N, C, generator=g)))
    dup = torch.randn(2, 8, 3, generator=g).repeat(1, 8, 1)  # every vector appears 8 times: ties everywhere
    cases.append(("duplicates-B2-N64-C3", dup))
    cases.append(("all-equal-B1-N16-C2", torch.ones(1, 16, 2)))
    grid = torch.randint(-2, 3, (3, 64, 5), generator=g).float()  # small integers: many exactly equal distances
    cases.append(("int-grid-B3-N64-C5", grid))
    cases.append(("large-B2-N32-C6", torch.randn(2, 32, 6, generator=g) * 1e15))
    cases.append(("float64-B2-N16-C4", torch.randn(2, 16, 4, generator=g, dtype=torch.float64)))
    return [(name, f.to(device)) for name, f in cases]


def check_structure(labels, N):
    """Nested (child // 2 == parent) and equal-sized clusters at every level."""
    K = labels.shape[1] - 1
    assert N == 2**K
    assert (labels[:, 0] == 0).all()
    for i in range(1, K + 1):
        assert torch.equal(labels[:, i] // 2, labels[:, i - 1])
        counts = torch.stack([torch.bincount(row, minlength=2**i) for row in labels[:, i].cpu()])
        assert (counts == N // 2**i).all()


@pytest.mark.parametrize("idx", range(len(sample_inputs("cpu"))), ids=[n for n, _ in sample_inputs("cpu")])
def test_matches_reference(device, idx):
    name, f = sample_inputs(device)[idx]
    out = granularity_cluster(f)
    assert out.dtype == torch.long and out.shape == (f.shape[0], f.shape[1].bit_length(), f.shape[1])
    assert out.device == f.device
    ref = granularity_cluster_ref(f.cpu())
    assert torch.equal(out.cpu(), ref), name
    check_structure(out, f.shape[1])


def tie_inputs():
    """Inputs full of exactly equal distances, N = 2..256, B = 1 and odd B: the mutual-nearest-neighbour rounds must
    break every tie as the official one-pair-at-a-time loop does (smallest distance, then first row-major entry)."""
    g = torch.Generator().manual_seed(7)
    cases = []
    for N in [2, 4, 8, 16, 32, 64, 128, 256]:
        B = 1 if N in (2, 16, 128) else 3
        cases.append((f"int-grid-B{B}-N{N}", torch.randint(-1, 2, (B, N, 2), generator=g).double()))
        reps = max(N // 4, 1)  # N / reps distinct vectors, each repeated
        base = torch.randint(-2, 3, (B, N // reps, 3), generator=g).double()
        cases.append((f"duplicates-B{B}-N{N}", base.repeat(1, reps, 1)))
        cases.append((f"all-equal-B{B}-N{N}", torch.full((B, N, 4), 0.5, dtype=torch.float64)))
    # a line of points 0, 1, 2, ...: equal nearest distances along a chain, and one mutual pair per round
    cases.append(("line-B5-N64", torch.arange(64.0).view(1, 64, 1).repeat(5, 1, 1)))
    cases.append(("doubling-B1-N32", (2.0 ** torch.arange(32.0)).view(1, 32, 1)))
    cases.append(("lattice-B1-N256", torch.stack(torch.meshgrid(torch.arange(16.0), torch.arange(16.0),
                                                                indexing="ij"), -1).view(1, 256, 2)))
    return cases


@pytest.mark.parametrize("idx", range(len(tie_inputs())), ids=[n for n, _ in tie_inputs()])
def test_ties_match_official_order(idx):
    name, f = tie_inputs()[idx]
    out = granularity_cluster(f)
    assert torch.equal(out, granularity_cluster_ref(f)), name
    check_structure(out, f.shape[1])
    assert torch.equal(granularity_cluster(f, validate=False), out)


def test_validate_false_keeps_valid_structure_on_nan():
    """Unvalidated non-finite input: no error, no out-of-range label (NaN distances count as +inf)."""
    f = torch.randn(3, 32, 4)
    f[0, 3] = float("nan")
    f[1] = float("inf")
    check_structure(granularity_cluster(f, validate=False), 32)


def test_official_reference_labels(nvg_reference):
    ref = nvg_reference
    f = ref["clustering.f"]
    assert torch.equal(granularity_cluster(f), ref["clustering.labels"])
    assert torch.equal(granularity_cluster_ref(f), ref["clustering.labels"])


@pytest.mark.cuda
def test_cuda_matches_cpu_large_batch():
    f = torch.randn(67, 256, 32)
    assert torch.equal(granularity_cluster(f.cuda()).cpu(), granularity_cluster(f))


def test_half_precision_inputs_are_clustered_in_double():
    f = torch.randn(2, 16, 8).half()
    assert torch.equal(granularity_cluster(f), granularity_cluster_ref(f))


def test_opcheck():
    f = torch.randn(3, 16, 5)
    torch.library.opcheck(torch.ops.nvg.granularity_cluster.default, (f,))


def test_compile_fullgraph():
    f = torch.randn(2, 8, 3)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def fn(x):
        return granularity_cluster(x * 2.0) + 1

    assert torch.equal(fn(f), granularity_cluster(f * 2.0) + 1)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: torch.randn(16, 4), "3-D tensor"),
        (lambda: torch.randn(1, 2, 16, 4), "3-D tensor"),
        (lambda: torch.randn(2, 12, 4), "power of two"),
        (lambda: torch.randn(2, 0, 4), "power of two"),
        (lambda: torch.randn(0, 16, 4), "empty batch"),
        (lambda: torch.randn(2, 16, 0), "no channels"),
        (lambda: torch.randint(0, 5, (2, 16, 4)), "floating-point"),
        (lambda: torch.randn(2, 4, 16).transpose(1, 2), "contiguous"),
        (lambda: torch.full((1, 4, 2), float("nan")), "NaN"),
    ],
    ids=["rank2", "rank4", "N12", "N0", "B0", "C0", "int", "noncontig", "nan"],
)
def test_bad_inputs(make, match):
    with pytest.raises(RuntimeError, match=match):
        granularity_cluster(make())


# ---- CUDA-only cases (the kernel's shared-memory and global-memory paths, chunking, streams)
@pytest.mark.cuda
@pytest.mark.parametrize("B, N, C", [(67, 256, 32), (5, 1024, 32), (3, 256, 128), (4, 1, 3), (4, 2, 1)],
                         ids=["B67-smem", "N1024-global", "C128-global", "N1", "N2-C1"])
def test_cuda_paths_match_cpu(B, N, C):
    f = torch.randn(B, N, C)
    assert torch.equal(granularity_cluster(f.cuda()).cpu(), granularity_cluster(f))


@pytest.mark.cuda
def test_cuda_workspace_chunking_and_stream(monkeypatch):
    f = torch.randn(5, 64, 7)
    expected = granularity_cluster(f)
    monkeypatch.setenv("NVG_CLUSTER_WORKSPACE_MB", "0")  # one image per launch
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = granularity_cluster(f.cuda())
    stream.synchronize()
    assert torch.equal(out.cpu(), expected)
    monkeypatch.setenv("NVG_CLUSTER_WORKSPACE_MB", "abc")
    with pytest.raises(RuntimeError, match="NVG_CLUSTER_WORKSPACE_MB"):
        granularity_cluster(f.cuda())


@pytest.mark.cuda
@pytest.mark.parametrize("make, match", [(lambda: torch.full((1, 4, 2), float("nan")), "NaN"),
                                         (lambda: torch.randn(2, 4, 16).transpose(1, 2), "contiguous")])
def test_cuda_bad_inputs(make, match):
    with pytest.raises(RuntimeError, match=match):
        granularity_cluster(make().cuda())


def test_huge_magnitudes_keep_valid_structure():
    """Squared distances overflow to inf beyond ~1e154: the labels must still be nested and balanced."""
    f = torch.randn(2, 32, 4, dtype=torch.float64) * 1e200
    check_structure(granularity_cluster(f), 32)
