"""Where evaluation weights come from: a run directory, a checkpoint step directory, an
exported ``.pt`` state dict, a reference I-JEPA checkpoint, or a random init.

Every source ends up as a plain state dict in our parameter names plus an
:class:`EncoderSpec` (architecture, input size, normalisation). The architecture is read
off the tensor shapes, so any of these sources loads without a config; a run's config,
when there is one, adds the normalisation and the seed (the random-init baseline uses the
run's seed, which reproduces the exact weights its target encoder started from).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from scalejepa.eval.reference import is_reference_checkpoint, reference_encoder_state
from scalejepa.eval.spec import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SIDECAR_FORMAT,
    EncoderSpec,
    EncoderWeights,
    WeightsError,
    check_fits,
    infer_spec,
    strip_wrappers,
)
from scalejepa.ijepa import build_encoder
from scalejepa.layout import (
    COMMIT_MARKER,
    CONFIG_FILE,
    DEEPSPEED_META_FILE,
    DEEPSPEED_TARGET_FILE,
    MODEL_KEY,
    TARGET_KEY,
    RunDir,
    committed_step_dirs,
    is_committed,
    step_of,
)
from scalejepa.models.layers import sincos_pos_embed_2d
from scalejepa.models.vit import VisionTransformer

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
        run = RunDir(path)
        if step_of(path) is None and run.looks_like_run():
            found = committed_step_dirs(run.checkpoints)
            if found:
                return load_step_dir(found[-1], entry)
            exported = run.export
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
    if not (step_dir / DEEPSPEED_META_FILE).is_file():
        if not (step_dir / ".metadata").is_file():
            raise WeightsError(
                f"{step_dir} is neither a run directory ({CONFIG_FILE}, checkpoints/) nor a checkpoint step directory "
                f"(DCP .metadata or {DEEPSPEED_META_FILE}, {COMMIT_MARKER})"
            )
        return load_dcp_checkpoint(step_dir, entry)
    if not is_committed(step_dir):
        raise WeightsError(f"checkpoint {step_dir} has no {COMMIT_MARKER} marker: its save did not finish")
    if entry != "target":
        raise WeightsError(
            f"{step_dir} is a DeepSpeed checkpoint: only its target encoder is stored as plain weights "
            "(convert the context encoder with DeepSpeed's zero_to_fp32.py)"
        )
    weights = load_pt(step_dir / DEEPSPEED_TARGET_FILE, entry, run_config=_step_config(step_dir))
    weights.step = step_of(step_dir)
    return weights


def load_dcp_checkpoint(step_dir: str | Path, entry: str = "target") -> EncoderWeights:
    """One encoder out of a training checkpoint, read in this process alone (no process
    group needed): only its tensors are read, not the optimizer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    step_dir = Path(step_dir)
    if not is_committed(step_dir):
        raise WeightsError(
            f"checkpoint {step_dir} has no {COMMIT_MARKER} marker: its save did not finish. "
            "Pass an earlier step directory, or the run directory (which picks the newest committed one)"
        )
    # The trained I-JEPA module (encoder.*, predictor.*) and the target encoder.
    top, prefix = (TARGET_KEY, "") if entry == "target" else (MODEL_KEY, "encoder.")
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
    with warnings.catch_warnings():  # DCP warns that it "assumes a single process": that is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=reader, no_dist=True)
    config = _step_config(step_dir)
    data, train = config.get("data", {}), config.get("train", {})
    state_dict = {k[len(prefix):]: v for k, v in state[top].items()}
    spec = infer_spec({k: v.shape for k, v in state_dict.items()}, mean=data.get("mean", IMAGENET_MEAN),
                      std=data.get("std", IMAGENET_STD), model=config.get("model"))
    name = "target encoder" if entry == "target" else "context encoder"
    return EncoderWeights(state_dict, spec, f"{step_dir} ({name})", step=step_of(step_dir),
                          seed=int(train.get("seed", 0)))


def load_pt(path: str | Path, entry: str = "target", run_config: dict[str, Any] | None = None) -> EncoderWeights:
    """An exported state dict (ours, or any ViT with our names, wrapper prefixes allowed)
    or a reference I-JEPA checkpoint (``encoder`` / ``target_encoder`` / ``predictor``)."""
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
    spec = infer_spec({k: v.shape for k, v in state_dict.items()}, mean=norm.get("mean", IMAGENET_MEAN),
                      std=norm.get("std", IMAGENET_STD), model=sidecar or config.get("model"))
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
    run = RunDir(path.parent.parent)
    return _read_yaml(run.config) if run.export == path else {}


def _step_config(step_dir: Path) -> dict[str, Any]:
    """The config that wrote a step directory (kept inside it), else its run's."""
    own = step_dir / CONFIG_FILE
    return _read_yaml(own if own.is_file() else RunDir(step_dir.parent.parent).config)


def _read_yaml(path: Path) -> dict[str, Any]:
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


# ----------------------------------------------------------------------------- models


def build_encoder_from(weights: EncoderWeights, device: torch.device | str = "cpu") -> VisionTransformer:
    """The encoder of ``weights.spec`` with the weights loaded (names and shapes checked)."""
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
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream alone
        torch.manual_seed(seed)
        encoder = build_encoder(spec.model_config())
    return encoder.to(device).eval().requires_grad_(False)
