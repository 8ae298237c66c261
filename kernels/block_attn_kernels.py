"""Triton kernels for block-structured attention: forward, and the FA2 backward (dq; dk and dv).

Mask: query i may attend to key j iff k_block[j] <= q_block[i]. With k_block non-decreasing, the allowed keys of
query i are the prefix [0, kv_len[i]) with kv_len[i] = #{j : k_block[j] <= q_block[i]}; the kernels only see
kv_len. Per query tile, keys below min(kv_len) are allowed for every row (tiles processed without an element mask),
keys in [min, max) are partially allowed (element mask `j < kv_len[i]`), keys from max(kv_len) on are masked for
every row and never loaded.

Modified from: the Triton fused-attention tutorial (06) and FlashAttention-2 (Dao, 2023), rewritten with plain
pointer arithmetic (no block pointers) and prefix-bounded key loops.
"""
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# fp32 dots are exact in the interpreter; on the GPU they use TF32 (tests use tolerances near 1e-2 there).
DOT_PRECISION = "ieee" if INTERPRET else "tf32"


# NVG_TRITON_AUTOTUNE=0 (the GPU check's test phase): one config per kernel (TEST_BLOCKS), so each head dim, dtype
# and argument specialization compiles once instead of once per config. Benchmarks keep the default (autotune).
AUTOTUNE = os.environ.get("NVG_TRITON_AUTOTUNE", "1") != "0"


def _configs(blocks, test_block):
    # Autotune over several tile shapes only on a GPU: the interpreter supports one config, and tiny 16x16 tiles
    # make interpreter tests cross tile boundaries at lengths of a few dozen.
    if INTERPRET or not torch.cuda.is_available():
        return [triton.Config({"BM": 16, "BN": 16}, num_warps=4, num_stages=1)]
    chosen = blocks if AUTOTUNE else [test_block]
    return [triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in chosen]


# (BM, BN, num_warps, num_stages); Hopper-sized tiles for D <= 128. All compile for sm_90a with triton 3.6 (see
# compile_for_gpu); configs that exceed shared memory for fp32 at D = 128 are skipped by the autotuner.
FWD_BLOCKS = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3), (128, 32, 4, 4),
              (64, 32, 4, 4), (32, 32, 4, 2), (16, 32, 4, 2)]
