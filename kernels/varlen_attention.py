"""Variable-length (packed) multi-head attention: Triton flash-attention forward and backward.

Sequences of different lengths are packed along the token axis: ``q, k, v`` are
``(total_tokens, heads, head_dim)`` and sequence ``i`` owns rows ``cu_seqlens[i]:cu_seqlens[i+1]``.
Attention is full (bidirectional) inside each sequence and absent across sequences, so no padding
tokens are ever computed (I-JEPA's context lengths vary per image).

Algorithm (FlashAttention-2):
- forward: one program per (query block, head, sequence); it streams the sequence's key/value
  blocks through an online softmax (running max + running sum, base-2 exponentials with
  ``softmax_scale * log2(e)`` folded in) and writes the output plus the natural-log
  log-sum-exp ``lse`` of each query row, ``(heads, total_tokens)`` float32. No N x N matrix is
  ever stored. The grid's first axis is ``cdiv(max_seqlen, BLOCK_M)``; programs whose block
  starts past their sequence's end return at once (also every program of an empty sequence).
- backward: a preprocess kernel computes ``delta = rowsum(dO * O)``; then a dK/dV kernel (one
  program per key block, looping over the sequence's query blocks) and a separate dQ kernel (one
  program per query block, looping over key blocks) recompute the probabilities from ``lse``.
  Why two kernels rather than atomically accumulating dQ inside the dK/dV loop: no float32 dQ
  scratch buffer, zero-fill or conversion pass, results are deterministic, and every kernel is
  idempotent, which lets ``triton.autotune`` re-run it safely. The price is computing ``Q K^T``
  and ``dO V^T`` twice (about 7 instead of 5 matmuls per tile pair); at I-JEPA's lengths
  (<= a few hundred tokens) attention is 1-3% of the model's FLOPs, so determinism wins.
- Inside every loop, full blocks run without bounds masks and only the last, partial block of
  a sequence is masked.

Numerics: matmul inputs stay in the input dtype (bf16/fp16 tensor cores; fp32 inputs use
``input_precision="ieee"``, i.e. no TF32), everything else accumulates in float32. Output and
gradients are returned in the input dtype.

Head dims: any ``1 <= head_dim <= 256``. The kernels work on ``BLOCK_D = next_power_of_2(head_dim)``
(at least 16, the smallest ``tl.dot`` depth) columns and mask the loads/stores of the padding
columns, which read as zeros. The padding costs dot-product work, not memory traffic:
80 -> 128 (ViT-H) wastes 37.5% of the matmul work, 88 -> 128 (ViT-G) 31%, 24 -> 32 (the
I-JEPA predictor) 25%; 16, 32, 64, 128 waste nothing. Splitting the head dim into two
power-of-two chunks (80 = 64 + 16, 88 = 64 + 32) would remove most of that at the cost of
doubling every dot call; not done (attention is a small share of I-JEPA's FLOPs).

Alignment: Triton specialises integer arguments only on divisibility by 16, so with a head
stride such as 88 or 24 (8 x 11, 8 x 3) it cannot prove a row starts 16-byte aligned, loads
one element at a time, skips the shared-memory pipelining and spills registers (head dim 88 on
sm_90a: 16-304 bytes of spills per thread in 10 of 11 configs, ``kernels/compile_check.py``).
The launcher therefore passes ``STRIDE_ALIGN``, the largest power of two <= 16 dividing every
token and head stride, and the kernels declare the head offsets multiples of it. Token strides
(3 x heads x head_dim in the model) are multiples of 16 and specialised by Triton itself.

Host syncs: with ``validate=True`` (default) the launcher copies ``cu_seqlens`` to the host once
(one small ``.tolist()``) to check its values; no other host sync happens. Pass
``validate=False`` in a hot path (or for CUDA-graph capture) once the offsets are trusted:
invalid offsets then read and write out of bounds. Shape/dtype/device checks are free and
always run. Under ``torch.compile`` the checks of values run inside the custom op at run time.

Devices: CUDA tensors run compiled kernels (autotuned per head-dim block, sequence-length
bucket and dtype; ``SCALEJEPA_AUTOTUNE=0`` uses the default configuration). CPU tensors run only
under the Triton interpreter (``TRITON_INTERPRET=1`` set before import; slow, for tests).
The Triton interpreter (3.6 and 3.9 alike) multiplies bfloat16 ``tl.dot`` operands as raw
integers, so under the interpreter bf16 operands are upcast to float32 first (exact); compiled
kernels never do.

Custom ops: ``scalejepa::varlen_attn_fwd`` -> ``(out, lse)`` and ``scalejepa::varlen_attn_bwd`` ->
``(dq, dk, dv)``, with fake (meta) implementations and autograd, so ``torch.compile(fullgraph=True)``
traces callers without graph breaks.
"""

import functools
import math

import torch

