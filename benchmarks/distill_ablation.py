"""Ablation of the distillation loss: each teacher term switched off (or, when the recipe leaves it
off, on at --add-weight) in turn, on a finished run.

    anyo run recipes/ml100k.yaml --out runs/ml100k --seeds 3
    python benchmarks/distill_ablation.py --recipe recipes/ml100k.yaml --run runs/ml100k --seeds 3 \
        --out benchmarks/distill_ablation.md

For each seed, trains `anyo distill --set distill.TERM_weight=0 --name ablation-no-TERM` for
each term with a non-zero weight (same teacher cache, same warm start), plus a control
with every teacher term off ("own loss only": the same extra epochs without the teacher), the
control "distilled from the CF model alone" (the recipe's loss on the w = 1 cache of the CF model,
distill/stages/cf_control.py: what distillation gives without the LLM), and one run
`--name ablation-with-TERM` for each term the recipe leaves at weight 0, then
tabulates validation NDCG@10 (what a choice between rows may read) and test metrics (mean and
standard deviation over seeds) next to the full distilled student and the student alone, with
each row minus the student alone on per-user test NDCG@10 and its two-level bootstrap CI.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import numpy as np

from distill.artifacts import read_json
from distill.config import load_recipe
from distill.stages import cf_control, prepare
from distill.stages import distill as distill_stage
from distill.runs import CF_DISTILLED, model_dir
from distill.stats import levels, ndcg_per_user, nested_bootstrap

TERMS = ("kd", "pairwise", "ird", "align", "ced")  # ced: student/embedding_distillation.py
KEYS = ("HR@10", "NDCG@10", "MRR@10")


def finished(folder: Path) -> dict:
    if not (folder / "metrics.json").is_file():
        raise SystemExit(f"{folder}: not trained yet; run `anyo run RECIPE --out RUN --seeds N` first")
    return read_json(folder / "metrics.json") | {"folder": folder}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/ml100k.yaml")
    ap.add_argument("--run", type=Path, required=True, help="a run with student_alone, teacher_cache, student_distilled")
    ap.add_argument("--seeds", type=int, default=1, help="seeds recipe.seed, recipe.seed + 1, ... (as `anyo run --seeds`)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/distill_ablation.md"))
    ap.add_argument("--add-weight", type=float, default=0.5, help="weight of a term the recipe leaves off")
    args = ap.parse_args()
    recipe = load_recipe(args.recipe)
    split = prepare.run(recipe, args.run)
    seeds = [recipe.seed + i for i in range(args.seeds)]
    active = [t for t in TERMS if getattr(recipe.distill, f"{t}_weight") != 0]
    # label -> (run folder name, overrides)
    variants = {f"without {t}": (f"ablation-no-{t}", [f"distill.{t}_weight=0"]) for t in active}
    variants.update({f"with {t} (weight {args.add_weight:g})": (f"ablation-with-{t}", [f"distill.{t}_weight={args.add_weight}"])
                     for t in TERMS if t not in active})
    variants["own loss only (no teacher)"] = ("ablation-own-only", [f"distill.{t}_weight=0" for t in active])
    rows: dict[str, list[dict]] = {
        "student alone": [finished(model_dir(args.run, "student_alone", s, recipe)) for s in seeds],
        "distilled (the recipe's terms)": [distill_stage.run(recipe, args.run, split, s)
                                           | {"folder": model_dir(args.run, "student_distilled", s, recipe)}
                                           for s in seeds]}
    rows["distilled from the CF model alone (w = 1 cache, no LLM)"] = [
        r | {"folder": model_dir(args.run, CF_DISTILLED, s, recipe)}
        for s, r in zip(seeds, cf_control.run(recipe, args.run, split, seeds))]
    for label, (name, sets) in variants.items():
        off = load_recipe(args.recipe, sets)
        rows[label] = [distill_stage.run(off, args.run, split, s, name=name) | {"folder": model_dir(args.run, name, s, off)}
                       for s in seeds]

    def per_user(records: list[dict]) -> dict:  # {None: {seed: per-user NDCG@10}}: paired by seed id
        return levels((None, r["seed"], ndcg_per_user(np.load(r["folder"] / "test_ranks.npy"))) for r in records)

    alone = per_user(rows["student alone"])
    lines = ["# Distillation ablation (MovieLens-100K, this machine)", "", "```",
             f"python benchmarks/distill_ablation.py --recipe {args.recipe} --run {args.run} --seeds {args.seeds} "
             f"--add-weight {args.add_weight:g} --out {args.out}   # {datetime.date.today()}", "```", "",
             f"Seeds {', '.join(map(str, seeds))}; test split, full ranking with history masked; mean ± std over "
             "seeds; the last column is the row minus the student alone on per-user NDCG@10 with its 95% CI "
             "from a two-level bootstrap (seeds paired and resampled, then users), so it includes seed variance.", "",
             "| model | valid NDCG@10 | " + " | ".join(f"test {k}" for k in KEYS) + " | NDCG@10 - alone [95% CI] |",
             "|---|---|---|---|---|---|"]
    for label, records in rows.items():
        cells = [f"{np.mean([r['metrics'][k] for r in records]):.4f} ± {np.std([r['metrics'][k] for r in records]):.4f}"
                 for k in KEYS]
        diff = ""
        if label != "student alone":
            c = nested_bootstrap(per_user(records), alone)
            diff = f"{c['mean_diff']:+.4f} [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]"
        valid = np.mean([r["valid_metrics"]["NDCG@10"] for r in records])
        lines.append(f"| {label} | {valid:.4f} | " + " | ".join(cells) + f" | {diff} |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
