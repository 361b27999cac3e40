"""Ahead-of-time compile check of every Triton kernel for named GPU targets, on a machine without a GPU.

    python -m scalejepa.kernels.compile_check [--target sm_90a,sm_80] [--json FILE] [--md FILE]
        [--head-dims 64,80,88,24,32] [--widths 384,768,1024,1280,1408] [--dtypes fp16,bf16] [--workers N]

For every compilation the GPU launchers can trigger (each kernel x every autotune candidate of
its BLOCK_D tier x head dim or width x dtype; the ``compile_variants`` functions of
``varlen_attention.py``, ``gather_tokens.py`` and ``predictor_input.py`` iterate the very
``LaunchConfig`` objects the launchers pick from) it runs Triton's compiler to PTX and cubin for the target with the
``ptxas`` bundled in the triton wheel (no driver needed) and reads the cubin's resource usage
(``cuobjdump -res-usage``): registers per thread, stack frame (local memory per thread:
register spills, since Triton kernels have no calls or local arrays), shared memory.

It exits 1 when a variant fails to compile, needs more shared memory than one block may
have on the target (the opt-in maximum per block: 227 KiB on sm_90 (of 228 KiB per SM),
163 KiB on sm_80 (of 164 KiB per SM)), or spills registers without a written reason
(``LaunchConfig.allow_spills``). Exit 2: bad arguments or no usable compiler.

The launch arguments are specialised the way Triton's JIT specialises a real launch: tensors
as 16-byte aligned pointers of their dtype, integers as i32 (or i64) marked divisible by 16
when their value is, 1 as a constant, floats as fp32. Compiled kernels land in Triton's cache
(``TRITON_CACHE_DIR``), so a second run only reads them back. Nothing here is measured on a
GPU: registers and shared memory are the compiler's, run time is not known.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import datetime as dt
import importlib
import json
import multiprocessing
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from . import _common

# triton is imported inside the functions that use it: without it this module still imports,
# and main() says what to install.

# The modules, not the same-named functions that the package namespace exports.
varlen_attention = importlib.import_module(".varlen_attention", __package__)
gather_tokens = importlib.import_module(".gather_tokens", __package__)
predictor_input = importlib.import_module(".predictor_input", __package__)

DEFAULT_TARGETS = ("sm_90a", "sm_80")
DEFAULT_HEAD_DIMS = (64, 80, 88, 24, 32)  # ViT-B/L, ViT-H, ViT-G encoders; predictors 384/16, 384/12
DEFAULT_WIDTHS = (384, 768, 1024, 1280, 1408)  # predictor, ViT-B, -L, -H, -G token widths
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Shared memory one block may use (cudaFuncAttributeMaxDynamicSharedMemorySize's ceiling,
# i.e. sharedMemPerBlockOptin), bytes; per SM it is 1 KiB more (228 / 164 KiB).
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
                 torch.int32: "i32", torch.int64: "i64", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}


def parse_target(name: str) -> int:
    """'sm_90a' / 'sm_90' / 'sm_80' -> compute capability 90 / 80 (Triton builds sm_90a for 90)."""
    m = re.fullmatch(r"sm_(\d+)a?", name.strip())
    if not m or int(m.group(1)) not in SHARED_LIMIT:
        raise ValueError(f"unknown target {name!r}; choose from sm_90a (H100/H200) and sm_80 (A100)")
    return int(m.group(1))


def all_variants(head_dims, widths, dtypes) -> tuple[list[_common.CompileVariant], list[list[str]]]:
    """The launchers' compile variants, deduplicated (gathers of equal BLOCK_D compile to one
    binary), in a fixed order, and for each the model shapes that select it."""
    index: dict[str, int] = {}
    out, used_by = [], []
    for dtype in dtypes:
        found = [v for hd in head_dims for v in varlen_attention.compile_variants(hd, dtype)]
        found += [v for w in widths for module in (gather_tokens, predictor_input)
                  for v in module.compile_variants(w, dtype)]
        for v in found:
            key = variant_key(v)
            if key not in index:
                index[key] = len(out)
                out.append(v)
                used_by.append([])
            if v.shape not in used_by[index[key]]:
                used_by[index[key]].append(v.shape)
    return out, used_by


def specialize(variant: _common.CompileVariant) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attribute descriptors) of a launch, as Triton's JIT specialises it."""
    params = variant.kernel.params
    positional = [p for p in params if not p.is_constexpr]
    if len(positional) != len(variant.args):
        raise TypeError(f"{variant.kernel.__name__}: {len(variant.args)} launch arguments for "
                        f"{len(positional)} parameters")
    signature, constexprs, divisible = {}, dict(variant.constexprs), []
    for param, arg in zip(positional, variant.args):
        if isinstance(arg, torch.Tensor):
            signature[param.name] = "*" + _TRITON_TYPES[arg.dtype]
            divisible.append(param.name)  # torch allocations (and the model's views) are 16-byte aligned
        elif isinstance(arg, bool):
            signature[param.name] = "i1"
        elif isinstance(arg, int):
            if getattr(param, "do_not_specialize", False):
                signature[param.name] = "i32" if -2**31 <= arg < 2**31 else "i64"
                continue
            if arg == 1:
                signature[param.name] = "constexpr"
                constexprs[param.name] = 1
                continue
            signature[param.name] = "i32" if -2**31 <= arg < 2**31 else "i64"
            if arg % 16 == 0:
                divisible.append(param.name)
        elif isinstance(arg, float):
            signature[param.name] = "fp32"
        else:
            raise TypeError(f"{variant.kernel.__name__}.{param.name}: unsupported launch argument {type(arg).__name__}")
    constexprs.update(variant.config.meta)
    for p in params:
        if p.is_constexpr:
            if p.name not in constexprs:
                raise TypeError(f"{variant.kernel.__name__}: constexpr {p.name} has no value")
            signature[p.name] = "constexpr"
    signature = {p.name: signature[p.name] for p in params}
    return signature, constexprs, {(params.index(p),): "D" for p in params if p.name in divisible}


