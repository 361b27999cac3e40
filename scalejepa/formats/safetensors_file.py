"""Encoder weights as a ``.safetensors`` file: tensors only (nothing pickled), and the
sidecar (architecture, provenance; :func:`scalejepa.export.sidecar`) as JSON in the
file's metadata, so the file describes itself. ``format: pt`` in the metadata is what
transformers and timm look for."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from scalejepa.eval.spec import WeightsError

WEIGHTS_FILE = "model.safetensors"
SHARD_INDEX_FILE = "model.safetensors.index.json"  # transformers' layout for weights split over files
METADATA_KEY = "scalejepa"


def _safetensors_torch():
    try:  # optional (the [hub] extra): imported where used
        import safetensors.torch
    except ImportError as exc:
        raise WeightsError(f"safetensors files need the safetensors package: pip install 'scalejepa[hub]' ({exc})") \
            from None
    return safetensors.torch


def save_safetensors(state: dict[str, torch.Tensor], path: str | Path, sidecar: dict[str, Any] | None = None) -> None:
    """Write ``state`` (tensors that share no memory) with the sidecar in the metadata."""
    metadata = {"format": "pt"}
    if sidecar is not None:
        metadata[METADATA_KEY] = json.dumps(sidecar)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    _safetensors_torch().save_file(tensors, str(path), metadata=metadata)


def is_safetensors_file(path: str | Path) -> bool:
    """The format's header: an 8-byte little-endian length, then a JSON object."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(tensors, our sidecar or None)."""
    _safetensors_torch()  # the optional package, or a clear error
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError
        raise WeightsError(f"could not read {path} as safetensors: {exc}") from exc
    sidecar = json.loads(metadata[METADATA_KEY]) if METADATA_KEY in metadata else None
    return state, sidecar


def read_weights_dir(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The weights of a Hugging Face-style directory: ``model.safetensors``, or the files
    that ``model.safetensors.index.json`` lists, or a pickle-free ``pytorch_model.bin``."""
    if (folder / WEIGHTS_FILE).is_file():
        return read_safetensors(folder / WEIGHTS_FILE)
    if (folder / SHARD_INDEX_FILE).is_file():
        files = sorted(set(json.loads((folder / SHARD_INDEX_FILE).read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for name in files:
            state.update(read_safetensors(folder / name)[0])
        return state, None
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True), None
    raise WeightsError(f"{folder} has a config.json but no weights: no {WEIGHTS_FILE}, {SHARD_INDEX_FILE} "
                       "or pytorch_model.bin")
