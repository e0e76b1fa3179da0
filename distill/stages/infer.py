"""Stage `teacher infer`: the teacher's top-K for every scored position, in RUN/teacher_cache (teacher seed
T other than the recipe's: RUN/teachers/seed-T/teacher_cache, distill.runs.teacher_root)."""

from __future__ import annotations

from pathlib import Path

from distill.artifacts import read_json
from distill.config import Recipe
from distill.data import Split
from distill.runs import cache_up_to_date, teacher_root
from teacher.infer import merge, run_inference
from teacher.checkpoint import load_teacher


def run(recipe: Recipe, run: Path, split: Split, merge_only: bool = False,
        teacher_seed: int | None = None) -> dict | None:
    root = teacher_root(run, recipe, recipe.seed if teacher_seed is None else teacher_seed)
    out = root / "teacher_cache"
    if merge_only:
        return merge(recipe, split, root / "teacher", out)
    if (manifest := cache_up_to_date(recipe, run, split, teacher_seed)) is not None:
        print(f"teacher cache up to date in {out}")
        return manifest
    model, meta = load_teacher(root / "teacher", run / "student_alone", split)
    recorded = read_json(root / "teacher" / "metrics.json")["valid_metrics"]["NDCG@10"]
    return run_inference(recipe, split, model, meta["checkpoint_hash"], out, recipe.distill.backend, recorded)
