"""`anyo run`: every stage in order, each skipped when up to date."""

from __future__ import annotations

from pathlib import Path

from distill.config import Recipe
from distill.data import Split
from distill.runs import teacher_root, teacher_seed_list
from distill.stages import cf_control, distill, infer, llara, mostpop, report, student, teacher
from distill.stages.common import mean_row, print_table, table_row


def run(recipe: Recipe, run: Path, split: Split, seeds: int, teacher_seeds: int = 1) -> dict:
    """Students alone over `seeds` seeds, the CF-only control, then `teacher_seeds` teachers, each with its
    cache and one distilled student per student seed, then the report."""
    seed_list = [recipe.seed + i for i in range(seeds)]
    rows = {"MostPop": table_row(mostpop.run(recipe, run, split))}
    alone = [student.run(recipe, run, split, s) for s in seed_list]
    cf_distilled = cf_control.run(recipe, run, split, seed_list)   # seconds for the cache, no LLM
    trained, distilled = [], []
    for t in teacher_seed_list(recipe, teacher_seeds):
        trained.append(teacher.run(recipe, run, split, t))
        infer.run(recipe, run, split, teacher_seed=t)
        cache = teacher_root(run, recipe, t) / "teacher_cache"
        distilled += [distill.run(recipe, run, split, s, cache_dir=cache) for s in seed_list]
    rows["student alone"] = mean_row(alone)
    rows["teacher"] = mean_row(trained)
    rows["distilled student"] = mean_row(distilled)
    rows["distilled from the CF model alone"] = mean_row(cf_distilled)
    if recipe.llara.enabled:  # the generative baseline (issue 14)
        llara.run(recipe, run, split, recipe.seed)
    report.run(recipe, run)
    print()
    print_table(rows)
    return rows
