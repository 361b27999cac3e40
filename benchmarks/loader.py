"""Loader throughput: images/s of JPEG decode + RandomResizedCrop per CPU core, and of the
WebDataset training pipeline (tar reading, shuffle, decode, crop, masks, batching) for
several worker counts; how many CPU cores one GPU needs at a given train-step rate.

Data: shards of real photos. By default the RGB photos that scikit-image ships (offline),
each cut into ``--crops`` random crops (50-100% of the side) and scaled to at most
``--max-side`` pixels (500: ImageNet's photos are mostly 500 px on the long side; 0 keeps
the originals, up to 1411x1411), saved as JPEG at ``--quality``, written with
``scalejepa.data.writer.build_shards`` and cached. ``--shards DIR`` measures your own
shards instead (e.g. ImageNet's).

Measured:
- ``decode``: one process, one thread, samples already in memory: images/s (per CPU-second
  of the process, and per wall-clock second, which a loaded CPU lowers) of
  ``decode_random_crop`` with a full decode (``pillow_full``), with Pillow's JPEG draft mode
  (``pillow_draft``: DCT-domain downscaling to the smallest 1/2, 1/4, 1/8 scale that still
  covers the crop, the pipeline's default) and, if installed, ``simplejpeg`` (libjpeg-turbo
  with the same DCT scaling, then the same Pillow resize).
- ``pipeline``: ``scalejepa.data.pipeline.ShardStreams`` in a torch ``DataLoader`` exactly as
  ``TrainLoader`` builds it, for each of ``--workers``; after ``--warmup-batches``, the rate
  over ``--batches`` batches. Per-worker rate = rate / workers. (Worker 0 = in the main process.)
- ``cores_per_gpu``: a GPU training at R images/s needs R / (per-core rate) cores, for the
  measured train-step rate (the newest ``train_step_*.json`` in ``--out-dir``, or
  ``--gpu-img-per-sec``) and two reference rates: the paper's 92.6 img/s per A100 (300 epochs
  in 1152 A100-hours) and the 600 img/s per H100 goal.

The CPU may be shared: the 1/5/15-minute load average before and after each measurement is
recorded, and with other work running the rates are lower bounds.

Commands::

    python benchmarks/loader.py                               # built-in photos, workers 1..cores
    python benchmarks/loader.py --workers 1,2,4,8,16 --batch 128
    python benchmarks/loader.py --shards /data/in1k-shards --workers 4,8,16
    python benchmarks/loader.py --smoke --out-dir /tmp/bench  # a quick check of the script

Needs webdataset for the pipeline part (the GPU image lacks it: carry its wheel, see
``benchmarks/gpu_suite.sh``); without it the decode part still runs and the pipeline part
records the import error. Writes ``loader_<UTC stamp>.json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import statistics
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import (  # noqa: E402
    RESULTS_DIR, ensure_importable, environment, latest_result, output_path, progress, provenance_line, pyplot,
    save_figure, write_report,
)

ensure_importable()

from scalejepa.data.transforms import decode_random_crop, random_resized_crop_box  # noqa: E402

PAPER_A100_IMG_S = 300 * 1_281_167 / (1152 * 3600)  # 92.7: 300 epochs in 1152 A100-hours
GOAL_H100_IMG_S = 600.0
SHARD_RECIPE_VERSION = 1


# ----------------------------------------------------------------------------- shards
def photo_shards(cache: Path, crops: int, max_side: int, quality: int, seed: int = 0) -> Path:
    """Shards of the RGB scikit-image photos (``crops`` random crops of each), cached."""
    from PIL import Image

    from scalejepa.data.builtin import builtin_records
    from scalejepa.data.writer import build_shards

    out = cache / f"skimage-rgb-c{crops}-s{max_side}-q{quality}-v{SHARD_RECIPE_VERSION}"
    if (out / "index.json").is_file():
        return out
    records, _ = builtin_records("skimage-photos", "all")
    rng = np.random.default_rng(seed)
    folder = cache / f".{out.name}.src-{os.getpid()}"
    for record in records:
        image = Image.open(io.BytesIO(record.image)) if isinstance(record.image, bytes) else record.image
        if image.mode != "RGB":  # ImageNet is (almost) all colour; grayscale decodes ~3x faster
            continue
        image.load()
        (folder / record.key).mkdir(parents=True, exist_ok=True)
        for k in range(crops):
            w, h = image.size
            f = 1.0 if k == 0 else rng.uniform(0.5, 1.0)
            cw, ch = max(1, round(w * f)), max(1, round(h * f))
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            crop = image.crop((left, top, left + cw, top + ch))
            if max_side and max(crop.size) > max_side:
                s = max_side / max(crop.size)
                crop = crop.resize((max(1, round(cw * s)), max(1, round(ch * s))), Image.Resampling.LANCZOS)
            crop.save(folder / record.key / f"{k:03d}.jpg", quality=quality)
    try:
        build_shards(folder, out, shard_size=64, seed=seed, prefix="photos", workers=1, overwrite=True)
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    return out


def read_samples(urls: list[str], limit: int = 4096) -> list[bytes]:
    """JPEG bytes of the shards' images (tarfile only: no webdataset needed)."""
    out = []
    for url in urls:
        with tarfile.open(url) as tar:
            for member in tar:
                if member.name.lower().endswith((".jpg", ".jpeg")):
                    out.append(tar.extractfile(member).read())
                    if len(out) >= limit:
                        return out
    return out


