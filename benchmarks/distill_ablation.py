"""Ablation of the distillation loss: each teacher term switched off in turn, on a finished run.

    python benchmarks/distill_ablation.py --recipe recipes/ml100k.yaml --run runs/ml100k \
        --out benchmarks/distill_ablation.md

Trains `anyo distill --set distill.TERM_weight=0 --name ablation-no-TERM` for each
term with a non-zero weight (same seed, same teacher cache), then tabulates test
metrics next to the full distilled student and the student alone.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from distill.artifacts import read_json
from distill.config import load_recipe
from distill.pipeline import stage_distill, stage_prepare

TERMS = ("kd", "rank", "align")
KEYS = ("HR@10", "NDCG@10", "MRR@10")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/ml100k.yaml")
    ap.add_argument("--run", type=Path, required=True, help="a run with student_alone, teacher_cache, student_distilled")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/distill_ablation.md"))
    args = ap.parse_args()
    recipe = load_recipe(args.recipe)
    split = stage_prepare(recipe, args.run)
    rows = {"student alone": read_json(args.run / "student_alone" / "metrics.json"),
            "distilled (all terms)": read_json(args.run / "student_distilled" / "metrics.json")}
    for term in TERMS:
        if getattr(recipe.distill, f"{term}_weight") == 0:
            continue
        off = load_recipe(args.recipe, [f"distill.{term}_weight=0"])
        rows[f"without {term}"] = stage_distill(off, args.run, split, recipe.seed, name=f"ablation-no-{term}")
    lines = ["# Distillation ablation (MovieLens-100K, this machine)", "", "```",
             f"python benchmarks/distill_ablation.py --recipe {args.recipe} --run {args.run} --out {args.out}",
             "```", "", f"Seed {recipe.seed}, test split, full ranking with history masked.", "",
             "| model | " + " | ".join(f"test {k}" for k in KEYS) + " | best epoch |", "|---|---|---|---|---|"]
    lines += [f"| {name} | " + " | ".join(f"{r['metrics'][k]:.4f}" for k in KEYS) + f" | {r['best_epoch']} |"
              for name, r in rows.items()]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
