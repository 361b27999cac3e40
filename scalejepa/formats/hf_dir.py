"""Hugging Face transformers ``IJepaModel`` directories: ``config.json`` (``IJepaConfig``),
``model.safetensors`` and ``preprocessor_config.json``.

Key layout, as the published conversion of the official checkpoints writes it
(transformers' ``models/ijepa/convert_ijepa_to_hf.py``): ``pos_embed`` ->
``embeddings.position_embeddings``, ``patch_embed.proj`` ->
``embeddings.patch_embeddings.projection``, ``blocks.{i}`` -> ``encoder.layer.{i}`` with
``norm1/2`` -> ``layernorm_before/after``, ``attn.proj`` -> ``attention.output.dense``,
``mlp.fc1/fc2`` -> ``intermediate.dense`` / ``output.dense``, the fused ``attn.qkv`` split
into ``attention.attention.query/key/value`` (in that order), ``norm`` -> ``layernorm``.
No pooler (``IJepaModel``'s default). The renames are exact, so ours -> HF -> ours gives
the same tensors bit for bit.

The preprocessor is our evaluation transform (``scalejepa.eval.features``): resize the short
side to ``eval_resize(size)`` (bilinear), central crop, the run's mean and std. The
published conversion wrote a plain resize with 0.5 / 0.5 normalisation, which is not what
the encoders were trained or evaluated with.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
import yaml

from scalejepa.data.transforms import eval_resize
from scalejepa.eval.spec import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EncoderSpec,
    EncoderWeights,
    WeightsError,
    spec_with_heads,
)
from scalejepa.formats.safetensors_file import WEIGHTS_FILE, read_weights_dir, save_safetensors
from scalejepa.models.vit import VitSize

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
MODEL_TYPE = "ijepa"
LAYER_NORM_EPS = 1e-6  # our encoders' (and the reference's); IJepaConfig's default is 1e-12
_PIL_BILINEAR = 2  # PIL.Image.Resampling.BILINEAR, as the evaluation transform resizes

_TOP_LEVEL = {
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
_IN_BLOCK = {  # our module inside blocks.{i} -> the HF module inside encoder.layer.{i}
    "norm1": "layernorm_before",
    "attn.proj": "attention.output.dense",
    "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
_QKV = ("query", "key", "value")
_OUR_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")
_HF_LAYER_KEY = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")
_HF_PREFIX = "ijepa."  # IJepaForImageClassification keeps the IJepaModel under this name


# ----------------------------------------------------------------------------- names


def to_hf_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our encoder state dict in ``IJepaModel``'s names, q/k/v split."""
    out = {}
    for key, value in state.items():
        if key in _TOP_LEVEL:
            out[_TOP_LEVEL[key]] = value
            continue
        match = _OUR_BLOCK_KEY.match(key)
        if match is None or (match.group(2) not in _IN_BLOCK and match.group(2) != "attn.qkv"):
            raise WeightsError(f"encoder weight {key!r} has no place in an IJepaModel")
        layer, module, kind = match.groups()
        if module == "attn.qkv":
            for name, part in zip(_QKV, value.chunk(3)):  # clones: safetensors refuses tensors that share memory
                out[f"encoder.layer.{layer}.attention.attention.{name}.{kind}"] = part.clone()
        else:
            out[f"encoder.layer.{layer}.{_IN_BLOCK[module]}.{kind}"] = value
    return out


def from_hf_state(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """``IJepaModel`` weights back in our names, q/k/v fused again."""
    top = {hf: ours for ours, hf in _TOP_LEVEL.items()}
    in_block = {hf: ours for ours, hf in _IN_BLOCK.items()}
    out, qkv, unknown = {}, {}, []
    for key, value in state.items():
        key = key.removeprefix(_HF_PREFIX)
        if key in top:
            out[top[key]] = value
            continue
        match = _HF_LAYER_KEY.match(key)
        if match is None:
            unknown.append(key)
            continue
        layer, module, kind = match.groups()
        if module.startswith("attention.attention.") and module.rpartition(".")[2] in _QKV:
            qkv.setdefault((layer, kind), {})[module.rpartition(".")[2]] = value
        elif module in in_block:
            out[f"blocks.{layer}.{in_block[module]}.{kind}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise WeightsError(f"{source}: weights {sorted(unknown)[:5]} have no place in a scalejepa encoder (an "
                           "IJepaModel without pooler or classifier head is expected)")
    for (layer, kind), parts in qkv.items():
        missing = [name for name in _QKV if name not in parts]
        if missing:
            raise WeightsError(f"{source}: layer {layer} has no attention {', '.join(missing)} {kind}")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts[name] for name in _QKV])
    return out