def image_stats(samples: list[bytes]) -> dict:
    from PIL import Image

    sizes = [Image.open(io.BytesIO(s)).size for s in samples]
    modes = [Image.open(io.BytesIO(s)).mode for s in samples]
    pixels = [w * h for w, h in sizes]
    return {"images": len(samples), "mean_width": statistics.fmean(w for w, _ in sizes),
            "mean_height": statistics.fmean(h for _, h in sizes), "mean_megapixels": statistics.fmean(pixels) / 1e6,
            "max_side": max(max(s) for s in sizes), "min_side": min(min(s) for s in sizes),
            "mean_kib": statistics.fmean(len(s) for s in samples) / 1024,
            "modes": {m: modes.count(m) for m in sorted(set(modes))}}


# ----------------------------------------------------------------------------- decoders
def decode_simplejpeg(data: bytes, size: int, scale, rng: np.random.Generator) -> np.ndarray:
    """Same crop as ``decode_random_crop(draft=True)``, decoded by simplejpeg (libjpeg-turbo,
    DCT scaling to the smallest size that covers the crop), resized by Pillow."""
    import simplejpeg
    from PIL import Image

    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    left, top, w, h = random_resized_crop_box(width, height, scale, rng)
    arr = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=math.ceil(height * size / h),
                                 min_width=math.ceil(width * size / w))
    sy, sx = arr.shape[0] / height, arr.shape[1] / width
    image = Image.fromarray(arr).resize((size, size), Image.Resampling.BILINEAR,
                                        box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))
    return np.asarray(image)


def decoders() -> dict:
    out = {
        "pillow_full": lambda d, size, scale, rng: decode_random_crop(d, size, scale, rng, draft=False),
        "pillow_draft": lambda d, size, scale, rng: decode_random_crop(d, size, scale, rng, draft=True),
    }
    try:
        import simplejpeg  # noqa: F401
    except ImportError as exc:
        out["simplejpeg"] = f"not installed ({exc}); pip install simplejpeg to compare"
    else:
        out["simplejpeg"] = decode_simplejpeg
    return out


