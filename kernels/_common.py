"""Plumbing shared by the kernel files: optional Triton import, launch checks, input checks.

Triton is optional: without it this package still imports and every ``*_reference`` function
works; only launching a Triton kernel raises (``require_triton``).
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # reference paths keep working; require_triton() raises on launch
    triton = None

    class tl:  # noqa: N801 - stands in for triton.language so kernel signatures still parse
        constexpr = None


HAS_TRITON = triton is not None

def jit(fn=None, *, do_not_specialize: tuple[str, ...] = ()):
    """``triton.jit``, usable bare or with ``do_not_specialize``: integer arguments whose value
    changes from step to step (token counts, strides over all tokens). Triton otherwise
    compiles one binary per "divisible by 16 / equal to 1 / neither" value class of each
    integer argument, which on a GPU recompiles every autotune candidate when a count moves
    between classes. Without triton, kernels stay plain functions; they are never launched,
    because require_triton() raises first."""
    if not HAS_TRITON:
        return fn if fn is not None else (lambda f: f)
    decorator = triton.jit(do_not_specialize=list(do_not_specialize)) if do_not_specialize else triton.jit
    return decorator(fn) if fn is not None else decorator

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SHORT_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def is_interpreted(kernel) -> bool:
    """Whether ``kernel`` was built by the Triton interpreter.

    ``@triton.jit`` reads TRITON_INTERPRET when the decorator runs, i.e. when this package is
    imported, so setting the variable later has no effect on already-defined kernels.
    """
    return type(kernel).__name__ == "InterpretedFunction"


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


@functools.cache
def interpreter_problem() -> str:
    """Why the installed Triton interpreter cannot run these kernels, or "" if it can.

    Triton's interpreter before 3.7 holds a scalar as a 1-element array and turns it into a
    Python int with ``int(array)``, which NumPy 2.4 made a TypeError: every loop whose bounds
    are loaded (all of ours: sequence offsets) then fails with "only 0-dimensional arrays can
    be converted to Python scalars" (triton-lang/triton#9171, fixed in 3.7; compiled kernels
    are unaffected)."""
    import numpy  # here: only the interpreter needs it; the kernels depend on torch and triton alone

    if _major_minor(triton.__version__) < (3, 7) and _major_minor(numpy.__version__) >= (2, 4):
        return (f"the Triton {triton.__version__} interpreter cannot run with NumPy {numpy.__version__} (it converts "
                "scalars with int(array), an error since NumPy 2.4; fixed in Triton 3.7): "
                "`pip install 'numpy<2.4'` or a newer triton")
    return ""


def require_triton(kernel, device: torch.device, what: str, reference: str) -> None:
    """Raise a clear RuntimeError if ``kernel`` cannot run on ``device``."""
    if not HAS_TRITON:
        raise RuntimeError(
            f"{what} needs the 'triton' package, which is not installed: "
            f"`pip install triton` (it ships with CUDA builds of torch) or use {reference}."
        )
    if device.type != "cuda" and not is_interpreted(kernel):
        raise RuntimeError(
            f"{what} runs Triton kernels, which need CUDA tensors; got tensors on {device}. "
            "To run them on CPU (slowly, for tests) set TRITON_INTERPRET=1 in the environment "
            f"before scalejepa.kernels is imported, or use {reference} (plain PyTorch)."
        )
    if is_interpreted(kernel) and interpreter_problem():
        raise RuntimeError(f"{what} cannot run under TRITON_INTERPRET=1 here: {interpreter_problem()}; "
                           f"or use {reference} (plain PyTorch).")


def autotune_enabled() -> bool:
    """GPU autotuning is on unless SCALEJEPA_AUTOTUNE=0 (then the first config of each list runs)."""
    return os.environ.get("SCALEJEPA_AUTOTUNE", "1") != "0"


@dataclass(frozen=True)
class LaunchConfig:
    """One GPU launch configuration a launcher can pick: tile sizes (constexpr keyword
    arguments of the kernel), warps per program and software-pipelining depth.

    ``allow_spills``: empty, or the written reason why this configuration may spill registers
    (``kernels/compile_check.py`` fails on any other spilling configuration)."""

    blocks: tuple[tuple[str, int], ...]
    num_warps: int
    num_stages: int
    allow_spills: str = ""

    @classmethod
    def of(cls, num_warps: int, num_stages: int, allow_spills: str = "", **blocks: int) -> "LaunchConfig":
        return cls(tuple(blocks.items()), num_warps, num_stages, allow_spills)

    @property
    def meta(self) -> dict:
        """The tile constexprs, e.g. ``{"BLOCK_M": 128, "BLOCK_N": 64}``."""
        return dict(self.blocks)

    def launch_kwargs(self) -> dict:
        return {**self.meta, "num_warps": self.num_warps, "num_stages": self.num_stages}

    def triton_config(self):
        return triton.Config(self.meta, num_warps=self.num_warps, num_stages=self.num_stages)

    def __str__(self) -> str:
        return " ".join(f"{k.removeprefix('BLOCK_')}{v}" for k, v in self.blocks) + \
            f" w{self.num_warps} s{self.num_stages}"


@dataclass(frozen=True)
class CompileVariant:
    """One compilation a launcher can trigger on a GPU, for ``kernels/compile_check.py``:
    the kernel, its positional launch arguments exactly as the launcher builds them (tensors
    may live on the ``meta`` device: only dtype, shape and strides matter), the constexpr
    keyword arguments other than the tile sizes, and the launch configuration."""

    kernel: object
    args: tuple
    constexprs: dict = field(hash=False)
    config: LaunchConfig
    shape: str  # the model shape that selects it, e.g. "head_dim 80 bf16"


# Debug aid for tests: when True, launchers fill outputs the kernels must overwrite with NaN
# (float) or -1 (int) instead of leaving them uninitialised, so an unwritten element shows.
POISON_OUTPUTS = False


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer that a kernel fully overwrites (poisoned under POISON_OUTPUTS)."""
    if not POISON_OUTPUTS:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.full(shape, float("nan") if dtype.is_floating_point else -1, dtype=dtype, device=device)


