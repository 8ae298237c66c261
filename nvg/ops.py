"""The single Python front door to nvg's custom ops: typed wrappers, fake (meta) kernels and pure-PyTorch references.

Each op `<op>` is `torch.ops.nvg.<op>` (C++ CPU kernel in csrc/<op>.cpp, CUDA kernel in csrc/cuda/<op>.cu), and
`<op>_ref` beside it is the specification: short, batched, no tricks. Tests compare the two; benchmarks time them.
"""
import torch
from torch import Tensor

__all__ = ["NonFiniteError", "granularity_cluster", "granularity_cluster_ref", "cluster_quantize",
           "cluster_quantize_ref", "prepare_codebook"]


# ------------------------------------------------------------------------------------------------ granularity_cluster
class NonFiniteError(ValueError):
    """An input holds NaN or Inf (in training: a symptom of divergence, counted by the training loop)."""


def granularity_cluster(f: Tensor, validate: bool = True) -> Tensor:
    """Nested label maps of the official greedy pairwise clustering (spec/nvg-method.md §1.1).

    Args:
        f: float[B, N, C] latent features, N = 2**K positions (row-major over the latent grid).
    Returns:
        long[B, K+1, N]: level i holds labels in [0, 2**i) with exactly N / 2**i positions each; level 0 is all
        zeros, level K the finest (a permutation of 0..N-1), and level[i] // 2 == level[i-1] (children of p: 2p, 2p+1).
    validate=False skips the check that f is finite (on CUDA a device-to-host sync, and not capturable in a CUDA
    graph): for callers that validated once upstream. Shapes and dtypes are always checked. Non-finite values then
    give valid but meaningless label maps.
    """
    return torch.ops.nvg.granularity_cluster.default(f, validate)


@torch.library.register_fake("nvg::granularity_cluster")
def _granularity_cluster_fake(f, validate=True):
    torch._check(f.dim() == 3, lambda: f"granularity_cluster: f must be [B, N, C], got shape {tuple(f.shape)}")
    n = f.shape[1]
    k = max(int(n).bit_length() - 1, 0)
    return f.new_empty((f.shape[0], k + 1, n), dtype=torch.long)


def _relabel_ref(raw: Tensor) -> Tensor:
    """Top-down renumbering: the child with the smaller raw label of parent p becomes 2p, the other 2p+1."""
    out = torch.zeros_like(raw)
    for level in range(1, raw.shape[1]):
        child = raw[:, level]  # (B, N) raw labels in [0, 2**level)
        parent_of = torch.empty_like(child[:, : 2**level]).scatter_(1, child, out[:, level - 1])
        order = torch.sort(parent_of, dim=1, stable=True).indices  # children grouped by parent, smaller raw first
        ar = torch.arange(order.shape[1], device=raw.device).expand_as(order)
        rank = torch.empty_like(order).scatter_(1, order, ar)
        out[:, level] = rank.gather(1, child)
    return out


