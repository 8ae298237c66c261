"""Static KV cache: step-by-step append + attend equals full recomputation; static buffers; clear errors."""
import pytest
import torch
from nvg.kernels import KVCache, block_attention_ref
from nvg.kernels.block_attn import block_attn_fwd_triton

import nvg  # noqa: F401

# triton 3.6's interpreter converts 1-element numpy arrays to scalars, deprecated in numpy >= 1.25: noise only
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # interpreter without a GPU
TOL = {"cpu": dict(atol=2e-5, rtol=2e-5), "cuda": dict(atol=1e-2, rtol=1e-2)}  # fp32; TF32 dots on the GPU


def var_steps(sides):
    """VAR sampling: scale s adds sides[s]**2 tokens of block s. Returns (block ids, [(offset, length)])."""
    lengths = [n * n for n in sides]
    ids = torch.repeat_interleave(torch.arange(len(sides)), torch.tensor(lengths))
    offsets = torch.tensor([0] + lengths).cumsum(0)[:-1].tolist()
    return ids, list(zip(offsets, lengths))


def random_sequence(B, H, L, D, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, D, generator=g).to(device) for _ in range(3)]


@pytest.mark.parametrize("sides", [(1, 2, 3, 4), (1, 2, 3, 5)], ids=["L30", "L39"])
def test_var_sampling_steps_equal_full_recomputation(sides, device):
    B, H, D = 2, 2, 32
    ids, steps = var_steps(sides)
    L = len(ids)
    q, k, v = random_sequence(B, H, L, D, device)
    full = block_attention_ref(q, k, v, ids.to(device), ids.to(device))
    cache = KVCache(B, H, L + 3, D, device=device, block_ids=torch.cat([ids, ids.new_full((3,), len(sides))]))
    k_ptr, v_ptr = cache.k.data_ptr(), cache.v.data_ptr()
    for offset, n in steps:
        s = slice(offset, offset + n)
        cache.append(k[:, :, s], v[:, :, s], offset)
        out = cache.attend(q[:, :, s], offset)
        assert out.shape == (B, H, n, D)
        torch.testing.assert_close(out, full[:, :, s], **TOL[device])
    # static: the same buffers throughout, never reallocated or grown
    assert cache.k.data_ptr() == k_ptr and cache.v.data_ptr() == v_ptr and cache.k.shape == (B, H, L + 3, D)


def test_triton_kernel_on_cache_views():
    # The same Triton kernel with offsets: new queries against strided views [0, offset + n) of the static buffers.
    B, H, D = 1, 2, 32
    ids, steps = var_steps((1, 2, 3, 4))
    L = len(ids)
    q, k, v = random_sequence(B, H, L, D, TRITON_DEVICE, seed=1)
    full = block_attention_ref(q, k, v, ids.to(TRITON_DEVICE), ids.to(TRITON_DEVICE))
    cache = KVCache(B, H, 40, D, device=TRITON_DEVICE, block_ids=torch.cat([ids, ids.new_full((10,), 9)]))
    block = cache.block_ids
    for offset, n in steps:
        end = offset + n
        cache.append(k[:, :, offset:end], v[:, :, offset:end], offset)
        out, _ = block_attn_fwd_triton(q[:, :, offset:end], cache.k[:, :, :end], cache.v[:, :, :end],
                                       block[offset:end], block[:end], D**-0.5)
        torch.testing.assert_close(out, full[:, :, offset:end], **TOL[torch.device(TRITON_DEVICE).type])


def test_prefix_then_chunks(device):
    # prefix-LM: a cached prefix (block 0), then the rest (block 1) appended in two chunks of odd sizes
    B, H, D, P, L = 1, 3, 64, 7, 20
    ids = (torch.arange(L) >= P).long()
    q, k, v = random_sequence(B, H, L, D, device, seed=2)
    cache = KVCache(B, H, L, D, device=device, block_ids=ids)
    for offset, end in [(0, P), (P, 12), (12, L)]:
        cache.append(k[:, :, offset:end], v[:, :, offset:end], offset)
        out = cache.attend(q[:, :, offset:end], offset, scale=0.5)
    # the last chunk sees everything cached (block 1 sees blocks 0 and 1): full attention over [0, L)
    expected = block_attention_ref(q, k, v, ids.to(device), ids.to(device), scale=0.5)[:, :, 12:]
    torch.testing.assert_close(out, expected, **TOL[device])


def test_default_block_ids_are_causal(device):
    B, H, D, L = 1, 1, 32, 9
    q, k, v = random_sequence(B, H, L, D, device, seed=3)
    cache = KVCache(B, H, L, D, device=device)
    for t in range(L):  # token by token decoding
        cache.append(k[:, :, t:t + 1], v[:, :, t:t + 1], t)
        out = cache.attend(q[:, :, t:t + 1], t)
    pos = torch.arange(L, device=device)
    torch.testing.assert_close(out, block_attention_ref(q, k, v, pos, pos)[:, :, -1:], **TOL[device])


