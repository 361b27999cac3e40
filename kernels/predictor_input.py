"""The predictor's packed input in one kernel.

``build_predictor_input``: the packed predictor input of I-JEPA in one kernel. Sequence
``s = m * B + b`` (target block ``m`` of image ``b``) is
``[ctx rows of image b + pos_embed[ctx_idx] ; mask_token + pos_embed[tgt_idx rows of s]]``.
Where sequence ``s`` starts needs no prefix sum:
``cu_out[s] = (s // B) * T_ctx + cu_ctx[s % B] + cu_tgt[s]`` (all earlier target-block rounds
hold every context row once; within the round come images ``< b`` and targets ``< s``). The
forward kernel writes ``cu_out`` itself, on the device: no host sync; the total
``M * T_ctx + T_tgt`` comes from shapes. Backward, one program per (image, column block):
``grad_ctx`` sums the M copies of each row (a gather-sum, no atomics, deterministic);
``grad_mask_token`` sums every mask row, through per-image float32 partial sums reduced by
torch (deterministic); ``grad_pos_embed`` (only if required) uses float32 atomics.
Both are memory-bound copies; the fused kernel saves the reference's intermediate tables and
index tensors (about 10 small launches). Whether that pays off on a GPU is for
``benchmarks/`` to show; the reference is the plain-PyTorch path.

Host syncs: ``validate=True`` copies the offsets and a few index statistics to the host in
one ``.tolist()``; ``validate=False`` skips it (bad indices then read/write out of bounds).
Dtypes: float32/bfloat16/float16, additions done in float32 and rounded once; ``ctx``,
``mask_token`` and ``pos_embed`` must share one dtype.

Custom ops: ``scalejepa::build_predictor_input_fwd`` / ``_bwd``, with fake implementations and autograd.
"""

import torch

from ._common import (
    CompileVariant,
    check_cu_seqlens_meta,
    check_cu_seqlens_values,
    check_float_dtype,
    check_index_tensor,
    check_same_device,
    check_tensor,
    contiguous_rows,
    copy_blocks,
    copy_compile_variants,
    is_interpreted,
    jit,
    new_output,
    require_triton,
    sequence_ids,
    tl,
    triton,
)

__all__ = ["build_predictor_input", "build_predictor_input_reference"]

_INT32_MAX = 2**31 - 1