def granularity_cluster_ref(f: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """Reference for `granularity_cluster`: the official batched greedy loop (float64 by default; the benchmarks also
    run it in float32, the official code's precision, as the baseline)."""
    B, N, C = f.shape
    K = N.bit_length() - 1
    dev = f.device
    x, rows = f.to(dtype), torch.arange(B, device=dev)
    raw = torch.zeros(B, K + 1, N, dtype=torch.long, device=dev)
    raw[:, K] = torch.arange(N, device=dev)
    # (B, M, S): positions of each cluster, in member order
    members = torch.arange(N, device=dev).view(1, N, 1).expand(B, N, 1)
    for level in range(K, 0, -1):
        M, S = members.shape[1], members.shape[2]
        means = x.gather(1, members.reshape(B, M * S, 1).expand(-1, -1, C)).view(B, M, S, C).mean(2)
        d = (means[:, :, None] - means[:, None]).square().sum(-1)  # (B, M, M) squared L2
        d.diagonal(dim1=1, dim2=2).fill_(float("inf"))
        merged = []
        for _ in range(M // 2):
            flat = d.flatten(1).argmin(1)  # first minimum in row-major order
            i, j = flat // M, flat % M
            merged.append(torch.cat([members[rows, i], members[rows, j]], 1))
            for t in (i, j):
                d[rows, t, :] = float("inf")
                d[rows, :, t] = float("inf")
        members = torch.stack(merged, 1)  # (B, M/2, 2S), raw label = merge order
        labels = torch.arange(M // 2, device=dev).repeat_interleave(2 * S).expand(B, -1)
        raw[:, level - 1].scatter_(1, members.reshape(B, -1), labels)
    return _relabel_ref(raw)


# ---------------------------------------------------------------------------------------------------- cluster_quantize
def cluster_quantize(residual: Tensor, labels: Tensor, num_clusters: int, codebook: Tensor,
                     prepared: list[Tensor] | None = None, validate: bool = True) -> tuple[Tensor, Tensor]:
    """Mean residual of every cluster and the index of its nearest code (L2, lowest index on ties).

    Args:
        residual: float[B, N, C]; labels: long[B, N] in [0, num_clusters); codebook: float[V, C].
        prepared: `prepare_codebook(codebook)`, computed once per codebook version and passed to every call that
            uses that codebook (the quantizer prepares once per forward for its K+1 stages); None prepares here.
            Stale preparations (codebook changed in place afterwards) are not detected: prepare again.
        validate: check label range and finiteness (on CUDA two device-to-host syncs; no CUDA-graph capture).
            False for callers that validated upstream: shapes, dtypes and devices are still checked; on CUDA a
            label outside [0, num_clusters) then joins no cluster, on the CPU it still raises.
    Returns:
        ids: long[B, num_clusters]; means: [B, num_clusters, C] in residual's dtype (an empty cluster's mean is 0).
        Equivalent to `cluster_quantize_ref`; the CUDA kernel never materialises the B x n x V distances.
    """
    return torch.ops.nvg.cluster_quantize.default(residual, labels, num_clusters, codebook, prepared, validate)


def prepare_codebook(codebook: Tensor) -> list[Tensor]:
    """The codebook-derived arrays of `cluster_quantize` (double copy, norms, float32 tiles; layout per device).
    Device work only, no host sync: call it once per codebook version, outside the per-stage loop."""
    return torch.ops.nvg.cluster_quantize_prepare.default(codebook)


@torch.library.register_fake("nvg::cluster_quantize")
def _cluster_quantize_fake(residual, labels, num_clusters, codebook, prepared=None, validate=True):
    torch._check(residual.dim() == 3,
                 lambda: f"cluster_quantize: residual must be [B, N, C], got {tuple(residual.shape)}")
    torch._check(
        residual.device == labels.device == codebook.device,
        lambda: f"cluster_quantize: residual ({residual.device}), labels ({labels.device}) and codebook "
        f"({codebook.device}) must be on the same device",
    )
    B, C = residual.shape[0], residual.shape[2]
    return labels.new_empty((B, num_clusters)), residual.new_empty((B, num_clusters, C))


@torch.library.register_fake("nvg::cluster_quantize_prepare")
def _cluster_quantize_prepare_fake(codebook):
    V, C = codebook.shape
    d, f = dict(dtype=torch.float64), dict(dtype=torch.float32)
    if codebook.device.type == "cuda":  # csrc/cuda/cluster_quantize.cu: tiles of 128 codes, transposed copies
        Vp = (V + 127) // 128 * 128
        shapes = [((C, V), d), ((V,), d), ((C, Vp), f), ((Vp,), f), ((), d)]
    else:  # csrc/cluster_quantize.cpp: tiles of 16 codes
        Vp = (V + 15) // 16 * 16
        shapes = [((V, C), d), ((V,), d), ((Vp * C,), f), ((Vp,), f), ((), d)]
    return [codebook.new_empty(shape, **kw) for shape, kw in shapes]


def cluster_mean_ref(residual: Tensor, labels: Tensor, num_clusters: int) -> Tensor:
    """Per-cluster mean via scatter-add (float64 accumulation); empty clusters get 0 (official clamp(count, 1))."""
    B, N, C = residual.shape
    sums = residual.new_zeros(B, num_clusters, C, dtype=torch.float64)
    sums.scatter_add_(1, labels[..., None].expand(-1, -1, C), residual.double())
    counts = sums.new_zeros(B, num_clusters).scatter_add_(1, labels, sums.new_ones(B, N))
    return sums / counts.clamp(min=1)[..., None]


def cluster_quantize_ref(residual: Tensor, labels: Tensor, num_clusters: int,
                         codebook: Tensor) -> tuple[Tensor, Tensor]:
    """Reference for `cluster_quantize`: scatter-mean + the official addmm distance + argmin, in float64."""
    means = cluster_mean_ref(residual, labels, num_clusters)  # (B, n, C)
    r, E = means.flatten(0, 1), codebook.double()
    d = (r.square().sum(1, keepdim=True) + E.square().sum(1)).addmm_(r, E.T, alpha=-2)  # (B*n, V)
    ids = d.argmin(1).view(means.shape[:2])
    return ids, means.to(residual.dtype)
