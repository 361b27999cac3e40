"""gather_tokens and build_predictor_input: Triton kernels vs references, input checks, custom ops.

Runs under the Triton interpreter without a GPU (tests/conftest.py); shapes stay tiny.
"""

import importlib

import pytest
import torch

from scalejepa.kernels import (
    build_predictor_input,
    build_predictor_input_reference,
    gather_tokens,
    gather_tokens_reference,
)

common = importlib.import_module("scalejepa.kernels._common")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# Sums of two values rounded once: exact in float32 up to summation order; the interpreter
# truncates float32 -> bf16 (1 ulp); gradient sums over copies differ by summation order.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=1.6e-2)}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Outputs start as NaN / -1, so an element a kernel fails to write cannot pass."""
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)


def make_cu(lengths, device=DEVICE):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def randn(*shape, dtype=torch.float32, seed=0, grad=True):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)
    return t.requires_grad_(grad)


def distinct_indices(lengths, num_patches, seed=0):
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randperm(num_patches, generator=g)[:n] for n in lengths]
    return torch.cat(parts).to(DEVICE) if parts else torch.zeros(0, dtype=torch.int64, device=DEVICE)


def grads(out, inputs, grad):
    """Gradients of <out, grad> w.r.t. the inputs that require grad (None for the others)."""
    needed = [t for t in inputs if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(out, needed, grad))
    return [next(got) if t is not None and t.requires_grad else None for t in inputs]


def assert_close(got, want, dtype, what):
    assert got.shape == want.shape and got.dtype == want.dtype, what
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype], msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------- gather_tokens
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pos", ["none", "fixed", "learned"])
def test_gather_matches_reference(dtype, pos):
    lengths, num_patches, dim = [5, 0, 20, 1], 24, 160  # dim 160: two column blocks, one partial
    x = randn(len(lengths), num_patches, dim, dtype=dtype)
    pos_embed = None if pos == "none" else randn(num_patches, dim, dtype=dtype, seed=1, grad=pos == "learned")
    idx, cu = distinct_indices(lengths, num_patches), make_cu(lengths)
    out = gather_tokens(x, idx, cu, pos_embed)
    ref = gather_tokens_reference(x, idx, cu, pos_embed)
    assert_close(out, ref, dtype, "out")
    grad = randn(*out.shape, dtype=dtype, seed=2, grad=False)
    for name, got, want in zip(("x", "pos_embed"), grads(out, (x, pos_embed), grad), grads(ref, (x, pos_embed), grad)):
        if want is None:
            assert got is None
        else:
            assert_close(got, want, dtype, f"grad {name}")


def test_gather_repeats_need_no_grad():
    """Repeated indices (e.g. overlapping target blocks) are fine without a backward."""
    x, cu = randn(2, 6, 16), make_cu([3, 2])
    idx = torch.tensor([1, 1, 4, 0, 0], device=DEVICE)
    with torch.no_grad():
        assert_close(gather_tokens(x, idx, cu), gather_tokens_reference(x, idx, cu), torch.float32, "out")
    with pytest.raises(ValueError, match="repeats a patch index"):
        gather_tokens(x, idx, cu)


def test_gather_empty_and_validate_false():
    x = randn(2, 6, 16)
    out = gather_tokens(x, torch.zeros(0, dtype=torch.int64, device=DEVICE), make_cu([0, 0]))
    assert out.shape == (0, 16)
    idx, cu = torch.tensor([5, 0, 2], device=DEVICE), make_cu([1, 2])
    assert_close(gather_tokens(x, idx, cu, validate=False), gather_tokens_reference(x, idx, cu), torch.float32, "out")


def _gather_args(**over):
    x = torch.zeros(2, 6, 16, device=DEVICE)
    args = dict(x=x, token_idx=torch.tensor([0, 1, 5], device=DEVICE), cu_seqlens=make_cu([2, 1]),
                pos_embed=torch.zeros(6, 16, device=DEVICE))
    args.update(over)
    return args