def test_rejects_bad_use():
    cache = KVCache(2, 2, 10, 32)
    x = torch.randn(2, 2, 4, 32)
    with pytest.raises(ValueError, match="outside"):
        cache.append(x, x, 7)
    with pytest.raises(ValueError, match="outside"):
        cache.attend(x, -1)
    with pytest.raises(ValueError, match=r"\[2, 2, L, 32\]"):
        cache.append(torch.randn(2, 3, 4, 32), x, 0)
    with pytest.raises(ValueError, match="float16"):
        cache.append(x.half(), x.half(), 0)
    with pytest.raises(ValueError, match="differ"):
        cache.append(x, x[:, :, :3], 0)
    with pytest.raises(ValueError, match="non-decreasing"):
        KVCache(1, 1, 4, 32, block_ids=torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="shape"):
        KVCache(1, 1, 4, 32, block_ids=torch.arange(5))


@pytest.mark.cuda
def test_cuda_graph_step_replays():
    # One VAR sampling step (append + attend at fixed offset) captured in a CUDA graph, replayed on new inputs.
    B, H, D = 4, 4, 64
    ids, steps = var_steps((1, 2, 3, 4, 5))
    offset, n = steps[-1]
    cache = KVCache(B, H, len(ids), D, dtype=torch.bfloat16, device="cuda", block_ids=ids)
    q, k, v = (torch.randn(B, H, len(ids), D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cache.append(k[:, :, :offset], v[:, :, :offset], 0)
    static_q, static_k, static_v = (x[:, :, offset:].clone() for x in (q, k, v))

    def step():
        cache.append(static_k, static_v, offset)
        return cache.attend(static_q, offset)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm up: compile and autotune outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    for seed in range(2):
        torch.manual_seed(seed)
        for x in (static_q, static_k, static_v):
            x.copy_(torch.randn_like(x))
        graph.replay()
        q[:, :, offset:], k[:, :, offset:], v[:, :, offset:] = static_q, static_k, static_v
        expected = block_attention_ref(q, k, v, ids.cuda(), ids.cuda())[:, :, offset:]
        torch.testing.assert_close(static_out.float(), expected.float(), atol=3e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("chunks", [[(0, 1), (1, 2), (2, 9)], [(0, 5), (5, 6), (6, 13)]], ids=["size1", "odd"])
def test_cpu_path_equals_reference(dtype, chunks):
    # the CPU path slices the written keys and masks only ranges that need it: causal chunks of awkward sizes
    B, H, D, L = 3, 2, 16, 13
    ids = torch.arange(L)
    q, k, v = (x.to(dtype) for x in random_sequence(B, H, L, D, "cpu", seed=4))
    cache = KVCache(B, H, L + 2, D, dtype=dtype, block_ids=torch.arange(L + 2))
    full = block_attention_ref(q, k, v, ids, ids)
    for offset, end in chunks:
        cache.append(k[:, :, offset:end], v[:, :, offset:end], offset)
        out = cache.attend(q[:, :, offset:end], offset)
        assert out.dtype == dtype
        tol = TOL["cpu"] if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(out, full[:, :, offset:end], **tol)
    # masks only for the ranges of more than one causal position, built once
    assert {r for r, views in cache._views.items() if views[-1] is not None} == {
        (o, e) for o, e in chunks if e - o > 1}


def test_cpu_path_builds_no_mask_when_all_keys_are_visible():
    # prefix-LM sampling: the prefix attends to itself, then each step's block-1 queries see every written key
    B, H, D, P, N = 2, 2, 32, 5, 3
    ids = (torch.arange(P + N) >= P).long()
    q, k, v = random_sequence(B, H, P + N, D, "cpu", seed=5)
    cache = KVCache(B, H, P + N, D, block_ids=ids)
    cache.append(k[:, :, :P], v[:, :, :P], 0)
    torch.testing.assert_close(cache.attend(q[:, :, :P], 0), block_attention_ref(
        q[:, :, :P], k[:, :, :P], v[:, :, :P], ids[:P], ids[:P]), **TOL["cpu"])
    for step in range(3):  # the same positions rewritten every step
        kk, vv = k[:, :, P:] + step, v[:, :, P:] - step
        cache.append(kk, vv, P)
        out = cache.attend(q[:, :, P:], P)
        k_all, v_all = torch.cat([k[:, :, :P], kk], 2), torch.cat([v[:, :, :P], vv], 2)
        torch.testing.assert_close(out, block_attention_ref(q[:, :, P:], k_all, v_all, ids[P:], ids), **TOL["cpu"])
    assert all(views[-1] is None for views in cache._views.values())


def test_views_follow_the_buffers_after_to():
    # the per-range views are remade after .to() / .half(): writes land in the new buffers
    cache = KVCache(1, 2, 6, 16, block_ids=torch.tensor([0, 0, 0, 1, 1, 1]))
    k = torch.randn(1, 2, 3, 16)
    cache.append(k, k, 0)
    cache.to(torch.float64)
    cache.append(k.double() * 2, k.double(), 0)
    torch.testing.assert_close(cache.k[:, :, :3], k.double() * 2)
    assert cache.attend(k.double(), 0).dtype == torch.float64
