"""Learning curve: does pretraining add linearly decodable information, and when?

For each seed, a real ``scalejepa-train`` process pretrains ``--config`` with a checkpoint
every ``--probe-every`` steps. The random init (the run's seed: the exact weights its
target encoder started from, step 0) and every checkpoint's target encoder are then
probed on each labeled set, the paper's protocol: average-pooled patch tokens of each
block (normed with the final LayerNorm), weighted kNN (k = 20) and the default linear
probe of ``scalejepa.eval``. Alongside, the diagnostics of a failing run:

* ``position_share``: the fraction of the (layer-normed, as the targets are) token
  features' variance that the patch position alone explains, i.e. how much of each target
  a predictor could get right without looking at the context;
* ``token_std`` / ``token_rankme`` (collapse monitors on the last block's tokens) and the
  RankMe of the pooled features.

    python benchmarks/learning.py --config small_cpu --seeds 0 1 2 --probe-every 62

Labeled sets: ``mnist5k`` (built in) and, when the ``animal-mnist`` package is installed
(``pip install --no-deps animal-mnist``; its wheel ships the images), 5,000 of its
10,000 animal silhouettes (28x28, 10 classes), split 4,000 / 1,000 like mnist5k: a real
set no setting was tuned on. Writes ``benchmarks/results/learning_<stamp>.{json,png}``.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import io
import os
import pickle
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import _common

_common.ensure_importable()

from scalejepa.config import load_config  # noqa: E402
from scalejepa.data.builtin import split_indices  # noqa: E402
from scalejepa.data.cache import resolve_shards  # noqa: E402
from scalejepa.data.pipeline import normalize  # noqa: E402
from scalejepa.data.transforms import decode_center_crop  # noqa: E402
from scalejepa.eval.features import load_images  # noqa: E402
from scalejepa.eval.knn import HEADLINE_K, knn_classify  # noqa: E402
from scalejepa.eval.linear import linear_probe  # noqa: E402
from scalejepa.eval.monitors import collapse_metrics, position_share, rankme  # noqa: E402
from scalejepa.eval.weights import build_encoder_from, load_step_dir, random_encoder  # noqa: E402
from scalejepa.flops import expected_flops_per_image  # noqa: E402
from scalejepa.layout import RunDir, committed_step_dirs, step_of  # noqa: E402
from scalejepa.models.layers import Seqs  # noqa: E402

ANIMAL_PER_CLASS = 500  # of 1,000 per class: the size of mnist5k, so probes cost the same


# ----------------------------------------------------------------------------- labeled sets


def mnist5k(image_size: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {split: load_images(resolve_shards(f"builtin:mnist5k:{split}")[0], image_size)
            for split in ("train", "val")}


def animal_mnist(image_size: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """Animal-MNIST silhouettes from the installed package's data files (no network, and
    without importing its loader, which needs TensorFlow); None when not installed."""
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "Animal_MNIST"
    with gzip.open(folder / "animal_data_version_3.gz", "rb") as f:
        images = np.asarray(pickle.load(f), dtype=np.uint8)  # (10000, 28, 28); a pickle of the package's own
    with gzip.open(folder / "animal_label_version_3.gz", "rb") as f:
        labels = np.asarray(pickle.load(f), dtype=np.int64)
    keep = np.concatenate([np.flatnonzero(labels == c)[:ANIMAL_PER_CLASS] for c in np.unique(labels)])
    images, labels = images[keep], labels[keep]
    out = {}
    for split in ("train", "val"):
        idx = split_indices(labels, split)
        # The eval transform of every other set: encoded image -> resize + centre crop.
        decoded = [decode_center_crop(_png(images[i]), image_size) for i in idx]
        out[split] = (torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).contiguous(),
                      torch.from_numpy(labels[idx]))
    return out


def _png(gray: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(gray, mode="L").save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- features and probes


@torch.no_grad()
def block_tokens(encoder, images: torch.Tensor, mean, std, batch: int = 250) -> list[torch.Tensor]:
    """(N, num_patches, D) tokens of every block, each normed with the final LayerNorm
    (as ``forward_pooled`` does for the paper's last-4 protocol)."""
    per_block: list[list[torch.Tensor]] = [[] for _ in encoder.blocks]
    for start in range(0, images.shape[0], batch):
        x = normalize(images[start:start + batch], mean, std)
        b = x.shape[0]
        h = (encoder.patch_embed(x) + encoder.pos_embed).reshape(b * encoder.num_patches, -1)
        seqs = Seqs.uniform(b, encoder.num_patches, h.device)
        for i, block in enumerate(encoder.blocks):
            h = block(h, seqs)
            per_block[i].append(encoder.norm(h).view(b, encoder.num_patches, -1))
    return [torch.cat(t) for t in per_block]


def probe_encoder(encoder, spec, data: dict, probe_epochs: int | None, all_blocks: bool) -> dict:
    """kNN and linear top-1 on val and diagnostics on the val tokens, for the last block
    (or every block, ``all_blocks``)."""
    encoder.eval()
    (train_x, train_y), (val_x, val_y) = data["train"], data["val"]
    train_tokens = block_tokens(encoder, train_x, spec.mean, spec.std)
    val_tokens = block_tokens(encoder, val_x, spec.mean, spec.std)
    kwargs = {} if probe_epochs is None else {"epochs": probe_epochs}
    blocks = []
    first = 0 if all_blocks else len(train_tokens) - 1
    for b, (tr, va) in enumerate(zip(train_tokens[first:], val_tokens[first:]), start=first):
        ftr, fva = tr.mean(1), va.mean(1)
        knn = knn_classify(ftr, train_y, fva, val_y, ks=(HEADLINE_K,))[HEADLINE_K]["top1"]
        linear = linear_probe(ftr, train_y, fva, val_y, **kwargs)
        blocks.append({"block": b, "knn_top1": knn, "linear_top1": linear["top1"], "linear_best_lr": linear["best_lr"],
                       "position_share": round(float(position_share(va)), 4),
                       "pooled_rankme": round(float(rankme(fva)), 3)})
    last = F.layer_norm(val_tokens[-1], val_tokens[-1].shape[-1:]).reshape(-1, val_tokens[-1].shape[-1])
    monitors = collapse_metrics(last)
    return {"blocks": blocks, "knn_top1": blocks[-1]["knn_top1"], "linear_top1": blocks[-1]["linear_top1"],
            "token_std": round(monitors["feature_std"], 4), "token_rankme": round(monitors["rankme"], 3)}


# ----------------------------------------------------------------------------- training


def train_run(args, seed: int, run_dir: Path) -> float:
    """Pretrain one seed in its own process; returns the wall-clock seconds (0 if reused)."""
    if RunDir(run_dir).export.is_file():
        _common.progress(f"seed {seed}: reusing the finished run {run_dir}")
        return 0.0
    cmd = [sys.executable, "-m", "scalejepa.train", "--config", args.config, "--run-dir", str(run_dir),
           f"train.seed={seed}", f"checkpoint.interval={args.probe_every}", "checkpoint.keep=1000",
           *args.overrides]
    run_dir.mkdir(parents=True, exist_ok=True)
    _common.progress(f"seed {seed}: {' '.join(cmd[1:])}")
    start = time.monotonic()
    with open(run_dir / "train.log", "w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"training seed {seed} failed (exit {code}); see {run_dir / 'train.log'}")
    return time.monotonic() - start


def pixel_baseline(data: dict, mean, std) -> float:
    """Linear-probe top-1 on the normalised pixels of one channel (the images are gray):
    what a linear classifier gets with no encoder at all."""
    (train_x, train_y), (val_x, val_y) = data["train"], data["val"]
    flat = [normalize(x, mean, std)[:, 0].flatten(1) for x in (train_x, val_x)]
    return linear_probe(flat[0], train_y, flat[1], val_y)["top1"]


def learning_curve(args, seed: int, run_dir: Path, sets: dict, flops_per_step: float) -> list[dict]:
    checkpoints = committed_step_dirs(RunDir(run_dir).checkpoints)
    if not checkpoints:
        raise SystemExit(f"{run_dir} has no committed checkpoint")
    first = load_step_dir(checkpoints[0])
    points = [(0, random_encoder(first.spec, first.seed))]
    points += [(step_of(c), None) for c in checkpoints]
    curve = []
    for i, ((step, encoder), path) in enumerate(zip(points, [None, *checkpoints])):
        if encoder is None:
            encoder = build_encoder_from(load_step_dir(path))
        point = {"step": step, "train_flops": step * flops_per_step, "sets": {}}
        final = i == len(points) - 1
        all_blocks = i == 0 or final  # per-block probes at the ends only: they cost the most
        for name, data in sets.items():
            point["sets"][name] = probe_encoder(encoder, first.spec, data, args.probe_epochs, all_blocks)
            if step == 0:
                point["sets"][name]["pixels_linear_top1"] = pixel_baseline(data, first.spec.mean, first.spec.std)
            if final:  # the online (context) encoder, which the EMA target lags behind
                online = build_encoder_from(load_step_dir(path, "encoder"))
                point["sets"][name]["context_encoder"] = probe_encoder(online, first.spec, data, args.probe_epochs,
                                                                       False)
        summary = ", ".join(f"{n}: kNN {r['knn_top1']:.1f} linear {r['linear_top1']:.1f} "
                            f"pos-share {r['blocks'][-1]['position_share']:.2f}" for n, r in point["sets"].items())
        _common.progress(f"seed {seed} step {step}: {summary}")
        curve.append(point)
    return curve


# ----------------------------------------------------------------------------- report


def summarize(seeds: dict) -> dict:
    """Per set: final - random-init top-1 (last block) for every seed, and the best block."""
    out: dict[str, dict] = {}
    for seed, run in seeds.items():
        first, final = run["curve"][0], run["curve"][-1]
        for name, result in final["sets"].items():
            base = first["sets"][name]
            row = out.setdefault(name, {"linear_gain": {}, "knn_gain": {}, "linear": {}, "knn": {},
                                        "random_linear": {}, "random_knn": {}, "best_block_linear": {}})
            row["linear"][seed], row["random_linear"][seed] = result["linear_top1"], base["linear_top1"]
            row["knn"][seed], row["random_knn"][seed] = result["knn_top1"], base["knn_top1"]
            row["linear_gain"][seed] = round(result["linear_top1"] - base["linear_top1"], 2)
            row["knn_gain"][seed] = round(result["knn_top1"] - base["knn_top1"], 2)
            best = max(result["blocks"], key=lambda b: b["linear_top1"])
            row["best_block_linear"][seed] = {"block": best["block"], "linear_top1": best["linear_top1"]}
    for row in out.values():
        for key in ("linear_gain", "knn_gain"):
            row[f"min_{key}"] = min(row[key].values())
    return out


def plot(results: dict, path: Path) -> str | None:
    plt, why = _common.pyplot()
    if plt is None:
        return why
    sets = list(next(iter(results["seeds"].values()))["curve"][0]["sets"])
    fig, axes = plt.subplots(len(sets), 2, figsize=(11, 3.6 * len(sets)), squeeze=False)
    for row, name in zip(axes, sets):
        for ax, xkey, xlabel in ((row[0], "step", "training step"), (row[1], "train_flops", "training FLOPs")):
            for metric, colour in (("linear_top1", "tab:blue"), ("knn_top1", "tab:orange")):
                for i, run in enumerate(results["seeds"].values()):
                    xs = [p[xkey] for p in run["curve"]]
                    ys = [p["sets"][name][metric] for p in run["curve"]]
                    label = f"{metric.split('_')[0]} (pretrained)" if i == 0 else None
                    ax.plot(xs, ys, "-o", color=colour, ms=3, alpha=0.8, label=label)
                    ax.axhline(ys[0], color=colour, ls=":", alpha=0.6,
                               label=f"{metric.split('_')[0]} random init" if i == 0 else None)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{name} val top-1 (%)")
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=8)
    title = (f"{' '.join([results['config'], *results['overrides']])}: target encoder, last block, "
             f"seeds {', '.join(results['seeds'])}")
    fig.suptitle(textwrap.fill(title, 140), fontsize=9)  # long override lists would run off the figure
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="small_cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--probe-every", type=int, default=62, help="checkpoint (and probe) interval in steps")
    parser.add_argument("--probe-epochs", type=int, default=None, help="linear-probe epochs (default: the CLI's)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/learning"))
    parser.add_argument("--out-dir", type=Path, default=_common.RESULTS_DIR)
    parser.add_argument("--no-animal", action="store_true", help="probe on mnist5k only")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of the training config")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    config = load_config(args.config, list(args.overrides))
    flops_per_step = expected_flops_per_image(config, config.train.batch_size) * config.train.batch_size
    size = config.model.image_size
    sets = {"mnist5k": mnist5k(size)}
    animal = None if args.no_animal else animal_mnist(size)
    if animal is not None:
        sets["animal_mnist"] = animal
    elif not args.no_animal:
        _common.progress("animal-mnist is not installed (pip install --no-deps animal-mnist): mnist5k only")
    env = _common.environment(torch.device("cpu"))
    tag = "_".join([args.config, *(o.replace("=", "-") for o in args.overrides)])
    results = {"benchmark": "learning", "env": env, "config": args.config, "overrides": list(args.overrides),
               "probe_every": args.probe_every, "probe_epochs": args.probe_epochs,
               "flops_per_step": flops_per_step, "sets": {n: {s: len(d[s][1]) for s in d} for n, d in sets.items()},
               "seeds": {}}
    for seed in args.seeds:
        run_dir = args.runs_dir / f"{tag}_seed{seed}"
        train_s = train_run(args, seed, run_dir)
        curve = learning_curve(args, seed, run_dir, sets, flops_per_step)
        results["seeds"][str(seed)] = {"run_dir": str(run_dir), "train_seconds": round(train_s, 1), "curve": curve}
    results["summary"] = summarize(results["seeds"])
    results["env"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    path = _common.output_path(args.out_dir, "learning", env, smoke=False)
    _common.write_json(path, results)
    problem = plot(results, path.with_suffix(".png"))
    for name, row in results["summary"].items():
        print(f"{name}: linear gain per seed {row['linear_gain']}, kNN gain {row['knn_gain']}")
    print(f"wrote {path}" + (f" (no plot: {problem})" if problem else f" and {path.with_suffix('.png').name}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
