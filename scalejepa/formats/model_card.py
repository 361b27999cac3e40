"""The model card (``README.md``) of an exported encoder: what it is, how it was trained,
how well it probes, which encoder it is, its licence, and how to load it."""

from __future__ import annotations

from typing import Any

from scalejepa.eval.spec import OFFICIAL_LICENCE, EncoderWeights
from scalejepa.models.vit import VitSize

LIBRARY = {"hf": "transformers", "timm": "timm", "safetensors": "scalejepa", "pt": "scalejepa"}
_ENCODER = {
    "target": "the target encoder (the EMA of the context encoder; what the I-JEPA paper evaluates)",
    "encoder": "the context encoder (the one trained by gradient; the published transformers and timm I-JEPA "
               "weights are this one)",
}
_USAGE = {
    "hf": ("python", 'from transformers import AutoImageProcessor, IJepaModel\n\n'
                     'processor = AutoImageProcessor.from_pretrained("{dir}")\n'
                     'model = IJepaModel.from_pretrained("{dir}")\n'
                     'features = model(**processor(images, return_tensors="pt")).last_hidden_state.mean(1)'),
    "timm": ("python", 'import timm\n\n'
                       'model = timm.create_model("local-dir:{dir}", pretrained=True)\n'
                       'transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))\n'
                       'features = model(transform(image).unsqueeze(0))  # average-pooled patch tokens'),
    "safetensors": ("python", 'import torch\n\n'
                              'encoder = torch.hub.load("path/to/scalejepa", "encoder", weights="{dir}", source="local")\n'
                              'features = encoder.forward_pooled(images)  # average-pooled patch tokens'),
}
_USAGE["pt"] = _USAGE["safetensors"]


def licence_lines(licence: str | None) -> tuple[str, str]:
    """(front-matter value, sentence for the card)."""
    if licence == OFFICIAL_LICENCE:
        return licence, (f"{OFFICIAL_LICENCE.upper()}: these weights derive from the official I-JEPA checkpoints "
                         "(facebookresearch/ijepa), whose licence they carry (non-commercial use).")
    if licence:
        return licence, f"{licence}, as the weights they derive from."
    return "other", ("not set by scalejepa: the weights were trained from scratch, not derived from the official "
                     "I-JEPA checkpoints; choose a licence that the training data allows.")


def model_card(weights: EncoderWeights, sidecar: dict[str, Any], size: VitSize, fmt: str, folder: str) -> str:
    """The card's Markdown, from the weights and their sidecar (with its ``provenance``:
    :func:`scalejepa.export.provenance`)."""
    spec, entry, facts = weights.spec, sidecar["entry"], sidecar.get("provenance") or {}
    front_licence, licence_text = licence_lines(weights.licence)
    rows = [
        ("Architecture", f"{spec.arch}: width {size.embed_dim}, depth {size.depth}, {size.num_heads} heads, MLP "
                         f"{size.mlp_hidden_dim}, patch {spec.patch_size}, {spec.image_size} px, {spec.in_chans} "
                         f"channels ({sidecar['num_params'] / 1e6:.2f} M parameters)"),
        ("Encoder", _ENCODER[entry]),
        ("Source", f"`{weights.source}`"),
    ]
    if facts.get("preset"):
        rows.append(("Preset", f"`{facts['preset']}`"))
    if weights.step is not None:
        seen = (f", {facts['images_seen']:,} images seen (global batch {facts['global_batch']})"
                if facts.get("images_seen") else "")
        rows.append(("Training", f"step {weights.step:,}{seen}"))
    if facts.get("data"):
        rows.append(("Data", facts["data"]))
    rows += [("Input", f"resize the short side, centre crop {spec.image_size} px, normalise with mean "
                       f"{list(spec.mean)}, std {list(spec.std)}"),
             ("Licence", licence_text)]
    lines = ["---", f"license: {front_licence}", f"library_name: {LIBRARY[fmt]}",
             "tags: [i-jepa, self-supervised-learning, vision, image-feature-extraction, scalejepa]",
             "pipeline_tag: image-feature-extraction", "---", "",
             f"# I-JEPA {spec.arch} {'target' if entry == 'target' else 'context'} encoder", "",
             "Exported by `scalejepa-export` (format `{}`).".format(fmt), "", "| | |", "| --- | --- |"]
    lines += [f"| {name} | {text} |" for name, text in rows]
    if facts.get("probes"):
        lines += ["", "## Probe results (from the run's evaluation files)", "",
                  "| file | protocol | encoder | step | top-1 | random init top-1 | gain |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, probe in sorted(facts["probes"].items()):
            cells = [probe.get(k) for k in ("protocol", "entry", "step", "top1", "random_init_top1", "gain_top1")]
            lines.append(f"| {name} | " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    language, code = _USAGE[fmt]
    lines += ["", "## Use", "", f"```{language}", code.format(dir=folder), "```", ""]
    return "\n".join(lines)
