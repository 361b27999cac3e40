"""Trace one real training step on a CPU: memory by category, and every op and collective
in program order, for any world size, with no GPU and no weights.

The engine is the one training builds (``scalejepa.parallel.build_engine``): FSDP2
``fully_shard`` per block with the sharded EMA target, HSDP meshes, mixed precision,
activation checkpointing; the step is training's own (``scalejepa.step``:
``accumulate_gradients`` then ``apply_update``, without the step's one host sync, which a
value-less trace cannot make). Under ``FakeTensorMode`` tensors have shapes, dtypes and
devices but no storage, and ``init_process_group("fake")`` lets one process be rank 0 of W.
The CPU stands in for the GPU (a CUDA device mesh cannot be made on a CPU-only build); the
step runs the GPU's configuration: ``train.precision=auto`` resolves to bf16 as on a GPU.

Two of PyTorch's tools watch the step:

* ``FSDPMemTracker`` (FSDP2) or ``MemTracker`` (one device) records memory by category
  (parameters, gradients, optimizer state, activations, temporaries, all-gather and
  reduce-scatter buffers) and its peak;
* :class:`StepRecorder`, a ``TorchDispatchMode``, records each op's FLOPs (PyTorch's
  ``flop_counter`` formulas, ours for the varlen attention kernel), bytes read and written,
  matmul dtype and phase, and each collective's bytes and process group, with the
  ``record_function`` labels of our phases and of FSDP2 (``FSDP::all_gather (encoder.blocks.3)``)
  that :mod:`scalejepa.plan.timeline` turns into a schedule.

``fake=False`` runs the same code on real tensors (and a real process group, when one is
initialised): the tests compare the two.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_flop_count

from scalejepa.config import Config, ConfigError, divide_batch
from scalejepa.dist_env import DistEnv, all_reduce_mean
from scalejepa.masks import MaskGenerator, mask_rng
from scalejepa.parallel import build_engine
from scalejepa.parallel.engine import PHASE_BACKWARD, PHASE_CONTEXT_PREDICTOR, PHASE_TARGET_FORWARD
from scalejepa.step import PHASE_DATA, PHASE_EMA, PHASE_OPTIMIZER, StepSchedule, accumulate_gradients, apply_update

PHASE_NAMES = {PHASE_TARGET_FORWARD: "target_forward", PHASE_CONTEXT_PREDICTOR: "context_predictor",
               PHASE_BACKWARD: "backward", PHASE_OPTIMIZER: "optimizer", PHASE_EMA: "ema"}
PHASES = tuple(PHASE_NAMES.values())
UPDATE_LABEL = "scalejepa/update"  # marks the end of the micro-batches in a trace
MASK_DRAWS = 16  # mask batches drawn to pick the traced ones from (mask_batches)

# Memory categories of the two trackers -> the planner's.
_CATEGORY = {
    "Sharded Param": "params", "Unsharded Param": "params", "Parameter": "params",
    "Sharded Grad": "grads", "Unsharded Grad": "grads", "Gradient": "grads",
    "OptState": "optimizer", "Optstate": "optimizer",
    "Activation": "activations",
}
GIB = 1024**3

_COLLECTIVES = {
    "c10d._allgather_base_": "all_gather", "c10d.allgather_": "all_gather",
    "c10d._reduce_scatter_base_": "reduce_scatter", "c10d.reduce_scatter_": "reduce_scatter",
    "c10d.allreduce_": "all_reduce",
}
_VARLEN_FWD, _VARLEN_BWD = "scalejepa.varlen_attn_fwd", "scalejepa.varlen_attn_bwd"
_CPU_SDPA_FWD = "aten._scaled_dot_product_flash_attention_for_cpu"
_CPU_SDPA_BWD = "aten._scaled_dot_product_flash_attention_for_cpu_backward"


@dataclass(slots=True)
class Op:
    """One kernel's work on this rank."""

    phase: str
    flops: float  # model FLOPs (2 per multiply-add; an attention backward counts 2x its forward)
    bytes: float  # tensor bytes read + written
    dtype: str | None  # matmul input dtype ("torch.bfloat16", "torch.float32"), None for other work
    attention_backward: bool = False  # FlashAttention-style kernels recompute Q K^T: 1.25x the FLOPs run


