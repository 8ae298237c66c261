"""Block-structured attention: query i may attend to key j iff k_block[j] <= q_block[i].

One op covers VAR's block-causal mask over scales (block = scale index), a prefix-LM mask (prefix block 0, the
rest block 1), causal attention (block = position) and full attention (all zeros). Key block ids must be
non-decreasing along the sequence (true for all four), so each query's allowed keys form a prefix.

Ops (namespace `nvg`, registered with torch.library.triton_op next to the C++ ops of nvg._C):
  nvg::block_attn_fwd(q, k, v, q_block, k_block, scale) -> (out, lse)
  nvg::block_attn_bwd(grad_out, q, k, v, out, lse, q_block, k_block, scale) -> (grad_q, grad_k, grad_v)
CUDA runs the Triton kernels of block_attn_kernels.py; the CPU runs the PyTorch reference. The public entry point
is `block_attention`, which checks its arguments; the ops themselves do not.

Triton ships with CUDA builds of torch but not with the CPU build: without it the same ops are registered with
torch.library.custom_op and run the reference on every device (with a warning on CUDA, where it is slow).
"""
import contextlib
import warnings
from bisect import bisect_right

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import custom_op, triton_op, wrap_triton

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # the CPU build of torch does not depend on triton
    HAS_TRITON = False
if HAS_TRITON:
    from .block_attn_kernels import (
        DOT_PRECISION,
        INTERPRET,
        _block_attn_bwd_dkdv_kernel,
        _block_attn_bwd_dq_kernel,
        _block_attn_fwd_kernel,
        _bwd_delta_kernel,
    )

__all__ = ["block_attention", "block_attention_ref", "block_mask"]

HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------------------
# reference (the specification, and the CPU kernel)
def block_mask(q_block: Tensor, k_block: Tensor) -> Tensor:
    """Boolean mask, True where attention is allowed: [Lq, Lk] for ids [Lq], [Lk]; [B, 1, Lq, Lk] for per-batch ids."""
    mask = k_block.unsqueeze(-2) <= q_block.unsqueeze(-1)
    return mask.unsqueeze(1) if mask.dim() == 3 else mask


def block_attention_ref(q: Tensor, k: Tensor, v: Tensor, q_block: Tensor, k_block: Tensor,
                        scale: float | None = None) -> Tensor:
    """SDPA in fp32 with the boolean mask `k_block[j] <= q_block[i]`, cast back to q's dtype.

    Args: q [B, H, Lq, D]; k, v [B, H, Lk, D]; q_block int [Lq] or [B, Lq]; k_block int [Lk] or [B, Lk].
    """
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=block_mask(q_block, k_block),
                                         scale=scale)
    return out.to(q.dtype)


def _fwd_ref(q, k, v, q_block, k_block, scale):
    # CPU kernel of nvg::block_attn_fwd: the reference output and the log-sum-exp of the masked logits.
    out = block_attention_ref(q, k, v, q_block, k_block, scale).contiguous()
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    lse = s.masked_fill(~block_mask(q_block, k_block), float("-inf")).logsumexp(-1)
    return out, lse


def _bwd_ref(grad_out, q, k, v, out, lse, q_block, k_block, scale):
    # CPU kernel of nvg::block_attn_bwd: softmax-attention gradients in fp32 from the saved log-sum-exp.
    q32, k32, v32, g32 = q.float(), k.float(), v.float(), grad_out.float()
    p = torch.exp(torch.matmul(q32, k32.transpose(-1, -2)) * scale - lse.unsqueeze(-1))
    p = p.masked_fill(~block_mask(q_block, k_block), 0.0)  # [B, H, Lq, Lk]
    dp = torch.matmul(g32, v32.transpose(-1, -2))
    ds = p * (dp - (g32 * out.float()).sum(-1, keepdim=True))
    dq = torch.matmul(ds, k32) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q32) * scale
    dv = torch.matmul(p.transpose(-1, -2), g32)
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous()


