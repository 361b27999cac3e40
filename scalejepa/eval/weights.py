"""Where evaluation weights come from: a run directory, a checkpoint step directory, an
exported ``.pt`` state dict, a reference I-JEPA checkpoint, or a random init.

Every source ends up as a plain state dict in our parameter names plus an
:class:`EncoderSpec` (architecture, input size, normalisation). The architecture is read
off the tensor shapes, so any of these sources loads without a config; a run's config,
when there is one, adds the normalisation and the seed (the random-init baseline uses the
run's seed, which reproduces the exact weights its target encoder started from).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from scalejepa.config import ModelConfig
from scalejepa.models.vit import VIT_SIZES, VisionTransformer

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIDECAR_FORMAT = "scalejepa-encoder"
SIDECAR_VERSION = 1
# Wrapper components that never belong to a parameter name: DDP/DeepSpeed (module.),
# torch.compile (_orig_mod.), activation checkpointing (_checkpoint_wrapped_module.).
_WRAPPER_PARTS = ("module", "_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module")
# DeepSpeed step directories keep the target encoder here (scalejepa/parallel/deepspeed.py).
DEEPSPEED_TARGET_FILE = "target_encoder.pt"
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


class WeightsError(ValueError):
    """The weights cannot be used as given; the message says what to pass instead."""


@dataclass(frozen=True)
class EncoderSpec:
    """What an evaluation needs to rebuild and feed an encoder."""

    arch: str
    image_size: int
    patch_size: int
    in_chans: int = 3
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def model_config(self) -> ModelConfig:
        return ModelConfig(arch=self.arch, image_size=self.image_size, patch_size=self.patch_size,
                           in_chans=self.in_chans, attn_impl="sdpa")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass
class EncoderWeights:
    """A state dict in our names, its spec, and where it came from (for reports)."""

    state_dict: dict[str, torch.Tensor]
    spec: EncoderSpec
    source: str
    step: int | None = None
    seed: int = 0  # the run's train.seed when known: the random-init baseline reuses it


# ----------------------------------------------------------------------------- names and shapes


def strip_wrappers(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drop wrapper components (``module.``, ``_orig_mod.``, ...) from every key."""
    out = {}
    for key, value in state_dict.items():
        name = ".".join(part for part in key.split(".") if part not in _WRAPPER_PARTS)
        if name in out:
            raise WeightsError(f"two entries map to {name!r} once wrapper prefixes are removed")
        out[name] = value
    return out


