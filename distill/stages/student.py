"""Stage `student train`: SASRec trained alone (the CF model) in RUN/student_alone (or RUN/seeds/...)."""

from __future__ import annotations

from pathlib import Path

from distill.config import Recipe
from distill.data import Split
from distill.losses import WeightedLoss
from distill.runs import finished_training, model_dir, student_inputs
from distill.stages.common import finish_training
from student.train import own_loss, train_and_save


def run(recipe: Recipe, run: Path, split: Split, seed: int) -> dict:
    out = model_dir(run, "student_alone", seed, recipe)
    wanted = student_inputs(recipe, run, split, seed)
    if (record := finished_training(out, wanted)) is not None:
        print(f"student alone (seed {seed}) up to date in {out}")
        return record
    loss = WeightedLoss({"own": (1.0, lambda: own_loss(recipe, split))})
    return finish_training(out, train_and_save(recipe, split, out, seed, loss, desc=f"student seed {seed}",
                                               inputs=wanted))
