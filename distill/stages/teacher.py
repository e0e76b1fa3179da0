"""Stage `teacher train`: the LLM retriever in RUN/teacher (teacher seed T other than the recipe's:
RUN/teachers/seed-T/teacher, distill.teacher_seeds), on the CF model in RUN/student_alone."""

from __future__ import annotations

from pathlib import Path

from distill.artifacts import sha256_file
from distill.config import Recipe
from distill.data import Split
from distill.stages.common import finish_training, finished_training
from distill.teacher_seeds import teacher_root


def inputs(recipe: Recipe, run: Path, split: Split, seed: int) -> dict:
    return {"split_hash": split.hash, "recipe": recipe.section_hash("data", "student", "teacher", "eval"),
            "seed": seed, "cf_sha256": sha256_file(run / "student_alone" / "model.safetensors")}


def run(recipe: Recipe, run: Path, split: Split, seed: int) -> dict:
    from student.model import load_student
    from teacher.train import train_teacher
    cf, _ = load_student(run / "student_alone", split.hash, split.n_items)
    out = teacher_root(run, recipe, seed) / "teacher"
    wanted = inputs(recipe, run, split, seed)
    if (record := finished_training(out, wanted)) is not None:
        print(f"teacher (seed {seed}) up to date in {out}")
        return record
    return finish_training(out, train_teacher(recipe, split, cf, out, seed, wanted))
