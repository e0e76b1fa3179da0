"""Stage `cf control`: the CF-only teacher as a standing control (teacher/cf_only.py).

RUN/cf_teacher_cache is the teacher cache the CF model alone (RUN/student_alone, the model every LLM
teacher blends with) gives at w = 1: same format, positions and K, built in seconds without the LLM.
RUN/student_cf_distilled (and RUN/seeds/student_cf_distilled-S) are students distilled from it with the
recipe's loss, each from the student alone of its seed, exactly as the distilled students are from the
LLM teacher's cache. The report's `llm_vs_cf_teacher` is the LLM teacher's distilled students minus these:
what the LLM adds beyond self-distillation from a SASRec.
"""

from __future__ import annotations

from pathlib import Path

from distill.artifacts import read_json, sha256_file
from distill.config import Recipe
from distill.data import Split
from distill.runs import CF_CACHE, CF_DISTILLED, cf_cache_up_to_date, cf_control_recipe
from distill.stages import distill as distill_stage
from student.model import load_student
from teacher.cf_only import build_cf_cache


def build_cache(recipe: Recipe, run: Path, split: Split) -> dict:
    """RUN/cf_teacher_cache, rebuilt only when the CF model, the split or the cache options changed."""
    out, cf_sha256 = run / CF_CACHE, sha256_file(run / "student_alone" / "model.safetensors")
    if (manifest := cf_cache_up_to_date(recipe, run, split)) is not None:
        print(f"CF-only teacher cache up to date in {out}")
        return manifest
    cf, _ = load_student(run / "student_alone", split.hash, split.n_items)
    recorded = read_json(run / "student_alone" / "metrics.json")["valid_metrics"]["NDCG@10"]
    return build_cf_cache(recipe, split, cf, cf_sha256, out, recorded)


def run(recipe: Recipe, run: Path, split: Split, seeds: list[int]) -> list[dict]:
    """The CF-only cache, then one student distilled from it per seed (distill.runs.cf_control_recipe)."""
    build_cache(recipe, run, split)
    control = cf_control_recipe(recipe)
    return [distill_stage.run(control, run, split, s, CF_DISTILLED, cache_dir=run / CF_CACHE) for s in seeds]
