"""Report plots (matplotlib, Agg): quality bars with CI whiskers, quality vs latency (when measured), and
the learning curves of every trained model. One colour per model throughout; legends sit outside the axes."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"mostpop": "#8c8c8c", "student_alone": "#4c72b0", "teacher": "#c44e52", "student_distilled": "#55a868"}
CURVES = (("train_loss", "training loss"), ("valid_NDCG@10", "validation NDCG@10"),
          ("examples_per_second", "training examples/s"))


def color(name: str) -> str:
    return COLORS.get(name, "#8172b2")


def plot_report(report: dict, out: Path) -> None:
    models = report["models"]
    names = [n for n in models if "NDCG@10" in models[n]["metrics"]]   # the full-ranking models
    title = f"{report.get('dataset', 'data')} (split {report['split_hash'][:8]}) — {report['machine']}"

    fig, ax = plt.subplots(figsize=(7, 4))
    vals = [models[n]["metrics"]["NDCG@10"] for n in names]
    ci = [models[n].get("NDCG@10_ci95", [v, v]) for n, v in zip(names, vals)]
    errs = [[v - lo for v, (lo, _) in zip(vals, ci)], [hi - v for v, (_, hi) in zip(vals, ci)]]
    ax.bar([models[n]["label"] for n in names], vals, yerr=errs, capsize=4, color=[color(n) for n in names])
    ax.set_ylabel("NDCG@10 (test, full ranking)\nwhiskers: 95% bootstrap CI over users")
    _finish(fig, ax, title, out / "quality.png", legend=False)

    latency = {n: models[n]["latency_ms"]["p50"] for n in names if "latency_ms" in models[n]}
    if latency:  # absent from a quality-only report (bench.measure_cost false)
        fig, ax = plt.subplots(figsize=(7, 4))
        for n, lat in latency.items():
            ax.scatter(lat, models[n]["metrics"]["NDCG@10"], s=60, label=models[n]["label"], color=color(n))
        ax.set_xscale("log")
        ax.set_xlabel("latency per user at batch 1, p50 (ms, log scale)")
        ax.set_ylabel("NDCG@10 (test)")
        _finish(fig, ax, title, out / "quality_vs_latency.png")
    cold = [n for n in names if models[n].get("cold", {}).get("users")]
    if cold:  # only when some test targets were never seen in training
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.bar(cold, [models[n]["cold"]["HR@10"] for n in cold], color=[color(n) for n in cold])
        ax.set_ylabel(f"HR@10 on cold targets (test)\n{models[cold[0]]['cold']['users']} users, never in training")
        _finish(fig, ax, title, out / "cold.png", legend=False)
    plot_curves(models, title, out / "curves.png")


def plot_curves(models: dict, title: str, path: Path) -> None:
    """Per epoch: training loss, validation NDCG@10 and examples/s of each trained model (every seed)."""
    fig, axes = plt.subplots(1, len(CURVES), figsize=(12, 3.6))
    for name, m in models.items():
        for seed, curve in enumerate(m.get("curves", [])):
            epochs = [c["epoch"] for c in curve]
            for ax, (key, _) in zip(axes, CURVES):
                ax.plot(epochs, [c.get(key, float("nan")) for c in curve], marker=".", color=color(name),
                        alpha=1.0 if seed == 0 else 0.4, label=m["label"] if seed == 0 else None)
    for ax, (_, label) in zip(axes, CURVES):
        ax.set_xlabel("epoch")
        ax.set_title(label, fontsize=9)
    axes[-1].set_yscale("log")
    fig.suptitle(title + " (faint: other seeds)", fontsize=9)
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=max(len(labels), 1), frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _finish(fig, ax, title: str, path: Path, legend: bool = True) -> None:
    ax.set_title(title, fontsize=9)
    if legend:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
