"""``scalejepa-train --init-from SOURCE``: start pretraining from weights made elsewhere, at
step 0 with a fresh optimizer and fresh schedules (``--resume`` continues a run instead).

Sources (:func:`load_init_weights`):

* a reference I-JEPA checkpoint (``.pth.tar``): encoder, predictor and target encoder;
* a run directory (its newest committed checkpoint) or a checkpoint step directory: the
  same three, from DCP, or from a DeepSpeed checkpoint (its target encoder file, and
  DeepSpeed's ``zero_to_fp32`` for the trained module);
* an export: a ``.pt`` or ``.safetensors`` file, a ``scalejepa-export`` directory, or a
  Hugging Face ``IJepaModel`` or timm ViT directory. These hold one encoder: it becomes the
  context encoder and the target encoder, and the predictor starts fresh.

Loading is strict (:meth:`InitWeights.check`, before anything is written): a missing,
unexpected or mis-shaped key is a :class:`ConfigError` that names the keys, says how the
checkpoint's architecture differs from the config's, and gives the overrides that fit it.
Head counts do not show in the weights: where the source names one (its run's config, an
export's sidecar, a transformers or timm config) it must match; where it does not (a
reference checkpoint's predictor), the config's is used and the log says so.

Every rank loads the source on the CPU into the freshly built models, before they are
sharded (FSDP2, HSDP) or handed to DeepSpeed (:func:`scalejepa.parallel.build_engine`).
The run records the source in ``config.yaml`` (``checkpoint.init_from``) and what was
loaded in ``RUN/init_from.json`` (with the licence that weights derived from the official
checkpoints carry).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn

from scalejepa.checkpoint import CheckpointError
from scalejepa.config import ConfigError, ModelConfig, from_dict
from scalejepa.eval.reference import is_reference_checkpoint, reference_entry
from scalejepa.eval.spec import OFFICIAL_LICENCE, WeightsError, encoder_shape
from scalejepa.eval.weights import (
    checkpoint_of,
    load_weights,
    read_dcp_entries,
    read_torch_file,
    step_config,
    step_provenance,
)
from scalejepa.formats.safetensors_file import is_safetensors_file
from scalejepa.ijepa import IJEPA, build_models
from scalejepa.io import atomic_write_text
from scalejepa.layout import (
    COMMIT_MARKER,
    DEEPSPEED_META_FILE,
    DEEPSPEED_SUBDIR,
    DEEPSPEED_TARGET_FILE,
    MODEL_KEY,
    TARGET_KEY,
    RunDir,
    is_committed,
    step_of,
)
from scalejepa.models.vit import VIT_SIZES, VisionTransformer, model_size

log = logging.getLogger(__name__)

FIXED_TABLES = ("pos_embed", "predictor_pos_embed")  # sin-cos buffers: a source may leave them out
_PRED_BLOCK_KEY = re.compile(r"^predictor_blocks\.(\d+)\.")
_SHOWN = 5  # keys named per kind of mismatch


@dataclass
class InitWeights:
    """The weights a run starts from, in our names, and what the source says of them."""

    source: str
    kind: str  # for logs and RUN/init_from.json
    encoder: dict[str, torch.Tensor]
    target: dict[str, torch.Tensor] | None = None  # None: the target starts as the encoder
    predictor: dict[str, torch.Tensor] | None = None  # None: the predictor starts fresh
    heads: int | None = None  # the encoder's head count, where the source names it
    pred_heads: int | None = None  # the predictor's, where the source names it
    licence: str | None = None
    step: int | None = None
    notes: list[str] = field(default_factory=list)  # what check() decided, for the log

    def parts(self, model: IJEPA, target: nn.Module) -> list[tuple[str, nn.Module, dict[str, torch.Tensor]]]:
        parts = [("encoder", model.encoder, self.encoder),
                 ("target encoder", target, self.target if self.target is not None else self.encoder)]
        if self.predictor is not None:
            parts.append(("predictor", model.predictor, self.predictor))
        return parts

    def check(self, config: ModelConfig) -> None:
        """Names, shapes and head counts against the models of ``config`` (built on the
        meta device: no memory, no init). Raises a ConfigError that says how to fit them."""
        with torch.device("meta"):
            model, target = build_models(config)
        problems, found = [], {}
        for name, module, state in self.parts(model, target):
            found[name] = problem = _mismatch(module, state)
            if problem and name == "target encoder" and problem == found["encoder"]:
                problems.append("  target encoder: as the encoder")
            elif problem:
                problems.append(f"  {name}: {problem}")
        heads = model_size(config).num_heads
        pred_heads = config.pred_heads or heads
        if not problems and self.heads is not None and self.heads != heads:
            problems.append(f"  encoder: {self.heads} attention heads in the source, {heads} in this config")
        if not problems and self.predictor is not None and self.pred_heads not in (None, pred_heads):
            problems.append(f"  predictor: {self.pred_heads} attention heads in the source, {pred_heads} in this "
                            "config (model.pred_heads; 0 = the encoder's)")
        if problems:
            raise ConfigError(f"--init-from {self.source} ({self.kind}) does not fit this config's model:\n"
                              + "\n".join(problems) + "\n" + self.explain(config))
        self.notes = [f"loaded {', '.join(name for name, _, _ in self.parts(model, target))} from {self.source} "
                      f"({self.kind})"]
        if self.target is None:
            self.notes.append("the source has no target encoder: it starts as a copy of the encoder")
        if self.predictor is None:
            self.notes.append("the source has no predictor: it starts fresh (train.seed)")
        if self.heads is None:
            self.notes.append(f"encoder head count {heads} taken from the config: the weights do not show it")
        if self.predictor is not None and self.pred_heads is None:
            self.notes.append(f"predictor head count {pred_heads} taken from the config (model.pred_heads="
                              f"{config.pred_heads}, 0 = the encoder's): it cannot be read from the weights")

    def explain(self, config: ModelConfig) -> str:
        """How the source's architecture differs from the config's, and the overrides that fit it."""
        with torch.device("meta"):
            model, _ = build_models(config)
        theirs, ours = _shape_of(self.encoder), _shape_of(model.encoder.state_dict())
        lines = [f"The source's encoder: {_describe(theirs, self.heads)}; this config's: "
                 f"{_describe(ours, model.encoder.num_heads)}."]
        overrides = _encoder_overrides(theirs, self.heads, config)
        if self.predictor is not None:
            theirs_pred = _predictor_shape(self.predictor)
            ours_pred = (config.pred_dim, config.pred_depth)
            lines.append(f"The source's predictor: width {theirs_pred[0]}, depth {theirs_pred[1]}; this config's: "
                         f"width {ours_pred[0]}, depth {ours_pred[1]}.")
            if theirs_pred[0] != ours_pred[0]:
                overrides.append(f"model.pred_dim={theirs_pred[0]}")
            if theirs_pred[1] != ours_pred[1]:
                overrides.append(f"model.pred_depth={theirs_pred[1]}")
            if self.pred_heads is not None and self.pred_heads != (config.pred_heads or model.encoder.num_heads):
                overrides.append(f"model.pred_heads={self.pred_heads}")
        if overrides:
            lines.append("Use a preset of the source's shape, or override: " + " ".join(overrides))
        return "\n".join(lines)

    def apply(self, model: IJEPA, target: VisionTransformer) -> None:
        """Load into the models as built (on the CPU, before any wrapping), strictly."""
        for _, module, state in self.parts(model, target):
            state = dict(state)
            own = module.state_dict()
            for name in FIXED_TABLES:  # recomputed tables, identical for a given shape
                if name in own and name not in state:
                    state[name] = own[name]
            module.load_state_dict(state, strict=True)

    def record(self) -> dict:
        """RUN/init_from.json."""
        return {"source": self.source, "kind": self.kind, "step": self.step,
                "loaded": {"encoder": True, "target": self.target is not None, "predictor": self.predictor is not None},
                "heads": self.heads, "pred_heads": self.pred_heads, "licence": self.licence, "notes": self.notes}


# ----------------------------------------------------------------------------- mismatch messages


def _mismatch(module: nn.Module, state: dict[str, torch.Tensor]) -> str:
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = [k for k in expected if k not in state and k not in FIXED_TABLES]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(v.shape)} (here {expected[k]})" for k, v in state.items()
             if k in expected and tuple(v.shape) != expected[k]]
    found = [f"{what} ({len(keys)}): {', '.join(keys[:_SHOWN])}{', ...' if len(keys) > _SHOWN else ''}"
             for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shapes", wrong)) if keys]
    return "; ".join(found)


def _shape_of(state: dict[str, torch.Tensor]):
    try:
        return encoder_shape({k: v.shape for k, v in state.items()})
    except WeightsError:
        return None


def _describe(shape, heads: int | None) -> str:
    if shape is None:
        return "not a ViT encoder (no patch_embed.proj.weight or pos_embed)"
    arch = shape.named_arch()
    head_text = f"{heads} heads" if heads is not None else "heads unknown"
    return f"{shape.describe()}, {head_text}" + (f" ({arch})" if arch else "")


def _encoder_overrides(shape, heads: int | None, config: ModelConfig) -> list[str]:
    if shape is None:
        return []
    out = []
    arch = shape.named_arch()
    if arch is not None and heads in (None, VIT_SIZES[arch].num_heads):
        if arch != config.arch:
            out.append(f"model.arch={arch}")
        if config.arch == "custom":  # a named size takes no shape keys
            out += ["model.width=0", "model.depth=0", "model.heads=0"] + \
                (["model.mlp_ratio=4.0"] if config.mlp_ratio != 4.0 else [])
    elif (config.arch, config.width, config.depth, config.heads) != ("custom", shape.width, shape.depth, heads):
        hidden = shape.mlp_hidden or 4 * shape.width
        out += ["model.arch=custom", f"model.width={shape.width}", f"model.depth={shape.depth}",
                f"model.heads={heads}" if heads is not None else
                "model.heads=<the head count it was trained with: the weights do not show it>",
                f"model.mlp_ratio={hidden / shape.width:g}"]
    for key, value in (("patch_size", shape.patch_size), ("image_size", shape.image_size),
                       ("in_chans", shape.in_chans)):
        if getattr(config, key) != value:
            out.append(f"model.{key}={value}")
    return out


def _predictor_shape(state: dict[str, torch.Tensor]) -> tuple[int | None, int]:
    embed = state.get("predictor_embed.weight")
    depth = len({int(m.group(1)) for k in state if (m := _PRED_BLOCK_KEY.match(k))})
    return (None if embed is None else int(embed.shape[0])), depth


# ----------------------------------------------------------------------------- sources


def load_init_weights(source: str | Path) -> InitWeights:
    """The weights of ``source`` (see the module docstring), on the CPU."""
    path = Path(source).expanduser()
    if not path.exists():
        raise WeightsError(
            f"--init-from {source} does not exist: pass a reference I-JEPA checkpoint (.pth.tar), a run or "
            "checkpoint step directory, an export (.pt, .safetensors, a scalejepa-export directory) or a Hugging "
            "Face IJepaModel or timm directory"
        )
    if path.is_file() and not is_safetensors_file(path):
        checkpoint = read_torch_file(path)
        if is_reference_checkpoint(checkpoint):
            return _from_reference(checkpoint, str(path))
    step_dir = checkpoint_of(path) if path.is_dir() else None
    if step_dir is not None:
        return _from_step_dir(step_dir)
    weights = load_weights(path)  # an export: one encoder; its spec names the head count
    return InitWeights(weights.source, "export", weights.state_dict,
                       heads=model_size(weights.spec.model_config()).num_heads, licence=weights.licence,
                       step=weights.step)


def _from_reference(checkpoint: dict, source: str) -> InitWeights:
    present = [e for e in ("encoder", "target_encoder", "predictor") if isinstance(checkpoint.get(e), dict)]
    entries = {e: reference_entry(checkpoint, e) for e in present}
    encoder = entries.get("encoder", entries.get("target_encoder"))
    shape = _shape_of(encoder)
    arch = shape.named_arch() if shape else None
    epoch = checkpoint.get("epoch")
    return InitWeights(source, "reference I-JEPA checkpoint" + (f", epoch {epoch}" if epoch is not None else ""),
                       encoder, target=entries.get("target_encoder"), predictor=entries.get("predictor"),
                       heads=VIT_SIZES[arch].num_heads if arch else None, licence=OFFICIAL_LICENCE)


def _heads_of(run_config: dict) -> tuple[int | None, int | None]:
    """(encoder, predictor) head counts of a run's config, if it has a model section."""
    if "model" not in run_config:
        return None, None
    model = from_dict({"model": run_config["model"]}).model
    heads = model_size(model).num_heads
    return heads, model.pred_heads or heads


