"""Fused context-token gather for packed I-JEPA batches.

``gather_tokens``: ``out[t] = x[b(t), token_idx[t]] (+ pos_embed[token_idx[t]])`` where row ``t``
belongs to image ``b(t)`` through ``cu_seqlens``. Used to pick each image's context patches
(after, or fused with, adding position embeddings). One Triton program per (image, column
block) walks that image's rows, so no per-row image id is materialised.
Backward stores the gradient rows into a zero-filled ``grad_x`` with plain (non-atomic)
stores, which requires the patch indices of an image to be distinct in that case (checked when
``validate=True``, the default, and the gradient will be needed); the forward alone accepts
repeats (e.g. overlapping target blocks under ``no_grad``). ``grad_pos_embed`` (only when
``pos_embed`` requires grad; I-JEPA's sin-cos table does not) is accumulated with float32
atomics, so its summation order is not deterministic.

The kernel is a memory-bound copy; whether the fusion pays off on a GPU is for ``benchmarks/``
to show; the reference is the plain-PyTorch path.

Host syncs: ``validate=True`` copies the offsets and a few index statistics to the host in
one ``.tolist()``; ``validate=False`` skips it (bad indices then read/write out of bounds).
Dtypes: float32/bfloat16/float16, additions done in float32 and rounded once; ``x``,
``pos_embed`` must share one dtype.

Custom ops: ``scalejepa::gather_tokens_fwd`` / ``_bwd``, with fake implementations and autograd.
"""

from typing import Optional

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

__all__ = ["gather_tokens", "gather_tokens_reference"]


