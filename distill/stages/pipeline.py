"""`anyo run`: every stage in order, each skipped when up to date."""

from __future__ import annotations

from pathlib import Path

from distill.config import Recipe
from distill.data import Split
from distill.stages import distill, infer, llara, mostpop, report, student, teacher
from distill.stages.common import mean_row, print_table, table_row


def run(recipe: Recipe, run: Path, split: Split, seeds: int) -> dict:
    seed_list = [recipe.seed + i for i in range(seeds)]
    rows = {"MostPop": table_row(mostpop.run(recipe, run, split))}
    alone = [student.run(recipe, run, split, s) for s in seed_list]
    trained = teacher.run(recipe, run, split, recipe.seed)
    infer.run(recipe, run, split)
    distilled = [distill.run(recipe, run, split, s) for s in seed_list]
    rows["student alone"] = mean_row(alone)
    rows["teacher"] = table_row(trained)
    rows["distilled student"] = mean_row(distilled)
    if recipe.llara.enabled:  # the generative baseline (issue 14)
        llara.run(recipe, run, split, recipe.seed)
    report.run(recipe, run)
    print()
    print_table(rows)
    return rows