def _from_step_dir(step_dir: Path) -> InitWeights:
    if not is_committed(step_dir):
        raise CheckpointError(f"--init-from {step_dir}: the checkpoint has no {COMMIT_MARKER} marker, its save did "
                              "not finish; pass an earlier step directory, or the run directory")
    heads, pred_heads = _heads_of(step_config(step_dir))
    licence, _ = step_provenance(step_dir)
    if (step_dir / DEEPSPEED_META_FILE).is_file():
        trained = _deepspeed_trained_state(step_dir)
        kind = "DeepSpeed checkpoint"
        target = read_torch_file(step_dir / DEEPSPEED_TARGET_FILE)
    else:
        encoder_head, predictor_head, target_head = f"{MODEL_KEY}.encoder.", f"{MODEL_KEY}.predictor.", f"{TARGET_KEY}."
        found = read_dcp_entries(step_dir, (encoder_head, predictor_head, target_head))
        trained = {**{f"encoder.{k}": v for k, v in found[encoder_head].items()},
                   **{f"predictor.{k}": v for k, v in found[predictor_head].items()}}
        kind = "checkpoint"
        target = found[target_head]
    encoder = {k.removeprefix("encoder."): v for k, v in trained.items() if k.startswith("encoder.")}
    predictor = {k.removeprefix("predictor."): v for k, v in trained.items() if k.startswith("predictor.")}
    if not encoder:
        raise WeightsError(f"--init-from {step_dir}: no encoder weights in it: not a scalejepa training checkpoint")
    return InitWeights(str(step_dir), f"{kind} at step {step_of(step_dir)}", encoder, target=target or None,
                       predictor=predictor or None, heads=heads, pred_heads=pred_heads, licence=licence,
                       step=step_of(step_dir))