from ._common import (
    FLOAT_DTYPES,
    SHORT_DTYPE_NAMES,
    CompileVariant,
    LaunchConfig,
    autotune_enabled,
    check_cu_seqlens_meta,
    check_cu_seqlens_values,
    check_float_dtype,
    check_same_device,
    check_tensor,
    is_interpreted,
    jit,
    new_output,
    require_triton,
    tl,
    triton,
)

__all__ = ["varlen_attention", "varlen_attention_reference"]

MAX_HEAD_DIM = 256
_MAX_GRID_YZ = 65535  # CUDA limit on grid axes 1 and 2 (heads, sequences)
_LOG2E = 1.4426950408889634


# ============================================================================ Triton kernels
@jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b in float32. UPCAST works around the interpreter's bf16 tl.dot (see docstring)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@jit
def _head_offset(head, stride, ALIGN: tl.constexpr):
    """head * stride, declared a multiple of ALIGN: the launcher's fact about the strides (see
    _stride_align). A hint on the product, since Triton drops hints on kernel arguments."""
    return tl.multiple_of(head * stride, ALIGN)


@jit
def _load_rows(ptrs, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, MASK_ROWS: tl.constexpr,
               EVEN_D: tl.constexpr):
    """Load a [rows, BLOCK_D] tile; rows >= n_rows (if MASK_ROWS) and padding columns read 0."""
    if MASK_ROWS:
        if EVEN_D:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return x


@jit
def _store_rows(ptrs, x, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr):
    if EVEN_D:
        tl.store(ptrs, x, mask=rows[:, None] < n_rows)
    else:
        tl.store(ptrs, x, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))


@jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, seqlen, start, end, qk_scale,
               offs_n, offs_d, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK_N: tl.constexpr,
               EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Online-softmax over key blocks [start, end); MASK_N only for the sequence's partial last block."""
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        k = _load_rows(k_base + cols[:, None] * stride_kt + offs_d[None, :], cols, seqlen, offs_d,
                       HEAD_DIM, MASK_N, EVEN_D)
        qk = _dot(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), UPCAST, PRECISION)
        if MASK_N:
            qk = tl.where(cols[None, :] < seqlen, qk, float("-inf"))
        # Scores are in base-2 units: s * softmax_scale * log2(e), so exp2 replaces exp.
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)  # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_base + cols[:, None] * stride_vt + offs_d[None, :], cols, seqlen, offs_d,
                       HEAD_DIM, MASK_N, EVEN_D)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], UPCAST, PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@jit(do_not_specialize=("stride_lse_h",))
def _attn_fwd_kernel(
    Q, K, V, O, LSE, CU_SEQLENS,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lse_h,
    qk_scale, seqlen_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, STRIDE_ALIGN: tl.constexpr,
):
    # seqlen_bucket is unused here: it only keys the autotuner (short vs long sequences).
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    k_head = _head_offset(head, stride_kh, STRIDE_ALIGN)
    o_head = _head_offset(head, stride_oh, STRIDE_ALIGN)
    q_head = _head_offset(head, stride_qh, STRIDE_ALIGN)
    v_head = _head_offset(head, stride_vh, STRIDE_ALIGN)
    seq = tl.program_id(2)
    seq_start = tl.load(CU_SEQLENS + seq).to(tl.int64)  # int64: token * stride may exceed 2**31
    seqlen = (tl.load(CU_SEQLENS + seq + 1) - seq_start).to(tl.int32)
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen:  # past this sequence's end (or an empty sequence)
        return

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + seq_start * stride_qt + q_head
    k_base = K + seq_start * stride_kt + k_head
    v_base = V + seq_start * stride_vt + v_head
    q = _load_rows(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], offs_m, seqlen, offs_d,
                   HEAD_DIM, True, EVEN_D)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_end = (seqlen // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, seqlen, 0, full_end,
                               qk_scale, offs_n, offs_d, HEAD_DIM, BLOCK_N, False, EVEN_D, UPCAST, PRECISION)
    if full_end < seqlen:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, seqlen, full_end,
                                   seqlen, qk_scale, offs_n, offs_d, HEAD_DIM, BLOCK_N, True, EVEN_D, UPCAST,
                                   PRECISION)

    acc = acc / l_i[:, None]
    o_ptrs = O + (seq_start + offs_m[:, None]) * stride_ot + o_head + offs_d[None, :]
    _store_rows(o_ptrs, acc.to(O.dtype.element_ty), offs_m, seqlen, offs_d, HEAD_DIM, EVEN_D)
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # base-2 -> natural log
    tl.store(LSE + head * stride_lse_h + seq_start + offs_m, lse, mask=offs_m < seqlen)