# ---------------------------------------------------------------------------------------------------------------------
# Triton launchers (also called directly by the interpreter tests on CPU tensors)
def _kv_len(q_block: Tensor, k_block: Tensor) -> tuple[Tensor, int]:
    """Allowed-prefix length per query, int32 [Lq] (batch stride 0) or [B, Lq]; needs k_block non-decreasing."""
    if q_block.dim() != k_block.dim():
        batch = q_block.shape[0] if q_block.dim() == 2 else k_block.shape[0]
        q_block = q_block.expand(batch, -1) if q_block.dim() == 1 else q_block
        k_block = k_block.expand(batch, -1) if k_block.dim() == 1 else k_block
    kv_len = torch.searchsorted(k_block.contiguous(), q_block.to(k_block.dtype).contiguous(), right=True)
    kv_len = kv_len.to(torch.int32)
    return kv_len, (kv_len.shape[-1] if kv_len.dim() == 2 else 0)


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# CUDA grid limits: x up to 2^31 - 1 programs, y and z up to 65,535.
GRID_LIMITS = (2**31 - 1, 65535, 65535)


def fold_grid(n_tiles: int, batch_heads: int) -> tuple[int]:
    """Launch grid of the attention kernels: one axis of n_tiles * batch_heads programs, program
    (b * H + h) * n_tiles + j (the kernels unfold it). B * H never lands on a 65,535-capped axis."""
    total = n_tiles * batch_heads
    if total > GRID_LIMITS[0]:
        raise ValueError(f"block_attention: {n_tiles} tiles x {batch_heads} batch-heads = {total} programs exceed "
                         f"the CUDA grid limit of {GRID_LIMITS[0]}; split the batch")
    return (total,)


def _on_device(x: Tensor):
    """Launch under x's CUDA device (Triton launches on the current device), as the C++ ops' device guard does.
    torch.compile emits its own guard: nothing to add while tracing."""
    if x.device.type == "cuda" and not torch.compiler.is_compiling():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def _rows(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()  # kernels assume unit stride along the head dimension


def block_attn_fwd_triton(q, k, v, q_block, k_block, scale):
    q, k, v = _rows(q), _rows(k), _rows(v)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    out = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    kv_len, stride_nb = _kv_len(q_block, k_block)

    def grid(meta):
        return fold_grid(_cdiv(Lq, meta["BM"]), B * H)

    with _on_device(q):
        wrap_triton(_block_attn_fwd_kernel)[grid](
            q, k, v, out, lse, kv_len, scale, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
            k.stride(2), v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            stride_nb, H, Lq, Lk, D=D, PRECISION=DOT_PRECISION)
    return out, lse


def block_attn_bwd_triton(grad_out, q, k, v, out, lse, q_block, k_block, scale):
    grad_out, q, k, v, out = _rows(grad_out), _rows(q), _rows(k), _rows(v), _rows(out)
    lse = lse.contiguous()  # [B, H, Lq], indexed as (b * H + h) * Lq + i
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    kv_len, stride_nb = _kv_len(q_block, k_block)
    delta = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    dq = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H, Lk, D), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, H, Lk, D), dtype=v.dtype, device=q.device)
    delta_bm = 16 if INTERPRET else 64
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0),
               v.stride(1), v.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), stride_nb)

    def grid_k(meta):
        return fold_grid(_cdiv(Lk, meta["BN"]), B * H)

    def grid_q(meta):
        return fold_grid(_cdiv(Lq, meta["BM"]), B * H)

    with _on_device(q):
        wrap_triton(_bwd_delta_kernel)[fold_grid(_cdiv(Lq, delta_bm), B * H)](
            out, grad_out, delta, out.stride(0), out.stride(1), out.stride(2), grad_out.stride(0),
            grad_out.stride(1), grad_out.stride(2), H, Lq, D=D, BM=delta_bm)
        wrap_triton(_block_attn_bwd_dkdv_kernel)[grid_k](
            q, k, v, grad_out, lse, delta, kv_len, dk, dv, scale, *strides, dk.stride(0), dk.stride(1),
            dk.stride(2), H, Lq, Lk, D=D, PRECISION=DOT_PRECISION)
        wrap_triton(_block_attn_bwd_dq_kernel)[grid_q](
            q, k, v, grad_out, lse, delta, kv_len, dq, scale, *strides, dq.stride(0), dq.stride(1), dq.stride(2),
            H, Lq, Lk, D=D, PRECISION=DOT_PRECISION)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------------------------