def loadavg() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def measure_decode(samples: list[bytes], fn, size: int, scale, seconds: float, min_images: int) -> dict:
    """Single-thread images/s over the in-memory samples, for at least ``seconds``."""
    rng = np.random.default_rng(0)
    before = loadavg()
    for data in samples[:4]:  # warm-up (imports, first allocations)
        fn(data, size, scale, rng)
    times, n, start = [], 0, time.perf_counter()
    cpu0 = time.process_time()
    while n < min_images or time.perf_counter() - start < seconds:
        data = samples[n % len(samples)]
        t0 = time.perf_counter()
        out = fn(data, size, scale, rng)
        times.append(time.perf_counter() - t0)
        n += 1
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    return {"images": n, "wall_s": wall, "cpu_s": cpu, "img_s_per_core": n / wall,
            "img_s_per_cpu_second": n / cpu if cpu > 0 else None,
            "ms_per_image_median": statistics.median(times) * 1e3, "loadavg_before": before, "loadavg_after": loadavg()}


def measure_pipeline(urls: list[str], workers: int, args) -> dict:
    """ShardStreams in a DataLoader, as TrainLoader builds it; images/s after warm-up."""
    from torch.utils.data import DataLoader

    from scalejepa.config import MaskConfig
    from scalejepa.data.pipeline import ShardStreams
    from scalejepa.masks import MaskGenerator

    grid = args.image_size // args.patch_size
    dataset = ShardStreams(urls, batch_size=args.batch, image_size=args.image_size, crop_scale=(0.3, 1.0),
                           mask_generator=MaskGenerator(grid, MaskConfig()), seed=0, rank=0,
                           num_streams=max(1, workers), shuffle_buffer=args.shuffle_buffer, jpeg_draft=True)
    loader = DataLoader(dataset, batch_size=None, num_workers=workers,
                        prefetch_factor=4 if workers else None, persistent_workers=False)
    before = loadavg()
    it = iter(loader)
    t_start = time.perf_counter()
    for _ in range(args.warmup_batches):
        next(it)
    first = time.perf_counter() - t_start
    times = []
    start = time.perf_counter()
    for _ in range(args.batches):
        t0 = time.perf_counter()
        batch = next(it)
        times.append(time.perf_counter() - t0)
    wall = time.perf_counter() - start
    assert batch.images.shape == (args.batch, 3, args.image_size, args.image_size)
    del it, loader
    rate = args.batch * args.batches / wall
    return {"workers": workers, "batches": args.batches, "batch": args.batch, "wall_s": wall,
            "img_s": rate, "img_s_per_worker": rate / max(1, workers), "warmup_s": first,
            "batch_wait_ms_median": statistics.median(times) * 1e3,
            "loadavg_before": before, "loadavg_after": loadavg()}


# ----------------------------------------------------------------------------- report
def train_step_rate(args) -> tuple[float | None, str | None]:
    if args.gpu_img_per_sec:
        return args.gpu_img_per_sec, "--gpu-img-per-sec"
    path = latest_result(args.out_dir, "train_step")
    if path is None:
        return None, None
    import json

    data = json.loads(path.read_text())
    best = data.get("headline", {})
    if not best.get("img_s_per_gpu"):
        return None, None
    return best["img_s_per_gpu"], f"{path.name}: {best['best_variant']} on {data['env']['device']}"


def cores_needed(results: dict, args) -> dict:
    decode = {k: v for k, v in results["decode"].items() if isinstance(v, dict) and "img_s_per_core" in v}
    # Per core = images per CPU-second of the decoding process: wall-clock rates on a shared,
    # loaded CPU include the time the process waited for a core.
    per_core = {f"decode:{k}": v["img_s_per_cpu_second"] or v["img_s_per_core"] for k, v in decode.items()}
    one_worker = [p for p in results["pipeline"] if p.get("workers") == 1 and "img_s" in p]
    if one_worker:
        per_core["pipeline:1 worker"] = one_worker[0]["img_s"]
    rates = {"paper_a100_92.7": PAPER_A100_IMG_S, "goal_h100_600": GOAL_H100_IMG_S}
    rate, source = train_step_rate(args)
    if rate:
        rates["measured_train_step"] = rate
    return {"gpu_rates_img_s": rates, "measured_train_step_source": source, "per_core_img_s": per_core,
            "cores": {r: {k: rate_ / v for k, v in per_core.items()} for r, rate_ in rates.items()}}