GATHER_BAD = [
    (dict(x=torch.zeros(2, 6, 16, dtype=torch.int32, device=DEVICE)), TypeError, "x must be one of"),
    (dict(x=torch.zeros(12, 16, device=DEVICE)), ValueError, "3-D"),
    (dict(pos_embed=torch.zeros(6, 16, dtype=torch.bfloat16, device=DEVICE)), TypeError, "pos_embed has dtype"),
    (dict(pos_embed=torch.zeros(5, 16, device=DEVICE)), ValueError, r"pos_embed must have shape"),
    (dict(token_idx=torch.tensor([0, 1, 5], dtype=torch.int32, device=DEVICE)), TypeError, "token_idx must be"),
    (dict(cu_seqlens=make_cu([2, 1]).long()), TypeError, "cu_seqlens must be torch.int32"),
    (dict(cu_seqlens=make_cu([3])), ValueError, r"x.shape\[0\] \+ 1"),
    (dict(cu_seqlens=torch.tensor([0, 4, 3], dtype=torch.int32, device=DEVICE)), ValueError, "non-decreasing"),
    (dict(cu_seqlens=torch.tensor([1, 2, 3], dtype=torch.int32, device=DEVICE)), ValueError, r"\[0\] must be 0"),
    (dict(cu_seqlens=torch.tensor([0, 2, 2], dtype=torch.int32, device=DEVICE)), ValueError, r"\[-1\] must equal"),
    (dict(token_idx=torch.tensor([0, 1, 6], device=DEVICE)), ValueError, r"in \[0, N=6\)"),
    (dict(token_idx=torch.tensor([0, -1, 2], device=DEVICE)), ValueError, r"in \[0, N=6\)"),
    (dict(pos_embed=torch.zeros(6, 16, device="meta")), ValueError, "one device"),
]


@pytest.mark.parametrize("over,exc,match", GATHER_BAD, ids=[m for _, _, m in GATHER_BAD])
def test_gather_bad_inputs(over, exc, match):
    with pytest.raises(exc, match=match):
        gather_tokens(**_gather_args(**over))


def test_gather_too_many_tokens_per_image():
    x = torch.zeros(1, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="only N=2 patches"):
        gather_tokens(x, torch.tensor([0, 1, 0], device=DEVICE), make_cu([3]))


# ----------------------------------------------------------------------------- build_predictor_input
def predictor_inputs(ctx_lens, tgt_lens, num_patches=20, width=40, dtype=torch.float32, pos_grad=False):
    ctx = randn(sum(ctx_lens), width, dtype=dtype)
    return dict(
        ctx=ctx,
        ctx_idx=distinct_indices(ctx_lens, num_patches, seed=1),
        cu_ctx=make_cu(ctx_lens),
        tgt_idx=distinct_indices(tgt_lens, num_patches, seed=2),
        cu_tgt=make_cu(tgt_lens),
        mask_token=randn(width, dtype=dtype, seed=3),
        pos_embed=randn(num_patches, width, dtype=dtype, seed=4, grad=pos_grad),
    )


@pytest.mark.parametrize(
    "dtype,pos_grad,ctx_lens,tgt_lens",
    [
        (torch.float32, False, [4, 1, 6], [3, 2, 0, 4, 1, 5]),  # M=2, one empty target block
        (torch.bfloat16, True, [4, 1, 6], [3, 2, 0, 4, 1, 5]),
        (torch.float32, True, [0, 70], [2, 3, 1, 0, 66, 4]),  # M=3, an empty context, > 64 rows
    ],
)
def test_predictor_matches_reference(dtype, pos_grad, ctx_lens, tgt_lens):
    args = predictor_inputs(ctx_lens, tgt_lens, num_patches=max(20, *ctx_lens, *tgt_lens),
                            width=160 if pos_grad else 40, dtype=dtype, pos_grad=pos_grad)
    out, cu_out = build_predictor_input(**args)
    ref, cu_ref = build_predictor_input_reference(**args)
    assert cu_out.dtype == torch.int32 and cu_out.tolist() == cu_ref.tolist()
    lengths = (cu_out[1:] - cu_out[:-1]).tolist()
    num_images = len(ctx_lens)
    assert lengths == [ctx_lens[s % num_images] + n for s, n in enumerate(tgt_lens)]
    assert_close(out, ref, dtype, "out")
    grad = randn(*out.shape, dtype=dtype, seed=5, grad=False)
    inputs = (args["ctx"], args["mask_token"], args["pos_embed"])
    for name, got, want in zip(("ctx", "mask_token", "pos_embed"), grads(out, inputs, grad), grads(ref, inputs, grad)):
        if want is None:
            assert got is None, name
        else:
            assert_close(got, want, dtype, f"grad {name}")