# ops
def _use_triton(x: Tensor) -> bool:
    # Non-CUDA devices reach the op's main function only when torch.compile traces it (eager CPU calls dispatch to
    # the registered CPU kernel): they get the reference too.
    if x.device.type != "cuda":
        return False
    if not HAS_TRITON:
        warnings.warn("nvg.kernels: triton is not installed; block attention runs the PyTorch reference on CUDA",
                      stacklevel=3)
    return HAS_TRITON


define_op = triton_op if HAS_TRITON else custom_op


@define_op("nvg::block_attn_fwd", mutates_args=())
def block_attn_fwd(q: Tensor, k: Tensor, v: Tensor, q_block: Tensor, k_block: Tensor,
                   scale: float) -> tuple[Tensor, Tensor]:
    """(out [B, H, Lq, D], lse fp32 [B, H, Lq]) of block attention; no argument checks (see block_attention)."""
    if not _use_triton(q):
        return _fwd_ref(q, k, v, q_block, k_block, scale)
    return block_attn_fwd_triton(q, k, v, q_block, k_block, scale)


@define_op("nvg::block_attn_bwd", mutates_args=())
def block_attn_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, q_block: Tensor,
                   k_block: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_q, grad_k, grad_v) of block attention from the forward's out and lse."""
    if not _use_triton(q):
        return _bwd_ref(grad_out, q, k, v, out, lse, q_block, k_block, scale)
    return block_attn_bwd_triton(grad_out, q, k, v, out, lse, q_block, k_block, scale)


block_attn_fwd.register_kernel("cpu")(_fwd_ref)
block_attn_bwd.register_kernel("cpu")(_bwd_ref)


# Explicit fake kernels: under TRITON_INTERPRET=1, wrap_triton launches the kernel eagerly even on fake tensors.
@block_attn_fwd.register_fake
def _(q, k, v, q_block, k_block, scale):
    B, H, Lq, D = q.shape
    return q.new_empty((B, H, Lq, D)), q.new_empty((B, H, Lq), dtype=torch.float32)


@block_attn_bwd.register_fake
def _(grad_out, q, k, v, out, lse, q_block, k_block, scale):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, q_block, k_block, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, q_block, k_block)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, q_block, k_block = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None, None, None
    dq, dk, dv = torch.ops.nvg.block_attn_bwd(grad_out, q, k, v, out, lse, q_block, k_block, ctx.scale)
    return dq, dk, dv, None, None, None


