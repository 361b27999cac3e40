"""Where evaluation weights come from: a run directory, a checkpoint step directory, an
exported ``.pt`` state dict or ``.safetensors`` file, an export directory
(``scalejepa-export --format pt|safetensors|hf|timm``, or any Hugging Face ``IJepaModel`` or
timm ViT directory of that layout), a reference I-JEPA checkpoint, or a random init.

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
    OFFICIAL_LICENCE,
    SIDECAR_FORMAT,
    EncoderSpec,
    EncoderWeights,
    WeightsError,
    check_fits,
    infer_spec,
    strip_wrappers,
)
from scalejepa.formats import PT_FILE, hf_dir, timm_dir
from scalejepa.formats.safetensors_file import WEIGHTS_FILE, is_safetensors_file, read_safetensors
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
    export), a checkpoint step directory, an export directory or file, or a reference
    checkpoint.

    ``entry``: ``target`` (the EMA target encoder, what the paper evaluates) or
    ``encoder`` (the context encoder); exports hold one encoder only.
    """
    if entry not in ("target", "encoder"):
        raise WeightsError(f"entry {entry!r}: choose target or encoder")
    path = Path(path).expanduser()
    if not path.exists():
        raise WeightsError(
            f"weights {path} do not exist: pass a run directory, a checkpoint directory "
            "(RUN/checkpoints/step_XXXXXXXX), an export (.pt, .safetensors or a scalejepa-export directory), "
            "or --random-init"
        )
    if path.is_dir():
        step_dir = checkpoint_of(path)
        if step_dir is not None:
            return load_step_dir(step_dir, entry)
        run = RunDir(path)
        if run.looks_like_run():
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
        return load_export_dir(path, entry)
    if is_safetensors_file(path):
        return load_safetensors(path)
    return load_pt(path, entry)


# What a directory can be, in the order load_export_dir tries them (for its error message).
DIRECTORY_FORMATS = (
    f"a run directory ({CONFIG_FILE}, checkpoints/)",
    f"a checkpoint step directory (DCP .metadata or {DEEPSPEED_META_FILE}, {COMMIT_MARKER})",
    "a Hugging Face IJepaModel directory (config.json with model_type ijepa)",
    "a timm directory (config.json with architecture, model_args)",
    f"a scalejepa export directory ({WEIGHTS_FILE} or model.pt)",
)


def is_step_dir(path: Path) -> bool:
    return (path / ".metadata").is_file() or (path / DEEPSPEED_META_FILE).is_file()


def checkpoint_of(path: Path) -> Path | None:
    """The training checkpoint a directory names: itself if it is a step directory, a run
    directory's newest committed one; None for anything else (or a run with none)."""
    if step_of(path) is not None or is_step_dir(path):  # before the run check: step directories have a config.yaml
        return path
    run = RunDir(path)
    found = committed_step_dirs(run.checkpoints) if run.looks_like_run() else []
    return found[-1] if found else None


def load_export_dir(folder: Path, entry: str = "target") -> EncoderWeights:
    """A directory written by ``scalejepa-export`` (or by transformers or timm in those
    layouts): one encoder, whichever ``entry`` asks for."""
    if hf_dir.is_hf_dir(folder):
        return hf_dir.read_hf_dir(folder)
    if timm_dir.is_timm_dir(folder):
        return timm_dir.read_timm_dir(folder)
    if (folder / WEIGHTS_FILE).is_file():
        return load_safetensors(folder / WEIGHTS_FILE)
    if (folder / PT_FILE).is_file():
        return load_pt(folder / PT_FILE, entry)
    raise WeightsError(f"{folder} is none of the directories scalejepa reads; tried " + "; ".join(DIRECTORY_FORMATS))


