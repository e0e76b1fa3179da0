"""Stage `teacher infer`: the teacher's top-K for every scored position, in RUN/teacher_cache."""

from __future__ import annotations

from pathlib import Path

from distill.config import Recipe
from distill.data import Split
from distill.runs import cache_up_to_date
from teacher.infer import merge, run_inference
from teacher.model import load_teacher


def run(recipe: Recipe, run: Path, split: Split, merge_only: bool = False) -> dict | None:
    out = run / "teacher_cache"
    if merge_only:
        return merge(recipe, split, run / "teacher", out)
    if (manifest := cache_up_to_date(recipe, run, split)) is not None:
        print(f"teacher cache up to date in {out}")
        return manifest
    model, meta = load_teacher(run / "teacher", run / "student_alone", split)
    return run_inference(recipe, split, model, meta["checkpoint_hash"], out, recipe.distill.backend)
