"""Block attention: Triton kernels (interpreter on CPU, native on GPU), nvg::block_attn_* ops vs the reference."""
import os
import subprocess
import sys

import pytest
import torch
from nvg.kernels import block_attention, block_attention_ref, block_mask
from nvg.kernels.block_attn import block_attn_bwd_triton, block_attn_fwd_triton

import nvg  # noqa: F401  (loads nvg._C: the Python ops share its `nvg` namespace)

# triton 3.6's interpreter converts 1-element numpy arrays to scalars, deprecated in numpy >= 1.25: noise only
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
HAS_CUDA = torch.cuda.is_available()
# Without a GPU the Triton launchers run in the interpreter on CPU tensors (root conftest sets TRITON_INTERPRET=1).
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"
# (atol, rtol) against the fp32 reference; fp32 is exact in the interpreter and TF32 on the GPU.
TOL = {
    (torch.float32, "cpu"): (2e-5, 2e-5),
    (torch.float32, "cuda"): (1e-2, 1e-2),
    (torch.float16, "cpu"): (5e-3, 5e-3),
    (torch.float16, "cuda"): (5e-3, 5e-3),
    (torch.bfloat16, "cuda"): (3e-2, 2e-2),
}
TRITON_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])


def var_ids(sides):
    """VAR's block ids: scale s (side n) contributes n*n tokens of block s."""
    return torch.repeat_interleave(torch.arange(len(sides)), torch.tensor([n * n for n in sides]))


def block_ids(kind, L, prefix=None):
    if kind == "causal":
        return torch.arange(L)
    if kind == "full":
        return torch.zeros(L, dtype=torch.int32)
    if kind == "prefix":  # prefix-LM: block 0 for the prefix, 1 for the rest
        return (torch.arange(L) >= (prefix or L // 2)).long()
    if kind == "var":
        ids = var_ids(range(1, 8))
        return ids[:L]
    raise ValueError(kind)


# (id, B, H, Lq, Lk, D, kind): awkward lengths, not multiples of the 16-wide interpreter tiles; Lq < Lk means the
# queries are the last Lq tokens (a cache step).
CASES = [
    ("B1-H1-L1-D32-causal", 1, 1, 1, 1, 32, "causal"),
    ("B2-H2-L37-D32-causal", 2, 2, 37, 37, 32, "causal"),
    ("B1-H2-L33-D64-prefix", 1, 2, 33, 33, 64, "prefix"),
    ("B1-H3-L30-D64-var", 1, 3, 30, 30, 64, "var"),
    ("B2-H1-L19-D16-full", 2, 1, 19, 19, 16, "full"),
    ("B1-H2-Lq9-Lk39-D32-var", 1, 2, 9, 39, 32, "var"),
    ("B1-H1-L17-D128-causal", 1, 1, 17, 17, 128, "causal"),
]


def sample_inputs(case, device, dtype, seed=0):
    _, B, H, Lq, Lk, D, kind = case
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=g).to(device, dtype) for L in (Lq, Lk, Lk))
    k_block = block_ids(kind, Lk).to(device)
    return q, k, v, k_block[Lk - Lq:], k_block


def reference_grads(q, k, v, q_block, k_block, grad_out, scale=None):
    q, k, v = (x.detach().float().requires_grad_() for x in (q, k, v))
    out = block_attention_ref(q, k, v, q_block, k_block, scale)
    return out, torch.autograd.grad(out, (q, k, v), grad_out.float())


def assert_close(actual, expected, dtype, device):
    atol, rtol = TOL[(dtype, torch.device(device).type)]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