def load_step_dir(step_dir: Path, entry: str = "target") -> EncoderWeights:
    """A checkpoint step directory: DCP (one-process and FSDP2 runs) or DeepSpeed's, which
    keeps the target encoder as a full state dict next to DeepSpeed's own files."""
    if not (step_dir / DEEPSPEED_META_FILE).is_file():
        if not (step_dir / ".metadata").is_file():
            raise WeightsError(f"{step_dir} is none of the directories scalejepa reads; tried "
                               + "; ".join(DIRECTORY_FORMATS))
        return load_dcp_checkpoint(step_dir, entry)
    if not is_committed(step_dir):
        raise WeightsError(f"checkpoint {step_dir} has no {COMMIT_MARKER} marker: its save did not finish")
    if entry != "target":
        raise WeightsError(
            f"{step_dir} is a DeepSpeed checkpoint: only its target encoder is stored as plain weights "
            "(convert the context encoder with DeepSpeed's zero_to_fp32.py)"
        )
    weights = load_pt(step_dir / DEEPSPEED_TARGET_FILE, entry, run_config=step_config(step_dir))
    weights.step = step_of(step_dir)
    weights.licence, weights.run_dir = step_provenance(step_dir)
    return weights


def read_dcp_entries(step_dir: Path, heads: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    """The tensors of a DCP checkpoint under each flattened key prefix of ``heads``
    (``model.encoder.``, ``target.``), prefix removed, read in this process alone (no
    process group needed): only these tensors are read, not the optimizer state."""
    # Here, not at the top: ~1 s to import, and only run checkpoints need it (hub loads, exports do not).
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(step_dir))
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, meta in reader.read_metadata().state_dict_metadata.items():
        if isinstance(meta, TensorStorageMetadata) and key.startswith(heads):
            top, _, rest = key.partition(".")  # DCP flattens {top: {rest: tensor}} to "top.rest"
            state.setdefault(top, {})[rest] = torch.empty(meta.size, dtype=meta.properties.dtype)
    if state:
        with warnings.catch_warnings():  # DCP warns that it "assumes a single process": that is the intent
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=reader, no_dist=True)
    found: dict[str, dict[str, torch.Tensor]] = {head: {} for head in heads}
    for top, tensors in state.items():
        for rest, tensor in tensors.items():
            head = next(h for h in heads if f"{top}.{rest}".startswith(h))
            found[head][f"{top}.{rest}"[len(head):]] = tensor
    return found


def load_dcp_checkpoint(step_dir: str | Path, entry: str = "target") -> EncoderWeights:
    """One encoder out of a training checkpoint (see :func:`read_dcp_entries`)."""
    step_dir = Path(step_dir)
    if not is_committed(step_dir):
        raise WeightsError(
            f"checkpoint {step_dir} has no {COMMIT_MARKER} marker: its save did not finish. "
            "Pass an earlier step directory, or the run directory (which picks the newest committed one)"
        )
    # The trained I-JEPA module (encoder.*, predictor.*) and the target encoder.
    head = f"{TARGET_KEY}." if entry == "target" else f"{MODEL_KEY}.encoder."
    state_dict = read_dcp_entries(step_dir, (head,))[head]
    if not state_dict:
        raise WeightsError(f"checkpoint {step_dir} holds no {head}* tensors: not a scalejepa training checkpoint")
    config = step_config(step_dir)
    data, train = config.get("data", {}), config.get("train", {})
    spec = infer_spec({k: v.shape for k, v in state_dict.items()}, mean=data.get("mean", IMAGENET_MEAN),
                      std=data.get("std", IMAGENET_STD), model=config.get("model"))
    name = "target encoder" if entry == "target" else "context encoder"
    licence, run_dir = step_provenance(step_dir)
    return EncoderWeights(state_dict, spec, f"{step_dir} ({name})", step=step_of(step_dir),
                          seed=int(train.get("seed", 0)), licence=licence, run_dir=run_dir)


def step_provenance(step_dir: Path) -> tuple[str | None, str | None]:
    """(licence, run directory) of a checkpoint step directory's run."""
    run = RunDir(step_dir.parent.parent)
    return (run_licence(run), str(run.root)) if run.looks_like_run() else (None, None)