def test_predictor_reference_layout():
    """The reference against a literal per-sequence construction (sequence s = m*B + b)."""
    ctx_lens, tgt_lens = [2, 3], [1, 2, 2, 0]
    a = predictor_inputs(ctx_lens, tgt_lens, width=8)
    ref, cu = build_predictor_input_reference(**a)
    rows, cu_ctx, cu_tgt = [], a["cu_ctx"].tolist(), a["cu_tgt"].tolist()
    for s in range(len(tgt_lens)):
        b = s % len(ctx_lens)
        c = slice(cu_ctx[b], cu_ctx[b + 1])
        t = slice(cu_tgt[s], cu_tgt[s + 1])
        rows += [a["ctx"][c] + a["pos_embed"][a["ctx_idx"][c]], a["mask_token"] + a["pos_embed"][a["tgt_idx"][t]]]
    torch.testing.assert_close(ref, torch.cat(rows))
    assert cu.tolist() == [0, 3, 8, 12, 15]


def test_predictor_no_sequences():
    a = predictor_inputs([], [], width=8)
    out, cu_out = build_predictor_input(**a)
    assert out.shape == (0, 8) and cu_out.tolist() == [0]


def _predictor_args(**over):
    a = predictor_inputs([2, 1], [1, 1, 2, 1], width=16)
    a = {k: v.detach() for k, v in a.items()}
    a.update(over)
    return a


PREDICTOR_BAD = [
    (dict(ctx=torch.zeros(3, 16, dtype=torch.float64, device=DEVICE)), TypeError, "ctx must be one of"),
    (dict(mask_token=torch.zeros(16, dtype=torch.bfloat16, device=DEVICE)), TypeError, "mask_token has dtype"),
    (dict(mask_token=torch.zeros(8, device=DEVICE)), ValueError, "width P=16"),
    (dict(pos_embed=torch.zeros(20, device=DEVICE)), ValueError, "2-D"),
    (dict(ctx_idx=torch.tensor([0, 1], device=DEVICE)), ValueError, "one index per ctx row"),
    (dict(tgt_idx=torch.tensor([0, 1, 2, 3, 4], dtype=torch.int32, device=DEVICE)), TypeError, "tgt_idx must be"),
    (dict(cu_tgt=make_cu([1, 1, 3])), ValueError, r"M \* B \+ 1"),
    (dict(cu_ctx=torch.tensor([0, 2, 3], device=DEVICE)), TypeError, "cu_ctx must be torch.int32"),
    (dict(cu_ctx=torch.tensor([1, 2, 3], dtype=torch.int32, device=DEVICE)), ValueError, r"cu_ctx\[0\] must be 0"),
    (dict(cu_tgt=torch.tensor([0, 1, 3, 2, 5], dtype=torch.int32, device=DEVICE)), ValueError, "non-decreasing"),
    (dict(cu_tgt=make_cu([1, 1, 1, 1])), ValueError, r"cu_tgt\[-1\] must equal"),
    (dict(tgt_idx=torch.tensor([0, 1, 20, 3, 4], device=DEVICE)), ValueError, r"tgt_idx values must be in"),
    (dict(ctx_idx=torch.tensor([0, -3, 1], device=DEVICE)), ValueError, r"ctx_idx values must be in"),
    (dict(mask_token=torch.zeros(16, device="meta")), ValueError, "one device"),
]


@pytest.mark.parametrize("over,exc,match", PREDICTOR_BAD, ids=[m for _, _, m in PREDICTOR_BAD])
def test_predictor_bad_inputs(over, exc, match):
    with pytest.raises(exc, match=match):
        build_predictor_input(**_predictor_args(**over))