@pytest.fixture
def nan_empty(monkeypatch):
    """torch.empty/empty_like return NaN-filled floats: an output element the kernels leave unwritten fails the test."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(x):
        return x.fill_(float("nan")) if x.is_floating_point() else x

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(empty_like(*a, **kw)))


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels (interpreter on CPU)
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_triton_fwd_bwd_match_reference(case, dtype, nan_empty):
    q, k, v, q_block, k_block = sample_inputs(case, TRITON_DEVICE, dtype)
    scale = q.shape[-1] ** -0.5
    out, lse = block_attn_fwd_triton(q, k, v, q_block, k_block, scale)
    grad_out = torch.randn_like(out)
    ref_out, ref_grads = reference_grads(q, k, v, q_block, k_block, grad_out)
    assert_close(out, ref_out, dtype, TRITON_DEVICE)
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    ref_lse = s.masked_fill(~block_mask(q_block, k_block), float("-inf")).logsumexp(-1)
    assert_close(lse, ref_lse, dtype, TRITON_DEVICE)
    for grad, ref in zip(block_attn_bwd_triton(grad_out, q, k, v, out, lse, q_block, k_block, scale), ref_grads):
        assert grad.dtype == dtype
        assert_close(grad, ref, dtype, TRITON_DEVICE)


@pytest.mark.parametrize("form", ["both", "q_only", "k_only"])
def test_triton_per_batch_ids_and_strided_inputs(form):
    # per-batch ids [B, L] (for q, k or both); q, k, v as transposed views of [B, L, H, D] (model layout)
    B, L, H, D = 2, 21, 2, 32
    q, k, v = (torch.randn(B, L, H, D, device=TRITON_DEVICE).transpose(1, 2) for _ in range(3))
    per_batch = torch.stack([block_ids("prefix", L, 5), block_ids("causal", L)]).to(TRITON_DEVICE)
    shared = block_ids("causal", L).to(TRITON_DEVICE)
    q_block = shared if form == "k_only" else per_batch
    k_block = shared if form == "q_only" else per_batch
    scale = 0.3
    out, lse = block_attn_fwd_triton(q, k, v, q_block, k_block, scale)
    grad_out = torch.randn_like(out)
    ref_out, ref_grads = reference_grads(q, k, v, q_block, k_block, grad_out, scale)
    assert_close(out, ref_out, torch.float32, TRITON_DEVICE)
    for grad, ref in zip(block_attn_bwd_triton(grad_out, q, k, v, out, lse, q_block, k_block, scale), ref_grads):
        assert_close(grad, ref, torch.float32, TRITON_DEVICE)


def test_triton_skips_fully_masked_key_tiles():
    # Every query sees only keys < 13; the keys from 128 on (whole tiles for any tile width up to 128) are NaN.
    # A kernel that loaded them would multiply NaN by a zero weight and return NaN.
    Lq, Lk, D = 5, 150, 32
    k_block = torch.cat([torch.zeros(13, dtype=torch.long), torch.ones(Lk - 13, dtype=torch.long)]).to(TRITON_DEVICE)
    q_block = torch.zeros(Lq, dtype=torch.long, device=TRITON_DEVICE)
    q, k, v = (torch.randn(1, 1, L, D, device=TRITON_DEVICE) for L in (Lq, Lk, Lk))
    k_poison, v_poison = k.clone(), v.clone()
    k_poison[:, :, 128:] = float("nan")
    v_poison[:, :, 128:] = float("nan")
    out, lse = block_attn_fwd_triton(q, k_poison, v_poison, q_block, k_block, D**-0.5)
    grad_out = torch.randn_like(out)
    ref_out, (dq_ref, dk_ref, dv_ref) = reference_grads(q, k, v, q_block, k_block, grad_out)
    assert_close(out, ref_out, torch.float32, TRITON_DEVICE)
    dq, dk, dv = block_attn_bwd_triton(grad_out, q, k_poison, v_poison, out, lse, q_block, k_block, D**-0.5)
    assert_close(dq, dq_ref, torch.float32, TRITON_DEVICE)
    assert_close(dk, dk_ref, torch.float32, TRITON_DEVICE)  # zero on the unseen keys, NaN-free
    assert_close(dv, dv_ref, torch.float32, TRITON_DEVICE)


# ---------------------------------------------------------------------------------------------------------------------
# the public op, on every device (CPU: the reference kernel; CUDA: Triton)
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5]], ids=[CASES[i][0] for i in (1, 3, 5)])
def test_block_attention_op_and_grads(case, device):
    q, k, v, q_block, k_block = sample_inputs(case, device, torch.float32, seed=1)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = block_attention(q, k, v, q_block, k_block)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_out, ref_grads = reference_grads(q, k, v, q_block, k_block, grad_out)
    assert_close(out, ref_out, torch.float32, device)
    for grad, ref in zip(grads, ref_grads):
        assert_close(grad, ref, torch.float32, device)


def test_opcheck(device):
    # the Python triton_ops share the `nvg` namespace with the C++ ops of nvg._C (a FRAGMENT library)
    assert hasattr(torch.ops.nvg, "granularity_cluster") and hasattr(torch.ops.nvg, "block_attn_fwd")
    q, k, v, q_block, k_block = sample_inputs(CASES[3], device, torch.float32)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    torch.library.opcheck(torch.ops.nvg.block_attn_fwd.default, (q, k, v, q_block, k_block, 0.125))
    out, lse = torch.ops.nvg.block_attn_fwd(q, k, v, q_block, k_block, 0.125)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, q_block, k_block, 0.125)
    torch.library.opcheck(torch.ops.nvg.block_attn_bwd.default, args)


def test_compile_fullgraph_matches_eager(device):
    q, k, v, q_block, k_block = sample_inputs(CASES[3], device, torch.float32)
    compiled = torch.compile(block_attention, fullgraph=True)
    assert_close(compiled(q, k, v, q_block, k_block), block_attention(q, k, v, q_block, k_block), torch.float32,
                 device)


# ---------------------------------------------------------------------------------------------------------------------
# bad input: clear errors before any compute
def test_rejects_empty_rows_and_unsorted_keys(device):
    q, k, v, _, _ = sample_inputs(CASES[1], device, torch.float32)
    L = q.shape[2]
    ids = torch.arange(L, device=device)
    with pytest.raises(ValueError, match="no allowed key"):
        block_attention(q, k, v, ids - 1, ids)  # query 0 (block -1) sees nothing
    with pytest.raises(ValueError, match="non-decreasing"):
        block_attention(q, k, v, ids, ids.flip(0))
    with pytest.raises(ValueError, match="no allowed key"):  # per-batch: only batch 1 is empty
        block_attention(q, k, v, torch.stack([ids, ids]), torch.stack([ids, ids + 1]))


@pytest.mark.parametrize("what", ["q_block float", "k_block length", "head dim 48", "k v shapes", "q 3-D",
                                  "dtype mix", "int q"])
def test_rejects_bad_arguments(what):
    q, k, v = (torch.randn(1, 2, 8, 32) for _ in range(3))
    ids = torch.arange(8)
    args = dict(q=q, k=k, v=v, q_block=ids, k_block=ids)
    if what == "q_block float":
        args["q_block"] = ids.float()
    elif what == "k_block length":
        args["k_block"] = torch.arange(7)
    elif what == "head dim 48":
        args.update(q=torch.randn(1, 2, 8, 48), k=torch.randn(1, 2, 8, 48), v=torch.randn(1, 2, 8, 48))
    elif what == "k v shapes":
        args["v"] = torch.randn(1, 2, 9, 32)
    elif what == "q 3-D":
        args["q"] = q[0]
    elif what == "dtype mix":
        args["k"] = k.half()
    elif what == "int q":
        args.update(q=q.long(), k=k.long(), v=v.long())
    with pytest.raises(ValueError, match="block_attention"):
        block_attention(**args)


# ---------------------------------------------------------------------------------------------------------------------
# GPU only: bf16 at the VAR and NVG shapes. Error budget as in flash-attention's tests: at most twice the error of
# the same math done naively in PyTorch at bf16 (scores, softmax and products rounded to bf16), both against fp32.
def naive_low_precision(q, k, v, q_block, k_block):
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return s.masked_fill(~block_mask(q_block, k_block), float("-inf")).softmax(-1) @ v


@pytest.mark.cuda
@pytest.mark.parametrize("kind,L", [("var", 680), ("prefix", 513), ("causal", 300), ("full", 257)])
def test_cuda_bf16_error_budget(kind, L):
    B, H, D = 2, 4, 64
    ids = (var_ids((1, 2, 3, 4, 5, 6, 8, 10, 13, 16)) if kind == "var" else block_ids(kind, L, 257)).cuda()
    assert len(ids) == L
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = block_attention(q, k, v, ids, ids)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_out, ref_grads = reference_grads(q, k, v, ids, ids, grad_out)
    low = naive_low_precision(q, k, v, ids, ids)
    low_grads = torch.autograd.grad(low, (q, k, v), grad_out)
    for name, mine, naive, ref in zip("out dq dk dv".split(), (out, *grads), (low, *low_grads), (ref_out, *ref_grads)):
        err = (mine.float() - ref).abs().max().item()
        budget = (naive.float() - ref).abs().max().item()
        assert err <= 2 * budget + 1e-5, (name, err, budget)


def test_without_triton_the_ops_run_the_reference():
    # CPU-only installs may lack triton: nvg.kernels still imports, and the ops run the reference.
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, nvg\n"
        "from nvg.kernels import block_attention, block_attention_ref, KVCache\n"
        "from nvg.kernels.block_attn import HAS_TRITON\n"
        "assert not HAS_TRITON\n"
        "q = torch.randn(1, 2, 9, 32, requires_grad=True); ids = torch.arange(9) // 3\n"
        "out = block_attention(q, q, q, ids, ids); out.sum().backward()\n"
        "torch.testing.assert_close(out, block_attention_ref(q, q, q, ids, ids))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_kernels_compile_for_hopper():
    # The real compiler (not the interpreter), ahead of time for sm_90: catches compile errors without a GPU.
    code = (
        "from nvg.kernels.block_attn_kernels import compile_for_gpu\n"
        "for dtype, head_dim in [('bf16', 64), ('fp32', 32), ('fp16', 128)]:\n"
        "    shared = compile_for_gpu(90, dtype, head_dim)\n"
        "    assert len(shared) == 4 and max(shared.values()) <= 227 * 1024, shared\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)


def test_cpu_path_per_query_block_equals_the_reference():
    """On the CPU, queries of each block run attend their visible key prefix without a mask: same values and grads."""
    from nvg.kernels.block_attn import MAX_CPU_GROUPS, key_prefixes

    torch.manual_seed(0)
    prefix = torch.tensor([0] * 5 + [1] * 4)  # NVG prefix-LM: 5 prefix tokens, 4 structure tokens
    assert key_prefixes(prefix, prefix) == [(0, 5, 5), (5, 9, 9)]
    assert key_prefixes(prefix[5:], prefix) == [(0, 4, 9)]  # structure queries only (the cached step)
    assert key_prefixes(torch.arange(MAX_CPU_GROUPS + 1), torch.arange(MAX_CPU_GROUPS + 1)) is None  # mask path
    assert key_prefixes(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, dtype=torch.long)) is None  # per batch
    scales = torch.repeat_interleave(torch.arange(4), torch.tensor([1, 4, 9, 3]))  # VAR-like, odd last scale
    for ids in (prefix, scales):
        q, k, v = (torch.randn(2, 3, len(ids), 16, requires_grad=True) for _ in range(3))
        out = block_attention(q, k, v, ids, ids)
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), g)
        ref = block_attention_ref(q, k, v, ids, ids)
        ref_grads = torch.autograd.grad(ref, (q, k, v), g)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