# ============================================================================ Triton kernels
@jit
def _gather_fwd_kernel(X, IDX, CU, POS, OUT, stride_xb, stride_xn, stride_pn, stride_ot, dim,
                       HAS_POS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    image = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < dim
    start = tl.load(CU + image)
    end = tl.load(CU + image + 1)
    x_base = X + image.to(tl.int64) * stride_xb
    for r0 in range(start, end, BLOCK_T):
        rows = r0 + tl.arange(0, BLOCK_T)
        ok = (rows < end)[:, None] & col_ok[None, :]
        idx = tl.load(IDX + rows, mask=rows < end, other=0)
        val = tl.load(x_base + idx[:, None] * stride_xn + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        if HAS_POS:
            val += tl.load(POS + idx[:, None] * stride_pn + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        tl.store(OUT + rows.to(tl.int64)[:, None] * stride_ot + cols[None, :], val.to(OUT.dtype.element_ty), mask=ok)


@jit
def _gather_bwd_kernel(GOUT, IDX, CU, GX, GPOS, stride_gt, stride_xb, stride_xn, stride_pn, dim,
                       POS_GRAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    image = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < dim
    start = tl.load(CU + image)
    end = tl.load(CU + image + 1)
    gx_base = GX + image.to(tl.int64) * stride_xb
    for r0 in range(start, end, BLOCK_T):
        rows = r0 + tl.arange(0, BLOCK_T)
        ok = (rows < end)[:, None] & col_ok[None, :]
        idx = tl.load(IDX + rows, mask=rows < end, other=0)
        g = tl.load(GOUT + rows.to(tl.int64)[:, None] * stride_gt + cols[None, :], mask=ok, other=0.0)
        # Plain store: indices are distinct within an image (checked by the launcher).
        tl.store(gx_base + idx[:, None] * stride_xn + cols[None, :], g, mask=ok)
        if POS_GRAD:  # the same patch index repeats across images: accumulate atomically
            tl.atomic_add(GPOS + idx[:, None] * stride_pn + cols[None, :], g.to(tl.float32), mask=ok)


# ============================================================================ launch arguments
# Positional launch arguments, built in one place for the launchers and for compile_check.
# An absent optional tensor (None) is replaced by a dummy pointer the kernel never touches.
def _gather_fwd_args(x, token_idx, cu_seqlens, pos, out) -> list:
    pos = x if pos is None else pos
    return [x, token_idx, cu_seqlens, pos, out, x.stride(0), x.stride(1), pos.stride(0), out.stride(0), x.shape[2]]


def _gather_bwd_args(grad_out, token_idx, cu_seqlens, grad_x, grad_pos32) -> list:
    dim = grad_out.shape[1]
    return [grad_out, token_idx, cu_seqlens, grad_x, grad_x if grad_pos32 is None else grad_pos32,
            grad_out.stride(0), grad_x.stride(0), grad_x.stride(1), dim, dim]


def compile_variants(width: int, dtype: torch.dtype, num_images: int = 128,
                     num_patches: int = 256) -> list[CompileVariant]:
    """Every compilation the GPU launchers of this file can trigger for one token width and
    dtype (with and without position-embedding gradients), with the arguments of an I-JEPA
    batch on the meta device; token counts are deliberately not multiples of 16."""
    meta = torch.device("meta")
    ctx_tokens = 14087

    def empty(*shape, dt=dtype):
        return torch.empty(*shape, dtype=dt, device=meta)

    x, pos = empty(num_images, num_patches, width), empty(num_patches, width)
    idx, cu = empty(ctx_tokens, dt=torch.int64), empty(num_images + 1, dt=torch.int32)
    tokens, grad_pos32 = empty(ctx_tokens, width), empty(num_patches, width, dt=torch.float32)
    launches = [
        (_gather_fwd_kernel, _gather_fwd_args(x, idx, cu, pos, tokens), {"HAS_POS": True}),
        (_gather_fwd_kernel, _gather_fwd_args(x, idx, cu, None, tokens), {"HAS_POS": False}),
        (_gather_bwd_kernel, _gather_bwd_args(tokens, idx, cu, x, grad_pos32), {"POS_GRAD": True}),
        (_gather_bwd_kernel, _gather_bwd_args(tokens, idx, cu, x, None), {"POS_GRAD": False}),
    ]
    return copy_compile_variants(launches, width, dtype)


# ============================================================================ gather_tokens
def _check_gather_inputs(x, token_idx, cu_seqlens, pos_embed) -> None:
    check_tensor("x", x, ndim=3)
    check_float_dtype("x", x)
    check_index_tensor("token_idx", token_idx, torch.int64)
    check_cu_seqlens_meta("cu_seqlens", cu_seqlens)
    if cu_seqlens.numel() != x.shape[0] + 1:
        raise ValueError(
            f"cu_seqlens must have x.shape[0] + 1 = {x.shape[0] + 1} elements (one offset per image plus "
            f"the total), got {cu_seqlens.numel()}"
        )
    tensors = {"x": x, "token_idx": token_idx, "cu_seqlens": cu_seqlens}
    if pos_embed is not None:
        check_tensor("pos_embed", pos_embed, ndim=2)
        check_float_dtype("pos_embed", pos_embed, x, "x")
        if pos_embed.shape != x.shape[1:]:
            raise ValueError(f"pos_embed must have shape (N, D) = {tuple(x.shape[1:])}, got {tuple(pos_embed.shape)}")
        tensors["pos_embed"] = pos_embed
    check_same_device(**tensors)


def _check_gather_values(x, token_idx, cu_seqlens, need_distinct: bool) -> None:
    """Offsets, index range and (if backward will run) distinct indices per image; one host copy."""
    num_images, num_patches, _ = x.shape
    total = token_idx.numel()
    stats = torch.zeros(3, dtype=torch.int64, device=token_idx.device)
    if total:
        stats[0], stats[1] = token_idx.min(), token_idx.max()
        if need_distinct and total > 1:
            key = torch.sort(sequence_ids(cu_seqlens, total) * num_patches + token_idx).values
            stats[2] = (key[1:] == key[:-1]).sum()
    host = torch.cat([cu_seqlens.long(), stats]).tolist()
    cu, (lo, hi, repeats) = host[:-3], host[-3:]
    lengths = check_cu_seqlens_values("cu_seqlens", cu, total, "token_idx.numel()")
    if max(lengths, default=0) > num_patches:
        raise ValueError(f"an image keeps {max(lengths)} tokens but has only N={num_patches} patches; "
                         "cu_seqlens does not match x")
    if total and (lo < 0 or hi >= num_patches):
        raise ValueError(f"token_idx values must be in [0, N={num_patches}), got range [{lo}, {hi}]")
    if repeats:
        raise ValueError(
            f"token_idx repeats a patch index within an image ({repeats} repeats); gather_tokens' backward "
            "needs distinct indices per image: deduplicate them, gather under torch.no_grad(), or use "
            "gather_tokens_reference"
        )


def _gather_forward(x, token_idx, cu_seqlens, pos_embed, validate: bool, need_distinct: bool):
    require_triton(_gather_fwd_kernel, x.device, "gather_tokens", "gather_tokens_reference")
    if validate:
        _check_gather_values(x, token_idx, cu_seqlens, need_distinct)
    num_images, _, dim = x.shape
    out = new_output((token_idx.numel(), dim), x.dtype, x.device)
    if out.numel() == 0:
        return out
    x = contiguous_rows(x)
    pos = contiguous_rows(pos_embed) if pos_embed is not None else None
    meta = copy_blocks(dim, is_interpreted(_gather_fwd_kernel))
    _gather_fwd_kernel[(num_images, triton.cdiv(dim, meta["BLOCK_D"]))](
        *_gather_fwd_args(x, token_idx, cu_seqlens, pos, out), HAS_POS=pos_embed is not None, **meta)
    return out


def _gather_backward(grad_out, token_idx, cu_seqlens, num_patches: int, pos_grad: bool):
    require_triton(_gather_bwd_kernel, grad_out.device, "gather_tokens backward", "gather_tokens_reference")
    num_images = cu_seqlens.numel() - 1
    dim = grad_out.shape[1]
    grad_x = torch.zeros((num_images, num_patches, dim), dtype=grad_out.dtype, device=grad_out.device)
    grad_pos32 = torch.zeros((num_patches, dim) if pos_grad else (0,), dtype=torch.float32, device=grad_out.device)
    if grad_out.numel():
        grad_out = contiguous_rows(grad_out)
        meta = copy_blocks(dim, is_interpreted(_gather_bwd_kernel))
        _gather_bwd_kernel[(num_images, triton.cdiv(dim, meta["BLOCK_D"]))](
            *_gather_bwd_args(grad_out, token_idx, cu_seqlens, grad_x, grad_pos32 if pos_grad else None),
            POS_GRAD=pos_grad, **meta)
    return grad_x, grad_pos32.to(grad_out.dtype)


@torch.library.custom_op("scalejepa::gather_tokens_fwd", mutates_args=())
def _gather_tokens_fwd(x: torch.Tensor, token_idx: torch.Tensor, cu_seqlens: torch.Tensor,
                       pos_embed: Optional[torch.Tensor], validate: bool, need_distinct: bool) -> torch.Tensor:
    return _gather_forward(x, token_idx, cu_seqlens, pos_embed, validate, need_distinct)


@_gather_tokens_fwd.register_fake
def _(x, token_idx, cu_seqlens, pos_embed, validate, need_distinct):
    return x.new_empty((token_idx.shape[0], x.shape[2]))


@torch.library.custom_op("scalejepa::gather_tokens_bwd", mutates_args=())
def _gather_tokens_bwd(grad_out: torch.Tensor, token_idx: torch.Tensor, cu_seqlens: torch.Tensor,
                       num_patches: int, pos_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _gather_backward(grad_out, token_idx, cu_seqlens, num_patches, pos_grad)


@_gather_tokens_bwd.register_fake
def _(grad_out, token_idx, cu_seqlens, num_patches, pos_grad):
    dim = grad_out.shape[1]
    grad_pos_shape = (num_patches, dim) if pos_grad else (0,)
    return grad_out.new_empty((cu_seqlens.shape[0] - 1, num_patches, dim)), grad_out.new_empty(grad_pos_shape)


def _gather_setup_context(ctx, inputs, output):
    x, token_idx, cu_seqlens, pos_embed, _, _ = inputs
    ctx.save_for_backward(token_idx, cu_seqlens)
    ctx.num_patches = x.shape[1]


def _gather_backward_rule(ctx, grad_out):
    token_idx, cu_seqlens = ctx.saved_tensors
    pos_grad = ctx.needs_input_grad[3]
    grad_x, grad_pos = _gather_tokens_bwd(grad_out, token_idx, cu_seqlens, ctx.num_patches, pos_grad)
    return grad_x, None, None, grad_pos if pos_grad else None, None, None


_gather_tokens_fwd.register_autograd(_gather_backward_rule, setup_context=_gather_setup_context)


def gather_tokens(x: torch.Tensor, token_idx: torch.Tensor, cu_seqlens: torch.Tensor,
                  pos_embed: torch.Tensor | None = None, *, validate: bool = True) -> torch.Tensor:
    """Packed gather ``out[t] = x[b(t), token_idx[t]] (+ pos_embed[token_idx[t]])`` -> ``(T, D)``.

    ``x``: ``(B, N, D)``; ``token_idx``: int64 ``(T,)`` patch indices, image ``b``'s rows being
    ``cu_seqlens[b]:cu_seqlens[b+1]`` (int32, ``(B+1,)``); ``pos_embed``: optional ``(N, D)``.
    Differentiable in ``x`` and ``pos_embed``; the backward needs distinct indices per image.
    """
    _check_gather_inputs(x, token_idx, cu_seqlens, pos_embed)
    need_distinct = torch.is_grad_enabled() and x.requires_grad
    return torch.ops.scalejepa.gather_tokens_fwd(x, token_idx, cu_seqlens, pos_embed, validate, need_distinct)


def gather_tokens_reference(x: torch.Tensor, token_idx: torch.Tensor, cu_seqlens: torch.Tensor,
                            pos_embed: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-PyTorch ``gather_tokens``: two index ops, no host sync, any repeats allowed."""
    _check_gather_inputs(x, token_idx, cu_seqlens, pos_embed)
    out = x[sequence_ids(cu_seqlens, token_idx.numel()), token_idx]
    return out if pos_embed is None else out + pos_embed[token_idx]
