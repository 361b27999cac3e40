"""torch.hub entry points of scalejepa: its I-JEPA ViT encoders, by preset or from weights.

    import torch
    encoder = torch.hub.load("path/to/scalejepa", "encoder", weights="exports/vith14_hf", source="local")
    encoder = torch.hub.load("path/to/scalejepa", "encoder", preset="vit_h14_in1k_ep300", source="local")
    features = encoder.forward_pooled(images)  # average-pooled patch tokens (B, D)

``weights``: anything ``scalejepa-eval --weights`` reads (a run or checkpoint directory, an
export of any ``scalejepa-export`` format, a Hugging Face IJepaModel or timm directory, a
reference I-JEPA checkpoint). ``preset``: a config name or YAML file; the encoder is then
randomly initialised from its ``train.seed``, as that run starts.
"""

from scalejepa.config import load_config
from scalejepa.eval.spec import EncoderSpec
from scalejepa.eval.weights import build_encoder_from, load_weights, random_encoder

dependencies = ["torch", "yaml", "numpy"]


def encoder(preset: str | None = None, weights: str | None = None, entry: str = "target"):
    """An I-JEPA ViT encoder (``scalejepa.models.vit.VisionTransformer``) in eval mode."""
    if (preset is None) == (weights is None):
        raise ValueError("give one of preset= (a random init of that config's encoder) or weights= (trained weights)")
    if weights is not None:
        return build_encoder_from(load_weights(weights, entry))
    config = load_config(preset)
    return random_encoder(EncoderSpec.from_config(config), seed=config.train.seed)