@jit(do_not_specialize=("total_tokens", "stride_delta_h"))
def _attn_bwd_preprocess_kernel(O, DO, DELTA, total_tokens, stride_ot, stride_oh, stride_dot, stride_doh,
                                stride_delta_h, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                                BLOCK_T: tl.constexpr, STRIDE_ALIGN: tl.constexpr):
    """delta[h, t] = sum_d O[t, h, d] * dO[t, h, d] (float32)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1)
    do_head = _head_offset(head, stride_doh, STRIDE_ALIGN)
    o_head = _head_offset(head, stride_oh, STRIDE_ALIGN)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < total_tokens) & (offs_d[None, :] < HEAD_DIM)
    rows64 = rows.to(tl.int64)
    o = tl.load(O + rows64[:, None] * stride_ot + o_head + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + rows64[:, None] * stride_dot + do_head + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + head * stride_delta_h + rows, delta, mask=rows < total_tokens)


@jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, seqlen, start, end,
                qk_scale, offs_m, offs_d, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                MASK_M: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dK, dV of one key block over query blocks [start, end) (transposed tiles: [N, M])."""
    for start_m in range(start, end, BLOCK_M):
        rows = start_m + offs_m
        q = _load_rows(q_base + rows[:, None] * stride_qt + offs_d[None, :], rows, seqlen, offs_d,
                       HEAD_DIM, MASK_M, EVEN_D)
        do = _load_rows(do_base + rows[:, None] * stride_dot + offs_d[None, :], rows, seqlen, offs_d,
                        HEAD_DIM, MASK_M, EVEN_D)
        if MASK_M:
            # lse = +inf makes the probabilities of rows past the end exactly 0.
            lse = tl.load(lse_base + rows, mask=rows < seqlen, other=float("inf"))
            delta = tl.load(delta_base + rows, mask=rows < seqlen, other=0.0)
        else:
            lse = tl.load(lse_base + rows)
            delta = tl.load(delta_base + rows)
        qk_t = _dot(k, tl.trans(q), tl.zeros([k.shape[0], BLOCK_M], dtype=tl.float32), UPCAST, PRECISION)
        p_t = tl.math.exp2(qk_t * qk_scale - (lse * 1.4426950408889634)[None, :])
        dv = _dot(p_t.to(do.dtype), do, dv, UPCAST, PRECISION)
        dp_t = _dot(v, tl.trans(do), tl.zeros([k.shape[0], BLOCK_M], dtype=tl.float32), UPCAST, PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = _dot(ds_t.to(q.dtype), q, dk, UPCAST, PRECISION)
    return dk, dv


@jit(do_not_specialize=("stride_lse_h",))
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, CU_SEQLENS,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lse_h,
    softmax_scale, qk_scale, seqlen_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, STRIDE_ALIGN: tl.constexpr,
):
    pid_n = tl.program_id(0)
    head = tl.program_id(1)
    dk_head = _head_offset(head, stride_dkh, STRIDE_ALIGN)
    do_head = _head_offset(head, stride_doh, STRIDE_ALIGN)
    dv_head = _head_offset(head, stride_dvh, STRIDE_ALIGN)
    k_head = _head_offset(head, stride_kh, STRIDE_ALIGN)
    q_head = _head_offset(head, stride_qh, STRIDE_ALIGN)
    v_head = _head_offset(head, stride_vh, STRIDE_ALIGN)
    seq = tl.program_id(2)
    seq_start = tl.load(CU_SEQLENS + seq).to(tl.int64)
    seqlen = (tl.load(CU_SEQLENS + seq + 1) - seq_start).to(tl.int32)
    start_n = pid_n * BLOCK_N
    if start_n >= seqlen:
        return

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K + (seq_start + offs_n[:, None]) * stride_kt + k_head + offs_d[None, :], offs_n,
                   seqlen, offs_d, HEAD_DIM, True, EVEN_D)
    v = _load_rows(V + (seq_start + offs_n[:, None]) * stride_vt + v_head + offs_d[None, :], offs_n,
                   seqlen, offs_d, HEAD_DIM, True, EVEN_D)
    q_base = Q + seq_start * stride_qt + q_head
    do_base = DO + seq_start * stride_dot + do_head
    lse_base = LSE + head * stride_lse_h + seq_start
    delta_base = DELTA + head * stride_lse_h + seq_start

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Key rows past the end (k = v = 0) get garbage here, but rows are independent and never stored.
    full_end = (seqlen // BLOCK_M) * BLOCK_M
    dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, seqlen, 0,
                         full_end, qk_scale, offs_m, offs_d, HEAD_DIM, BLOCK_M, False, EVEN_D, UPCAST, PRECISION)
    if full_end < seqlen:
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, seqlen,
                             full_end, seqlen, qk_scale, offs_m, offs_d, HEAD_DIM, BLOCK_M, True, EVEN_D, UPCAST,
                             PRECISION)

    dk = dk * softmax_scale
    _store_rows(DK + (seq_start + offs_n[:, None]) * stride_dkt + dk_head + offs_d[None, :],
                dk.to(DK.dtype.element_ty), offs_n, seqlen, offs_d, HEAD_DIM, EVEN_D)
    _store_rows(DV + (seq_start + offs_n[:, None]) * stride_dvt + dv_head + offs_d[None, :],
                dv.to(DV.dtype.element_ty), offs_n, seqlen, offs_d, HEAD_DIM, EVEN_D)