# ----------------------------------------------------------------------------- input checks
def check_tensor(name: str, t, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)} ({t.ndim}-D)")


def check_float_dtype(name: str, t: torch.Tensor, like: torch.Tensor | None = None, like_name: str = "",
                      allowed: tuple = FLOAT_DTYPES) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"{name} must be one of {names}; got {t.dtype}; cast it with .to(...)")
    if like is not None and t.dtype != like.dtype:
        raise TypeError(
            f"{name} has dtype {t.dtype} but {like_name} has {like.dtype}; cast both to one dtype "
            f"(e.g. {name}.to({like_name}.dtype))"
        )


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listed}; move them with .to(device)")


def check_index_tensor(name: str, t, dtype: torch.dtype) -> None:
    """A 1-D integer tensor of exactly ``dtype`` (int32 offsets, int64 indices)."""
    check_tensor(name, t)
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}; convert it with {name}.to({dtype})")
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")


def check_cu_seqlens_meta(name: str, cu: torch.Tensor) -> None:
    """Metadata checks of a cumulative-offsets tensor (no host sync)."""
    check_index_tensor(name, cu, torch.int32)
    if cu.numel() < 1:
        raise ValueError(f"{name} must hold at least one element (0 for an empty batch), got none")


def check_cu_seqlens_values(name: str, cu: list[int], total: int, total_name: str) -> list[int]:
    """Value checks of offsets already copied to the host; returns the sequence lengths."""
    if cu[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {cu[0]}; prepend a 0 (offsets are cumulative)")
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    for i, n in enumerate(lengths):
        if n < 0:
            raise ValueError(
                f"{name} must be non-decreasing, but {name}[{i + 1}]={cu[i + 1]} < {name}[{i}]={cu[i]}; "
                "build it as a cumulative sum of non-negative lengths"
            )
    if cu[-1] != total:
        raise ValueError(
            f"{name}[-1] must equal {total_name} ({total}), got {cu[-1]}; the offsets and the packed "
            "tensor disagree"
        )
    return lengths


def sequence_ids(cu: torch.Tensor, total: int) -> torch.Tensor:
    """For each of ``total`` packed rows, the index of the sequence it belongs to (int64, no host sync)."""
    rows = torch.arange(total, device=cu.device, dtype=cu.dtype)
    return torch.searchsorted(cu[1:], rows, right=True)


# ============================================================================ copy kernels
# The one GPU configuration of the memory-bound copy kernels (gather_tokens.py,
# predictor_input.py: 32 rows x up to 256 columns per step); BLOCK_D follows the width.
# kernels/compile_check.py compiles this object.
COPY_GPU_CONFIG = LaunchConfig.of(4, 3, BLOCK_T=32)
COPY_GPU_MAX_BLOCK_D = 256


def copy_block_d(dim: int, interpreted: bool) -> int:
    return max(16, min(128 if interpreted else COPY_GPU_MAX_BLOCK_D, triton.next_power_of_2(dim)))


def copy_blocks(dim: int, interpreted: bool) -> dict:
    """Row/column tiles and launch options; under the interpreter fewer, wider steps are faster."""
    if interpreted:
        return {"BLOCK_T": 64, "BLOCK_D": copy_block_d(dim, True)}
    return {**COPY_GPU_CONFIG.launch_kwargs(), "BLOCK_D": copy_block_d(dim, False)}


def contiguous_rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def copy_compile_variants(launches, width: int, dtype: torch.dtype) -> list["CompileVariant"]:
    """``(kernel, args, constexprs)`` launches of a copy kernel at one token width, as the
    GPU launcher would compile them."""
    block_d = {"BLOCK_D": copy_block_d(width, interpreted=False)}
    shape = f"width {width} {SHORT_DTYPE_NAMES[dtype]}"
    return [CompileVariant(kernel, tuple(args), {**consts, **block_d}, COPY_GPU_CONFIG, shape)
            for kernel, args, consts in launches]
