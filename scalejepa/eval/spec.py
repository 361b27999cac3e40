"""What an evaluation needs to know of an encoder, whatever it came from: its
:class:`EncoderSpec` (architecture, input size, normalisation, read off the tensor shapes),
its weights in our parameter names (:class:`EncoderWeights`), and the checks that a state
dict fits the architecture. Shared by :mod:`scalejepa.eval.weights` (our checkpoints and
exports) and :mod:`scalejepa.eval.reference` (the reference code's checkpoints)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from scalejepa.config import Config, ModelConfig
from scalejepa.ijepa import build_encoder
from scalejepa.models.vit import VIT_SIZES, model_size

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIDECAR_FORMAT = "scalejepa-encoder"
SIDECAR_VERSION = 1
# The official I-JEPA checkpoints' licence, which weights derived from them carry.
OFFICIAL_LICENCE = "cc-by-nc-4.0"
# Wrapper components that never belong to a parameter name: DDP/DeepSpeed (module.),
# torch.compile (_orig_mod.), activation checkpointing (_checkpoint_wrapped_module.).
_WRAPPER_PARTS = ("module", "_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module")
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
    # arch="custom" only (model.width/depth/heads/mlp_ratio): a head count cannot be read
    # off the weights, so a custom shape comes from the run's config or the export's sidecar.
    width: int = 0
    depth: int = 0
    heads: int = 0
    mlp_ratio: float = 4.0

    @classmethod
    def from_config(cls, config: Config) -> "EncoderSpec":
        """The spec of a training run's encoder."""
        m, d = config.model, config.data
        return cls(m.arch, m.image_size, m.patch_size, m.in_chans, tuple(d.mean), tuple(d.std),
                   m.width, m.depth, m.heads, m.mlp_ratio)

    def model_config(self) -> ModelConfig:
        return ModelConfig(arch=self.arch, image_size=self.image_size, patch_size=self.patch_size,
                           in_chans=self.in_chans, attn_impl="sdpa", width=self.width, depth=self.depth,
                           heads=self.heads, mlp_ratio=self.mlp_ratio)

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
    # Provenance for exports and model cards: the licence of weights derived from the
    # official I-JEPA checkpoints (OFFICIAL_LICENCE), the training run they come from.
    licence: str | None = None
    run_dir: str | None = None


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


@dataclass(frozen=True)
class EncoderShape:
    """What an encoder state dict's tensor shapes say of its architecture. The head count
    is not among them: it comes from a config, a sidecar or a named size."""

    width: int
    depth: int
    mlp_hidden: int | None  # None when the weights have no block
    patch_size: int
    in_chans: int
    image_size: int

    def named_arch(self) -> str | None:
        """The named size with this width, depth and MLP width, if any."""
        for arch, size in VIT_SIZES.items():
            if (size.embed_dim, size.depth) == (self.width, self.depth) and self.mlp_hidden in (None, size.mlp_hidden_dim):
                return arch
        return None

    def describe(self) -> str:
        return (f"width {self.width}, depth {self.depth}, MLP {self.mlp_hidden}, patch {self.patch_size}, "
                f"{self.image_size} px, {self.in_chans} channels")


def encoder_shape(shapes: Mapping[str, Sequence[int]]) -> EncoderShape:
    """The :class:`EncoderShape` of encoder parameter shapes in our names."""
    for needed in ("patch_embed.proj.weight", "pos_embed"):
        if needed not in shapes:
            raise WeightsError(
                f"no {needed!r} among the weights' {len(shapes)} entries (first: {sorted(shapes)[:3]}): "
                "this is not a ViT encoder state dict"
            )
    dim, in_chans, patch, _ = shapes["patch_embed.proj.weight"]
    grid = int(round(shapes["pos_embed"][-2] ** 0.5))
    depth = len({int(m.group(1)) for k in shapes if (m := _BLOCK_KEY.match(k))})
    hidden = shapes.get("blocks.0.mlp.fc1.weight", (None,))[0]
    return EncoderShape(int(dim), depth, None if hidden is None else int(hidden), int(patch), int(in_chans),
                        grid * int(patch))


def infer_spec(shapes: Mapping[str, Sequence[int]], *, mean=IMAGENET_MEAN, std=IMAGENET_STD,
               model: Mapping[str, Any] | None = None) -> EncoderSpec:
    """Architecture, patch size and input size from encoder parameter shapes (our names).

    ``model``: the run's ``model`` config section or an export's sidecar, when known; with
    ``arch: custom`` it supplies the shape (checked against the weights)."""
    shape = encoder_shape(shapes)
    dim, depth, hidden = shape.width, shape.depth, shape.mlp_hidden
    common = (shape.image_size, shape.patch_size, shape.in_chans, tuple(mean), tuple(std))
    if model and model.get("arch") == "custom":
        custom = EncoderSpec("custom", *common, int(model["width"]), int(model["depth"]), int(model["heads"]),
                             float(model.get("mlp_ratio", 4.0)))
        size = model_size(custom.model_config())
        if (size.embed_dim, size.depth) != (dim, depth) or hidden not in (None, size.mlp_hidden_dim):
            raise WeightsError(f"the weights (width {dim}, depth {depth}, MLP {hidden}) are not the custom shape "
                               f"their config names ({size})")
        return custom
    arch = shape.named_arch()
    if arch is not None:
        return EncoderSpec(arch, *common)
    raise WeightsError(
        f"no known architecture has width {dim}, depth {depth} and MLP width {hidden}; known: "
        + ", ".join(f"{a} ({s.embed_dim}x{s.depth})" for a, s in VIT_SIZES.items())
        + ". A model.arch=custom encoder loads from its run directory, checkpoint or export (with its .json sidecar), "
        "which name its head count"
    )


def spec_with_heads(shapes: Mapping[str, Sequence[int]], heads: int, *, mean=IMAGENET_MEAN,
                    std=IMAGENET_STD) -> EncoderSpec:
    """The spec of encoder weights whose head count a config names (a Hugging Face or timm
    config, a sidecar): the named size when its head count agrees, else a custom shape."""
    shape = encoder_shape(shapes)
    arch = shape.named_arch()
    if arch is not None and VIT_SIZES[arch].num_heads == heads:
        return infer_spec(shapes, mean=mean, std=std)
    hidden = shape.mlp_hidden or 4 * shape.width
    model = {"arch": "custom", "width": shape.width, "depth": shape.depth, "heads": heads,
             "mlp_ratio": hidden / shape.width}
    return infer_spec(shapes, mean=mean, std=std, model=model)


def check_fits(weights: EncoderWeights) -> None:
    """Names and shapes of ``weights`` against the model of its spec (built on the meta
    device: no memory, no init); ``pos_embed`` may be absent (a fixed table)."""
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
