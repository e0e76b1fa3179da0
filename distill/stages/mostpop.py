"""Stage `mostpop`: the MostPop floor in RUN/mostpop."""

from __future__ import annotations

from pathlib import Path

from distill.artifacts import atomic_dir, save_array, write_record
from distill.baselines import MostPop
from distill.config import Recipe
from distill.data import Split
from distill.harness import evaluate_model, metrics_record
from distill.runs import mostpop_inputs, up_to_date


def run(recipe: Recipe, run: Path, split: Split) -> dict:
    path = run / "mostpop" / "metrics.json"
    wanted = mostpop_inputs(recipe, run, split, recipe.seed)
    if (record := up_to_date(path, wanted)) is not None:
        return record
    model = MostPop(split)
    results = evaluate_model(split, lambda stage: model.encode(split.history(stage)), model.item_vectors(),
                             recipe.eval)
    with atomic_dir(path.parent) as tmp:  # both files or neither
        save_array(tmp / "test_ranks.npy", results["test"].ranks)
        record = write_record(tmp / "metrics.json", metrics_record(results, split, inputs=wanted),
                              files=[tmp / "test_ranks.npy"])
    return record