def markdown(results: dict) -> str:
    s, st = results["settings"], results["image_stats"]
    lines = [f"# Loader benchmark: {s['image_size']}px crops, batch {s['batch']}",
             "",
             provenance_line(results),
             "",
             f"Data: {results['data']}: {st['images']} images, mean {st['mean_width']:.0f}x{st['mean_height']:.0f} px "
             f"({st['mean_megapixels']:.2f} MP, {st['mean_kib']:.0f} KiB), modes {st['modes']}.",
             "", "| decode (1 thread) | img/s per CPU-second | img/s wall clock | ms/image (median) | load avg before |",
             "|---|---|---|---|---|"]
    for name, r in results["decode"].items():
        if isinstance(r, dict) and "img_s_per_core" in r:
            lines.append(f"| {name} | {r['img_s_per_cpu_second']:.1f} | {r['img_s_per_core']:.1f} | "
                         f"{r['ms_per_image_median']:.2f} | {r['loadavg_before']} |")
        else:
            lines.append(f"| {name} | | | | {r.get('error') if isinstance(r, dict) else r} |")
    lines += ["", "| pipeline workers | img/s | img/s per worker | batch wait ms | load avg before |", "|---|---|---|---|---|"]
    for p in results["pipeline"]:
        if "img_s" in p:
            lines.append(f"| {p['workers']} | {p['img_s']:.1f} | {p['img_s_per_worker']:.1f} | "
                         f"{p['batch_wait_ms_median']:.0f} | {p['loadavg_before']} |")
        else:
            lines.append(f"| {p.get('workers')} | | | | {p['error'][:150]} |")
    c = results["cores_per_gpu"]
    lines += ["", "Cores one GPU needs (GPU rate / per-core rate; decode: per CPU-second, pipeline: wall clock):", "",
              "| GPU rate | " + " | ".join(c["per_core_img_s"]) + " |",
              "|---|" + "---|" * len(c["per_core_img_s"])]
    for r, rate in c["gpu_rates_img_s"].items():
        lines.append(f"| {r} ({rate:.0f} img/s) | " + " | ".join(f"{v:.1f}" for v in c["cores"][r].values()) + " |")
    if c.get("measured_train_step_source"):
        lines += ["", f"measured train-step rate from {c['measured_train_step_source']}"]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> str | None:
    plt, reason = pyplot()
    if plt is None:
        return reason
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    dec = {k: v for k, v in results["decode"].items() if isinstance(v, dict) and "img_s_per_core" in v}
    x = range(len(dec))
    axes[0].bar([i - 0.2 for i in x], [v["img_s_per_cpu_second"] or 0 for v in dec.values()], 0.4,
                label="per CPU-second")
    axes[0].bar([i + 0.2 for i in x], [v["img_s_per_core"] for v in dec.values()], 0.4, label="wall clock")
    axes[0].set_xticks(list(x), list(dec))
    axes[0].legend(fontsize=8)
    axes[0].set_ylabel("images/s, one thread")
    axes[0].set_title("decode + RandomResizedCrop, 1 thread")
    pipe = [p for p in results["pipeline"] if "img_s" in p]
    if pipe:
        axes[1].plot([p["workers"] for p in pipe], [p["img_s"] for p in pipe], "o-", label="pipeline img/s")
        axes[1].set_xlabel("loader workers")
        axes[1].set_ylabel("images/s")
        axes[1].set_title("WebDataset pipeline (decode+crop+masks+batch)")
        axes[1].set_ylim(bottom=0)
        axes[1].legend()
    env = results["env"]
    save_figure(fig, path, f"{env['device']}, {env['date']}, load avg {env.get('loadavg_1_5_15min')}",
                smoke=results["smoke"], dpi=110)
    return None


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default="", help="shard spec (dir with index.json, ...); default: built-in photos")
    p.add_argument("--cache", type=Path, default=None, help="where the photo shards are built (default: cache)")
    p.add_argument("--crops", type=int, default=24, help="random crops per built-in photo")
    p.add_argument("--max-side", type=int, default=500, help="longest side of the built-in photos (0: original)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the built-in photos")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--patch-size", type=int, default=14)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--workers", default="", help="comma list of worker counts (default: 1, 2, 4, ... up to the cores)")
    p.add_argument("--batches", type=int, default=8, help="timed batches per worker count")
    p.add_argument("--warmup-batches", type=int, default=2)
    p.add_argument("--shuffle-buffer", type=int, default=256)
    p.add_argument("--decode-seconds", type=float, default=8.0, help="time per decode method")
    p.add_argument("--gpu-img-per-sec", type=float, default=None, help="train-step rate (default: newest result)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--smoke", action="store_true", help="tiny settings: checks the script in seconds")
    return p.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    if args.smoke:
        args.crops, args.max_side, args.batch, args.batches, args.warmup_batches = 1, 320, 8, 2, 1
        args.decode_seconds, args.shuffle_buffer = 0.2, 16
        args.workers = args.workers or "0,1"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = [int(w) for w in args.workers.split(",")] if args.workers else \
        sorted({w for w in (1, 2, 4, 8, 16, 32, 64) if w <= cores} | {cores})
    env = environment(torch.device("cpu"))
    progress(f"loader: {env['device']}, load average {env.get('loadavg_1_5_15min')}, workers {workers}")

    if args.shards:
        shards, data = args.shards, f"shards {args.shards}"
    else:
        from scalejepa.data.cache import default_cache_root

        cache = args.cache or default_cache_root().parent / "loader-bench"
        shards = str(photo_shards(cache, args.crops, args.max_side, args.quality))
        data = (f"scikit-image RGB photos, {args.crops} random crops each, longest side <= "
                f"{args.max_side or 'original'} px, JPEG quality {args.quality}")
    from scalejepa.data.cache import resolve_shards

    urls, _ = resolve_shards(shards)
    samples = read_samples(urls)
    progress(f"{len(samples)} images in {len(urls)} shards ({shards})")
    results = {"benchmark": "loader", "env": env, "smoke": args.smoke, "data": data, "shards": shards,
               "settings": {k: v for k, v in vars(args).items() if k not in ("out_dir", "cache")},
               "image_stats": image_stats(samples), "decode": {}, "pipeline": []}
    results["settings"]["workers"] = workers

    for name, fn in decoders().items():
        if isinstance(fn, str):
            results["decode"][name] = {"error": fn}
            progress(f"decode {name}: {fn}")
            continue
        r = measure_decode(samples, fn, args.image_size, (0.3, 1.0), args.decode_seconds,
                           min_images=4 if args.smoke else 50)
        results["decode"][name] = r
        progress(f"decode {name}: {r['img_s_per_core']:.1f} img/s per core ({r['ms_per_image_median']:.2f} ms median)"
                 f", load average {r['loadavg_before']}")
    for w in workers:
        try:
            r = measure_pipeline(urls, w, args)
        except Exception as exc:  # noqa: BLE001 - recorded (e.g. webdataset missing on the GPU image)
            r = {"workers": w, "error": f"{type(exc).__name__}: {exc}"[:1000]}
            progress(f"pipeline {w} workers: not measured ({r['error'][:200]})")
        else:
            progress(f"pipeline {w} workers: {r['img_s']:.1f} img/s ({r['img_s_per_worker']:.1f} per worker), "
                     f"load average {r['loadavg_before']}")
        results["pipeline"].append(r)
    results["cores_per_gpu"] = cores_needed(results, args)
    results["env"]["loadavg_end"] = loadavg()

    json_path = write_report(output_path(args.out_dir, "loader", env, args.smoke), results, markdown=markdown,
                             plot=plot)
    progress(f"wrote {json_path}")
    print(markdown(results))
    return json_path


if __name__ == "__main__":
    main()