def load_pt(path: str | Path, entry: str = "target", run_config: dict[str, Any] | None = None) -> EncoderWeights:
    """An exported state dict (ours, or any ViT with our names, wrapper prefixes allowed)
    or a reference I-JEPA checkpoint (``encoder`` / ``target_encoder`` / ``predictor``)."""
    path = Path(path)
    obj = read_torch_file(path)
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a state dict")
    if is_reference_checkpoint(obj):
        state_dict = reference_encoder_state(obj, "target_encoder" if entry == "target" else "encoder")
        which = "target encoder" if entry == "target" else "context encoder"
        epoch = obj.get("epoch")
        source = f"{path} (reference I-JEPA checkpoint, {which}" + (f", epoch {epoch})" if epoch is not None else ")")
        return EncoderWeights(state_dict, infer_spec({k: v.shape for k, v in state_dict.items()}), source,
                              licence=OFFICIAL_LICENCE)
    state_dict = strip_wrappers(obj)
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{path}: entries {bad[:3]} are not tensors; expected an encoder state dict")
    return _with_spec(state_dict, str(path), read_sidecar(path),
                      run_config if run_config is not None else _run_config_near(path), _run_near(path))


def read_torch_file(path: Path) -> Any:
    """``torch.load`` of tensors only (no code runs), or an error naming every format tried."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the path and what was expected
        raise WeightsError(
            f"{path} is none of the formats scalejepa reads; tried safetensors (no safetensors header) and "
            f"torch.load (a state dict, a scalejepa export .pt or a reference I-JEPA .pth.tar): {exc}"
        ) from exc


def load_safetensors(path: Path) -> EncoderWeights:
    """Our ``.safetensors`` export (the sidecar in its metadata), or any encoder state dict
    in our names or transformers' IJepaModel names."""
    state, sidecar = read_safetensors(path)
    if any(k.removeprefix("ijepa.").startswith(("embeddings.", "encoder.layer.")) for k in state):
        state = hf_dir.from_hf_state(state, str(path))
    return _with_spec(strip_wrappers(state), str(path), sidecar, _run_config_near(path), _run_near(path))


def _with_spec(state_dict: dict[str, torch.Tensor], source: str, sidecar: dict[str, Any] | None,
               config: dict[str, Any], run: RunDir | None) -> EncoderWeights:
    """Weights with their spec from the sidecar (an export) or the run's config."""
    norm = sidecar or config.get("data", {})
    spec = infer_spec({k: v.shape for k, v in state_dict.items()}, mean=norm.get("mean", IMAGENET_MEAN),
                      std=norm.get("std", IMAGENET_STD), model=sidecar or config.get("model"))
    seed = (sidecar or {}).get("seed", config.get("train", {}).get("seed", 0))
    step = (sidecar or {}).get("step")
    licence = (sidecar or {}).get("licence") or (run_licence(run) if run else None)
    run_dir = (sidecar or {}).get("run_dir") or (str(run.root) if run else None)
    return EncoderWeights(state_dict, spec, source, step=step, seed=int(seed), licence=licence, run_dir=run_dir)


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


def _run_near(path: Path) -> RunDir | None:
    """The run of RUN/export/target_encoder.pt; None elsewhere."""
    run = RunDir(path.parent.parent)
    return run if run.export == path else None


def _run_config_near(path: Path) -> dict[str, Any]:
    """RUN/config.yaml for RUN/export/target_encoder.pt; {} elsewhere."""
    run = _run_near(path)
    return _read_yaml(run.config) if run else {}


def run_licence(run: RunDir) -> str | None:
    """The licence a run's weights carry from the weights it started from (RUN/init_from.json)."""
    return json.loads(run.init_from.read_text()).get("licence") if run.init_from.is_file() else None


def step_config(step_dir: Path) -> dict[str, Any]:
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
