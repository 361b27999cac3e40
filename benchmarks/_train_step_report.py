"""The report of ``train_step.py``: the GPU-hours projection of a measured rate, the
comparisons between variants (speed-ups, headline, the benchmark issue's targets), the
Markdown table and the bar chart, and ``save``, which writes them all after every variant.

Projection: GPU-hours per epoch = images per epoch / (img/s per GPU) / 3600, and for the
preset's schedule (epochs x that). Compute only, perfect scaling: ``benchmarks/scaling.py``
adds communication for N GPUs. Compared with the paper's 16 A100s x 72 h = 1152 A100-hours
two ways: counting one hour of this GPU as one A100-hour, and normalised by the ratio of
dense bf16 peaks (i.e. assuming an A100 would run this code at the same MFU).
"""

from __future__ import annotations

from pathlib import Path

from _common import provenance_line, pyplot, save_figure, write_report

from scalejepa import flops
from scalejepa.config import Config

# Goals of the benchmark issue (H100, ViT-H/14, batch 128).
TARGETS = {"img_s_per_gpu_truncate": 600.0, "mfu_pct_truncate": 40.0, "speedup_vs_reference_baseline": 3.0}


def projection(config: Config, img_s: float, peak: float | None) -> dict:
    images_per_epoch = config.data.num_samples or flops.PAPER_IMAGES_PER_EPOCH
    per_epoch = flops.gpu_hours(images_per_epoch, img_s)
    schedule = per_epoch * config.train.epochs
    out = {
        "images_per_epoch": images_per_epoch,
        "images_per_epoch_source": "data.num_samples" if config.data.num_samples else
                                   "ImageNet-1k (the preset sets no data.num_samples)",
        "epochs": config.train.epochs,
        "gpu_hours_per_epoch": per_epoch,
        "gpu_hours_schedule": schedule,
        "paper_a100_hours": flops.PAPER_A100_HOURS,
        "paper_budget_over_ours_1to1": flops.PAPER_A100_HOURS / schedule,
        "assumption": "compute only at the measured single-GPU rate (no communication, perfect scaling); "
                      "'1to1' counts one hour of this GPU as one A100-hour; 'peak_normalised' converts our "
                      "GPU-hours to A100-hours by the ratio of dense bf16 peaks (an A100 at the same MFU)",
        "same_run_as_paper": (config.model.arch == "vit_huge" and config.model.patch_size == 14
                              and config.model.image_size == 224 and images_per_epoch == flops.PAPER_IMAGES_PER_EPOCH
                              and config.train.epochs == flops.PAPER_EPOCHS),
    }
    if peak:
        a100 = flops.peak_tflops_for_name("A100")
        out["a100_equivalent_hours_schedule"] = schedule * peak / a100
        out["paper_budget_over_ours_peak_normalised"] = flops.PAPER_A100_HOURS / out["a100_equivalent_hours_schedule"]
    return out


