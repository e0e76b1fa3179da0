"""`anyo bench`: the teacher-vs-student report (Markdown, JSON, PNG plots).

Quality comes from each model's metrics.json and per-user test ranks (written by
its training stage through the shared harness); cost is measured here, on this
machine, for each model: parameters, checkpoint size, peak RSS while serving,
latency per user at batch 1 (p50/p95, search included, loading excluded), a
throughput sweep over batch sizes on the same users for every model, and FLOPs per
user from each model's shapes (distill.serving). Comparisons of per-user NDCG@10 use
a three-level bootstrap over teachers, student seeds and users (distill.stats), seeds paired by id;
`llm_vs_cf_teacher` sets the LLM teacher's distilled students against those of the CF-only control
(distill.stages.cf_control). Models are keyed by their name in distill.runs.MODELS and shown by label.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np

from distill.artifacts import atomic_dir, check_sealed_folder, folder_files, write_record
from distill.config import Recipe
from distill.data import Split, load_split
from distill.errors import ArtifactError
from distill.harness import BUCKET_NAMES
from distill.plots import plot_report
from distill.runs import CF_DISTILLED, EXTERNAL, MODELS, current_records, llara_inputs
from distill.serving import measure_costs
from distill.stats import levels, mean_ci, ndcg_per_user, nested_bootstrap

HEADLINE = ("HR@1", "HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20", "MRR@10", "Coverage@10", "ARP@10")


def collect_quality(run: Path, recipe: Recipe, split: Split) -> dict:
    """Per model (by name): mean/std metrics over its current seeds (and teachers), curves, per-user test
    NDCG@10 keyed by (teacher seed, student seed) for the bootstrap (distill.stats.levels); seeds built
    from other inputs are left out and listed as stale."""
    models, per_user, missing, stale = {}, {}, [], []
    for name, entry in MODELS.items():
        found, old = current_records(run, recipe, split, name)
        stale += [str(d.relative_to(run)) for d in old]
        if not found:
            missing.append(name)
            continue
        dirs, records = [d for d, _, _ in found], [r for _, r, _ in found]
        keys = list(records[0]["metrics"])
        metrics = {k: float(np.mean([r["metrics"][k] for r in records])) for k in keys}
        metrics["HR@1(candidates)"] = float(np.mean([r["candidates"]["HR@1"] for r in records]))
        std = {k: float(np.std([r["metrics"][k] for r in records])) for k in keys}
        buckets = [b for b in BUCKET_NAMES if all(b in r.get("by_popularity", {}) for r in records)]
        models[name] = {"label": entry.label, "metrics": metrics, "metrics_std": std, "seeds": len(records),
                               "by_popularity": {b: {"users": records[0]["by_popularity"][b]["users"], **{
                                   k: float(np.mean([r["by_popularity"][b][k] for r in records]))
                                   for k in ("HR@10", "NDCG@10")}} for b in buckets},
                               "cold": cold_means(records),
                               "dirs": [str(d) for d in dirs], "curves": [r["curve"] for r in records if "curve" in r]}
        if entry.per_teacher:
            teachers = sorted({t for _, _, t in found})
            models[name]["teachers"] = len(teachers)
            models[name]["NDCG@10_by_teacher"] = {str(t): float(np.mean(
                [r["metrics"]["NDCG@10"] for _, r, tt in found if tt == t])) for t in teachers}
        rows = [(t if entry.per_teacher else None, r.get("seed") if entry.seeded else None,
                 ndcg_per_user(np.load(d / "test_ranks.npy", allow_pickle=False)))
                for d, r, t in found if (d / "test_ranks.npy").is_file()]
        if rows:
            per_user[name] = levels(rows)
            models[name]["NDCG@10_ci95"] = mean_ci(np.mean([v for _, _, v in rows], axis=0))
    if (generative := generative_row(run, recipe, split)) is not None:
        models["llara"] = generative
    return {"models": models, "per_user": per_user, "missing": missing, "stale": stale}


COMPARISONS = {  # key: (A, B), A minus B on per-user test NDCG@10
    "distilled_vs_alone": ("student_distilled", "student_alone"),
    "distilled_vs_teacher": ("student_distilled", "teacher"),
    "llm_vs_cf_teacher": ("student_distilled", CF_DISTILLED),
    "cf_teacher_vs_alone": (CF_DISTILLED, "student_alone"),
    "distilled_vs_external_teacher": ("student_distilled", EXTERNAL),
}


def comparisons(per_user: dict) -> dict:
    """Each comparison whose two models the run holds, with its three-level bootstrap (distill.stats)."""
    return {key: {"a": a, "b": b, "NDCG@10": nested_bootstrap(per_user[a], per_user[b])}
            for key, (a, b) in COMPARISONS.items() if a in per_user and b in per_user}


COLD_KEYS = ("HR@1", "HR@10", "NDCG@10", "MRR@10")


def cold_means(records: list[dict]) -> dict:
    """The seed-mean metrics of the test users whose target was never seen in training ({"users": 0}: none)."""
    cold = [r.get("cold", r.get("by_popularity", {}).get("unseen", {"users": 0})) for r in records]
    if not cold[0]["users"]:
        return {"users": 0}
    return {"users": cold[0]["users"], **{k: float(np.mean([c[k] for c in cold])) for k in COLD_KEYS if k in cold[0]}}


def generative_row(run: Path, recipe: Recipe, split: Split) -> dict | None:
    """RUN/llara's candidate metrics, when it was built from this run's inputs. It answers among the 20
    candidates only, so it has no full-ranking metrics and no retriever-protocol cost (its cost against
    the dense teacher is benchmarks/seed_claims.py's)."""
    path = run / "llara" / "metrics.json"
    if not path.is_file():
        return None
    try:
        record = check_sealed_folder(path)        # an edited record is never a result
    except ArtifactError:
        return None
    if record.get("inputs") != llara_inputs(recipe, run, split, record.get("seed", recipe.seed)):
        return None
    c = record["candidates"]
    return {"label": "generative (LLaRA-style)", "metrics": {"HR@1(candidates)": c["HR@1"], "ValidRatio": c["ValidRatio"]},
            "metrics_std": {}, "seeds": 1, "full_ranking": "not applicable: generates a title among 20 candidates",
            "examples_per_second": record.get("examples_per_second"),
            "test_users_per_second": record.get("test_users_per_second")}


def write_report(run: Path, recipe: Recipe, out: Path, inputs: dict) -> dict:
    run, out = Path(run), Path(out)
    split = load_split(run / "split")
    q = collect_quality(run, recipe, split)
    models = q["models"]
    if recipe.bench.measure_cost:
        costs = measure_costs(run, split, [name for name in models if name in MODELS and MODELS[name].cost],
                              recipe.bench, recipe.eval.mask_history)
        for name, m in models.items():
            m.update(costs.get(name, {}))
    report = {"split_hash": split.hash, "dataset": Path(split.manifest["inputs"]["inter"]).stem, "machine": machine(),
              "models": models, "comparisons": comparisons(q["per_user"]), "cost_ratios": cost_ratios(models),
              "missing": q["missing"], "stale": q["stale"], "inputs": inputs}
    with atomic_dir(out) as tmp:
        (tmp / "report.md").write_text(markdown(report))
        plot_report(report, tmp)
        report = write_record(tmp / "report.json", report, files=folder_files(tmp))  # report.md and the figures
    print(markdown(report))
    return report


def cost_ratios(models: dict) -> dict:
    """How many times cheaper the distilled student is than the teacher (teacher cost / student cost;
    throughput: student / teacher). Empty without both costs."""
    s, t = models.get("student_distilled", {}), models.get("teacher", {})
    if "latency_ms" not in s or "latency_ms" not in t:
        return {}
    return {"params": t["params"] / s["params"], "peak_rss_bytes": t["peak_rss_bytes"] / s["peak_rss_bytes"],
            "latency_p50": t["latency_ms"]["p50"] / s["latency_ms"]["p50"],
            "throughput": s["throughput_users_per_s"] / t["throughput_users_per_s"],   # best batch against best
            "flops_per_user": t["flops_per_user"] / s["flops_per_user"]}


def machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} CPU cores, {platform.system()} (torch CPU)"


