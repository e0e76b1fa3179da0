"""Stage `teacher train`: the LLM retriever in RUN/teacher (teacher seed T other than the recipe's:
RUN/teachers/seed-T/teacher, distill.runs.teacher_root), on the CF model in RUN/student_alone."""

from __future__ import annotations

from pathlib import Path

from distill.config import Recipe
from distill.data import Split
from distill.runs import finished_training, teacher_inputs, teacher_root
from distill.stages.common import finish_training
from student.model import load_student
from teacher.train import train_teacher


def run(recipe: Recipe, run: Path, split: Split, seed: int) -> dict | None:
    """The teacher's record (None on ranks other than 0 of a torchrun / deepspeed launch)."""
    cf, _ = load_student(run / "student_alone", split.hash, split.n_items)
    out = teacher_root(run, recipe, seed) / "teacher"
    wanted = teacher_inputs(recipe, run, split, seed)
    if (record := finished_training(out, wanted)) is not None:
        print(f"teacher (seed {seed}) up to date in {out}")
        return record
    record = train_teacher(recipe, split, cf, out, seed, wanted)
    return None if record is None else finish_training(out, record)