def _deepspeed_trained_state(step_dir: Path) -> dict[str, torch.Tensor]:
    """The trained I-JEPA module of a DeepSpeed checkpoint, as fp32 full tensors
    (DeepSpeed's own ``zero_to_fp32``, any ZeRO stage, no process group)."""
    try:  # optional (the [deepspeed] extra): imported where used
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as exc:
        raise WeightsError(f"--init-from {step_dir} is a DeepSpeed checkpoint, which needs DeepSpeed to read: "
                           f"pip install 'scalejepa[deepspeed]' ({exc})") from None
    return get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=DEEPSPEED_SUBDIR)


# ----------------------------------------------------------------------------- runs


def recorded_source(run: RunDir) -> str:
    """The ``checkpoint.init_from`` in a run directory's config.yaml ("" if none)."""
    if not run.config.is_file():
        return ""
    config = yaml.safe_load(run.config.read_text()) or {}
    return str((config.get("checkpoint") or {}).get("init_from") or "")


def init_for_run(source: str, run: RunDir, resume: str, resume_from: Path | None) -> InitWeights | None:
    """The weights a run starts from, or None when it resumes (or has no ``--init-from``).
    ``--init-from`` on a run with committed checkpoints is refused, except where the run's
    config.yaml records the same source: a restart of the same command (torchrun
    ``--max-restarts``, a requeued job) continues from its checkpoint."""
    if not source:
        return None
    if resume not in ("auto", "never"):
        raise ConfigError(f"--init-from {source} and --resume {resume} exclude each other: --resume continues a run "
                          "from its checkpoint, --init-from starts a new one at step 0 from other weights")
    if resume_from is not None:
        if resume == "auto" and recorded_source(run) == source:
            log.info("%s started from %s and has checkpoints: continuing from %s", run.root, source, resume_from)
            return None
        raise CheckpointError(
            f"--init-from {source}: {run.root} already holds committed checkpoints (newest {resume_from.name}). "
            f"To continue that run use --resume auto without --init-from; to start from {source} at step 0 use a "
            "new --run-dir"
        )
    return load_init_weights(source)


def write_record(init: InitWeights | None, run: RunDir, resumes: bool) -> None:
    """RUN/init_from.json for a run that starts from ``init``. A run that starts from
    scratch removes one left by an earlier attempt; a resumed run keeps its own."""
    if init is not None:
        atomic_write_text(run.init_from, json.dumps(init.record(), indent=1) + "\n")
    elif not resumes:
        run.init_from.unlink(missing_ok=True)
