"""varlen_attention: Triton kernels vs the plain-PyTorch reference, input checks, custom-op plumbing.

Without a GPU the kernels run under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), which is slow: shapes stay tiny. GPU-only tests at I-JEPA shapes are marked
``gpu`` and skipped without CUDA.
"""

import importlib
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from scalejepa.kernels import varlen_attention, varlen_attention_reference

attn_mod = importlib.import_module("scalejepa.kernels.varlen_attention")
common = importlib.import_module("scalejepa.kernels._common")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
triton_only = pytest.mark.skipif(not common.HAS_TRITON, reason="needs the triton package")

if common.HAS_TRITON:
    import triton.language as tl

    @common.jit
    def _dot_kernel(A, B, OUT, UPCAST: tl.constexpr):
        """OUT = A @ B for one 16 x 16 tile through the attention kernels' _dot."""
        rows = tl.arange(0, 16)
        offs = rows[:, None] * 16 + rows[None, :]
        acc = attn_mod._dot(tl.load(A + offs), tl.load(B + offs), tl.zeros([16, 16], dtype=tl.float32), UPCAST, None)
        tl.store(OUT + offs, acc)


# Tolerances vs the float32 reference computed from the same (rounded) inputs, as (error
# allowed per element relative to the tensor's max magnitude, elementwise rtol, Frobenius-norm
# relative error). bf16/fp16 round P and dS to 16 bits before their matmuls (as FlashAttention
# does) and the interpreter truncates float32 -> bf16; the errors match naive bf16 PyTorch math.
TOL = {torch.float32: (1e-5, 1e-5, 1e-5), torch.float16: (2e-3, 5e-3, 2e-3), torch.bfloat16: (1e-2, 2e-2, 1e-2)}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Outputs start as NaN, so an element a kernel fails to write cannot pass."""
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)


def make_cu(lengths, device=DEVICE):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def make_qkv(total, heads, head_dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(total, heads, head_dim, generator=g).to(DEVICE, dtype).requires_grad_() for _ in range(3)]


def run_both(q, k, v, cu, max_seqlen, scale=None):
    """Output and (dq, dk, dv) of the kernel, and of the reference on float32 copies of the inputs."""
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q.device, q.dtype)
    out = varlen_attention(q, k, v, cu, max_seqlen, scale)
    kernel = (out, *torch.autograd.grad(out, (q, k, v), grad))
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    out32 = varlen_attention_reference(q32, k32, v32, cu, max_seqlen, scale)
    ref = (out32, *torch.autograd.grad(out32, (q32, k32, v32), grad.float()))
    return kernel, ref


def assert_close(got, want, tol, what):
    """Elementwise |got - want| <= atol + rtol * |want| with atol scaled by max |want|, and a
    Frobenius relative-error bound; NaN (an unwritten element) fails."""
    assert got.shape == want.shape, what
    got, want = got.float(), want.float()
    scale_tol, rtol, rel_tol = tol
    atol = scale_tol * max(want.abs().max().item(), 1.0) if want.numel() else 0.0
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")
    if want.numel():
        rel = ((got - want).norm() / want.norm().clamp_min(1e-12)).item()
        assert rel <= rel_tol, f"{what}: relative error {rel:.3g} > {rel_tol:.3g}"


# Lengths: empty, single-token, one over a 64-wide block (full block + masked tail), odd ones.
LENGTHS = [5, 0, 70, 1, 33]


@pytest.mark.parametrize(
    "head_dim,dtype",
    [(16, torch.float32), (24, torch.float32), (24, torch.bfloat16), (32, torch.float16), (64, torch.bfloat16),
     (80, torch.float32), (80, torch.bfloat16), (128, torch.float32)],
)
def test_matches_reference(head_dim, dtype):
    q, k, v = make_qkv(sum(LENGTHS), 2, head_dim, dtype)
    kernel, ref = run_both(q, k, v, make_cu(LENGTHS), max(LENGTHS))
    for name, got, want in zip(("out", "dq", "dk", "dv"), kernel, ref):
        assert_close(got, want, TOL[dtype], f"{name} d={head_dim} {dtype}")


def test_head_dim_88_and_custom_scale():
    lengths = [3, 17]
    q, k, v = make_qkv(sum(lengths), 1, 88, torch.bfloat16)
    kernel, ref = run_both(q, k, v, make_cu(lengths), 20, scale=0.3)  # max_seqlen > longest is fine
    for name, got, want in zip(("out", "dq", "dk", "dv"), kernel, ref):
        assert_close(got, want, TOL[torch.bfloat16], name)


def test_longer_sequences():
    """Several full 64-blocks per sequence on both axes (the online softmax across many blocks)."""
    lengths = [1, 300, 129]
    q, k, v = make_qkv(sum(lengths), 1, 16, torch.float32, seed=3)
    kernel, ref = run_both(q, k, v, make_cu(lengths), 300)
    for name, got, want in zip(("out", "dq", "dk", "dv"), kernel, ref):
        assert_close(got, want, TOL[torch.float32], name)


@pytest.mark.skipif(DEVICE == "cuda", reason="interpreter block sizes only")
@pytest.mark.parametrize("blocks", [(32, 16), (16, 32)])
def test_unequal_blocks(monkeypatch, blocks):
    """BLOCK_M != BLOCK_N in every kernel, several full blocks plus a tail on both axes."""
    monkeypatch.setattr(attn_mod, "INTERPRETER_BLOCKS", {"fwd": blocks, "dkdv": blocks, "dq": blocks})
    lengths = [50, 16, 2]
    q, k, v = make_qkv(sum(lengths), 1, 24, torch.float32)
    kernel, ref = run_both(q, k, v, make_cu(lengths), 50)
    for name, got, want in zip(("out", "dq", "dk", "dv"), kernel, ref):
        assert_close(got, want, TOL[torch.float32], name)


def test_strided_views_of_packed_qkv():
    """q, k, v as views of one (T, 3, H, D) projection: token stride 3*H*D, no copies needed."""
    lengths = [9, 4]
    qkv = torch.randn(sum(lengths), 3, 2, 24, device=DEVICE, requires_grad=True)
    q, k, v = qkv.unbind(1)
    cu = make_cu(lengths)
    grad = torch.randn(sum(lengths), 2, 24, device=DEVICE)
    (g_kernel,) = torch.autograd.grad(varlen_attention(q, k, v, cu, 9), qkv, grad)
    out_ref = varlen_attention_reference(q, k, v, cu, 9)
    (g_ref,) = torch.autograd.grad(out_ref, qkv, grad)
    assert_close(varlen_attention(q, k, v, cu, 9), out_ref, TOL[torch.float32], "out")
    assert_close(g_kernel, g_ref, TOL[torch.float32], "grad qkv")


def test_lse_output():
    lengths = [6, 0, 3]
    q, k, v = make_qkv(9, 2, 16, torch.float32)
    out, lse = torch.ops.scalejepa.varlen_attn_fwd(q, k, v, make_cu(lengths), 6, 0.25, True)
    for start, n in ((0, 6), (6, 3)):
        qs, ks = q[start:start + n].transpose(0, 1), k[start:start + n].transpose(0, 1)
        want = torch.logsumexp(qs @ ks.transpose(1, 2) * 0.25, dim=-1)
        torch.testing.assert_close(lse[:, start:start + n], want.detach(), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- bf16: the dtype switches
# The interpreter holds bf16 as raw 16-bit integers and multiplies those in tl.dot, so under it
# the launcher upcasts bf16 dot operands to float32 (UPCAST); compiled kernels never do, which is
# why the compiled bf16 path (tests marked gpu, kernels/compile_check.py) never ran on CPU.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("interpreted", [True, False])
def test_upcast_and_precision_switches(dtype, interpreted):
    q = torch.empty(7, 2, 24, dtype=dtype, device="meta")
    consts = attn_mod._kernel_consts(24, dtype, interpreted, (q,))
    assert consts["UPCAST"] is (interpreted and dtype == torch.bfloat16)
    assert consts["PRECISION"] == ("ieee" if dtype == torch.float32 else None)  # no TF32 for float32 inputs
    assert (consts["HEAD_DIM"], consts["BLOCK_D"], consts["EVEN_D"]) == (24, 32, False)


@triton_only
@pytest.mark.parametrize("upcast", [True, False])
def test_dot_helper_bf16(upcast):
    """attn_mod._dot on bf16 tiles of small integers (every product and sum exact in float32).
    Compiled (GPU), bf16 tensor cores are exact here with or without UPCAST; under the
    interpreter only UPCAST is: if the interpreter ever multiplies bf16 right, drop the switch."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(-4, 5, (16, 16), generator=g).to(DEVICE, torch.bfloat16) for _ in range(2))
    out = torch.empty(16, 16, device=DEVICE)
    _dot_kernel[(1,)](a, b, out, UPCAST=upcast)
    want = a.float() @ b.float()
    if upcast or DEVICE == "cuda":
        assert torch.equal(out, want)
    else:
        assert not torch.allclose(out, want), "the interpreter's bf16 tl.dot is right now: UPCAST can go"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_outputs_and_gradients_keep_the_input_dtype(dtype):
    """out, dq, dk, dv come back in the input dtype (float32 accumulation inside), lse in float32."""
    q, k, v = make_qkv(9, 2, 16, dtype)
    out, lse = torch.ops.scalejepa.varlen_attn_fwd(q, k, v, make_cu([4, 5]), 5, 0.25, True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    assert [g.dtype for g in grads] == [dtype] * 3
    assert all(torch.isfinite(g.float()).all() for g in (out, *grads))


def test_reference_matches_sdpa_per_sequence():
    lengths = [7, 0, 1, 12]
    q, k, v = make_qkv(sum(lengths), 3, 24, torch.float32)
    ref = varlen_attention_reference(q, k, v, make_cu(lengths), 12)
    start = 0
    for n in lengths:
        if n:
            sl = slice(start, start + n)
            want = F.scaled_dot_product_attention(*(t[sl].transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
            torch.testing.assert_close(ref[sl], want, atol=1e-5, rtol=1e-5)
        start += n


@pytest.mark.parametrize("lengths", [[], [0], [0, 0, 0]])
def test_no_tokens(lengths):
    q, k, v = make_qkv(0, 2, 16, torch.float32)
    out = varlen_attention(q, k, v, make_cu(lengths), 0)
    assert out.shape == (0, 2, 16)
    (dq,) = torch.autograd.grad(out.sum(), q, allow_unused=True)
    assert dq is None or dq.shape == q.shape


def test_validate_false_skips_host_checks():
    lengths = [4, 3]
    q, k, v = make_qkv(7, 1, 16, torch.float32)
    out = varlen_attention(q, k, v, make_cu(lengths), 4, validate=False)
    assert_close(out, varlen_attention_reference(q, k, v, make_cu(lengths), 4), TOL[torch.float32], "out")


# ----------------------------------------------------------------------------- input errors
def _args(**over):
    q = torch.zeros(7, 2, 16, device=DEVICE)
    args = dict(q=q, k=q.clone(), v=q.clone(), cu_seqlens=make_cu([4, 3]), max_seqlen=4)
    args.update(over)
    return args


BAD_INPUTS = [
    (dict(q=torch.zeros(7, 2, 16, dtype=torch.float64, device=DEVICE)), TypeError, "q must be one of"),
    (dict(k=torch.zeros(7, 2, 16, dtype=torch.bfloat16, device=DEVICE)), TypeError, "k has dtype"),
    (dict(v=torch.zeros(7, 2, 8, device=DEVICE)), ValueError, "one shape"),
    (dict(q=torch.zeros(7, 32, device=DEVICE)), ValueError, "3-D"),
    (dict(q=[1.0]), TypeError, "torch.Tensor"),
    (dict(cu_seqlens=make_cu([4, 3]).long()), TypeError, "int32"),
    (dict(cu_seqlens=make_cu([4, 3])[None]), ValueError, "1-D"),
    (dict(cu_seqlens=torch.tensor([1, 4, 7], dtype=torch.int32, device=DEVICE)), ValueError, r"\[0\] must be 0"),
    (dict(cu_seqlens=torch.tensor([0, 5, 4, 7], dtype=torch.int32, device=DEVICE)), ValueError, "non-decreasing"),
    (dict(cu_seqlens=torch.tensor([0, 4, 6], dtype=torch.int32, device=DEVICE)), ValueError, r"\[-1\] must equal"),
    (dict(max_seqlen=3), ValueError, "smaller than the longest"),
    (dict(max_seqlen=4.0), TypeError, "max_seqlen must be a Python int"),
    (dict(max_seqlen=-1), ValueError, "max_seqlen must be >= 0"),
    (dict(softmax_scale=-1.0), ValueError, "softmax_scale"),
    (dict(cu_seqlens=make_cu([4, 3], device="meta")), ValueError, "one device"),
]


@pytest.mark.parametrize("over,exc,match", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_inputs(over, exc, match):
    with pytest.raises(exc, match=match):
        varlen_attention(**_args(**over))


@pytest.mark.parametrize("head_dim", [0, 257])
def test_unsupported_head_dim(head_dim):
    q = torch.zeros(7, 2, head_dim, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim"):
        varlen_attention(**_args(q=q, k=q, v=q))


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU-only behaviour")
def test_cpu_without_interpreter_raises():
    """Kernels defined without TRITON_INTERPRET (a fresh process) refuse CPU tensors clearly."""
    code = textwrap.dedent("""
        import torch
        from scalejepa.kernels import varlen_attention
        q = torch.randn(5, 1, 16); cu = torch.tensor([0, 2, 5], dtype=torch.int32)
        try:
            varlen_attention(q, q, q, cu, 3)
        except RuntimeError as e:
            assert "TRITON_INTERPRET=1" in str(e) and "varlen_attention_reference" in str(e), e
            print("OK")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-2000:]


@triton_only
@pytest.mark.parametrize("triton_version,numpy_version,refused", [
    ("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False), ("3.7.1", "2.4.6", False), ("3.10.0+git1a2b", "2.5.0.dev0", False)])
def test_interpreter_refused_where_triton_and_numpy_clash(monkeypatch, triton_version, numpy_version, refused):
    """Triton < 3.7's interpreter and NumPy >= 2.4 fail inside every loop with a TypeError about
    0-dimensional arrays (triton-lang/triton#9171): the launcher says that, and what to install."""
    import numpy

    monkeypatch.setattr(common.triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    common.interpreter_problem.cache_clear()
    try:
        assert bool(common.interpreter_problem()) is refused
        interpreted = type("InterpretedFunction", (), {})()
        if refused:
            with pytest.raises(RuntimeError, match=r"cannot run under TRITON_INTERPRET=1.*numpy<2\.4.*_reference"):
                common.require_triton(interpreted, torch.device("cpu"), "varlen_attention", "varlen_attention_reference")
        else:
            common.require_triton(interpreted, torch.device("cpu"), "varlen_attention", "varlen_attention_reference")
    finally:
        common.interpreter_problem.cache_clear()


def test_import_without_triton():
    """With triton unimportable, the package imports, references work, kernels raise clearly."""
    code = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import torch
        from scalejepa.kernels import varlen_attention, varlen_attention_reference, gather_tokens_reference
        q = torch.randn(5, 1, 16); cu = torch.tensor([0, 2, 5], dtype=torch.int32)
        assert varlen_attention_reference(q, q, q, cu, 3).shape == q.shape
        x = torch.randn(2, 4, 3); idx = torch.tensor([0, 1, 3, 2, 0])
        assert gather_tokens_reference(x, idx, cu).shape == (5, 3)
        try:
            varlen_attention(q, q, q, cu, 3)
        except RuntimeError as e:
            assert "not installed" in str(e), e
            print("OK")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-2000:]


# ----------------------------------------------------------------------------- custom op
def test_opcheck():
    q, k, v = make_qkv(9, 1, 16, torch.float32)
    torch.library.opcheck(torch.ops.scalejepa.varlen_attn_fwd.default, (q, k, v, make_cu([3, 0, 6]), 6, 0.25, True))


def test_fake_and_meta_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(11, 2, 80)
        out = varlen_attention(q, q, q, torch.zeros(3, dtype=torch.int32), 8)
        assert out.shape == q.shape and out.dtype == q.dtype
    q = torch.empty(11, 2, 80, device="meta", dtype=torch.bfloat16)
    out, lse = torch.ops.scalejepa.varlen_attn_fwd(q, q, q, torch.zeros(3, dtype=torch.int32, device="meta"), 8,
                                                   0.1, True)
    assert out.shape == q.shape and out.dtype == torch.bfloat16 and lse.shape == (2, 11)
    grads = torch.ops.scalejepa.varlen_attn_bwd(q, q, q, q, out, lse, torch.zeros(3, dtype=torch.int32,
                                                                                  device="meta"), 8, 0.1)
    assert all(g.shape == q.shape for g in grads)


def test_torch_compile_fullgraph():
    """Dynamo + AOTAutograd trace through the custom op without graph breaks (aot_eager keeps it
    fast; test_torch_compile_inductor_all_ops runs inductor)."""
    lengths = [3, 0, 6]
    q, k, v = make_qkv(9, 1, 16, torch.float32)
    cu = make_cu(lengths)

    def loss(q, k, v):
        return varlen_attention(q, k, v, cu, 6).square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    want = torch.autograd.grad(loss(q, k, v), (q, k, v))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.slow
@pytest.mark.skipif(DEVICE == "cpu" and not (shutil.which("c++") or shutil.which("g++")),
                    reason="inductor on CPU needs a C++ compiler")
def test_torch_compile_inductor_all_ops():
    """The default inductor backend over all three custom ops, forward and backward (~15 s on CPU)."""
    from scalejepa.kernels import build_predictor_input, gather_tokens

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, 32, generator=g).to(DEVICE).requires_grad_()
    idx = torch.tensor([0, 3, 7, 1, 2, 5, 11], device=DEVICE)
    cu = make_cu([3, 4])
    tgt_idx = torch.tensor([4, 5, 8, 9, 10, 6], device=DEVICE)
    cu_tgt = make_cu([2, 1, 0, 3])
    mask_token = torch.randn(32, generator=g).to(DEVICE).requires_grad_()
    pos = torch.randn(12, 32, generator=g).to(DEVICE)

    def loss(x, mask_token):
        ctx = gather_tokens(x, idx, cu)
        seq, cu_seq = build_predictor_input(ctx, idx, cu, tgt_idx, cu_tgt, mask_token, pos)
        qkv = seq.view(-1, 2, 16)
        return varlen_attention(qkv, qkv, qkv, cu_seq, 7).square().sum()

    got = torch.autograd.grad(torch.compile(loss, fullgraph=True)(x, mask_token), (x, mask_token))
    want = torch.autograd.grad(loss(x, mask_token), (x, mask_token))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- GPU, I-JEPA shapes
def _relative_error(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


def _check_against_float64(lengths, heads, head_dim, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(sum(lengths), heads, head_dim, device="cuda", generator=g, dtype=torch.bfloat16)
               .requires_grad_() for _ in range(3))
    cu, max_len = make_cu(lengths, "cuda"), max(lengths)
    grad = torch.randn(q.shape, device="cuda", generator=g, dtype=torch.bfloat16)
    out = varlen_attention(q, k, v, cu, max_len)
    got = (out, *torch.autograd.grad(out, (q, k, v), grad))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out64 = varlen_attention_reference(q64, k64, v64, cu, max_len)
    want = (out64, *torch.autograd.grad(out64, (q64, k64, v64), grad.double()))
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        err = _relative_error(a, b)
        assert err < 1e-2, f"{name}: relative error {err:.3g}"


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("case", ["vith_context", "predictor", "long"])
def test_gpu_bf16_vs_float64(case):
    g = torch.Generator().manual_seed(0)
    if case == "vith_context":  # ViT-H/14 context: 128 images, 36..154 tokens, 16 heads x 80
        _check_against_float64(torch.randint(36, 155, (128,), generator=g).tolist(), 16, 80)
    elif case == "predictor":  # 4 blocks x 128 images of context + ~44 targets, 16 heads x 24
        _check_against_float64((torch.randint(36, 155, (512,), generator=g) + 44).tolist(), 16, 24)
    else:  # long sequences, head dim 128
        _check_against_float64([4096, 4096], 16, 128)


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [24, 88, 256])
def test_gpu_untuned_default_configs(monkeypatch, dtype, head_dim):
    """SCALEJEPA_AUTOTUNE=0 launches the default configs: they must compile (shared memory) and agree."""
    monkeypatch.setenv("SCALEJEPA_AUTOTUNE", "0")
    lengths = [1, 200, 77]
    q, k, v = make_qkv(sum(lengths), 2, head_dim, dtype)
    kernel, ref = run_both(q, k, v, make_cu(lengths), 200)
    for name, got, want in zip(("out", "dq", "dk", "dv"), kernel, ref):
        assert_close(got, want, TOL[dtype], name)
