"""Stage `teacher infer`: the teacher's top-K for every scored position, in RUN/teacher_cache (teacher seed
T other than the recipe's: RUN/teachers/seed-T/teacher_cache, distill.teacher_seeds)."""

from __future__ import annotations

from pathlib import Path

from distill.artifacts import json_digest, read_json, read_record
from distill.cache import cache_key
from distill.config import Recipe
from distill.data import Split
from distill.errors import ArtifactError
from distill.teacher_seeds import teacher_root


def current_manifest(folder: Path, key: dict) -> dict | None:
    """The manifest of the cache in `folder` if it is intact and was built from exactly `key`."""
    if not (folder / "manifest.json").is_file():
        return None
    try:
        manifest = read_json(folder / "manifest.json")
    except ArtifactError:  # unreadable: not up to date, inference rebuilds the cache
        return None
    if not isinstance(manifest, dict) or json_digest({k: v for k, v in manifest.items() if k != "manifest_sha256"}) \
            != manifest.get("manifest_sha256"):
        return None
    return manifest if all(manifest.get(k) == v for k, v in key.items()) else None


def up_to_date(recipe: Recipe, run: Path, split: Split, teacher_seed: int | None = None) -> dict | None:
    """The cache's manifest if it was built from this run's split, teacher and options."""
    root = teacher_root(run, recipe, recipe.seed if teacher_seed is None else teacher_seed)
    if not (root / "teacher_cache" / "manifest.json").is_file():
        return None
    teacher_hash = read_record(root / "teacher" / "teacher.json", "checkpoint_hash")["checkpoint_hash"]
    return current_manifest(root / "teacher_cache", cache_key(recipe, split, teacher_hash))


def run(recipe: Recipe, run: Path, split: Split, merge_only: bool = False, teacher_seed: int | None = None) -> dict | None:
    from teacher.infer import merge, run_inference
    from teacher.model import load_teacher
    root = teacher_root(run, recipe, recipe.seed if teacher_seed is None else teacher_seed)
    out = root / "teacher_cache"
    if merge_only:
        return merge(recipe, split, root / "teacher", out)
    if (manifest := up_to_date(recipe, run, split, teacher_seed)) is not None:
        print(f"teacher cache up to date in {out}")
        return manifest
    model, meta = load_teacher(root / "teacher", run / "student_alone", split)
    recorded = read_json(root / "teacher" / "metrics.json")["valid_metrics"]["NDCG@10"]
    return run_inference(recipe, split, model, meta["checkpoint_hash"], out, recipe.distill.backend, recorded)
