"""Launch and dispatch rules of the Triton kernels and the C++ ops: grid limits and the tensors' device."""
import pytest
import torch

import nvg  # noqa: F401  (loads the C++ ops)
from nvg.kernels import block_attention, block_attention_ref
from nvg.kernels.block_attn import GRID_LIMITS, fold_grid
from nvg.ops import cluster_quantize, granularity_cluster


def _within_limits(grid):
    return len(grid) <= 3 and all(1 <= g <= lim for g, lim in zip(grid, GRID_LIMITS))


@pytest.mark.parametrize("n_tiles, batch_heads", [(1, 1), (3, 30 * 2200), (11, 65536), (1, 65535 * 4), (40, 7)],
                         ids=["one", "30heads-2200seqs", "2^16-bh", "4x-axis-limit", "small"])
def test_fold_grid_stays_within_cuda_limits(n_tiles, batch_heads):
    grid = fold_grid(n_tiles, batch_heads)
    assert _within_limits(grid), grid
    assert grid[0] == n_tiles * batch_heads  # every (batch-head, tile) program exactly once


def test_fold_grid_unfolds_to_every_tile_and_head():
    # the kernels' unfolding: pid -> (bh = pid // n_tiles, tile = pid % n_tiles)
    n_tiles, bh = 5, 7
    pairs = {(pid // n_tiles, pid % n_tiles) for pid in range(fold_grid(n_tiles, bh)[0])}
    assert pairs == {(b, t) for b in range(bh) for t in range(n_tiles)}


def test_fold_grid_rejects_beyond_the_axis_limit():
    with pytest.raises(ValueError, match="grid limit"):
        fold_grid(2**16, 2**16)


def _two_gpus():
    return torch.cuda.is_available() and torch.cuda.device_count() >= 2


needs_two_gpus = pytest.mark.skipif(not _two_gpus(), reason="needs two CUDA devices (tensors on cuda:1 while "
                                    "cuda:0 is current)")


@pytest.mark.cuda
@needs_two_gpus
def test_triton_launches_on_the_tensors_device():
    torch.cuda.set_device(0)
    ids = torch.arange(37, device="cuda:1") // 4
    q, k, v = (torch.randn(2, 3, 37, 64, device="cuda:1", requires_grad=True) for _ in range(3))
    out = block_attention(q, k, v, ids, ids)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    ref = block_attention_ref(*(x.detach() for x in (q, k, v)), ids, ids)
    torch.testing.assert_close(out, ref, atol=1e-2, rtol=1e-2)
    assert torch.cuda.current_device() == 0 and out.device == q.device
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.cuda
@needs_two_gpus
def test_cpp_ops_run_on_the_tensors_device():
    torch.cuda.set_device(0)
    f = torch.randn(3, 64, 8)
    labels = granularity_cluster(f.to("cuda:1"))
    assert labels.device == torch.device("cuda:1") and torch.equal(labels.cpu(), granularity_cluster(f))
    E = torch.randn(50, 8)
    ids, _ = cluster_quantize(f.to("cuda:1"), labels[:, 3].contiguous(), 8, E.to("cuda:1"))
    assert torch.equal(ids.cpu(), cluster_quantize(f, labels[:, 3].cpu().contiguous(), 8, E)[0])
