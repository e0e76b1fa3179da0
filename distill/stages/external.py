"""Stages `teacher import` and `teacher export-cache`: a teacher anyo did not train (teacher/imported.py).

`anyo teacher import` writes RUN/teacher_cache from another tool's outputs (top-K lists, or query and item
vectors) and, when the query and item vectors cover every user's validation and test positions, scores the
teacher through the harness into RUN/teacher_external (the report's "external teacher"). `anyo teacher
export-cache` writes a run's cache in the same public layout.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from distill.artifacts import atomic_dir, save_array, write_record
from distill.cache import TeacherCache
from distill.config import Recipe
from distill.data import Split
from distill.errors import ConfigError
from distill.harness import evaluate_model, metrics_record
from distill.runs import EXTERNAL, check_file_target, external_teacher_inputs
from teacher.imported import export_cache, import_files, import_teacher, items_file


def check_target(run: Path) -> None:
    """An imported cache never replaces the cache of a teacher anyo trained in the same run."""
    if (run / "teacher" / "teacher.json").is_file():
        raise ConfigError(f"--out {run}: holds a teacher anyo trained ({run / 'teacher'}); import into another "
                          "run folder")


def run(recipe: Recipe, run: Path, split: Split, topk: Path | None, queries: Path | None,
        items: Path | None) -> dict:
    check_target(run)
    manifest = import_files(recipe, split, run / "teacher_cache", topk, queries, items)
    report_import(recipe, run, split, manifest)
    return manifest


def run_teacher(recipe: Recipe, run: Path, split: Split, teacher) -> dict:
    """The Python protocol: RUN/teacher_cache from any object with `get_teacher_outputs(histories, k)` (and
    optionally `item_vectors()`), checked as an imported file is (teacher.imported.import_teacher)."""
    check_target(run)
    manifest = import_teacher(recipe, split, teacher, run / "teacher_cache")
    report_import(recipe, run, split, manifest)
    return manifest


def report_import(recipe: Recipe, run: Path, split: Split, manifest: dict) -> None:
    c = manifest["coverage"]
    print(f"teacher cache: {c['rows']} imported queries (K={manifest['k']}) for {c['users']} of {c['of_users']} "
          f"users, {c['training_positions']} of {c['of_training_positions']} training positions, at "
          f"{run / 'teacher_cache'}")
    if (record := score(recipe, run, split)) is not None:
        print(f"external teacher: test NDCG@10 {record['metrics']['NDCG@10']:.4f}, HR@10 "
              f"{record['metrics']['HR@10']:.4f} (harness, from its query and item vectors) in {run / EXTERNAL}")


def score(recipe: Recipe, run: Path, split: Split) -> dict | None:
    """RUN/teacher_external: the imported teacher's validation and test metrics through the harness, from the
    cache's query vectors at every user's validation and test position; None (and no folder) without them."""
    cache = TeacherCache(run / "teacher_cache", split.hash, split.n_items)
    lengths = split.sequences.lengths
    users = np.arange(split.n_users)
    rows = {stage: cache.lookup(users, lengths - cut) for stage, cut in (("valid", 2), ("test", 1))}
    if cache.dim == 0 or cache.dim != cache.item_table.shape[1] or not all(r.found.all() for r in rows.values()):
        shutil.rmtree(run / EXTERNAL, ignore_errors=True)  # an earlier import's scores are not this teacher's
        print("external teacher: not scored (needs query and item vectors of one dimension at every user's "
              "validation and test position)")
        return None
    results = evaluate_model(split, lambda stage: np.asarray(rows[stage].query), np.asarray(cache.item_table),
                             recipe.eval)
    with atomic_dir(run / EXTERNAL) as tmp:
        save_array(tmp / "test_ranks.npy", results["test"].ranks)
        return write_record(tmp / "metrics.json", metrics_record(
            results, split, inputs=external_teacher_inputs(recipe, run, split, recipe.seed),
            teacher=cache.manifest["teacher"]), files=[tmp / "test_ranks.npy"])


def export(run: Path, split: Split, out: Path) -> None:
    if out.suffix != ".parquet":
        raise ConfigError(f"--out {out}: expected a .parquet file")
    for path in (out, items_file(out)):                   # an existing file is never replaced
        check_file_target(path, "--out", {}, "anyo teacher export-cache")
    rows, items = export_cache(TeacherCache(run / "teacher_cache", split.hash, split.n_items), split, out)
    print(f"teacher cache: {rows} rows written to {out}" + (f", item vectors to {items}" if items else ""))