block_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------------
# public entry point
def check_args(q: Tensor, k: Tensor, v: Tensor, q_block: Tensor, k_block: Tensor) -> None:
    """Raise ValueError on a bad shape, dtype or device (metadata only: no device sync)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"block_attention: {name} must be [B, H, L, D], got shape {tuple(x.shape)}")
        if x.dtype not in DTYPES:
            raise ValueError(f"block_attention: {name} dtype {x.dtype} is not one of {DTYPES}")
        if x.device != q.device or x.dtype != q.dtype:
            raise ValueError(f"block_attention: {name} is {x.dtype} on {x.device}, q is {q.dtype} on {q.device}")
    B, H, Lq, D = q.shape
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != D:
        raise ValueError(f"block_attention: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "do not match ([B, H, Lq, D], [B, H, Lk, D], [B, H, Lk, D])")
    if D not in HEAD_DIMS:
        raise ValueError(f"block_attention: head dimension {D} is not supported (one of {HEAD_DIMS})")
    if q.numel() == 0 or k.numel() == 0:
        raise ValueError(f"block_attention: empty input, q {tuple(q.shape)}, k {tuple(k.shape)}")
    for name, ids, length in (("q_block", q_block, Lq), ("k_block", k_block, k.shape[2])):
        if ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"block_attention: {name} must be int32 or int64, got {ids.dtype}")
        if ids.device != q.device:
            raise ValueError(f"block_attention: {name} is on {ids.device}, q on {q.device}")
        if tuple(ids.shape) not in ((length,), (B, length)):
            raise ValueError(f"block_attention: {name} must have shape [{length}] or [{B}, {length}], "
                             f"got {tuple(ids.shape)}")


def check_block_ids(q_block: Tensor, k_block: Tensor) -> None:
    """Raise ValueError unless k_block is non-decreasing and every query has an allowed key (one device sync)."""
    unsorted = (k_block[..., 1:] < k_block[..., :-1]).any()
    empty = (k_block[..., 0] > q_block.min(-1).values).any()
    unsorted, empty = torch.stack([unsorted, empty]).tolist()
    if unsorted:
        raise ValueError("block_attention: k_block must be non-decreasing along the sequence")
    if empty:
        raise ValueError("block_attention: some query has no allowed key (its q_block is below min(k_block)); "
                         "its softmax row would be empty")


MAX_CPU_GROUPS = 16  # the CPU fast path below handles at most this many query blocks


def key_prefixes(q_block: Tensor, k_block: Tensor) -> list[tuple[int, int, int]] | None:
    """[(q_start, q_end, k_end)]: runs of equal query block ids and the key prefix [0, k_end) each run sees, for 1-D
    ids with non-decreasing keys (then the visible keys of a query are always a prefix); None when the ids are
    per-batch, a query sees no key, or there are more than MAX_CPU_GROUPS runs (e.g. causal: use the mask)."""
    if q_block.dim() != 1 or k_block.dim() != 1:
        return None
    qb, kb = q_block.tolist(), k_block.tolist()
    runs, start = [], 0
    for i in range(1, len(qb) + 1):
        if i == len(qb) or qb[i] != qb[start]:
            end = bisect_right(kb, qb[start])
            if end == 0:
                return None
            runs.append((start, i, end))
            start = i
            if len(runs) > MAX_CPU_GROUPS:
                return None
    return runs


def _block_attention_cpu(q, k, v, runs, scale):
    """CPU: per run of query blocks, SDPA over its key prefix without a mask (the same values as the reference,
    fewer operations, torch's own backward)."""
    q, k, v = q.float(), k.float(), v.float()  # fp32 like the reference (no-ops for fp32 inputs)
    outs = [F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, :e], v[:, :, :e], scale=scale) for a, b, e in runs]
    return outs[0] if len(outs) == 1 else torch.cat(outs, 2)


def _capturing(x: Tensor) -> bool:
    return x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def block_attention(q: Tensor, k: Tensor, v: Tensor, q_block: Tensor, k_block: Tensor, scale: float | None = None,
                    check: bool = True) -> Tensor:
    """Attention where query i sees key j iff k_block[j] <= q_block[i]; returns [B, H, Lq, D] in q's dtype.

    Equivalent to `softmax(q @ kᵀ · scale + bias) @ v` with bias = 0 where allowed, -inf elsewhere
    (see block_attention_ref). Differentiable in q, k and v.

    Args:
        q: [B, H, Lq, D]; k, v: [B, H, Lk, D]; fp32, fp16 or bf16; D in (16, 32, 64, 128).
        q_block: int32/int64 [Lq] (shared by the batch) or [B, Lq]; k_block: [Lk] or [B, Lk], non-decreasing.
        scale: logit scale, default D ** -0.5.
        check: check the block ids' values (one device sync). Skipped under torch.compile and CUDA-graph capture;
            pass False in hot loops whose ids were checked once (the cache does).
    """
    check_args(q, k, v, q_block, k_block)
    if check and not torch.compiler.is_compiling() and not _capturing(q):
        check_block_ids(q_block, k_block)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if q.device.type == "cpu" and not torch.compiler.is_compiling():
        runs = key_prefixes(q_block, k_block)
        if runs is not None:
            return _block_attention_cpu(q, k, v, runs, scale).to(q.dtype)
    return torch.ops.nvg.block_attn_fwd(q, k, v, q_block, k_block, scale)[0]