# ============================================================================ Triton kernels
@jit(do_not_specialize=("total_ctx", "total_tgt"))
def _predictor_fwd_kernel(CTX, CTX_IDX, CU_CTX, TGT_IDX, CU_TGT, MASK, POS, OUT, CU_OUT,
                          num_images, total_ctx, total_tgt, num_seqs, stride_ct, stride_pn, stride_ot, dim,
                          BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    seq = tl.program_id(0)  # seq = block * num_images + image
    image = seq % num_images
    block = seq // num_images
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < dim
    ctx_start = tl.load(CU_CTX + image)
    ctx_end = tl.load(CU_CTX + image + 1)
    tgt_start = tl.load(CU_TGT + seq)
    tgt_end = tl.load(CU_TGT + seq + 1)
    # Row numbers fit in int32 (the launcher checks the total); addresses are formed in int64.
    out_start = block * total_ctx + ctx_start + tgt_start
    if tl.program_id(1) == 0:
        tl.store(CU_OUT + seq, out_start)
        if seq == num_seqs - 1:
            tl.store(CU_OUT + num_seqs, (block + 1) * total_ctx + total_tgt)

    for r0 in range(ctx_start, ctx_end, BLOCK_T):  # context rows, each + its position embedding
        rows = r0 + tl.arange(0, BLOCK_T)
        ok = (rows < ctx_end)[:, None] & col_ok[None, :]
        idx = tl.load(CTX_IDX + rows, mask=rows < ctx_end, other=0)
        val = tl.load(CTX + rows.to(tl.int64)[:, None] * stride_ct + cols[None, :], mask=ok, other=0.0)
        val = val.to(tl.float32) + tl.load(POS + idx[:, None] * stride_pn + cols[None, :], mask=ok, other=0.0)
        dst = (out_start + (rows - ctx_start)).to(tl.int64)
        tl.store(OUT + dst[:, None] * stride_ot + cols[None, :], val.to(OUT.dtype.element_ty), mask=ok)

    mask_token = tl.load(MASK + cols, mask=col_ok, other=0.0).to(tl.float32)
    mask_start = out_start + (ctx_end - ctx_start)
    for r0 in range(tgt_start, tgt_end, BLOCK_T):  # mask token + target position embedding
        rows = r0 + tl.arange(0, BLOCK_T)
        ok = (rows < tgt_end)[:, None] & col_ok[None, :]
        idx = tl.load(TGT_IDX + rows, mask=rows < tgt_end, other=0)
        val = mask_token[None, :] + tl.load(POS + idx[:, None] * stride_pn + cols[None, :], mask=ok, other=0.0)
        dst = (mask_start + (rows - tgt_start)).to(tl.int64)
        tl.store(OUT + dst[:, None] * stride_ot + cols[None, :], val.to(OUT.dtype.element_ty), mask=ok)


@jit(do_not_specialize=("total_ctx",))
def _predictor_bwd_kernel(GOUT, CTX_IDX, CU_CTX, TGT_IDX, CU_TGT, GCTX, GMASK_PARTIAL, GPOS,
                          num_images, num_blocks, total_ctx, stride_gt, stride_ct, stride_mb, stride_pn, dim,
                          POS_GRAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    image = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < dim
    ctx_start = tl.load(CU_CTX + image)
    ctx_end = tl.load(CU_CTX + image + 1)

    # grad ctx[r] = sum over the M copies of row r (copy m sits at m*T_ctx + cu_tgt[m*B+b] + r).
    for r0 in range(ctx_start, ctx_end, BLOCK_T):
        rows = r0 + tl.arange(0, BLOCK_T)
        ok = (rows < ctx_end)[:, None] & col_ok[None, :]
        g = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        for block in range(0, num_blocks):
            shift = block * total_ctx + tl.load(CU_TGT + block * num_images + image)
            g += tl.load(GOUT + (shift + rows).to(tl.int64)[:, None] * stride_gt + cols[None, :], mask=ok, other=0.0)
        tl.store(GCTX + rows.to(tl.int64)[:, None] * stride_ct + cols[None, :], g.to(GCTX.dtype.element_ty), mask=ok)
        if POS_GRAD:
            idx = tl.load(CTX_IDX + rows, mask=rows < ctx_end, other=0)
            tl.atomic_add(GPOS + idx[:, None] * stride_pn + cols[None, :], g, mask=ok)

    # grad mask_token: this image's share of the sum over all mask rows (reduced by torch).
    g_mask = tl.zeros([BLOCK_D], dtype=tl.float32)
    for block in range(0, num_blocks):
        seq = block * num_images + image
        tgt_start = tl.load(CU_TGT + seq)
        tgt_end = tl.load(CU_TGT + seq + 1)
        mask_start = block * total_ctx + ctx_end  # cu_out[seq] + ctx length - tgt_start; fits int32
        for r0 in range(tgt_start, tgt_end, BLOCK_T):
            rows = r0 + tl.arange(0, BLOCK_T)
            ok = (rows < tgt_end)[:, None] & col_ok[None, :]
            g = tl.load(GOUT + (mask_start + rows).to(tl.int64)[:, None] * stride_gt + cols[None, :], mask=ok,
                        other=0.0).to(tl.float32)
            g_mask += tl.sum(g, axis=0)
            if POS_GRAD:
                idx = tl.load(TGT_IDX + rows, mask=rows < tgt_end, other=0)
                tl.atomic_add(GPOS + idx[:, None] * stride_pn + cols[None, :], g, mask=ok)
    tl.store(GMASK_PARTIAL + image * stride_mb + cols, g_mask, mask=col_ok)


# ============================================================================ launch arguments
# Positional launch arguments, built in one place for the launchers and for compile_check.
# An absent optional tensor (None) is replaced by a dummy pointer the kernel never touches.
def _predictor_fwd_args(ctx, ctx_idx, cu_ctx, tgt_idx, cu_tgt, mask_token, pos_embed, out, cu_out) -> list:
    num_images, num_seqs = cu_ctx.numel() - 1, cu_tgt.numel() - 1
    return [ctx, ctx_idx, cu_ctx, tgt_idx, cu_tgt, mask_token, pos_embed, out, cu_out, num_images, ctx.shape[0],
            tgt_idx.numel(), num_seqs, ctx.stride(0), pos_embed.stride(0), out.stride(0), ctx.shape[1]]


def _predictor_bwd_args(grad_out, ctx_idx, cu_ctx, tgt_idx, cu_tgt, grad_ctx, mask_partial, grad_pos32) -> list:
    num_images, num_seqs = cu_ctx.numel() - 1, cu_tgt.numel() - 1
    width = grad_out.shape[1]
    return [grad_out, ctx_idx, cu_ctx, tgt_idx, cu_tgt, grad_ctx, mask_partial,
            grad_ctx if grad_pos32 is None else grad_pos32, num_images, num_seqs // num_images, ctx_idx.numel(),
            grad_out.stride(0), grad_ctx.stride(0), mask_partial.stride(0), width, width]


def compile_variants(width: int, dtype: torch.dtype, num_images: int = 128, num_patches: int = 256,
                     num_blocks: int = 4) -> list[CompileVariant]:
    """Every compilation the GPU launchers of this file can trigger for one token width and
    dtype (with and without position-embedding gradients), with the arguments of an I-JEPA
    batch on the meta device; token counts are deliberately not multiples of 16."""
    meta = torch.device("meta")
    ctx_tokens, tgt_tokens = 14087, 4 * 128 * 44 + 3

    def empty(*shape, dt=dtype):
        return torch.empty(*shape, dtype=dt, device=meta)

    pos = empty(num_patches, width)
    idx, cu = empty(ctx_tokens, dt=torch.int64), empty(num_images + 1, dt=torch.int32)
    tokens, grad_pos32 = empty(ctx_tokens, width), empty(num_patches, width, dt=torch.float32)
    tgt_idx, cu_tgt = empty(tgt_tokens, dt=torch.int64), empty(num_blocks * num_images + 1, dt=torch.int32)
    pred_out = empty(num_blocks * ctx_tokens + tgt_tokens, width)
    cu_out = empty(num_blocks * num_images + 1, dt=torch.int32)
    mask_partial = empty(num_images, width, dt=torch.float32)
    launches = [
        (_predictor_fwd_kernel, _predictor_fwd_args(tokens, idx, cu, tgt_idx, cu_tgt, pos[0], pos, pred_out, cu_out),
         {}),
        (_predictor_bwd_kernel, _predictor_bwd_args(pred_out, idx, cu, tgt_idx, cu_tgt, tokens, mask_partial,
                                                    grad_pos32), {"POS_GRAD": True}),
        (_predictor_bwd_kernel, _predictor_bwd_args(pred_out, idx, cu, tgt_idx, cu_tgt, tokens, mask_partial, None),
         {"POS_GRAD": False}),
    ]
    return copy_compile_variants(launches, width, dtype)


# ============================================================================ build_predictor_input
def _check_predictor_inputs(ctx, ctx_idx, cu_ctx, tgt_idx, cu_tgt, mask_token, pos_embed) -> int:
    """Metadata checks; returns M, the number of target blocks per image."""
    check_tensor("ctx", ctx, ndim=2)
    check_float_dtype("ctx", ctx)
    check_index_tensor("ctx_idx", ctx_idx, torch.int64)
    check_index_tensor("tgt_idx", tgt_idx, torch.int64)
    check_cu_seqlens_meta("cu_ctx", cu_ctx)
    check_cu_seqlens_meta("cu_tgt", cu_tgt)
    check_tensor("mask_token", mask_token, ndim=1)
    check_tensor("pos_embed", pos_embed, ndim=2)
    check_float_dtype("mask_token", mask_token, ctx, "ctx")
    check_float_dtype("pos_embed", pos_embed, ctx, "ctx")
    width = ctx.shape[1]
    if ctx_idx.numel() != ctx.shape[0]:
        raise ValueError(f"ctx_idx must have one index per ctx row ({ctx.shape[0]}), got {ctx_idx.numel()}")
    if mask_token.shape[0] != width or pos_embed.shape[1] != width:
        raise ValueError(f"mask_token (P,) and pos_embed (N, P) must match ctx's width P={width}, got "
                         f"{tuple(mask_token.shape)} and {tuple(pos_embed.shape)}")
    check_same_device(ctx=ctx, ctx_idx=ctx_idx, cu_ctx=cu_ctx, tgt_idx=tgt_idx, cu_tgt=cu_tgt,
                      mask_token=mask_token, pos_embed=pos_embed)
    num_images, num_seqs = cu_ctx.numel() - 1, cu_tgt.numel() - 1
    if num_images == 0:
        if num_seqs:
            raise ValueError(f"cu_ctx describes no image but cu_tgt describes {num_seqs} target blocks")
        return 0
    if num_seqs % num_images:
        raise ValueError(
            f"cu_tgt must have M * B + 1 elements with B = {num_images} images (from cu_ctx), got "
            f"{cu_tgt.numel()}; sequence s = m * B + b is target block m of image b"
        )
    if num_seqs // num_images * ctx.shape[0] + tgt_idx.numel() > _INT32_MAX:
        raise ValueError("the packed predictor input would exceed 2**31 - 1 rows (int32 offsets); split the batch")
    return num_seqs // num_images


def _check_predictor_values(ctx, ctx_idx, cu_ctx, tgt_idx, cu_tgt, pos_embed) -> None:
    """Offsets and index ranges, one host copy."""
    num_patches = pos_embed.shape[0]
    stats = [torch.stack([t.min(), t.max()]) if t.numel() else t.new_zeros(2) for t in (ctx_idx, tgt_idx)]
    host = torch.cat([cu_ctx.long(), cu_tgt.long(), *stats]).tolist()
    n_ctx = cu_ctx.numel()
    check_cu_seqlens_values("cu_ctx", host[:n_ctx], ctx.shape[0], "ctx.shape[0]")
    check_cu_seqlens_values("cu_tgt", host[n_ctx:-4], tgt_idx.numel(), "tgt_idx.numel()")
    for name, t, (lo, hi) in (("ctx_idx", ctx_idx, host[-4:-2]), ("tgt_idx", tgt_idx, host[-2:])):
        if t.numel() and (lo < 0 or hi >= num_patches):
            raise ValueError(f"{name} values must be in [0, N={num_patches}) (pos_embed rows), got [{lo}, {hi}]")


def _predictor_forward(ctx, ctx_idx, cu_ctx, tgt_idx, cu_tgt, mask_token, pos_embed, validate: bool):
    require_triton(_predictor_fwd_kernel, ctx.device, "build_predictor_input", "build_predictor_input_reference")
    if validate:
        _check_predictor_values(ctx, ctx_idx, cu_ctx, tgt_idx, cu_tgt, pos_embed)
    num_images, num_seqs = cu_ctx.numel() - 1, cu_tgt.numel() - 1
    num_blocks = num_seqs // num_images if num_images else 0
    total_ctx, width = ctx.shape
    out = new_output((num_blocks * total_ctx + tgt_idx.numel(), width), ctx.dtype, ctx.device)
    if num_seqs == 0:
        return out, torch.zeros(1, dtype=torch.int32, device=ctx.device)
    cu_out = new_output((num_seqs + 1,), torch.int32, ctx.device)
    ctx, mask_token, pos_embed = contiguous_rows(ctx), contiguous_rows(mask_token), contiguous_rows(pos_embed)
    meta = copy_blocks(width, is_interpreted(_predictor_fwd_kernel))
    _predictor_fwd_kernel[(num_seqs, triton.cdiv(width, meta["BLOCK_D"]))](
        *_predictor_fwd_args(ctx, ctx_idx, cu_ctx, tgt_idx, cu_tgt, mask_token, pos_embed, out, cu_out), **meta)
    return out, cu_out


def _predictor_backward(grad_out, ctx_idx, cu_ctx, tgt_idx, cu_tgt, num_patches: int, pos_grad: bool):
    require_triton(_predictor_bwd_kernel, grad_out.device, "build_predictor_input backward",
                   "build_predictor_input_reference")
    num_images, num_seqs = cu_ctx.numel() - 1, cu_tgt.numel() - 1
    width = grad_out.shape[1]
    total_ctx = ctx_idx.numel()
    grad_ctx = new_output((total_ctx, width), grad_out.dtype, grad_out.device)
    mask_partial = torch.zeros((max(num_images, 1), width), dtype=torch.float32, device=grad_out.device)
    grad_pos32 = torch.zeros((num_patches, width) if pos_grad else (0,), dtype=torch.float32,
                             device=grad_out.device)
    if num_seqs:
        grad_out = contiguous_rows(grad_out)
        meta = copy_blocks(width, is_interpreted(_predictor_bwd_kernel))
        _predictor_bwd_kernel[(num_images, triton.cdiv(width, meta["BLOCK_D"]))](
            *_predictor_bwd_args(grad_out, ctx_idx, cu_ctx, tgt_idx, cu_tgt, grad_ctx, mask_partial,
                                 grad_pos32 if pos_grad else None), POS_GRAD=pos_grad, **meta)
    else:
        grad_ctx.zero_()
    return grad_ctx, mask_partial.sum(0).to(grad_out.dtype), grad_pos32.to(grad_out.dtype)


@torch.library.custom_op("scalejepa::build_predictor_input_fwd", mutates_args=())
def _build_predictor_input_fwd(ctx: torch.Tensor, ctx_idx: torch.Tensor, cu_ctx: torch.Tensor, tgt_idx: torch.Tensor,
                               cu_tgt: torch.Tensor, mask_token: torch.Tensor, pos_embed: torch.Tensor,
                               validate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _predictor_forward(ctx, ctx_idx, cu_ctx, tgt_idx, cu_tgt, mask_token, pos_embed, validate)


@_build_predictor_input_fwd.register_fake
def _(ctx, ctx_idx, cu_ctx, tgt_idx, cu_tgt, mask_token, pos_embed, validate):
    num_images, num_seqs = cu_ctx.shape[0] - 1, cu_tgt.shape[0] - 1
    num_blocks = num_seqs // num_images if num_images else 0
    rows = num_blocks * ctx.shape[0] + tgt_idx.shape[0]
    return ctx.new_empty((rows, ctx.shape[1])), cu_ctx.new_empty((num_seqs + 1,))


@torch.library.custom_op("scalejepa::build_predictor_input_bwd", mutates_args=())
def _build_predictor_input_bwd(grad_out: torch.Tensor, ctx_idx: torch.Tensor, cu_ctx: torch.Tensor,
                               tgt_idx: torch.Tensor, cu_tgt: torch.Tensor, num_patches: int,
                               pos_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _predictor_backward(grad_out, ctx_idx, cu_ctx, tgt_idx, cu_tgt, num_patches, pos_grad)


@_build_predictor_input_bwd.register_fake
def _(grad_out, ctx_idx, cu_ctx, tgt_idx, cu_tgt, num_patches, pos_grad):
    width = grad_out.shape[1]
    grad_pos_shape = (num_patches, width) if pos_grad else (0,)
    return (grad_out.new_empty((ctx_idx.shape[0], width)), grad_out.new_empty((width,)),
            grad_out.new_empty(grad_pos_shape))


def _predictor_setup_context(ctx, inputs, output):
    _, ctx_idx, cu_ctx, tgt_idx, cu_tgt, _, pos_embed, _ = inputs
    ctx.save_for_backward(ctx_idx, cu_ctx, tgt_idx, cu_tgt)
    ctx.num_patches = pos_embed.shape[0]
    ctx.mark_non_differentiable(output[1])


def _predictor_backward_rule(ctx, grad_out, _grad_cu_out):
    ctx_idx, cu_ctx, tgt_idx, cu_tgt = ctx.saved_tensors
    pos_grad = ctx.needs_input_grad[6]
    grad_ctx, grad_mask, grad_pos = _build_predictor_input_bwd(grad_out, ctx_idx, cu_ctx, tgt_idx, cu_tgt,
                                                               ctx.num_patches, pos_grad)
    return grad_ctx, None, None, None, None, grad_mask, grad_pos if pos_grad else None, None

_build_predictor_input_fwd.register_autograd(_predictor_backward_rule, setup_context=_predictor_setup_context)


def build_predictor_input(ctx: torch.Tensor, ctx_idx: torch.Tensor, cu_ctx: torch.Tensor, tgt_idx: torch.Tensor,
                          cu_tgt: torch.Tensor, mask_token: torch.Tensor, pos_embed: torch.Tensor, *,
                          validate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed I-JEPA predictor input and its int32 offsets ``cu_out`` (``(M*B + 1,)``, on device).

    ``ctx``: ``(T_ctx, P)`` projected context rows of B images (offsets ``cu_ctx``, ``(B+1,)``),
    ``ctx_idx``: their patch indices; ``tgt_idx``: target patch indices of M*B sequences
    (offsets ``cu_tgt``, sequence ``s = m*B + b``); ``mask_token``: ``(P,)``; ``pos_embed``:
    ``(N, P)``. Sequence s of the output = ctx rows of image b (+ their position embeddings),
    then one mask token + position embedding per target of s. Differentiable in ``ctx``,
    ``mask_token`` and ``pos_embed``.
    """
    _check_predictor_inputs(ctx, ctx_idx, cu_ctx, tgt_idx, cu_tgt, mask_token, pos_embed)
    return torch.ops.scalejepa.build_predictor_input_fwd(ctx, ctx_idx, cu_ctx, tgt_idx, cu_tgt, mask_token,
                                                         pos_embed, validate)


def build_predictor_input_reference(ctx: torch.Tensor, ctx_idx: torch.Tensor, cu_ctx: torch.Tensor,
                                    tgt_idx: torch.Tensor, cu_tgt: torch.Tensor, mask_token: torch.Tensor,
                                    pos_embed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch ``build_predictor_input``: one gather from [ctx rows ; mask rows], no host sync."""
    num_blocks = _check_predictor_inputs(ctx, ctx_idx, cu_ctx, tgt_idx, cu_tgt, mask_token, pos_embed)
    num_images, num_seqs = cu_ctx.numel() - 1, cu_tgt.numel() - 1
    total_ctx = ctx.shape[0]
    device = ctx.device
    if num_seqs == 0:
        return ctx.new_empty((0, ctx.shape[1])), torch.zeros(1, dtype=torch.int32, device=device)
    seq = torch.arange(num_seqs + 1, device=device)
    image = seq % num_images
    cu_out = (seq // num_images * total_ctx + cu_ctx.long()[image] + cu_tgt.long()).to(torch.int32)

    total_out = num_blocks * total_ctx + tgt_idx.numel()
    row_seq = sequence_ids(cu_out, total_out)  # output row -> sequence
    offset = torch.arange(total_out, device=device) - cu_out.long()[row_seq]  # position inside the sequence
    row_image = row_seq % num_images
    ctx_len = (cu_ctx[1:] - cu_ctx[:-1]).long()[row_image]
    src = torch.where(offset < ctx_len, cu_ctx.long()[row_image] + offset,
                      total_ctx + cu_tgt.long()[row_seq] + offset - ctx_len)
    table = torch.cat([ctx + pos_embed[ctx_idx], mask_token + pos_embed[tgt_idx]])
    return table[src], cu_out