@jit
def _dq_inner(dq, q, do, lse_log2, delta, k_base, v_base, stride_kt, stride_vt, seqlen, start, end, qk_scale,
              offs_n, offs_d, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK_N: tl.constexpr,
              EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dQ of one query block over key blocks [start, end)."""
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        k = _load_rows(k_base + cols[:, None] * stride_kt + offs_d[None, :], cols, seqlen, offs_d,
                       HEAD_DIM, MASK_N, EVEN_D)
        v = _load_rows(v_base + cols[:, None] * stride_vt + offs_d[None, :], cols, seqlen, offs_d,
                       HEAD_DIM, MASK_N, EVEN_D)
        qk = _dot(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), UPCAST, PRECISION)
        p = tl.math.exp2(qk * qk_scale - lse_log2[:, None])
        if MASK_N:
            p = tl.where(cols[None, :] < seqlen, p, 0.0)
        dp = _dot(do, tl.trans(v), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), UPCAST, PRECISION)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq, UPCAST, PRECISION)
    return dq


@jit(do_not_specialize=("stride_lse_h",))
def _attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, CU_SEQLENS,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh, stride_lse_h,
    softmax_scale, qk_scale, seqlen_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, STRIDE_ALIGN: tl.constexpr,
):
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    do_head = _head_offset(head, stride_doh, STRIDE_ALIGN)
    dq_head = _head_offset(head, stride_dqh, STRIDE_ALIGN)
    k_head = _head_offset(head, stride_kh, STRIDE_ALIGN)
    q_head = _head_offset(head, stride_qh, STRIDE_ALIGN)
    v_head = _head_offset(head, stride_vh, STRIDE_ALIGN)
    seq = tl.program_id(2)
    seq_start = tl.load(CU_SEQLENS + seq).to(tl.int64)
    seqlen = (tl.load(CU_SEQLENS + seq + 1) - seq_start).to(tl.int32)
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen:
        return

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + (seq_start + offs_m[:, None]) * stride_qt + q_head + offs_d[None, :], offs_m,
                   seqlen, offs_d, HEAD_DIM, True, EVEN_D)
    do = _load_rows(DO + (seq_start + offs_m[:, None]) * stride_dot + do_head + offs_d[None, :], offs_m,
                    seqlen, offs_d, HEAD_DIM, True, EVEN_D)
    row_ok = offs_m < seqlen
    lse_log2 = tl.load(LSE + head * stride_lse_h + seq_start + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + head * stride_lse_h + seq_start + offs_m, mask=row_ok, other=0.0)
    k_base = K + seq_start * stride_kt + k_head
    v_base = V + seq_start * stride_vt + v_head

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_end = (seqlen // BLOCK_N) * BLOCK_N
    dq = _dq_inner(dq, q, do, lse_log2, delta, k_base, v_base, stride_kt, stride_vt, seqlen, 0, full_end,
                   qk_scale, offs_n, offs_d, HEAD_DIM, BLOCK_N, False, EVEN_D, UPCAST, PRECISION)
    if full_end < seqlen:
        dq = _dq_inner(dq, q, do, lse_log2, delta, k_base, v_base, stride_kt, stride_vt, seqlen, full_end,
                       seqlen, qk_scale, offs_n, offs_d, HEAD_DIM, BLOCK_N, True, EVEN_D, UPCAST, PRECISION)

    dq = dq * softmax_scale
    _store_rows(DQ + (seq_start + offs_m[:, None]) * stride_dqt + dq_head + offs_d[None, :],
                dq.to(DQ.dtype.element_ty), offs_m, seqlen, offs_d, HEAD_DIM, EVEN_D)


# ============================================================================ launch configs
# Under the interpreter every program is a Python loop over numpy ops: few, wide blocks are
# fastest (16-wide blocks run ~10x slower than 64-wide). Tests may patch this dict.
INTERPRETER_BLOCKS = {"fwd": (64, 64), "dkdv": (64, 64), "dq": (64, 64)}  # (BLOCK_M, BLOCK_N)

_KERNELS = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}


def _c(block_m: int, block_n: int, warps: int, stages: int) -> LaunchConfig:
    return LaunchConfig.of(warps, stages, BLOCK_M=block_m, BLOCK_N=block_n)


# The configurations the GPU launcher can pick, per kernel and BLOCK_D tier (the smallest tier
# >= BLOCK_D applies): the autotuner times every one of a tier, SCALEJEPA_AUTOTUNE=0 takes the
# first (16-bit inputs) or the last (float32). kernels/compile_check.py compiles exactly these
# objects for sm_90a and sm_80 and fails when one spills registers or overflows shared memory.
# In fwd and dq, BLOCK_M is the program's own query block and BLOCK_N the key block it loops
# over; in dkdv, BLOCK_N is the program's key block and BLOCK_M the query block it loops over.
# Chosen from a compile survey (kernels/compile_check.py, sm_90a and sm_80): none of these
# spills at the model head dims; 128-row own blocks need 8 warps once BLOCK_D = 128 (head dims
# 80, 88), and the first config of each pre-survey list spilled there or at head dim 64
# (fwd 128x64 w4: 280 B stack on sm_90a at 80; dkdv 32x128 w4: 32 B at 64); fwd 32x64 w4
# spilled 8 B on sm_80 at BLOCK_D 128. The lists must also hold under Triton 3.6 (the GPU image's),
# whose code generation spilled two configs that 3.9 kept at the edge: dq 32x64 w4 s2 at BLOCK_D
# 128 (sm_90a: 168 regs + 8 B stack; 3.9: 174 regs) and dkdv 64x128 w8 s3 at BLOCK_D 64 (sm_80:
# 255 regs + 24 B; 3.9: 255 regs). Their replacements keep the tile of the program and halve the
# registers per thread: dq 32x64 with 8 warps (3.6 / 3.9: 100 / 98 regs sm_90a, 126 / 126 sm_80)
# and dkdv with a 32-row query block (164 / 164 sm_90a, 192 / 186 sm_80).
GPU_CANDIDATES: dict[str, dict[int, tuple[LaunchConfig, ...]]] = {
    "fwd": {
        32: (_c(128, 64, 8, 4), _c(128, 128, 8, 3), _c(64, 64, 4, 3), _c(64, 32, 4, 2)),
        64: (_c(128, 64, 8, 4), _c(128, 128, 8, 3), _c(64, 128, 4, 3), _c(64, 32, 4, 2)),
        128: (_c(128, 64, 8, 3), _c(128, 32, 8, 3), _c(64, 32, 4, 2)),
        256: (_c(64, 32, 4, 2), _c(32, 32, 4, 2)),
    },
    "dkdv": {
        32: (_c(32, 64, 4, 2), _c(64, 128, 8, 3), _c(32, 32, 4, 2), _c(16, 32, 4, 1)),
        64: (_c(32, 64, 4, 2), _c(32, 128, 8, 3), _c(32, 32, 4, 2), _c(16, 32, 4, 1)),
        128: (_c(64, 64, 8, 3), _c(32, 32, 4, 2), _c(16, 32, 4, 1)),
        256: (_c(16, 32, 4, 1),),
    },
    "dq": {
        32: (_c(64, 64, 4, 3), _c(128, 64, 8, 3), _c(64, 32, 4, 2), _c(32, 16, 4, 1)),
        64: (_c(128, 64, 8, 3), _c(64, 64, 4, 3), _c(64, 32, 4, 2), _c(32, 16, 4, 1)),
        128: (_c(128, 32, 8, 3), _c(64, 64, 8, 3), _c(32, 64, 8, 2), _c(32, 32, 4, 2)),
        256: (_c(32, 16, 4, 1),),
    },
}


def candidates(kind: str, block_d: int) -> tuple[LaunchConfig, ...]:
    """The GPU configurations of kernel ``kind`` for head-dim block ``block_d``."""
    tiers = GPU_CANDIDATES[kind]
    return tiers[min(t for t in tiers if t >= block_d)]


def preprocess_config(block_d: int) -> LaunchConfig:
    """The delta = rowsum(dO * O) kernel: ~8K elements per tile (no register spills), no loop."""
    return LaunchConfig.of(4, 1, BLOCK_T=min(128, 8192 // block_d))


def _default_config(kind: str, block_d: int, dtype: torch.dtype) -> LaunchConfig:
    """Untuned choice (SCALEJEPA_AUTOTUNE=0): the tier's first candidate, or its last (the
    smallest tiles) for float32, whose tiles take twice the shared memory and registers."""
    tier = candidates(kind, block_d)
    return tier[-1 if dtype == torch.float32 else 0]


@functools.cache
def _tuned(kind: str, block_d: int):
    """Autotuned wrapper of one kernel for one BLOCK_D tier, built on first GPU use; it caches
    the best config per (BLOCK_D, sequence-length bucket, dtypes of the tensor arguments)."""
    configs = [c.triton_config() for c in candidates(kind, block_d)]
    return triton.autotune(configs, key=["BLOCK_D", "seqlen_bucket"])(_KERNELS[kind])


def _launch(kind: str, grid_blocks, args: list, consts: dict, dtype: torch.dtype, interpreted: bool) -> None:
    """Launch kernel ``kind`` on the grid (cdiv(max_seqlen, own block), heads, seqs)."""
    max_seqlen, heads, seqs = grid_blocks
    own = "BLOCK_N" if kind == "dkdv" else "BLOCK_M"
    if interpreted:
        block_m, block_n = INTERPRETER_BLOCKS[kind]
        meta = {"BLOCK_M": block_m, "BLOCK_N": block_n}
    elif autotune_enabled():
        _tuned(kind, consts["BLOCK_D"])[lambda meta: (triton.cdiv(max_seqlen, meta[own]), heads, seqs)](*args, **consts)
        return
    else:
        meta = _default_config(kind, consts["BLOCK_D"], dtype).launch_kwargs()
    _KERNELS[kind][(triton.cdiv(max_seqlen, meta[own]), heads, seqs)](*args, **consts, **meta)


# ============================================================================ launchers
def _stride_align(tensors) -> int:
    """The largest power of two <= 16 dividing every token and head stride of ``tensors``
    (elements). Triton only knows a stride divides by 16 or not; head dims such as 88 and 24
    (strides 8 x 11, 8 x 3) would otherwise be loaded one element at a time, and spill."""
    align = 16
    for t in tensors:
        for stride in t.stride()[:-1]:
            align = math.gcd(align, stride)
    return align


def _kernel_consts(head_dim: int, dtype: torch.dtype, interpreted: bool, tensors) -> dict:
    block_d = max(16, triton.next_power_of_2(head_dim))
    return {
        "HEAD_DIM": head_dim,
        "BLOCK_D": block_d,
        "EVEN_D": head_dim == block_d,  # no column masks needed
        "UPCAST": interpreted and dtype == torch.bfloat16,
        "PRECISION": "ieee" if dtype == torch.float32 else None,
        "STRIDE_ALIGN": _stride_align(tensors),
    }


def _seqlen_bucket(max_seqlen: int) -> int:
    return max(16, triton.next_power_of_2(max(1, max_seqlen)))


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_values(q: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> None:
    """Value checks of the offsets: one host copy of cu_seqlens (a sync if it lives on the GPU)."""
    lengths = check_cu_seqlens_values("cu_seqlens", cu_seqlens.tolist(), q.shape[0], "q.shape[0] (total tokens)")
    longest = max(lengths, default=0)
    if longest > max_seqlen:
        raise ValueError(
            f"max_seqlen={max_seqlen} is smaller than the longest sequence ({longest} tokens); "
            "pass max_seqlen >= max(cu_seqlens[1:] - cu_seqlens[:-1])"
        )


# Positional launch arguments, built in one place for the launchers and for compile_check.
def _fwd_args(q, k, v, out, lse, cu_seqlens, max_seqlen: int, softmax_scale: float) -> list:
    return [q, k, v, out, lse, cu_seqlens,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), lse.stride(0),
            softmax_scale * _LOG2E, _seqlen_bucket(max_seqlen)]


def _preprocess_args(out, grad_out, delta) -> list:
    return [out, grad_out, delta, out.shape[0], out.stride(0), out.stride(1), grad_out.stride(0),
            grad_out.stride(1), delta.stride(0)]


def _bwd_args(kind: str, grad_out, q, k, v, lse, delta, cu_seqlens, grads: tuple, max_seqlen: int,
              softmax_scale: float) -> list:
    """Arguments of the dkdv kernel (``grads = (dk, dv)``) or of the dq kernel (``grads = (dq,)``)."""
    strides = [q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               grad_out.stride(0), grad_out.stride(1)]
    grad_strides = [s for g in grads for s in (g.stride(0), g.stride(1))]
    scalars = [softmax_scale, softmax_scale * _LOG2E, _seqlen_bucket(max_seqlen)]
    assert len(grads) == (2 if kind == "dkdv" else 1), kind
    return [q, k, v, grad_out, *grads, lse, delta, cu_seqlens, *strides, *grad_strides, lse.stride(0), *scalars]


def _forward(q, k, v, cu_seqlens, max_seqlen: int, softmax_scale: float, validate: bool):
    require_triton(_attn_fwd_kernel, q.device, "varlen_attention", "varlen_attention_reference")
    if validate:
        _check_values(q, cu_seqlens, max_seqlen)
    total, heads, _ = q.shape
    out = new_output(q.shape, q.dtype, q.device)
    lse = new_output((heads, total), torch.float32, q.device)
    num_seqs = cu_seqlens.numel() - 1
    if total == 0 or max_seqlen == 0 or num_seqs == 0:
        return out, lse
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    interpreted = is_interpreted(_attn_fwd_kernel)
    _launch("fwd", (max_seqlen, heads, num_seqs), _fwd_args(q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale),
            _kernel_consts(q.shape[-1], q.dtype, interpreted, (q, k, v, out)), q.dtype, interpreted)
    return out, lse


def _backward(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen: int, softmax_scale: float):
    require_triton(_attn_bwd_dq_kernel, q.device, "varlen_attention backward", "varlen_attention_reference")
    total, heads, head_dim = q.shape
    dq = new_output(q.shape, q.dtype, q.device)
    dk = new_output(k.shape, k.dtype, k.device)
    dv = new_output(v.shape, v.dtype, v.device)
    num_seqs = cu_seqlens.numel() - 1
    if total == 0 or max_seqlen == 0 or num_seqs == 0:
        return dq, dk, dv
    q, k, v, out, grad_out = (_last_dim_contiguous(t) for t in (q, k, v, out, grad_out))
    interpreted = is_interpreted(_attn_bwd_dq_kernel)
    consts = _kernel_consts(head_dim, q.dtype, interpreted, (q, k, v, out, grad_out, dq, dk, dv))

    delta = new_output(lse.shape, torch.float32, lse.device)
    pre = preprocess_config(consts["BLOCK_D"])
    _attn_bwd_preprocess_kernel[(triton.cdiv(total, pre.meta["BLOCK_T"]), heads)](
        *_preprocess_args(out, grad_out, delta), **_preprocess_consts(consts),
        **(pre.meta if interpreted else pre.launch_kwargs()))
    common = (grad_out, q, k, v, lse, delta, cu_seqlens)
    _launch("dkdv", (max_seqlen, heads, num_seqs),
            _bwd_args("dkdv", *common, (dk, dv), max_seqlen, softmax_scale), consts, q.dtype, interpreted)
    _launch("dq", (max_seqlen, heads, num_seqs),
            _bwd_args("dq", *common, (dq,), max_seqlen, softmax_scale), consts, q.dtype, interpreted)
    return dq, dk, dv


def _preprocess_consts(consts: dict) -> dict:
    return {k: consts[k] for k in ("HEAD_DIM", "BLOCK_D", "STRIDE_ALIGN")}


def compile_variants(head_dim: int, dtype: torch.dtype, heads: int = 16) -> list[CompileVariant]:
    """Every compilation the GPU launchers can trigger for one head dim and dtype, with the
    arguments of the model's layout (q, k, v: views of one (T, 3, heads, head_dim) qkv buffer;
    outputs and gradients contiguous) on the meta device. The token count (which sets the
    lse stride) is deliberately not a multiple of 16: the less aligned specialisation."""
    total, max_seqlen = 14087, 154
    meta = torch.device("meta")
    q, k, v = torch.empty(total, 3, heads, head_dim, dtype=dtype, device=meta).unbind(1)
    out, grad_out, dq, dk, dv = (torch.empty(total, heads, head_dim, dtype=dtype, device=meta) for _ in range(5))
    lse, delta = (torch.empty(heads, total, dtype=torch.float32, device=meta) for _ in range(2))
    cu = torch.empty(129, dtype=torch.int32, device=meta)
    fwd_consts = _kernel_consts(head_dim, dtype, False, (q, k, v, out))
    consts = _kernel_consts(head_dim, dtype, False, (q, k, v, out, grad_out, dq, dk, dv))
    scale = 1.0 / math.sqrt(head_dim)
    shape = f"head_dim {head_dim} {SHORT_DTYPE_NAMES[dtype]}"
    common = (grad_out, q, k, v, lse, delta, cu)
    args = {"fwd": _fwd_args(q, k, v, out, lse, cu, max_seqlen, scale),
            "dkdv": _bwd_args("dkdv", *common, (dk, dv), max_seqlen, scale),
            "dq": _bwd_args("dq", *common, (dq,), max_seqlen, scale)}
    variants = [CompileVariant(_attn_bwd_preprocess_kernel, tuple(_preprocess_args(out, grad_out, delta)),
                               _preprocess_consts(consts), preprocess_config(consts["BLOCK_D"]), shape)]
    for kind, kernel in _KERNELS.items():
        variants += [CompileVariant(kernel, tuple(args[kind]), fwd_consts if kind == "fwd" else consts, config, shape)
                     for config in candidates(kind, consts["BLOCK_D"])]
    return variants


# ============================================================================ custom ops
@torch.library.custom_op("scalejepa::varlen_attn_fwd", mutates_args=())
def _varlen_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, softmax_scale: float, validate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, cu_seqlens, max_seqlen, softmax_scale, validate)


@_varlen_attn_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, softmax_scale, validate):
    total, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((heads, total), dtype=torch.float32)


@torch.library.custom_op("scalejepa::varlen_attn_bwd", mutates_args=())
def _varlen_attn_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                     softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale)


@_varlen_attn_bwd.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, softmax_scale, _ = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.max_seqlen = max_seqlen
    ctx.softmax_scale = softmax_scale
    ctx.mark_non_differentiable(lse)


def _backward_rule(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _varlen_attn_bwd(grad_out, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.softmax_scale)
    return dq, dk, dv, None, None, None, None


_varlen_attn_fwd.register_autograd(_backward_rule, setup_context=_setup_context)


# ============================================================================ public API
def _check_inputs(q, k, v, cu_seqlens, max_seqlen, softmax_scale, allow_float64: bool = False) -> float:
    """Shape/dtype/device checks (no host sync); returns the softmax scale."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=3)
    allowed = FLOAT_DTYPES + ((torch.float64,) if allow_float64 else ())
    check_float_dtype("q", q, allowed=allowed)
    check_float_dtype("k", k, q, "q", allowed=allowed)
    check_float_dtype("v", v, q, "q", allowed=allowed)
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must have one shape (total_tokens, heads, head_dim), got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    head_dim = q.shape[-1]
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(
            f"head_dim={head_dim} is not supported (1..{MAX_HEAD_DIM}); use varlen_attention_reference or "
            "torch.nn.functional.scaled_dot_product_attention"
        )
    check_cu_seqlens_meta("cu_seqlens", cu_seqlens)
    check_same_device(q=q, k=k, v=v, cu_seqlens=cu_seqlens)
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, (int, torch.SymInt)):
        raise TypeError(f"max_seqlen must be a Python int, got {type(max_seqlen).__name__}; pass int(max_seqlen)")
    if max_seqlen < 0:
        raise ValueError(f"max_seqlen must be >= 0, got {max_seqlen}")
    if q.is_cuda and (q.shape[1] > _MAX_GRID_YZ or cu_seqlens.numel() - 1 > _MAX_GRID_YZ):
        raise ValueError(f"at most {_MAX_GRID_YZ} heads and {_MAX_GRID_YZ} sequences per call (CUDA grid limit); "
                         "split the batch")
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not isinstance(softmax_scale, (int, float)) or not softmax_scale > 0:
        raise ValueError(f"softmax_scale must be a positive float or None, got {softmax_scale!r}")
    return float(softmax_scale)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, softmax_scale: float | None = None, *, validate: bool = True) -> torch.Tensor:
    """Attention within each packed sequence; ``(total_tokens, heads, head_dim)`` in and out.

    ``cu_seqlens``: int32 ``(num_seqs + 1,)`` offsets, 0 first, total_tokens last, non-decreasing
    (empty sequences allowed). ``max_seqlen``: a host int >= the longest sequence (it sizes the
    grid). ``softmax_scale`` defaults to ``1/sqrt(head_dim)``. ``validate=False`` skips the one
    host sync that checks the offsets' values. Differentiable in q, k, v.
    """
    scale = _check_inputs(q, k, v, cu_seqlens, max_seqlen, softmax_scale)
    out, _ = torch.ops.scalejepa.varlen_attn_fwd(q, k, v, cu_seqlens, max_seqlen, scale, validate)
    return out