def variant_key(v: _common.CompileVariant) -> str:
    signature, constexprs, attrs = specialize(v)
    return json.dumps([v.kernel.__name__, signature, sorted(constexprs.items(), key=str), sorted(attrs),
                       v.config.num_warps, v.config.num_stages], default=str)


def find_tool(name: str) -> str | None:
    """A CUDA binary bundled with the triton wheel, else on PATH."""
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(bundled) if bundled.exists() else shutil.which(name)


def resource_usage(cubin: bytes, cuobjdump: str) -> dict:
    """Registers, stack frame, local and shared memory of the one kernel in a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise RuntimeError(f"cuobjdump -res-usage failed ({res.returncode}): {res.stderr.strip()[:300]}")
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res.stdout)
    if not m:
        raise RuntimeError(f"cuobjdump -res-usage printed no resource line: {res.stdout.strip()[:300]}")
    reg, stack, shared, local = map(int, m.groups())
    return {"registers": reg, "stack_bytes": stack, "static_shared_bytes": shared, "local_bytes": local}


def _attrs_for(target):
    """Triton's attribute format for 'divisible by 16' (parse_attr where the version has it)."""
    from triton.compiler import make_backend

    backend = make_backend(target)
    parse = getattr(backend, "parse_attr", None)
    return parse("D") if parse else [["tt.divisibility", 16]]


_WORKER: dict = {}


def _init_worker(head_dims, widths, dtype_names) -> None:
    # Triton 3.9 warns that its default FP fusion (on, as in the GPU image's Triton 3.6) will
    # change; the check compiles with the default, as a launch does, and records the version.
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    _WORKER["variants"] = all_variants(head_dims, widths, [DTYPES[d] for d in dtype_names])[0]
    _WORKER["cuobjdump"] = find_tool("cuobjdump")


