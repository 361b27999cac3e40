"""``scalejepa-export``: one encoder as a plain state dict, plus a JSON sidecar.

    scalejepa-export runs/vith14 --out vith14_target.pt            # newest checkpoint
    scalejepa-export runs/vith14/checkpoints/step_00050000 --out t.pt
    scalejepa-export IN1K-vit.h.14-300e.pth.tar --out ijepa_h14.pt  # reference I-JEPA

The ``.pt`` holds ``{name: tensor}`` in our (= the reference's, = timm's) parameter
names with no wrapper prefixes; ``load_state_dict`` on a
``scalejepa.models.vit.VisionTransformer`` of the sidecar's architecture takes it as is.
The sidecar (same path, ``.json``) records the architecture, input size, normalisation,
source and step. Training checkpoints are read in this process alone (no process group),
loading only the encoder's tensors.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from scalejepa.eval.spec import SIDECAR_FORMAT, SIDECAR_VERSION, EncoderWeights, WeightsError
from scalejepa.eval.weights import load_weights, sidecar_path
from scalejepa.io import atomic_torch_save, atomic_write_text
from scalejepa.models.vit import model_size


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
    }


def write_export(weights: EncoderWeights, out: str | Path, entry: str = "target") -> tuple[Path, dict]:
    """Write ``weights`` to ``out`` and its sidecar next to it, each durably (training's
    final export and ``scalejepa-export`` both come through here)."""
    out = Path(out)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in weights.state_dict.items()}
    meta = sidecar(weights, entry)
    atomic_torch_save(state, out)
    atomic_write_text(sidecar_path(out), json.dumps(meta, indent=1) + "\n")
    return out, meta


def export_encoder(source: str | Path, out: str | Path, entry: str = "target") -> tuple[Path, dict]:
    """Export the target (or context) encoder of a run directory, checkpoint step
    directory or reference checkpoint; returns (path, sidecar)."""
    return write_export(load_weights(source, entry), out, entry)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scalejepa-export",
        description="Export an encoder (target by default) to a plain state dict + JSON sidecar.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[1],
    )
    parser.add_argument("source", help="run directory (newest committed checkpoint), checkpoint step directory, "
                                       "or a reference I-JEPA checkpoint (.pth.tar)")
    parser.add_argument("--out", required=True, type=Path, help="output .pt (the sidecar goes to the same name .json)")
    parser.add_argument("--entry", choices=("target", "encoder"), default="target",
                        help="target encoder (default; what evaluations use) or context encoder")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.out.suffix != ".pt":
        print(f"scalejepa-export: error: --out {args.out} should end in .pt (the sidecar takes .json)", file=sys.stderr)
        return 2
    try:
        path, meta = export_encoder(args.source, args.out, args.entry)
    except (WeightsError, FileNotFoundError) as exc:
        print(f"scalejepa-export: error: {exc}", file=sys.stderr)
        return 1
    print(f"exported {meta['arch']} {args.entry} encoder ({meta['num_params'] / 1e6:.1f}M parameters, "
          f"{meta['image_size']}px, patch {meta['patch_size']}) from {meta['source']}")
    print(f"  weights: {path}")
    print(f"  sidecar: {sidecar_path(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