@dataclass(slots=True)
class Collective:
    kind: str  # all_gather | reduce_scatter | all_reduce
    bytes: int  # the full buffer: all-gather output, reduce-scatter input, all-reduce tensor
    ranks: tuple[int, ...]  # the process group
    label: str  # innermost FSDP label, e.g. "FSDP::all_gather (encoder.blocks.3)"
    phase: str


@dataclass(slots=True)
class Label:
    """A ``record_function`` region opening (FSDP2's, and the start of each micro-batch),
    in program order."""

    name: str
    phase: str


@dataclass
class StepTrace:
    config: Config
    world_size: int
    micro_batch: int
    micro_batches_traced: int
    grad_accum: int
    masks: str = "typical"  # which mask draws were traced (mask_batches)
    events: list = field(default_factory=list)  # Op | Collective | Label, in program order
    memory: dict[str, float] = field(default_factory=dict)  # category -> the most it holds during the step
    memory_at_peak: dict[str, float] = field(default_factory=dict)  # category -> bytes when the total peaks
    peak_bytes: float = 0.0

    def memory_gib(self) -> dict[str, float]:
        """The most each category holds during the step, and the peak of their total."""
        out = {k: v / GIB for k, v in self.memory.items()}
        out["peak"] = self.peak_bytes / GIB
        return out

    def totals(self) -> dict[str, float]:
        ops = [e for e in self.events if isinstance(e, Op)]
        comms = [e for e in self.events if isinstance(e, Collective)]
        out = {"flops": sum(o.flops for o in ops), "bytes": sum(o.bytes for o in ops)}
        for kind in ("all_gather", "reduce_scatter", "all_reduce"):
            out[f"{kind}_bytes"] = sum(c.bytes for c in comms if c.kind == kind)
        return out


# ----------------------------------------------------------------------------- config


# Attention paths that cannot run on fake CPU tensors, and what the trace runs in their place:
# the same packed shapes and FLOPs through our varlen kernel's fake implementation, or SDPA with
# the CPU's own kernel. Their speed on a GPU relative to ours is what --calibrate measures.
STAND_INS = {"attn_impl": {"sdpa_nested": "triton", "torch_varlen": "triton"},
             "sdpa_backend": {"efficient": "auto", "cudnn": "auto"}}


def planning_config(config: Config) -> Config:
    """The configuration a GPU run would execute, as the CPU trace can run it:
    ``train.precision=auto`` is bf16 on a GPU; ``distributed.compile`` is traced eagerly (a
    compiled step fuses elementwise work, so the eager trace over-counts its memory traffic);
    attention paths without a fake-tensor kernel run through a stand-in (:data:`STAND_INS`)."""
    train, model = config.train, config.model
    if train.precision == "auto":
        train = dataclasses.replace(train, precision="bf16")
    model = dataclasses.replace(model, attn_impl=STAND_INS["attn_impl"].get(model.attn_impl, model.attn_impl),
                                sdpa_backend=STAND_INS["sdpa_backend"].get(model.sdpa_backend, model.sdpa_backend))
    return dataclasses.replace(config, train=train, model=model,
                               distributed=dataclasses.replace(config.distributed, compile=False))


def check_plannable(config: Config, world_size: int) -> int:
    """Training's own checks for this world size; returns the per-rank batch."""
    per_rank = divide_batch(config.train.batch_size, world_size, config.train.grad_accum)
    if config.distributed.backend == "none" and world_size > 1:
        raise ConfigError(f"distributed.backend=none runs one process, not {world_size}: "
                          "set distributed.backend=fsdp2 or deepspeed")
    if config.model.attn_impl == "flex":
        raise ConfigError("model.attn_impl=flex cannot be traced without a GPU (FlexAttention builds its block mask "
                          "from values); plan with sdpa or triton")
    return per_rank