def infer_spec(shapes: Mapping[str, Sequence[int]], *, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> EncoderSpec:
    """Architecture, patch size and input size from encoder parameter shapes (our names)."""
    for needed in ("patch_embed.proj.weight", "pos_embed"):
        if needed not in shapes:
            raise WeightsError(
                f"no {needed!r} among the weights' {len(shapes)} entries (first: {sorted(shapes)[:3]}): "
                "this is not a ViT encoder state dict"
            )
    dim, in_chans, patch, _ = shapes["patch_embed.proj.weight"]
    num_patches = shapes["pos_embed"][-2]
    grid = int(round(num_patches**0.5))
    depth = len({int(m.group(1)) for k in shapes if (m := _BLOCK_KEY.match(k))})
    hidden = shapes.get("blocks.0.mlp.fc1.weight", (None,))[0]
    for arch, size in VIT_SIZES.items():
        if (size.embed_dim, size.depth) == (dim, depth) and hidden in (None, size.mlp_hidden_dim):
            return EncoderSpec(arch, grid * patch, patch, in_chans, tuple(mean), tuple(std))
    raise WeightsError(
        f"no known architecture has width {dim}, depth {depth} and MLP width {hidden}; known: "
        + ", ".join(f"{a} ({s.embed_dim}x{s.depth})" for a, s in VIT_SIZES.items())
    )


# ----------------------------------------------------------------------------- sources


def load_weights(path: str | Path, entry: str = "target") -> EncoderWeights:
    """Encoder weights from a run directory (its newest committed checkpoint, else its
    export), a checkpoint step directory, an exported ``.pt`` or a reference checkpoint.

    ``entry``: ``target`` (the EMA target encoder, what the paper evaluates) or
    ``encoder`` (the context encoder); exported ``.pt`` files hold one encoder only.
    """
    if entry not in ("target", "encoder"):
        raise WeightsError(f"entry {entry!r}: choose target or encoder")
    path = Path(path).expanduser()
    if not path.exists():
        raise WeightsError(
            f"weights {path} do not exist: pass a run directory, a checkpoint directory "
            "(RUN/checkpoints/step_XXXXXXXX), an exported .pt file, or --random-init"
        )
    if path.is_dir():
        from scalejepa.checkpoint import committed_checkpoints

        if (path / "checkpoints").is_dir() or (path / "config.yaml").is_file():
            found = committed_checkpoints(path / "checkpoints")
            if found:
                return load_step_dir(found[-1], entry)
            exported = path / "export" / "target_encoder.pt"
            if exported.is_file() and entry == "target":
                return load_pt(exported)
            if exported.is_file():
                raise WeightsError(f"run directory {path} has no committed checkpoint, and its export holds only "
                                   "the target encoder: evaluate that (--entry target)")
            raise WeightsError(
                f"run directory {path} has no committed checkpoint (checkpoints/step_*/COMMITTED) "
                f"and no export/target_encoder.pt: train it first, or pass another run or checkpoint"
            )
        return load_step_dir(path, entry)
    return load_pt(path, entry)


def load_step_dir(step_dir: Path, entry: str = "target") -> EncoderWeights:
    """A checkpoint step directory: DCP (one-process and FSDP2 runs) or DeepSpeed's, which
    keeps the target encoder as a full state dict next to DeepSpeed's own files."""
    from scalejepa.checkpoint import is_committed, step_of

    if (step_dir / ".metadata").is_file():
        return load_dcp_checkpoint(step_dir, entry)
    deepspeed_target = step_dir / DEEPSPEED_TARGET_FILE
    if not deepspeed_target.is_file():
        raise WeightsError(
            f"{step_dir} is neither a run directory (config.yaml, checkpoints/) nor a checkpoint step directory "
            f"(.metadata or {DEEPSPEED_TARGET_FILE}, COMMITTED)"
        )
    if not is_committed(step_dir):
        raise WeightsError(f"checkpoint {step_dir} has no COMMITTED marker: its save did not finish")
    if entry != "target":
        raise WeightsError(
            f"{step_dir} is a DeepSpeed checkpoint: only its target encoder is stored as plain weights "
            "(convert the context encoder with DeepSpeed's zero_to_fp32.py)"
        )
    weights = load_pt(deepspeed_target, entry, run_config=_read_yaml(step_dir.parent.parent / "config.yaml"))
    weights.step = step_of(step_dir)
    return weights


def load_dcp_checkpoint(step_dir: str | Path, entry: str = "target") -> EncoderWeights:
    """One encoder out of a training checkpoint, read in this process alone (no process
    group needed): only its tensors are read, not the optimizer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from scalejepa.checkpoint import is_committed, step_of

    step_dir = Path(step_dir)
    if not is_committed(step_dir):
        raise WeightsError(
            f"checkpoint {step_dir} has no COMMITTED marker: its save did not finish. "
            "Pass an earlier step directory, or the run directory (which picks the newest committed one)"
        )
    # The engine saves {"model": IJEPA (encoder.*, predictor.*), "target": encoder, ...}.
    top, prefix = ("target", "") if entry == "target" else ("model", "encoder.")
    reader = dcp.FileSystemReader(str(step_dir))
    metadata = reader.read_metadata()
    head = f"{top}.{prefix}"
    tensors = {
        key[len(head):]: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(head) and isinstance(meta, TensorStorageMetadata)
    }
    if not tensors:
        raise WeightsError(f"checkpoint {step_dir} holds no {head}* tensors: not a scalejepa training checkpoint")
    state: dict[str, Any] = {top: {prefix + k: v for k, v in tensors.items()}}
    if "trainer" in metadata.state_dict_metadata:
        state["trainer"] = ""
    with warnings.catch_warnings():  # DCP warns that it "assumes a single process": that is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=reader, no_dist=True)
    trainer = json.loads(state["trainer"]) if state.get("trainer") else {}
    config = trainer.get("config", {})
    data, train = config.get("data", {}), config.get("train", {})
    state_dict = {k[len(prefix):]: v for k, v in state[top].items()}
    spec = infer_spec({k: v.shape for k, v in state_dict.items()},
                      mean=data.get("mean", IMAGENET_MEAN), std=data.get("std", IMAGENET_STD))
    name = "target encoder" if entry == "target" else "context encoder"
    return EncoderWeights(state_dict, spec, f"{step_dir} ({name})", step=step_of(step_dir),
                          seed=int(train.get("seed", 0)))


def load_pt(path: str | Path, entry: str = "target", run_config: dict[str, Any] | None = None) -> EncoderWeights:
    """An exported state dict (ours, or any ViT with our names, wrapper prefixes allowed)
    or a reference I-JEPA checkpoint (``encoder`` / ``target_encoder`` / ``predictor``)."""
    from scalejepa.eval.reference import is_reference_checkpoint, reference_encoder_state

    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the path and what was expected
        raise WeightsError(f"could not read {path} as a torch state dict: {exc}") from exc
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a state dict")
    sidecar = read_sidecar(path)
    config = run_config if run_config is not None else _run_config_near(path)
    if is_reference_checkpoint(obj):
        state_dict = reference_encoder_state(obj, "target_encoder" if entry == "target" else "encoder")
        which = "target encoder" if entry == "target" else "context encoder"
        epoch = obj.get("epoch")
        source = f"{path} (reference I-JEPA checkpoint, {which}" + (f", epoch {epoch})" if epoch is not None else ")")
        return EncoderWeights(state_dict, infer_spec({k: v.shape for k, v in state_dict.items()}), source)
    state_dict = strip_wrappers(obj)
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{path}: entries {bad[:3]} are not tensors; expected an encoder state dict")
    norm = sidecar or config.get("data", {})
    spec = infer_spec({k: v.shape for k, v in state_dict.items()},
                      mean=norm.get("mean", IMAGENET_MEAN), std=norm.get("std", IMAGENET_STD))
    seed = (sidecar or {}).get("seed", config.get("train", {}).get("seed", 0))
    step = (sidecar or {}).get("step")
    return EncoderWeights(state_dict, spec, str(path), step=step, seed=int(seed))


def sidecar_path(weights_path: str | Path) -> Path:
    return Path(weights_path).with_suffix(".json")


def read_sidecar(weights_path: str | Path) -> dict[str, Any] | None:
    path = sidecar_path(weights_path)
    if not path.is_file():
        return None
    sidecar = json.loads(path.read_text())
    if sidecar.get("format") != SIDECAR_FORMAT:
        return None  # some other JSON that happens to sit next to the weights
    return sidecar


def _run_config_near(path: Path) -> dict[str, Any]:
    """RUN/config.yaml for RUN/export/target_encoder.pt; {} elsewhere."""
    return _read_yaml(path.parent.parent / "config.yaml") if path.parent.name == "export" else {}


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


# ----------------------------------------------------------------------------- models


def check_fits(weights: EncoderWeights) -> None:
    """Names and shapes of ``weights`` against the model of its spec (built on the meta
    device: no memory, no init); ``pos_embed`` may be absent (a fixed table)."""
    from scalejepa.ijepa import build_encoder

    with torch.device("meta"):
        expected = {k: v.shape for k, v in build_encoder(weights.spec.model_config()).state_dict().items()}
    given = weights.state_dict
    missing = [k for k in expected if k not in given and k != "pos_embed"]
    unexpected = [k for k in given if k not in expected]
    wrong = [f"{k} {tuple(v.shape)} (needs {tuple(expected[k])})"
             for k, v in given.items() if k in expected and tuple(v.shape) != tuple(expected[k])]
    if missing or unexpected or wrong:
        raise WeightsError(
            f"weights from {weights.source} do not fit {weights.spec.arch}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shapes {wrong[:3]}"
        )


def build_encoder_from(weights: EncoderWeights, device: torch.device | str = "cpu") -> VisionTransformer:
    """The encoder of ``weights.spec`` with the weights loaded (names and shapes checked)."""
    from scalejepa.ijepa import build_encoder
    from scalejepa.models.layers import sincos_pos_embed_2d

    check_fits(weights)
    # Built on the meta device: no time spent on an init that the weights overwrite.
    with torch.device("meta"):
        encoder = build_encoder(weights.spec.model_config())
    encoder.to_empty(device=device)
    state_dict = dict(weights.state_dict)
    if "pos_embed" not in state_dict:  # a fixed sin-cos table: some exports leave it out
        state_dict["pos_embed"] = sincos_pos_embed_2d(encoder.embed_dim, encoder.patch_embed.grid_size).unsqueeze(0)
    encoder.load_state_dict(state_dict, strict=True)
    return encoder.eval().requires_grad_(False)


def random_encoder(spec: EncoderSpec, seed: int = 0, device: torch.device | str = "cpu") -> VisionTransformer:
    """The untrained baseline. With the run's ``train.seed`` these are exactly the weights
    the run's target encoder started from (build_models draws the encoder first)."""
    from scalejepa.ijepa import build_encoder

    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream alone
        torch.manual_seed(seed)
        encoder = build_encoder(spec.model_config())
    return encoder.to(device).eval().requires_grad_(False)