def compile_one(index: int, capability: int) -> dict:
    """Compile variant ``index`` for ``capability``; a failure is a result (error text), not an exception."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    v = _WORKER["variants"][index]
    target = GPUTarget("cuda", capability, 32)
    signature, constexprs, attr_desc = specialize(v)
    divisible = _attrs_for(target)
    src = ASTSource(v.kernel, signature, constexprs=constexprs, attrs={k: divisible for k in attr_desc})
    t0 = time.perf_counter()
    try:
        compiled = triton.compile(src, target=target,
                                  options={"num_warps": v.config.num_warps, "num_stages": v.config.num_stages})
    except Exception as e:  # noqa: BLE001 - a kernel that does not compile is the finding to report
        return {"index": index, "ok": False, "error": f"{type(e).__name__}: {e}"[:2000],
                "compile_s": time.perf_counter() - t0}
    record = {"index": index, "ok": True, "compile_s": time.perf_counter() - t0,
              "shared_bytes": int(compiled.metadata.shared), "ptx_bytes": len(compiled.asm["ptx"])}
    record.update(resource_usage(compiled.asm["cubin"], _WORKER["cuobjdump"]))
    return record


def verdict(record: dict, variant: _common.CompileVariant, capability: int) -> str:
    """'ok', or why the variant fails the check."""
    if not record["ok"]:
        return "compile error"
    problems = []
    if record["shared_bytes"] > SHARED_LIMIT[capability]:
        problems.append("shared memory over the limit")
    if (record["stack_bytes"] or record["local_bytes"]) and not variant.config.allow_spills:
        problems.append("spills registers")
    return "; ".join(problems) or "ok"


def run(targets, head_dims, widths, dtype_names, workers: int) -> dict:
    variants, used_by = all_variants(head_dims, widths, [DTYPES[d] for d in dtype_names])
    capabilities = [parse_target(t) for t in targets]
    jobs = [(i, cap) for cap in capabilities for i in range(len(variants))]
    t0 = time.perf_counter()
    init = (tuple(head_dims), tuple(widths), tuple(dtype_names))
    if workers > 1:
        pool = futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                           initializer=_init_worker, initargs=init)
        with pool:
            results = list(pool.map(compile_one, *zip(*jobs)))
    else:
        _init_worker(*init)
        results = [compile_one(i, cap) for i, cap in jobs]
    wall = time.perf_counter() - t0
    rows = []
    for (i, cap), record in zip(jobs, results):
        v = variants[i]
        row = {"target": f"sm_{cap}" + ("a" if cap >= 90 else ""), "kernel": v.kernel.__name__, "shape": v.shape,
               "used_by": used_by[i],
               "config": str(v.config), "flags": _flags(v.constexprs), "num_warps": v.config.num_warps, "num_stages": v.config.num_stages,
               "blocks": v.config.meta, "constexprs": {k: val for k, val in v.constexprs.items()},
               "allow_spills": v.config.allow_spills or None,
               "shared_limit_bytes": SHARED_LIMIT[cap], **{k: val for k, val in record.items() if k != "index"}}
        row["verdict"] = verdict(record, v, cap)
        rows.append(row)
    return {"rows": rows, "wall_s": wall, "variants_per_target": len(variants)}


def _flags(constexprs: dict) -> str:
    """The boolean constexprs that are on (HAS_POS, POS_GRAD, EVEN_D): what tells variants apart."""
    return ",".join(k for k, val in constexprs.items() if val is True) or "-"


def ptxas_versions() -> dict:
    """Version of every ptxas the triton wheel bundles (Triton 3.9 uses ``ptxas-blackwell``, CUDA
    13, for sm_90a and the plain one for sm_80; older wheels bundle one)."""
    import triton

    found = sorted((Path(triton.__file__).parent / "backends" / "nvidia" / "bin").glob("ptxas*"))
    if not found and shutil.which("ptxas"):
        found = [Path(shutil.which("ptxas"))]
    versions = {}
    for tool in found:
        out = subprocess.run([str(tool), "--version"], capture_output=True, text=True, timeout=30).stdout
        versions[tool.name] = (re.findall(r"release [\d.]+, V[\d.]+", out) or [out.strip()[-60:]])[0]
    return versions


def environment() -> dict:
    import triton

    now = dt.datetime.now(dt.timezone.utc)
    return {"what": "CPU-compiled, not measured: Triton compiled each kernel ahead of time to PTX and cubin "
                    "without a GPU; registers, spills and shared memory are the compiler's figures",
            "device": f"none (compiled on cpu: {platform.machine()}, {os.cpu_count()} logical cores)",
            "date": now.date().isoformat(), "timestamp_utc": now.isoformat(timespec="seconds"),
            "triton": triton.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "ptxas": ptxas_versions(), "hostname": platform.node(),
            "loadavg_1_5_15min": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
            "triton_cache_dir": os.environ.get("TRITON_CACHE_DIR") or "(Triton's default)"}


def table(report: dict) -> str:
    lines = [f"{'target':7} {'kernel':28} {'config':18} {'flags':12} {'shape':18} {'regs':>4} {'stack':>5} "
             f"{'smem KiB':>8} {'limit':>5}  verdict"]
    for r in report["rows"]:
        if r["ok"]:
            nums = f"{r['registers']:4d} {r['stack_bytes']:5d} {r['shared_bytes'] / 1024:8.1f}"
        else:
            nums = f"{'-':>4} {'-':>5} {'-':>8}"
        lines.append(f"{r['target']:7} {r['kernel']:28} {r['config']:18} {r['flags']:12} {r['shape']:18} {nums} "
                     f"{r['shared_limit_bytes'] // 1024:5d}  {r['verdict']}")
    failed = [r for r in report["rows"] if r["verdict"] != "ok"]
    lines.append(f"{len(report['rows'])} variants ({report['variants_per_target']} per target), "
                 f"{len(failed)} failing, {report['wall_s']:.0f} s wall")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    env = report["env"]
    lines = [f"# Triton compile check ({', '.join(report['settings']['targets'])}): CPU-compiled, not measured", "",
             f"{env['what']}. Triton {env['triton']}, ptxas "
             f"{', '.join(f'{k} {v}' for k, v in env['ptxas'].items())}, torch {env['torch']}, {env['date']}, "
             f"on {env['device']}; {report['wall_s']:.0f} s wall with {report['settings']['workers']} workers "
             f"(shared CPU, load {env['loadavg_1_5_15min']}).", "",
             f"Compile time: {sum(r['compile_s'] for r in report['rows']):.0f} s summed over the variants (each "
             f"{min(r['compile_s'] for r in report['rows']):.1f}-{max(r['compile_s'] for r in report['rows']):.1f} s "
             f"wall in its worker); {sum(r['compile_s'] < 1 for r in report['rows'])} of {len(report['rows'])} were "
             "read back from the Triton cache (under 1 s), the figures are the same either way.", "",
             f"Head dims {report['settings']['head_dims']}, widths {report['settings']['widths']}, dtypes "
             f"{report['settings']['dtypes']}. Shared-memory limit: the opt-in maximum per block. Stack = local "
             "memory per thread (register spills).", "",
             "| target | kernel | config | flags | shapes | regs | stack B | shared KiB | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        regs = r.get("registers", "-")
        stack = r.get("stack_bytes", "-")
        shared = f"{r['shared_bytes'] / 1024:.1f}" if r["ok"] else "-"
        verdict = r["verdict"] if r["ok"] else f"compile error: {r['error'].splitlines()[0][:120]}"
        lines.append(f"| {r['target']} | {r['kernel']} | {r['config']} | {r['flags']} | {', '.join(r['used_by'])} | {regs} "
                     f"| {stack} "
                     f"| {shared} | {verdict} |")
    return "\n".join(lines) + "\n"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m scalejepa.kernels.compile_check", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--target", default=",".join(DEFAULT_TARGETS), help="comma list of sm_90a, sm_80")
    p.add_argument("--head-dims", default=",".join(map(str, DEFAULT_HEAD_DIMS)), help="attention head dims")
    p.add_argument("--widths", default=",".join(map(str, DEFAULT_WIDTHS)), help="token widths of the gathers")
    p.add_argument("--dtypes", default="fp16,bf16", help=f"comma list of {', '.join(DTYPES)}")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="compiler processes")
    p.add_argument("--json", type=Path, default=None, help="write the full report here")
    p.add_argument("--md", type=Path, default=None, help="write a markdown table here")
    args = p.parse_args(argv)
    try:
        args.targets = [t.strip() for t in args.target.split(",") if t.strip()]
        for t in args.targets:
            parse_target(t)
        args.head_dims, args.widths = _ints(args.head_dims), _ints(args.widths)
    except ValueError as e:
        p.error(str(e))
    args.dtype_names = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in args.dtype_names if d not in DTYPES]
    if bad or not args.dtype_names:
        p.error(f"unknown dtypes {bad}; choose from {', '.join(DTYPES)}")
    bad = [h for h in args.head_dims if not 1 <= h <= varlen_attention.MAX_HEAD_DIM]
    if bad:
        p.error(f"head dims {bad} outside 1..{varlen_attention.MAX_HEAD_DIM}")
    if args.workers < 1:
        p.error("--workers must be >= 1")
    return args


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not _common.HAS_TRITON:
        print("compile_check needs the 'triton' package: pip install triton", file=sys.stderr)
        return 2
    if _common.is_interpreted(varlen_attention._attn_fwd_kernel):
        print("compile_check needs Triton's compiler, but TRITON_INTERPRET is set (the kernels were built for the "
              "interpreter): run it with TRITON_INTERPRET unset", file=sys.stderr)
        return 2
    missing = [t for t in ("ptxas", "cuobjdump") if find_tool(t) is None]
    if missing:
        print(f"compile_check needs {' and '.join(missing)} (bundled with the triton wheel, or the CUDA toolkit "
              "on PATH); none found", file=sys.stderr)
        return 2
    report = run(args.targets, args.head_dims, args.widths, args.dtype_names, args.workers)
    report["env"] = environment()
    report["settings"] = {"targets": args.targets, "head_dims": args.head_dims, "widths": args.widths,
                          "dtypes": args.dtype_names, "workers": args.workers,
                          "shared_limit_bytes": {f"sm_{c}": b for c, b in SHARED_LIMIT.items()}}
    failed = [r for r in report["rows"] if r["verdict"] != "ok"]
    report["passed"] = not failed
    print(table(report))
    if args.json:
        _write(args.json, json.dumps(report, indent=1, default=str))
    if args.md:
        _write(args.md, markdown(report))
    for r in failed:
        print(f"FAIL {r['target']} {r['kernel']} {r['config']} ({r['shape']}): "
              f"{r['verdict'] if r['ok'] else r['error'].splitlines()[0][:300]}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