# ----------------------------------------------------------------------------- recorder


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _tensors(tree) -> Iterator[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            yield from _tensors(item)


def _varlen_attention_flops(q: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> float:
    """Forward FLOPs of Q K^T and P V over the packed sequences: 4 * sum(L^2) * H * hd. The
    trace keeps the mask batch's offsets real; offsets made inside the fake mode (the target
    encoder's uniform sequences) are fake, but then every sequence has max_seqlen tokens."""
    if isinstance(cu_seqlens, torch._subclasses.FakeTensor):
        sequences = cu_seqlens.shape[0] - 1
        if q.shape[0] != sequences * max_seqlen:
            raise RuntimeError("varlen attention on fake offsets of unequal sequences: keep the masks real")
        return 4.0 * sequences * max_seqlen**2 * q.shape[1] * q.shape[2]
    with unset_fake_temporarily():  # the offsets are real: read them outside the fake mode
        offsets = cu_seqlens.tolist()
    return 4.0 * sum((b - a) ** 2 for a, b in zip(offsets, offsets[1:])) * q.shape[1] * q.shape[2]


class StepRecorder(TorchDispatchMode):
    """Records ops, collectives and ``record_function`` labels (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.events: list = []
        # Open record_function regions, innermost last. Exits are matched by nesting, not by
        # handle: the handle reaches this mode as a new Python wrapper at every crossing.
        self._labels: list[str] = []
        self.phase = "other"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t is DTensor for t in types):
            return NotImplemented  # let DTensor run its local ops, which come back here
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func.overloadpacket) if hasattr(func, "overloadpacket") else str(func)
        if name == "profiler._record_function_enter_new":
            self._labels.append(args[0])
            if args[0] in PHASE_NAMES:
                self.phase = PHASE_NAMES[args[0]]
            elif args[0].startswith("FSDP::") or args[0] == PHASE_DATA:
                self.events.append(Label(args[0], self.phase))
            return out
        if name == "profiler._record_function_exit":
            label = self._labels.pop() if self._labels else None
            if label in PHASE_NAMES:
                inner = next((n for n in reversed(self._labels) if n in PHASE_NAMES), None)
                self.phase = PHASE_NAMES[inner] if inner else "other"
            return out
        if name in _COLLECTIVES:
            self._record_collective(_COLLECTIVES[name], args)
        else:
            self._record_op(func, name, args, kwargs, out)
        return out

    def _record_collective(self, kind: str, args) -> None:
        group = next(a for a in args if isinstance(a, torch.ScriptObject)
                     and "ProcessGroup" in a._type().qualified_name())
        ranks = tuple(dist.get_process_group_ranks(dist.ProcessGroup.unbox(group)))
        if kind == "all_gather":
            nbytes = sum(_nbytes(t) for t in _tensors(args[0]))  # the gathered output
        elif kind == "reduce_scatter":
            nbytes = sum(_nbytes(t) for t in _tensors(args[1]))  # the full input
        else:
            nbytes = sum(_nbytes(t) for t in _tensors(args[0]))
        label = next((n for n in reversed(self._labels) if n.startswith("FSDP::")), "")
        self.events.append(Collective(kind, nbytes, ranks, label, self.phase))

    def _record_op(self, func, name: str, args, kwargs, out) -> None:
        schema = func._schema
        if any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns):
            return  # a view: no data moves
        if name.startswith(("aten.empty", "aten.new_empty")):
            return  # allocates without writing
        inputs = list(_tensors(list(args) + list(kwargs.values())))
        outputs = list(_tensors(out))
        written = [a for a, arg in zip(args, schema.arguments) if arg.alias_info is not None and arg.alias_info.is_write]
        nbytes = sum(_nbytes(t) for t in inputs) + sum(_nbytes(t) for t in outputs)
        if not outputs:
            nbytes += sum(_nbytes(t) for t in _tensors(written))
        flops, dtype, attn_bwd = 0.0, None, False
        if name == _VARLEN_FWD:
            flops, dtype = _varlen_attention_flops(args[0], args[3], args[4]), str(args[0].dtype)
        elif name == _VARLEN_BWD:
            flops, dtype, attn_bwd = 2 * _varlen_attention_flops(args[1], args[6], args[7]), str(args[1].dtype), True
        elif name == _CPU_SDPA_FWD:
            q, k, v = args[:3]
            flops, dtype = float(sdpa_flop_count(q.shape, k.shape, v.shape)), str(q.dtype)
        elif name == _CPU_SDPA_BWD:
            q, k, v = args[1:4]
            flops, dtype, attn_bwd = 2.0 * sdpa_flop_count(q.shape, k.shape, v.shape), str(q.dtype), True
        elif func.overloadpacket in flop_registry:
            flops = float(flop_registry[func.overloadpacket](*args, **kwargs, out_val=out))
            dtype = str(inputs[0].dtype) if inputs else None
        self.events.append(Op(self.phase, flops, float(nbytes), dtype, attn_bwd))


# ----------------------------------------------------------------------------- world


@contextlib.contextmanager
def fake_world(world_size: int) -> Iterator[None]:
    """A fake process group of ``world_size`` ranks in this process (this process is rank 0)
    for the length of a trace; nothing if a real group is already initialised (the tests'
    gloo ranks). It must not outlive the trace: code that finds a process group uses it."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


class _CategoryPeaks:
    """Tracker mixin: the step's peak snapshot, plus the largest value each memory
    category reaches (the trackers' own snapshot holds the categories at the moment of the
    total's peak). Per-module peaks, which the trackers also keep, are not needed here and
    cost a scan of every module per op (most of a ViT-H trace's time): they are skipped."""

    category_peaks: dict[str, int]

    def _update_peak_stats(self, peak_state) -> None:
        peaks = self.__dict__.setdefault("category_peaks", {})
        for device, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(device, 0) < snap[_TOTAL_KEY]:
                self._peak_mem[device] = snap[_TOTAL_KEY]
                self._peak_mem_snap[device] = dict(snap)
            for key, value in snap.items():
                name = str(getattr(key, "value", key))
                if value > peaks.get(name, 0):
                    peaks[name] = value


class _TwoRootTracker(_CategoryPeaks, FSDPMemTracker):
    """``FSDPMemTracker`` over both FSDP roots: the trained I-JEPA and the target encoder."""

    def __init__(self, roots: list[torch.nn.Module], optimizer: torch.optim.Optimizer):
        super().__init__(roots[0], optimizer)
        self._roots = roots

    def _instrument_fsdp_module(self) -> None:
        for root in self._roots:
            self._root_mod = root
            super()._instrument_fsdp_module()
        self._root_mod = self._roots[0]


class _FrozenAwareTracker(_CategoryPeaks, MemTracker):
    """``MemTracker`` that does not put gradient hooks on frozen modules (the target
    encoder): torch 2.13's tracker registers them on every parameter it sees in a forward,
    which raises for parameters that do not require gradients."""

    def _track_module_params_and_buffers(self, module, install_grad_hooks: bool = True):
        trainable = any(p.requires_grad for p in module.parameters())
        return super()._track_module_params_and_buffers(module, install_grad_hooks and trainable)


def _memory_tracker(engine, backend: str):
    if backend == "fsdp2":
        return _TwoRootTracker([engine.model, engine.target], engine.optimizer)
    tracker = _FrozenAwareTracker()
    tracker.track_external(engine.model, engine.target, engine.optimizer)
    return tracker


def _create_optimizer_state(engine) -> None:
    """Give the optimizer its state (AdamW creates it lazily at its first step), as it has
    from the second training step on; a zero-gradient step with lr 0 changes no weight."""
    params = [p for group in engine.optimizer.param_groups for p in group["params"]]
    for p in params:
        p.grad = torch.zeros_like(p)
    saved = [(g["lr"], g["weight_decay"]) for g in engine.optimizer.param_groups]
    for g in engine.optimizer.param_groups:
        g["lr"], g["weight_decay"] = 0.0, 0.0
    engine.optimizer.step()
    engine.optimizer.zero_grad(set_to_none=True)
    for g, (lr, wd) in zip(engine.optimizer.param_groups, saved):
        g["lr"], g["weight_decay"] = lr, wd


def _reset_between(tracker, micro_batches: int) -> Iterator[int]:
    """Micro-batch indices; the trackers keep per-module stats of one forward per module,
    so they are reset between micro-batches (the step's totals and peaks are kept)."""
    for micro in range(micro_batches):
        if micro:
            tracker.reset_mod_stats()
        yield micro


def _categories(snapshot: dict[str, int]) -> dict[str, float]:
    """A tracker's categories summed into the planner's."""
    memory = {"params": 0.0, "grads": 0.0, "optimizer": 0.0, "activations": 0.0, "other": 0.0}
    for category, value in snapshot.items():
        if category != "Total":
            memory[_CATEGORY.get(category, "other")] += value
    return memory


@dataclass
class _Batch:
    images: torch.Tensor
    masks: object


def mask_batches(config: Config, micro: int, count: int, rank: int, seed: int, masks: str):
    """``count`` of training's own mask batches for the traced micro-batches. Their token
    counts vary from step to step (block sizes are drawn per batch; truncation cuts to the
    batch's shortest context), and so do a step's time and memory: ``typical`` takes the
    draws nearest the median token count of :data:`MASK_DRAWS` draws, ``largest`` the
    largest ones (the step that sets the peak memory over a run)."""
    grid = config.model.image_size // config.model.patch_size
    generator = MaskGenerator(grid, config.mask)
    draws = [generator(micro, mask_rng(seed, rank, 0, i)) for i in range(MASK_DRAWS)]
    # Tokens the encoders and the predictor process: the context once in the encoder and once
    # per target block in the predictor, plus the target blocks' mask tokens.
    draws.sort(key=lambda m: m.context_tokens * (1 + m.num_targets) + m.target_tokens)
    if masks == "largest":
        return draws[-count:]
    middle = (MASK_DRAWS - count) // 2
    return draws[middle:middle + count]


def trace_step(config: Config, world_size: int, *, micro_batch: int | None = None, fake: bool = True,
               record_ops: bool = True, masks: str = "typical", seed: int = 0) -> StepTrace:
    """Trace one optimizer step of ``config`` on rank 0 of ``world_size`` ranks (see the
    module docstring). ``micro_batch`` overrides the per-rank micro-batch (the global batch
    and grad-accumulation then follow from it); the step traces up to two micro-batches
    (the second one sees the first one's gradients, as every later one does) on ``masks``
    mask batches (:func:`mask_batches`)."""
    config = planning_config(config)
    if micro_batch is not None:
        t = config.train
        config = dataclasses.replace(config, train=dataclasses.replace(
            t, batch_size=micro_batch * world_size * t.grad_accum))
    per_rank = check_plannable(config, world_size)
    if config.distributed.backend == "deepspeed":
        raise ConfigError("distributed.backend=deepspeed is not traced (DeepSpeed cannot run on fake tensors): "
                          "scalejepa.plan prices it with DeepSpeed's own model-state estimators")
    accum = config.train.grad_accum
    micro = per_rank // accum
    traced = min(accum, 2)
    rank = dist.get_rank() if dist.is_initialized() else 0
    batches_masks = mask_batches(config, micro, traced, rank, seed, masks)
    trace = StepTrace(config, world_size, micro, traced, accum, masks=masks)
    device = torch.device("cpu")
    env = DistEnv(rank, world_size, 0, device)
    image_shape = (micro, config.model.in_chans, config.model.image_size, config.model.image_size)
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    with (fake_world(world_size) if fake else contextlib.nullcontext()), mode:
        engine = build_engine(config, env, meta_init=fake)
        _create_optimizer_state(engine)
        images = torch.empty(image_shape) if fake else torch.randn(image_shape)
        batches = iter([_Batch(images, m) for m in batches_masks])
        tracker = _memory_tracker(engine, config.distributed.backend)
        recorder = StepRecorder() if record_ops else contextlib.nullcontext()
        with tracker, recorder:
            loss = sum(accumulate_gradients(engine, batches.__next__)[0] for _ in _reset_between(tracker, traced))
            if record_ops:
                recorder.events.append(Label(UPDATE_LABEL, recorder.phase))
            all_reduce_mean(torch.stack([loss, torch.zeros_like(loss)]))  # the step's loss and stop flags
            apply_update(engine, StepSchedule(lr=1e-3, weight_decay=0.05, ema_momentum=0.996))
        at_peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    trace.memory, trace.memory_at_peak = _categories(tracker.category_peaks), _categories(at_peak)
    trace.peak_bytes = float(at_peak["Total"])
    if record_ops:
        trace.events = recorder.events
    return trace