def compare(results: dict) -> None:
    by_name = {v["variant"]: v for v in results["variants"]}
    base = by_name.get("reference_baseline", {}).get("img_s_per_gpu")
    code = by_name.get("reference_code", {}).get("img_s_per_gpu")
    for v in results["variants"]:
        if "img_s_per_gpu" not in v:
            continue
        if base:
            v["speedup_vs_reference_baseline"] = v["img_s_per_gpu"] / base
        if code:
            v["speedup_vs_reference_code"] = v["img_s_per_gpu"] / code
    ours = [v for v in results["variants"] if "img_s_per_gpu" in v and not v["variant"].startswith("reference")]
    truncate = [v for v in ours if v["context"] == "truncate"]
    headline = {}
    if ours:
        best = max(ours, key=lambda v: v["img_s_per_gpu"])
        headline["best_variant"] = best["variant"]
        headline.update({k: best.get(k) for k in ("img_s_per_gpu", "mfu_pct", "tflops_per_gpu",
                                                   "speedup_vs_reference_baseline", "speedup_vs_reference_code")})
        headline["gpu_hours_schedule"] = best["projection"]["gpu_hours_schedule"]
        headline["paper_a100_hours"] = flops.PAPER_A100_HOURS
    if truncate:
        best_t = max(truncate, key=lambda v: v["img_s_per_gpu"])
        headline["best_truncate_variant"] = best_t["variant"]
        headline["best_truncate_img_s_per_gpu"] = best_t["img_s_per_gpu"]
    results["headline"] = headline
    targets = {}
    if truncate and results["env"]["device_type"] == "cuda":
        best_t = max(truncate, key=lambda v: v["img_s_per_gpu"])
        targets["img_s_per_gpu_truncate"] = dict(value=best_t["img_s_per_gpu"],
                                                 target_min=TARGETS["img_s_per_gpu_truncate"],
                                                 met=best_t["img_s_per_gpu"] >= TARGETS["img_s_per_gpu_truncate"])
        if best_t["mfu_pct"] is not None:
            targets["mfu_pct_truncate"] = dict(value=best_t["mfu_pct"], target_min=TARGETS["mfu_pct_truncate"],
                                               met=best_t["mfu_pct"] >= TARGETS["mfu_pct_truncate"])
        if best_t.get("speedup_vs_reference_baseline"):
            s = best_t["speedup_vs_reference_baseline"]
            targets["speedup_vs_reference_baseline"] = dict(value=s, target_min=TARGETS["speedup_vs_reference_baseline"],
                                                            met=s >= TARGETS["speedup_vs_reference_baseline"])
    results["targets"] = targets


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [f"# Train-step benchmark: {s['preset']} ({s['arch']}), batch {s['batch']} per GPU",
             "",
             provenance_line(results),
             "",
             f"{s['warmup']} warm-up + {s['steps']} timed steps, {results['data']}; img/s from the median step; "
             "FLOPs: model FLOPs (scalejepa.flops), MFU vs dense bf16 peak "
             f"({results['peak_tflops'] if results['peak_tflops'] else 'n/a'} TFLOP/s).",
             "",
             "| variant | img/s/GPU | step ms (p10-p90) | TFLOP/s | MFU % | GFLOP/img | ctx tok | peak GiB "
             "| GPU-h/epoch | GPU-h schedule | x ref. baseline | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(x, fmt):
        return "" if x is None else format(x, fmt)

    for v in results["variants"]:
        if "error" in v:
            lines.append(f"| {v['variant']} | | | | | | | | | | | not measured: "
                         f"{v['error'].splitlines()[0][:160].replace('|', '/')} |")
            continue
        p = v["projection"]
        lines.append(
            f"| {v['variant']} | {v['img_s_per_gpu']:.1f} | {v['step_ms_median']:.1f} ({v['step_ms_p10']:.1f}-"
            f"{v['step_ms_p90']:.1f}) | {v['tflops_per_gpu']:.2f} | {f(v['mfu_pct'], '.1f')} | "
            f"{v['gflops_per_image']:.1f} | {v['context_tokens_per_image']:.1f} | "
            f"{f(v.get('peak_memory_allocated_gib'), '.1f')} | {p['gpu_hours_per_epoch']:.3g} | "
            f"{p['gpu_hours_schedule']:.4g} | {f(v.get('speedup_vs_reference_baseline'), '.2f')} | "
            f"{v.get('note', '')} |")
    h = results.get("headline", {})
    if h.get("best_variant"):
        lines += ["", f"Best: **{h['best_variant']}**, {h['img_s_per_gpu']:.1f} img/s per GPU"
                  + (f", MFU {h['mfu_pct']:.1f}%" if h.get("mfu_pct") is not None else "")
                  + f"; {h['gpu_hours_schedule']:.4g} GPU-hours for the preset's schedule (compute only) vs the "
                  f"paper's {flops.PAPER_A100_HOURS:.0f} A100-hours (16 A100s x 72 h, ViT-H/14, 300 epochs)."]
    if results.get("targets"):
        lines += ["", "Targets: " + "; ".join(f"{k} {t['value']:.3g} (goal {t.get('target_min')}): "
                                              f"{'met' if t['met'] else 'not met'}"
                                              for k, t in results["targets"].items())]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> str | None:
    plt, reason = pyplot()
    if plt is None:
        return reason
    measured = [v for v in results["variants"] if "img_s_per_gpu" in v]
    if not measured:
        return "no variant was measured"
    names = [v["variant"] for v in measured]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = ["tab:gray" if n.startswith("reference") else "tab:blue" for n in names]
    axes[0].bar(range(len(names)), [v["img_s_per_gpu"] for v in measured], color=colors)
    axes[0].set_ylabel("images/s per GPU")
    axes[0].set_title("throughput (median step)")
    second = [v["mfu_pct"] for v in measured]
    if all(x is not None for x in second):
        axes[1].bar(range(len(names)), second, color=colors)
        axes[1].set_ylabel("MFU % (dense bf16 peak)")
        axes[1].set_title("model FLOPs utilisation")
    else:
        axes[1].bar(range(len(names)), [v["tflops_per_gpu"] for v in measured], color=colors)
        axes[1].set_ylabel("TFLOP/s (model FLOPs)")
        axes[1].set_title("achieved TFLOP/s")
    for ax in axes:
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    s, env = results["settings"], results["env"]
    save_figure(fig, path, f"{s['arch']} {s['preset']}, batch {s['batch']}: {env['device']}, {env['date']}",
                smoke=results["smoke"])
    return None


def save(results: dict, json_path: Path) -> None:
    """Comparisons, then the chart, the table and the JSON (after every variant)."""
    compare(results)
    write_report(json_path, results, markdown=markdown, plot=plot)