def _fmt(v, std=None) -> str:
    if v is None:
        return "–"
    return f"{v:.4f}" + (f" ± {std:.4f}" if std else "")  # std only when several seeds differ


def _count(v) -> str:
    return "–" if v is None else f"{v:,.0f}"


def trained(name: str, m: dict) -> str:
    """How many models a row averages: seeds, or teachers (x student seeds) for a model per teacher."""
    teachers, n = m.get("teachers", 1), m["seeds"]
    if teachers == 1:
        return str(n)
    if name == "teacher":
        return f"{teachers} teachers"
    return f"{teachers} teachers x {n // teachers} seeds" if n % teachers == 0 else f"{teachers} teachers, {n} in all"


def seed_label(p: dict) -> str:
    """t1/s3: teacher seed 1, student seed 3 (either left out when the model has no such level)."""
    return "/".join(f"{k[0]}{p[k]}" for k in ("teacher", "seed") if p[k] is not None) or "-"


def comparison_lines(comps: dict) -> list[str]:
    """One paragraph per comparison, then the LLM's own share of the distilled student's gain."""
    lines = []
    for key, c in comps.items():
        d = c["NDCG@10"]
        levels_used = "teachers, student seeds and users" if d["ci_method"] == "teachers+seeds+users" \
            else "student seeds and users"
        seeds = ", ".join(f"{seed_label(p)} {p['diff']:+.4f}" for p in d["per_seed"])
        teachers = "" if len(d["per_teacher"]) < 2 else "; per teacher: " + ", ".join(
            f"t{p['teacher']} {p['diff']:+.4f}" for p in d["per_teacher"])
        lines.append(f"\n{key} ({MODELS[c['a']].label} minus {MODELS[c['b']].label}): "
                     f"NDCG@10 difference {d['mean_diff']:+.4f}, 95% CI "
                     f"[{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] (bootstrap over {levels_used}; "
                     f"{d['teachers'][0]} x {d['seeds'][0]} against {d['teachers'][1]} x {d['seeds'][1]} "
                     f"(teachers x seeds); per seed: {seeds}{teachers})")
    if "distilled_vs_alone" in comps and "llm_vs_cf_teacher" in comps:
        gain = comps["distilled_vs_alone"]["NDCG@10"]["mean_diff"]
        llm = comps["llm_vs_cf_teacher"]["NDCG@10"]["mean_diff"]
        share = f" ({llm / gain:.0%} of it)" if gain > 0 else ""
        lines.append(f"\nThe LLM's own share: of the distilled student's gain over the student alone ({gain:+.4f}), "
                     f"the LLM teacher adds {llm:+.4f}{share} over the CF-only teacher; the rest is "
                     "self-distillation from the CF model, which needs no LLM.")
    return lines


