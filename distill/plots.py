"""Report plots (matplotlib, Agg): quality bars with CI whiskers, quality vs latency (when measured)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_report(report: dict, out: Path) -> None:
    models = report["models"]
    names = list(models)
    title = f"{report.get('dataset', 'data')} (split {report['split_hash'][:8]}) — {report['machine']}"

    fig, ax = plt.subplots(figsize=(7, 4))
    vals = [models[n]["metrics"]["NDCG@10"] for n in names]
    ci = [models[n].get("NDCG@10_ci95", [v, v]) for n, v in zip(names, vals)]
    errs = [[v - lo for v, (lo, _) in zip(vals, ci)], [hi - v for v, (_, hi) in zip(vals, ci)]]
    ax.bar(names, vals, yerr=errs, capsize=4, color=["#999", "#4c72b0", "#c44e52", "#55a868"][: len(names)],
           label="test NDCG@10 (95% bootstrap CI over users)")
    ax.set_ylabel("NDCG@10 (test, full ranking)")
    _finish(fig, ax, title, out / "quality.png")

    latency = {n: models[n]["latency_ms"]["p50"] for n in names if "latency_ms" in models[n]}
    if not latency:  # a quality-only report (bench.measure_cost false)
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for n, lat in latency.items():
        ax.scatter(lat, models[n]["metrics"]["NDCG@10"], s=60, label=n)
    ax.set_xscale("log")
    ax.set_xlabel("latency per user at batch 1, p50 (ms, log scale)")
    ax.set_ylabel("NDCG@10 (test)")
    _finish(fig, ax, title, out / "quality_vs_latency.png")


def _finish(fig, ax, title: str, path: Path) -> None:
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