DKDV_BLOCKS = [(32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3), (16, 64, 4, 2)]
DQ_BLOCKS = [(128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (32, 32, 4, 2), (16, 32, 4, 2)]
# The single configs of NVG_TRITON_AUTOTUNE=0: they fit shared memory for every dtype up to fp32 at D = 128.
TEST_BLOCKS = {"fwd": (64, 32, 4, 2), "dkdv": (32, 64, 4, 2), "dq": (64, 32, 4, 2)}
FWD_CONFIGS = _configs(FWD_BLOCKS, TEST_BLOCKS["fwd"])
DKDV_CONFIGS = _configs(DKDV_BLOCKS, TEST_BLOCKS["dkdv"])
DQ_CONFIGS = _configs(DQ_BLOCKS, TEST_BLOCKS["dq"])
# Re-tune per (lengths, head dim): sampling calls each scale's shape repeatedly (warm up before graph capture).
KEY = ["Lq", "Lk", "D"]
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# ---------------------------------------------------------------------------------------------------------------------
# forward
@triton.jit
def _fwd_tile(acc, l_i, m_i, b_q, b_len, K, V, stride_kt, stride_vt, start_n, Lk, qk_scale,
              D: tl.constexpr, BN: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """One online-softmax step (base 2) over keys [start_n, start_n + BN)."""
    o_n = start_n + tl.arange(0, BN)
    o_d = tl.arange(0, D)
    if MASKED:
        m_n = o_n < Lk
        b_k = tl.load(K + o_n[:, None] * stride_kt + o_d[None, :], mask=m_n[:, None], other=0.0)
        b_v = tl.load(V + o_n[:, None] * stride_vt + o_d[None, :], mask=m_n[:, None], other=0.0)
    else:
        b_k = tl.load(K + o_n[:, None] * stride_kt + o_d[None, :])
        b_v = tl.load(V + o_n[:, None] * stride_vt + o_d[None, :])
    # [BM, D] @ [D, BN] -> [BM, BN]
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale
    if MASKED:
        b_s = tl.where(o_n[None, :] < b_len[:, None], b_s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(b_s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet (padding rows)
    alpha = tl.math.exp2(m_i - m_use)
    b_p = tl.math.exp2(b_s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(b_p, 1)
    # [BM, BN] @ [BN, D] -> [BM, D]
    acc = acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PRECISION)
    return acc, l_i, m_new


@triton.autotune(configs=FWD_CONFIGS, key=KEY)
@triton.jit
def _block_attn_fwd_kernel(Q, K, V, O, LSE, KV_LEN, sm_scale,
                           stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                           stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot, stride_nb,
                           H, Lq, Lk, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr):
    """O = softmax(Q Kᵀ·scale + mask) V and LSE = logsumexp of the masked logits (natural log), per query row."""
    # One grid axis: program = (b * H + h) * n_tiles + j (see fold_grid). Last query tiles first: under
    # block-causal masks they see the most keys, so the longest programs start early.
    n_tiles = tl.cdiv(Lq, BM)
    pid = tl.program_id(0)
    i_m, i_bh = n_tiles - 1 - pid % n_tiles, pid // n_tiles
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    Q += i_b * stride_qb + i_h * stride_qh
    K += i_b * stride_kb + i_h * stride_kh
    V += i_b * stride_vb + i_h * stride_vh
    O += i_b * stride_ob + i_h * stride_oh
    o_m = i_m * BM + tl.arange(0, BM)
    o_d = tl.arange(0, D)
    m_m = o_m < Lq

    # Tile bounds: keys < lo are allowed for every row, keys >= hi for none.
    b_len = tl.load(KV_LEN + i_b * stride_nb + o_m, mask=m_m, other=0)
    hi = tl.max(b_len)
    lo = tl.min(tl.where(m_m, b_len, Lk))
    full_end = (lo // BN) * BN

    b_q = tl.load(Q + o_m[:, None] * stride_qt + o_d[None, :], mask=m_m[:, None], other=0.0)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # base-2 softmax
    for start_n in range(0, full_end, BN):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, b_q, b_len, K, V, stride_kt, stride_vt, start_n, Lk, qk_scale,
                                  D, BN, False, PRECISION)
    for start_n in range(full_end, hi, BN):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, b_q, b_len, K, V, stride_kt, stride_vt, start_n, Lk, qk_scale,
                                  D, BN, True, PRECISION)

    # Rows without any allowed key (rejected by the Python checks) give 0 and LSE = +inf, so backward gives 0.
    empty = l_i == 0.0
    b_o = acc / tl.where(empty, 1.0, l_i)[:, None]
    b_lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    tl.store(O + o_m[:, None] * stride_ot + o_d[None, :], b_o.to(O.dtype.element_ty), mask=m_m[:, None])
    tl.store(LSE + i_bh.to(tl.int64) * Lq + o_m, b_lse, mask=m_m)


# ---------------------------------------------------------------------------------------------------------------------
# backward
@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_db, stride_dh, stride_dt,
                      H, Lq, D: tl.constexpr, BM: tl.constexpr):
    """DELTA[b, h, i] = sum_d O[b, h, i, d] * dO[b, h, i, d] (fp32): the softmax-gradient row correction."""
    n_tiles = tl.cdiv(Lq, BM)
    i_m, i_bh = tl.program_id(0) % n_tiles, tl.program_id(0) // n_tiles
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    o_m = i_m * BM + tl.arange(0, BM)
    o_d = tl.arange(0, D)
    m_m = o_m < Lq
    b_o = tl.load(O + i_b * stride_ob + i_h * stride_oh + o_m[:, None] * stride_ot + o_d[None, :],
                  mask=m_m[:, None], other=0.0).to(tl.float32)
    b_do = tl.load(DO + i_b * stride_db + i_h * stride_dh + o_m[:, None] * stride_dt + o_d[None, :],
                   mask=m_m[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + i_bh.to(tl.int64) * Lq + o_m, tl.sum(b_o * b_do, 1), mask=m_m)


@triton.autotune(configs=DKDV_CONFIGS, key=KEY)
@triton.jit
def _block_attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, KV_LEN, DK, DV, sm_scale,
                                stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                                stride_vb, stride_vh, stride_vt, stride_db, stride_dh, stride_dt, stride_nb,
                                stride_gb, stride_gh, stride_gt,
                                H, Lq, Lk, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                                PRECISION: tl.constexpr):
    """dV = Pᵀ dO and dK = scale · dSᵀ Q with dS = P ∘ (dO Vᵀ − DELTA), for one key tile over all query tiles.

    P = exp(Q Kᵀ·scale − LSE) is recomputed from the saved LSE. Query tiles whose rows all stop before this key tile
    are skipped after loading their kv_len; the element mask is applied only when the tile is partially allowed.
    """
    n_tiles = tl.cdiv(Lk, BN)
    i_n, i_bh = tl.program_id(0) % n_tiles, tl.program_id(0) // n_tiles
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    Q += i_b * stride_qb + i_h * stride_qh
    K += i_b * stride_kb + i_h * stride_kh
    V += i_b * stride_vb + i_h * stride_vh
    DO += i_b * stride_db + i_h * stride_dh
    LSE += i_bh.to(tl.int64) * Lq
    DELTA += i_bh.to(tl.int64) * Lq
    start_n = i_n * BN
    o_n = start_n + tl.arange(0, BN)
    o_d = tl.arange(0, D)
    m_n = o_n < Lk
    b_k = tl.load(K + o_n[:, None] * stride_kt + o_d[None, :], mask=m_n[:, None], other=0.0)
    b_v = tl.load(V + o_n[:, None] * stride_vt + o_d[None, :], mask=m_n[:, None], other=0.0)
    b_dk = tl.zeros([BN, D], tl.float32)
    b_dv = tl.zeros([BN, D], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    for start_m in range(0, Lq, BM):
        o_m = start_m + tl.arange(0, BM)
        m_m = o_m < Lq
        b_len = tl.load(KV_LEN + i_b * stride_nb + o_m, mask=m_m, other=0)
        if tl.max(b_len) > start_n:  # some row of this query tile sees some key of this key tile
            b_q = tl.load(Q + o_m[:, None] * stride_qt + o_d[None, :], mask=m_m[:, None], other=0.0)
            b_do = tl.load(DO + o_m[:, None] * stride_dt + o_d[None, :], mask=m_m[:, None], other=0.0)
            # padding rows get LSE = +inf, hence P = 0
            b_lse = tl.load(LSE + o_m, mask=m_m, other=float("inf")) * 1.4426950408889634
            b_delta = tl.load(DELTA + o_m, mask=m_m, other=0.0)
            # [BN, D] @ [D, BM] -> [BN, BM]
            b_pT = tl.math.exp2(tl.dot(b_k, tl.trans(b_q), input_precision=PRECISION) * qk_scale - b_lse[None, :])
            if tl.min(tl.where(m_m, b_len, Lk)) < start_n + BN:  # partially allowed tile
                b_pT = tl.where(o_n[:, None] < b_len[None, :], b_pT, 0.0)
            # [BN, BM] @ [BM, D] -> [BN, D]
            b_dv += tl.dot(b_pT.to(b_do.dtype), b_do, input_precision=PRECISION)
            b_dpT = tl.dot(b_v, tl.trans(b_do), input_precision=PRECISION)
            b_dsT = b_pT * (b_dpT - b_delta[None, :])
            b_dk += tl.dot(b_dsT.to(b_q.dtype), b_q, input_precision=PRECISION)
    DK += i_b * stride_gb + i_h * stride_gh  # dk and dv: contiguous, same shape, strides stride_g*
    DV += i_b * stride_gb + i_h * stride_gh
    tl.store(DK + o_n[:, None] * stride_gt + o_d[None, :], (b_dk * sm_scale).to(DK.dtype.element_ty),
             mask=m_n[:, None])
    tl.store(DV + o_n[:, None] * stride_gt + o_d[None, :], b_dv.to(DV.dtype.element_ty), mask=m_n[:, None])


@triton.jit
def _dq_tile(b_dq, b_q, b_do, b_lse, b_delta, b_len, K, V, stride_kt, stride_vt, start_n, Lk, qk_scale,
             D: tl.constexpr, BN: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """dQ += dS K over keys [start_n, start_n + BN) (scale applied by the caller)."""
    o_n = start_n + tl.arange(0, BN)
    o_d = tl.arange(0, D)
    if MASKED:
        m_n = o_n < Lk
        b_k = tl.load(K + o_n[:, None] * stride_kt + o_d[None, :], mask=m_n[:, None], other=0.0)
        b_v = tl.load(V + o_n[:, None] * stride_vt + o_d[None, :], mask=m_n[:, None], other=0.0)
    else:
        b_k = tl.load(K + o_n[:, None] * stride_kt + o_d[None, :])
        b_v = tl.load(V + o_n[:, None] * stride_vt + o_d[None, :])
    # [BM, D] @ [D, BN] -> [BM, BN]
    b_p = tl.math.exp2(tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale - b_lse[:, None])
    if MASKED:
        b_p = tl.where(o_n[None, :] < b_len[:, None], b_p, 0.0)
    b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)
    b_ds = b_p * (b_dp - b_delta[:, None])
    # [BM, BN] @ [BN, D] -> [BM, D]
    return b_dq + tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PRECISION)


@triton.autotune(configs=DQ_CONFIGS, key=KEY)
@triton.jit
def _block_attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, KV_LEN, DQ, sm_scale,
                              stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                              stride_vb, stride_vh, stride_vt, stride_db, stride_dh, stride_dt, stride_nb,
                              stride_gb, stride_gh, stride_gt,
                              H, Lq, Lk, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                              PRECISION: tl.constexpr):
    """dQ = scale · dS K for one query tile, looping over its allowed key prefix only (as the forward)."""
    n_tiles = tl.cdiv(Lq, BM)
    pid = tl.program_id(0)
    i_m, i_bh = n_tiles - 1 - pid % n_tiles, pid // n_tiles  # longest programs first
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    Q += i_b * stride_qb + i_h * stride_qh
    K += i_b * stride_kb + i_h * stride_kh
    V += i_b * stride_vb + i_h * stride_vh
    DO += i_b * stride_db + i_h * stride_dh
    o_m = i_m * BM + tl.arange(0, BM)
    o_d = tl.arange(0, D)
    m_m = o_m < Lq
    b_len = tl.load(KV_LEN + i_b * stride_nb + o_m, mask=m_m, other=0)
    hi = tl.max(b_len)
    full_end = (tl.min(tl.where(m_m, b_len, Lk)) // BN) * BN

    b_q = tl.load(Q + o_m[:, None] * stride_qt + o_d[None, :], mask=m_m[:, None], other=0.0)
    b_do = tl.load(DO + o_m[:, None] * stride_dt + o_d[None, :], mask=m_m[:, None], other=0.0)
    b_lse = tl.load(LSE + i_bh.to(tl.int64) * Lq + o_m, mask=m_m, other=float("inf")) * 1.4426950408889634
    b_delta = tl.load(DELTA + i_bh.to(tl.int64) * Lq + o_m, mask=m_m, other=0.0)
    b_dq = tl.zeros([BM, D], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    for start_n in range(0, full_end, BN):
        b_dq = _dq_tile(b_dq, b_q, b_do, b_lse, b_delta, b_len, K, V, stride_kt, stride_vt, start_n, Lk, qk_scale,
                        D, BN, False, PRECISION)
    for start_n in range(full_end, hi, BN):
        b_dq = _dq_tile(b_dq, b_q, b_do, b_lse, b_delta, b_len, K, V, stride_kt, stride_vt, start_n, Lk, qk_scale,
                        D, BN, True, PRECISION)
    DQ += i_b * stride_gb + i_h * stride_gh  # dq: contiguous, strides stride_g*
    tl.store(DQ + o_m[:, None] * stride_gt + o_d[None, :], (b_dq * sm_scale).to(DQ.dtype.element_ty),
             mask=m_m[:, None])


# ---------------------------------------------------------------------------------------------------------------------
def compile_for_gpu(arch: int = 90, dtype: str = "bf16", head_dim: int = 64, all_configs: bool = False) -> dict:
    """Compile every kernel for a CUDA architecture without a GPU (ahead of time, no launch).

    Catches what the interpreter cannot: type and layout errors of the real compiler, shared-memory use per config.
    Needs TRITON_INTERPRET unset. Returns {(kernel, BM, BN, num_warps, num_stages): shared-memory bytes}.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def build(kernel, pointers, consts, num_warps, num_stages):
        fn = kernel.fn if hasattr(kernel, "configs") else kernel  # unwrap the autotuner
        signature = {name: "i32" for name in fn.arg_names}
        signature.update(pointers)
        if "sm_scale" in signature:
            signature["sm_scale"] = "fp32"
        signature.update({name: "constexpr" for name in consts})
        source = ASTSource(fn=fn, signature=signature,
                           constexprs={(fn.arg_names.index(name),): value for name, value in consts.items()})
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options=dict(num_warps=num_warps, num_stages=num_stages))
        return compiled.metadata.shared

    tensors = {name: f"*{dtype}" for name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
    tensors.update(LSE="*fp32", DELTA="*fp32", KV_LEN="*i32")
    shared = {}
    for name, kernel, blocks in (("fwd", _block_attn_fwd_kernel, FWD_BLOCKS),
                                 ("dkdv", _block_attn_bwd_dkdv_kernel, DKDV_BLOCKS),
                                 ("dq", _block_attn_bwd_dq_kernel, DQ_BLOCKS)):
        fn = kernel.fn
        pointers = {arg: tensors[arg] for arg in fn.arg_names if arg in tensors}
        for bm, bn, warps, stages in blocks if all_configs else blocks[:1]:
            consts = dict(D=head_dim, BM=bm, BN=bn, PRECISION="tf32")
            shared[(name, bm, bn, warps, stages)] = build(kernel, pointers, consts, warps, stages)
    pointers = {arg: tensors[arg] for arg in ("O", "DO", "DELTA")}
    shared[("delta", 64, 0, 4, 1)] = build(_bwd_delta_kernel, pointers, dict(D=head_dim, BM=64), 4, 1)
    return shared