# ----------------------------------------------------------------------------- files


def hf_config(spec: EncoderSpec, size: VitSize) -> dict[str, Any]:
    """``config.json``: the ``IJepaConfig`` of the encoder."""
    return {
        "architectures": ["IJepaModel"],
        "model_type": MODEL_TYPE,
        "hidden_size": size.embed_dim,
        "num_hidden_layers": size.depth,
        "num_attention_heads": size.num_heads,
        "intermediate_size": size.mlp_hidden_dim,
        "hidden_act": "gelu",  # exact GELU, as nn.GELU()
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": LAYER_NORM_EPS,
        "image_size": spec.image_size,
        "patch_size": spec.patch_size,
        "num_channels": spec.in_chans,
        "qkv_bias": True,
    }


def preprocessor_config(spec: EncoderSpec) -> dict[str, Any]:
    """``preprocessor_config.json``: the evaluation transform as a ``BitImageProcessor``
    (short-side resize, centre crop, rescale, normalise)."""
    return {
        "image_processor_type": "BitImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": eval_resize(spec.image_size)},
        "resample": _PIL_BILINEAR,
        "do_center_crop": True,
        "crop_size": {"height": spec.image_size, "width": spec.image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(spec.mean),
        "image_std": list(spec.std),
    }


def write_hf_dir(folder: Path, weights: EncoderWeights, size: VitSize, sidecar: dict[str, Any]) -> None:
    (folder / CONFIG_FILE).write_text(json.dumps(hf_config(weights.spec, size), indent=2) + "\n")
    (folder / PREPROCESSOR_FILE).write_text(json.dumps(preprocessor_config(weights.spec), indent=2) + "\n")
    save_safetensors(to_hf_state(weights.state_dict), folder / WEIGHTS_FILE, sidecar)


def is_hf_dir(folder: Path) -> bool:
    config = folder / CONFIG_FILE
    return config.is_file() and json.loads(config.read_text()).get("model_type") == MODEL_TYPE


def read_hf_dir(folder: Path) -> EncoderWeights:
    """An ``IJepaModel`` directory (ours or the published conversions) in our names."""
    config = json.loads((folder / CONFIG_FILE).read_text())
    for key, ours in (("hidden_act", "gelu"), ("qkv_bias", True), ("layer_norm_eps", LAYER_NORM_EPS)):
        if config.get(key, ours) != ours:
            raise WeightsError(f"{folder}: {key}={config[key]!r}, scalejepa's encoders have {ours!r}")
    raw, sidecar = read_weights_dir(folder)
    state = from_hf_state(raw, str(folder))
    processor = folder / PREPROCESSOR_FILE
    norm = json.loads(processor.read_text()) if processor.is_file() else {}
    spec = spec_with_heads({k: v.shape for k, v in state.items()}, int(config["num_attention_heads"]),
                           mean=norm.get("image_mean", IMAGENET_MEAN), std=norm.get("image_std", IMAGENET_STD))
    sidecar = sidecar or {}
    return EncoderWeights(state, spec, str(folder), step=sidecar.get("step"), seed=int(sidecar.get("seed", 0)),
                          licence=sidecar.get("licence") or card_licence(folder))


def card_licence(folder: Path) -> str | None:
    """The ``license`` of a model card's YAML front matter (``README.md``), if any."""
    card = folder / "README.md"
    if not card.is_file():
        return None
    parts = card.read_text().split("---", 2)
    if len(parts) < 3 or parts[0].strip():
        return None
    front = yaml.safe_load(parts[1]) or {}
    return front.get("license") if isinstance(front, dict) else None