def varlen_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                               max_seqlen: int, softmax_scale: float | None = None) -> torch.Tensor:
    """Plain-PyTorch ground truth with the same contract, vectorised and free of host syncs.

    Scatters the packed tokens into a ``(num_seqs, max_seqlen)`` padded batch, masks padding
    keys, computes in float32 (float64 inputs stay float64) and gathers the valid rows back.
    Memory is ``num_seqs * heads * max_seqlen**2`` scores.
    """
    scale = _check_inputs(q, k, v, cu_seqlens, max_seqlen, softmax_scale, allow_float64=True)
    total, heads, head_dim = q.shape
    num_seqs = cu_seqlens.numel() - 1
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    seq = torch.searchsorted(cu_seqlens[1:], torch.arange(total, device=q.device, dtype=cu_seqlens.dtype),
                             right=True)
    pos = torch.arange(total, device=q.device) - cu_seqlens.long()[seq]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    key_ok = torch.arange(max_seqlen, device=q.device)[None, :] < lengths[:, None]  # (S, L)

    def pad(t):  # (T, H, D) -> (S, H, L, D)
        padded = t.new_zeros((num_seqs, max_seqlen, heads, head_dim), dtype=compute)
        padded = padded.index_put((seq, pos), t.to(compute))
        return padded.transpose(1, 2)

    qp, kp, vp = pad(q), pad(k), pad(v)
    scores = torch.matmul(qp, kp.transpose(-1, -2)) * scale
    # A finite fill keeps rows of empty sequences NaN-free (they are never read back).
    scores = scores.masked_fill(~key_ok[:, None, None, :], torch.finfo(compute).min)
    out = torch.matmul(torch.softmax(scores, dim=-1), vp)  # (S, H, L, D)
    return out.transpose(1, 2)[seq, pos].to(q.dtype)