def markdown(report: dict) -> str:
    lines = [f"# anyo report (split {report['split_hash']}, {report['machine']})", "",
             "Test split, full ranking over the whole catalogue, history masked; "
             "HR@1(cand) is the LLaRA 20-candidate protocol.", ""]
    cols = ["HR@10", "NDCG@10", "MRR@10", "HR@1(candidates)", "Coverage@10", "ValidRatio"]
    lines.append("| model | models trained | " + " | ".join(cols) + " | params | peak RSS (MiB) | latency p50 (ms) | users/s |")
    lines.append("|---" * (len(cols) + 6) + "|")
    for name, m in report["models"].items():
        q = ["n/a" if "full_ranking" in m and c not in m["metrics"] else _fmt(m["metrics"].get(c), m["metrics_std"].get(c))
             for c in cols]
        rss = m.get("peak_rss_bytes")
        cost = [_count(m.get("params")), _count(None if rss is None else rss / 2**20),
                _fmt(m.get("latency_ms", {}).get("p50")), _count(m.get("throughput_users_per_s"))]
        lines.append(f"| {m['label']} | {trained(name, m)} | " + " | ".join(q + cost) + " |")
    runtimes = sorted({m["runtime"] for m in report["models"].values() if "runtime" in m})
    if runtimes:
        lines.append(f"\nThe students' cost is that of the `Recommender` `anyo serve` runs, minus HTTP (runtime "
                     f"{', '.join(runtimes)}); the teacher's that of its own retriever and the harness's search.")
    if CF_DISTILLED in report["models"]:
        lines.append(f"\n{MODELS[CF_DISTILLED].label}: the recipe's distillation from a w = 1 cache of the CF model "
                     "every teacher blends with (no LLM); its serving cost is the distilled student's (the same SASRec).")
    if "teacher" in report["models"] and report["models"]["teacher"].get("teachers", 1) == 1:
        lines.append("\nThe teacher was trained once: the teacher's seed variance is not in any interval below "
                     "(`anyo run --teacher-seeds N` measures it).")
    lines += comparison_lines(report["comparisons"])
    swept = {n: m for n, m in report["models"].items() if "throughput_by_batch" in m}
    if swept:
        batches = list(next(iter(swept.values()))["throughput_by_batch"])
        lines += ["", f"Serving: users/s at each batch size (the same {next(iter(swept.values()))['users']} test users "
                  "for every model, encode + top-10 search with the history masked), and FLOPs per user from the "
                  "models' shapes:", "", "| model | " + " | ".join(f"batch {b}" for b in batches)
                  + " | latency p95 (ms) | MFLOP/user |", "|---" * (len(batches) + 3) + "|"]
        for m in swept.values():
            lines.append(f"| {m['label']} | " + " | ".join(_count(m["throughput_by_batch"].get(b)) for b in batches)
                         + f" | {_fmt(m['latency_ms']['p95'])} | {m['flops_per_user'] / 1e6:,.2f} |")
    with_buckets = {m["label"]: m["by_popularity"] for m in report["models"].values() if m.get("by_popularity")}
    if with_buckets:
        buckets = [b for b in BUCKET_NAMES if any(b in v for v in with_buckets.values())]
        users = {b: next(v[b]["users"] for v in with_buckets.values() if b in v) for b in buckets}
        lines += ["", "Test NDCG@10 by the target's training popularity (head: the 20% most popular items seen in "
                  "training, torso: the next 30%, tail: the rest, unseen: never in training):", "",
                  "| model | " + " | ".join(f"{b} ({users[b]} users)" for b in buckets) + " |",
                  "|---" * (len(buckets) + 1) + "|"]
        for name, v in with_buckets.items():
            lines.append(f"| {name} | " + " | ".join(_fmt(v[b]["NDCG@10"]) if b in v else "–" for b in buckets) + " |")
    cold = {n: m["cold"] for n, m in report["models"].items() if m.get("cold", {}).get("users")}
    if cold:
        keys = [k for k in COLD_KEYS if all(k in c for c in cold.values())]
        lines += ["", f"Cold targets: the {next(iter(cold.values()))['users']} test users whose target was never seen "
                  "in training (data.cold_items or cold in the data), full ranking:", "",
                  "| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        lines += [f"| {n} | " + " | ".join(_fmt(c[k]) for k in keys) + " |" for n, c in cold.items()]
    if r := report.get("cost_ratios"):
        lines.append(f"\ndistilled student vs teacher: {r['params']:,.0f}x fewer parameters, "
                     f"{r['peak_rss_bytes']:.1f}x less peak memory, {r['latency_p50']:,.1f}x lower latency, "
                     f"{r['throughput']:,.1f}x the throughput (each at its best batch size; "
                     f"{r['flops_per_user']:,.0f}x fewer FLOPs per user by the models' shapes)")
    if report["missing"]:
        lines.append(f"\nMissing stages: {', '.join(report['missing'])}")
    if report["stale"]:
        lines.append(f"\nLeft out as stale (built from other inputs): {', '.join(report['stale'])}")
    return "\n".join(lines) + "\n"
