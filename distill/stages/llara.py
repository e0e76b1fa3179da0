"""Stage `baseline llara`: the LLaRA-style generative recommender in RUN/llara (teacher/generative.py),
on the CF model in RUN/student_alone and the split in RUN/split.

RUN/llara/  adapter/ (peft), heads.safetensors, llara.json, test_outputs.json, metrics.json
metrics.json: `candidates` (test: HR@1, ValidRatio, HR@1_valid, users), `valid_ratio`, `curve`,
`examples_per_second`, `tokens_per_second`, `train_seconds`, `test_users_per_second`, `best_epoch`.
"""

from __future__ import annotations

from pathlib import Path

from distill.config import Recipe
from distill.data import Split
from distill.errors import AnyoError
from distill.runs import finished_training, llara_inputs, model_dir
from distill.stages.common import finish_training
from student.model import load_student
from teacher.generative_train import train_generative


def run(recipe: Recipe, run: Path, split: Split, seed: int) -> dict | None:
    """The baseline's record (None on ranks other than 0 of a torchrun / deepspeed launch)."""
    if not (run / "student_alone" / "model.safetensors").is_file():
        raise AnyoError(f"{run / 'student_alone'}: not found; the generative baseline reads its CF model "
                        f"(run `anyo student train` or `anyo run` first)")
    cf, _ = load_student(run / "student_alone", split.hash, split.n_items)
    out = model_dir(run, "llara", seed, recipe)
    wanted = llara_inputs(recipe, run, split, seed)
    if (record := finished_training(out, wanted)) is not None:
        print(f"generative baseline (seed {seed}) up to date in {out}")
        return record
    record = train_generative(recipe, split, cf, out, seed, wanted)
    if record is None:
        return None
    record = finish_training(out, record)
    m = record["candidates"]
    print(f"generative baseline (LLaRA): test HR@1 {m['HR@1']:.4f}  ValidRatio {m['ValidRatio']:.4f}  "
          f"HR@1 among valid {m['HR@1_valid']:.4f}  ({m['users']} users) -> {out}")
    return record
