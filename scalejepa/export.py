"""``scalejepa-export``: one encoder (target by default) in the layout another library loads.

    scalejepa-export runs/vith14 --out vith14_target.pt                    # plain state dict
    scalejepa-export runs/vith14 --format hf --out hf/vith14               # transformers IJepaModel
    scalejepa-export runs/vith14 --format timm --out timm/vith14           # timm VisionTransformer
    scalejepa-export runs/vith14 --format safetensors --out st/vith14      # our names, safetensors
    scalejepa-export IN1K-vit.h.14-300e.pth.tar --format hf --out ijepa_h14  # reference I-JEPA

SOURCE: a run directory (newest committed checkpoint), a checkpoint step directory, an
export, or a reference I-JEPA checkpoint. ``--format pt`` with ``--out FILE.pt`` writes
``{name: tensor}`` in our (= the reference's, = timm's) parameter names and a JSON sidecar
(same path, ``.json``) with the architecture, input size, normalisation, source, step and
licence. Every other ``--out`` is a directory, written whole or not at all, with a model
card (``README.md``): ``pt`` (``model.pt`` + ``model.json``), ``safetensors``
(``model.safetensors``, the sidecar in its metadata), ``hf`` (``config.json``,
``model.safetensors``, ``preprocessor_config.json``: ``IJepaModel.from_pretrained(DIR)``)
or ``timm`` (``config.json``, ``model.safetensors``: ``timm.create_model("local-dir:DIR",
pretrained=True)``). Training checkpoints are read in this process alone (no process
group), loading only the encoder's tensors.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from scalejepa.config import preset_of
from scalejepa.eval.spec import SIDECAR_FORMAT, SIDECAR_VERSION, EncoderWeights, WeightsError
from scalejepa.eval.weights import load_weights, sidecar_path
from scalejepa.formats import CARD_FILE, PT_FILE
from scalejepa.formats.hf_dir import write_hf_dir
from scalejepa.formats.model_card import model_card
from scalejepa.formats.safetensors_file import WEIGHTS_FILE, save_safetensors
from scalejepa.formats.timm_dir import write_timm_dir
from scalejepa.io import atomic_torch_save, atomic_write_dir, atomic_write_text
from scalejepa.layout import RunDir
from scalejepa.models.vit import VitSize, model_size

FORMATS = ("pt", "safetensors", "hf", "timm")
EVAL_RESULTS_GLOB = "eval_*.json"  # what `make demo` and the README write into a run directory


def sidecar(weights: EncoderWeights, entry: str) -> dict:
    size = model_size(weights.spec.model_config())
    return {
        "format": SIDECAR_FORMAT,
        "format_version": SIDECAR_VERSION,
        **weights.spec.to_dict(),
        "embed_dim": size.embed_dim,
        "depth": size.depth,
        "num_heads": size.num_heads,
        "mlp_hidden_dim": size.mlp_hidden_dim,
        "entry": entry,
        "source": weights.source,
        "step": weights.step,
        "seed": weights.seed,
        "num_params": sum(v.numel() for k, v in weights.state_dict.items() if k != "pos_embed"),
        "licence": weights.licence,
        "run_dir": weights.run_dir,
    }


def _plain(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def write_export(weights: EncoderWeights, out: str | Path, entry: str = "target") -> tuple[Path, dict]:
    """Write ``weights`` to ``out`` and its sidecar next to it, each durably (training's
    final export and ``scalejepa-export --format pt`` both come through here)."""
    out = Path(out)
    meta = sidecar(weights, entry)
    atomic_torch_save(_plain(weights.state_dict), out)
    atomic_write_text(sidecar_path(out), json.dumps(meta, indent=1) + "\n")
    return out, meta


def _write_pt(folder: Path, weights: EncoderWeights, size: VitSize, meta: dict) -> None:
    torch.save(_plain(weights.state_dict), folder / PT_FILE)
    sidecar_path(folder / PT_FILE).write_text(json.dumps(meta, indent=1) + "\n")


def _write_safetensors(folder: Path, weights: EncoderWeights, size: VitSize, meta: dict) -> None:
    save_safetensors(weights.state_dict, folder / WEIGHTS_FILE, meta)


WRITERS = {"pt": _write_pt, "safetensors": _write_safetensors, "hf": write_hf_dir, "timm": write_timm_dir}


def provenance(weights: EncoderWeights) -> dict[str, Any]:
    """What the sidecar and the model card tell of the training run the weights come from:
    its preset, data, images seen and probe results (the run's eval_*.json)."""
    if not weights.run_dir:
        return {}
    run = RunDir(weights.run_dir)
    config = (yaml.safe_load(run.config.read_text()) or {}) if run.config.is_file() else {}
    data, batch = config.get("data") or {}, (config.get("train") or {}).get("batch_size")
    probes = {}
    for path in sorted(run.root.glob(EVAL_RESULTS_GLOB)):
        result = json.loads(path.read_text())
        probes[path.name] = {"protocol": result.get("protocol"), "entry": result.get("entry"),
                             "step": result.get("step"), "top1": result.get("top1"),
                             "random_init_top1": (result.get("random_init_baseline") or {}).get("top1"),
                             "gain_top1": result.get("gain_top1")}
    return {
        "preset": preset_of(run.config) if run.config.is_file() else None,
        "data": ("synthetic images (data.synthetic)" if data.get("synthetic") else data.get("shards")
                 or (f"built-in set {data['builtin']}" if data.get("builtin") else None)),
        "global_batch": batch,
        "images_seen": weights.step * batch if batch and weights.step is not None else None,
        "probes": probes,
    }


def export(source: str | Path, out: str | Path, fmt: str = "pt", entry: str = "target") -> tuple[Path, dict]:
    """Export the target (or context) encoder of ``source`` in ``fmt``; returns (path, sidecar).
    ``fmt`` pt with an ``out`` ending in ``.pt`` writes one file and its sidecar; every other
    export is a directory with a model card."""
    if fmt not in FORMATS:
        raise WeightsError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    weights = load_weights(source, entry)
    if fmt == "pt" and out.suffix == ".pt":
        return write_export(weights, out, entry)
    meta = {**sidecar(weights, entry), "provenance": provenance(weights)}
    size = model_size(weights.spec.model_config())
    card = model_card(weights, meta, size, fmt, str(out))

    def fill(folder: Path) -> None:
        WRITERS[fmt](folder, weights, size, meta)
        (folder / CARD_FILE).write_text(card)

    atomic_write_dir(out, fill)
    return out, meta


def export_encoder(source: str | Path, out: str | Path, entry: str = "target") -> tuple[Path, dict]:
    """The plain ``.pt`` export (``export(source, out, "pt", entry)``)."""
    return export(source, out, "pt", entry)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scalejepa-export",
        description="Export an encoder (target by default) as a plain state dict, safetensors, a Hugging Face "
                    "IJepaModel or a timm model.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[1],
    )
    parser.add_argument("source", help="run directory (newest committed checkpoint), checkpoint step directory, "
                                       "an export, or a reference I-JEPA checkpoint (.pth.tar)")
    parser.add_argument("--out", required=True, type=Path,
                        help="output directory, or FILE.pt with --format pt (the sidecar goes to FILE.json)")
    parser.add_argument("--format", choices=FORMATS, default="pt", help="layout of the export (default: pt)")
    parser.add_argument("--entry", choices=("target", "encoder"), default="target",
                        help="target encoder (default; what evaluations use) or context encoder")
    return parser


def _check_out(out: Path, fmt: str) -> str | None:
    if fmt == "pt" and out.suffix not in ("", ".pt"):
        return f"--out {out} should end in .pt (one file and its .json sidecar) or name a directory (no suffix)"
    if fmt != "pt" and out.suffix == ".pt":
        return f"--out {out}: --format {fmt} writes a directory, not a .pt file"
    return None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    problem = _check_out(args.out, args.format)
    if problem:
        print(f"scalejepa-export: error: {problem}", file=sys.stderr)
        return 2
    try:
        path, meta = export(args.source, args.out, args.format, args.entry)
    except (WeightsError, FileNotFoundError, FileExistsError) as exc:
        print(f"scalejepa-export: error: {exc}", file=sys.stderr)
        return 1
    print(f"exported {meta['arch']} {args.entry} encoder ({meta['num_params'] / 1e6:.1f}M parameters, "
          f"{meta['image_size']}px, patch {meta['patch_size']}) from {meta['source']} as {args.format}")
    if path.is_dir():
        print(f"  directory: {path} ({', '.join(sorted(p.name for p in path.iterdir()))})")
    else:
        print(f"  weights: {path}")
        print(f"  sidecar: {sidecar_path(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