# ----------------------------------------------------------------------------- custom ops
def test_opcheck_gather():
    x, cu = randn(3, 8, 16), make_cu([3, 0, 4])
    idx = distinct_indices([3, 0, 4], 8)
    pos = randn(8, 16, seed=1)
    torch.library.opcheck(torch.ops.scalejepa.gather_tokens_fwd.default, (x, idx, cu, pos, True, True))


def test_opcheck_predictor():
    a = predictor_inputs([2, 3], [1, 2, 0, 1], width=16, pos_grad=True)
    torch.library.opcheck(torch.ops.scalejepa.build_predictor_input_fwd.default, (*a.values(), True))


def test_meta_tensors():
    x = torch.empty(4, 10, 24, device="meta", dtype=torch.bfloat16)
    cu = torch.empty(5, dtype=torch.int32, device="meta")
    idx = torch.empty(13, dtype=torch.int64, device="meta")
    assert gather_tokens(x, idx, cu, torch.empty(10, 24, device="meta", dtype=torch.bfloat16)).shape == (13, 24)
    gx, gp = torch.ops.scalejepa.gather_tokens_bwd(torch.empty(13, 24, device="meta"), idx, cu, 10, True)
    assert gx.shape == (4, 10, 24) and gp.shape == (10, 24)
    ctx = torch.empty(13, 24, device="meta")
    out, cu_out = build_predictor_input(ctx, idx, cu, torch.empty(30, dtype=torch.int64, device="meta"),
                                        torch.empty(9, dtype=torch.int32, device="meta"),
                                        torch.empty(24, device="meta"), torch.empty(10, 24, device="meta"))
    assert out.shape == (2 * 13 + 30, 24) and cu_out.shape == (9,) and cu_out.dtype == torch.int32
    g_ctx, g_mask, g_pos = torch.ops.scalejepa.build_predictor_input_bwd(out, idx, cu, idx, cu, 10, False)
    assert g_ctx.shape == (13, 24) and g_mask.shape == (24,) and g_pos.shape == (0,)


def test_torch_compile_fullgraph():
    a = predictor_inputs([2, 3], [1, 2, 0, 1], width=16)
    x, idx, cu = randn(2, 20, 16, seed=7), distinct_indices([2, 3], 20), make_cu([2, 3])

    def loss(x, mask_token):
        ctx = gather_tokens(x, idx, cu)
        out, cu_out = build_predictor_input(ctx, idx, cu, a["tgt_idx"], a["cu_tgt"], mask_token, a["pos_embed"])
        return out.square().sum() + cu_out.sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, a["mask_token"]), (x, a["mask_token"]))
    want = torch.autograd.grad(loss(x, a["mask_token"]), (x, a["mask_token"]))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


# ----------------------------------------------------------------------------- GPU, I-JEPA shapes
@pytest.mark.gpu
@gpu_only
def test_gpu_vith_shapes_bf16():
    """ViT-H/14: 128 images of 256 patches, ~110 context and 4 x ~44 target tokens."""
    g = torch.Generator().manual_seed(0)
    num_images, num_patches, dim, width = 128, 256, 1280, 384
    ctx_lens = torch.randint(36, 155, (num_images,), generator=g).tolist()
    tgt_lens = torch.randint(35, 55, (4 * num_images,), generator=g).tolist()
    x = randn(num_images, num_patches, dim, dtype=torch.bfloat16)
    idx, cu = distinct_indices(ctx_lens, num_patches), make_cu(ctx_lens)
    out = gather_tokens(x, idx, cu)
    torch.testing.assert_close(out, gather_tokens_reference(x, idx, cu), atol=0, rtol=0)

    a = predictor_inputs(ctx_lens, tgt_lens, num_patches, width, torch.bfloat16)
    out, cu_out = build_predictor_input(**a)
    ref, cu_ref = build_predictor_input_reference(**a)
    assert torch.equal(cu_out, cu_ref)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)  # one float32 add rounded once, both ways
    grad = randn(*out.shape, dtype=torch.bfloat16, seed=9, grad=False)
    inputs = (a["ctx"], a["mask_token"])
    for got, want in zip(grads(out, inputs, grad), grads(ref, inputs, grad)):
        rel = ((got.double() - want.double()).norm() / want.double().norm()).item()
        assert rel < 1e-2
