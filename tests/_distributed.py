"""Shared pieces of the distributed tests (CPU, gloo, torchrun in a subprocess).

Every run trains the micro I-JEPA of ``debug_cpu`` on synthetic images
(``data.synthetic``) with packed contexts: a batch is a function of (seed, step, global
sample index), so runs on any number of ranks see the same global batches and their
losses and weights can be compared with a one-process run (``reference``), which runs in
this process once per session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from scalejepa.config import load_config
from scalejepa.data.pipeline import SyntheticLoader
from scalejepa.ijepa import build_models, compute_targets
from scalejepa.init_from import FIXED_TABLES
from scalejepa.masks import MaskGenerator

REPO = Path(__file__).resolve().parents[1]
STEPS = 6
# Global batch 8 over 2 micro-batches: 2 ranks x 2 images x 2 accumulation steps. Packed
# contexts: truncation is per rank (as with real data), packing gives any world size the
# one-process run's batches.
COMMON = ["data.synthetic=true", "mask.context=pack", "data.num_samples=64", "train.batch_size=8", "train.grad_accum=2",
          f"train.steps={STEPS}", "train.log_every=1", "model.pred_depth=2", "checkpoint.interval=3",
          "checkpoint.keep=3"]
# fp32 on CPU; only the order of the gradient reductions differs from the one-process run.
LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-6
# AdamW divides each gradient by its running RMS, so reduction-order noise in gradients
# near zero is amplified up to ~lr per step: seen ~8e-7 after 6 steps (peak lr 2e-3).
PARAM_ATOL = 1e-5

# --init-from runs stop after their first step, whose loss is compared; the schedules stay the run's.
ONE_STEP = ("train.stop_at_step=1",)

_reference: dict[str, Path] = {}


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed JIT-builds a shared-memory comm op on its first start (~40-90 s cold):
    # cache it in the repository's ignored .cache/ unless the user has a cache of their own.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env.pop("TRITON_INTERPRET", None)
    return env


def torchrun(run_dir: Path, nproc: int, *overrides: str, resume: str = "auto", script: str | None = None,
             max_restarts: int = 0, extra_env: dict | None = None, timeout: int = 400,
             check: bool = True) -> subprocess.CompletedProcess:
    """``torchrun --standalone`` (a free port of its own) of the trainer; returns the process."""
    entry = [script] if script else ["-m", "scalejepa.train"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--max-restarts={max_restarts}", *entry, "--config", "debug_cpu", "--run-dir", str(run_dir),
           "--resume", resume, *COMMON, *overrides]
    env = subprocess_env()
    env.update(extra_env or {})
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def train_here(run_dir: Path, *overrides: str, resume: str = "auto") -> int:
    """One process, in this process (no interpreter start-up), on one thread as the
    torchrun workers (2 threads on 2 busy cores are several times slower)."""
    from scalejepa.train import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(["--config", "debug_cpu", "--run-dir", str(run_dir), "--resume", resume, *COMMON, *overrides])
    finally:
        torch.set_num_threads(threads)


def reference(tmp_path_factory) -> Path:
    """The uninterrupted one-process run (backend none), once per session."""
    if "none" not in _reference:
        run_dir = tmp_path_factory.mktemp("reference") / "run"
        assert train_here(run_dir) == 0
        _reference["none"] = run_dir
    return _reference["none"]


def losses(run_dir: Path) -> dict[int, float]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def assert_losses_match(run_dir: Path, ref_dir: Path, steps=range(1, STEPS + 1)) -> None:
    got, want = losses(run_dir), losses(ref_dir)
    assert sorted(got) == list(steps), sorted(got)
    for step in steps:
        assert abs(got[step] - want[step]) <= LOSS_ATOL + LOSS_RTOL * abs(want[step]), (step, got[step], want[step])


def checkpoint(run_dir: Path, step: int = STEPS) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def dcp_state(step_dir: Path) -> dict:
    """A DCP step directory read back in one process as full tensors."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = step_dir.parent / f"{step_dir.name}.pt"
    if not out.exists():
        dcp_to_torch_save(step_dir, out)
    return torch.load(out, weights_only=False)


def assert_weights_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = PARAM_ATOL) -> None:
    assert sorted(got) == sorted(want), set(got) ^ set(want)
    worst = max((got[k].float() - want[k].float()).abs().max().item() for k in want)
    assert worst <= atol, worst


def exported_target(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(Path(run_dir) / "export" / "target_encoder.pt")


def model_part(state: dict, prefix: str) -> dict:
    """``encoder.`` or ``predictor.`` weights of a :func:`dcp_state`'s trained module."""
    return {k.removeprefix(prefix): v for k, v in state["model"].items() if k.startswith(prefix)}


def first_loss(encoder: dict, predictor: dict | None = None, target: dict | None = None, *overrides: str) -> float:
    """Step 1's loss of a run that starts from these weights, computed without the trainer:
    the models built from train.seed as the trainer builds them, the weights loaded, the
    first global batch's two micro-batches through the I-JEPA forward."""
    config = load_config("debug_cpu", [*COMMON, *overrides])
    torch.manual_seed(config.train.seed)
    model, target_model = build_models(config.model, config.train.loss)
    for module, state in ((model.encoder, encoder), (target_model, target or encoder), (model.predictor, predictor)):
        if state is not None:
            own = module.state_dict()
            module.load_state_dict({**{k: own[k] for k in FIXED_TABLES if k in own}, **state})
    grid = config.model.image_size // config.model.patch_size
    loader = SyntheticLoader(batch_size=config.train.batch_size // config.train.grad_accum,
                             image_size=config.model.image_size, mask_generator=MaskGenerator(grid, config.mask),
                             seed=config.train.seed)
    loss = torch.zeros(())
    with torch.no_grad():
        for _ in range(config.train.grad_accum):
            batch = next(loader)
            loss += model(batch.images, batch.masks, compute_targets(target_model, batch.images, batch.masks)) \
                / config.train.grad_accum
    return float(loss)
