"""Stage `teacher infer`: the teacher's top-K for every scored position, in RUN/teacher_cache."""

from __future__ import annotations

from pathlib import Path

from distill.artifacts import json_digest, read_json, read_record
from distill.cache import cache_key
from distill.config import Recipe
from distill.data import Split
from distill.errors import ArtifactError


def up_to_date(recipe: Recipe, run: Path, split: Split) -> dict | None:
    """The cache's manifest if it was built from this run's split, teacher and options."""
    out = run / "teacher_cache"
    if not (out / "manifest.json").is_file():
        return None
    key = cache_key(recipe, split, read_record(run / "teacher" / "teacher.json", "checkpoint_hash")["checkpoint_hash"])
    try:
        manifest = read_json(out / "manifest.json")
    except ArtifactError:  # unreadable: not up to date, inference rebuilds the cache
        return None
    if not isinstance(manifest, dict) or json_digest({k: v for k, v in manifest.items() if k != "manifest_sha256"}) \
            != manifest.get("manifest_sha256"):
        return None
    return manifest if all(manifest.get(k) == v for k, v in key.items()) else None


def run(recipe: Recipe, run: Path, split: Split, merge_only: bool = False) -> dict | None:
    from teacher.infer import merge, run_inference
    from teacher.model import load_teacher
    out = run / "teacher_cache"
    if merge_only:
        return merge(recipe, split, run / "teacher", out)
    if (manifest := up_to_date(recipe, run, split)) is not None:
        print(f"teacher cache up to date in {out}")
        return manifest
    model, meta = load_teacher(run / "teacher", run / "student_alone", split)
    return run_inference(recipe, split, model, meta["checkpoint_hash"], out, recipe.distill.backend)
