"""``python -m scalejepa.sweep.probe knn|linear --weights RUN ...``: ``scalejepa.eval.cli``
for runs of any shape.

The evaluator reads an encoder's architecture off its weight shapes, matching the known
sizes; a custom shape (``model.arch=custom``) is made known here from the run's
config.yaml first (its head count cannot be read off the weights). Arguments and output
are the evaluator's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scalejepa.config import load_config
from scalejepa.eval import cli as eval_cli
from scalejepa.models.vit import custom_arch_name, model_size, register_size


def register_run_shape(run_dir: Path) -> str | None:
    """Register the custom shape of the run in ``run_dir``; its architecture name, or None."""
    config_path = Path(run_dir) / "config.yaml"
    if not config_path.is_file():
        return None
    model = load_config(str(config_path)).model
    if model.arch != "custom":
        return None
    size = model_size(model)
    name = custom_arch_name(size)
    register_size(name, size)
    return name


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--weights")
    known, _ = parser.parse_known_args(argv)
    if known.weights and Path(known.weights).is_dir():
        register_run_shape(Path(known.weights))
    return eval_cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
