"""Stage `bench`: the teacher-vs-student report in RUN/report (distill.report), rebuilt only when a model's
metrics or the recipe's `bench` section changed (cost measurements take minutes)."""

from __future__ import annotations

from pathlib import Path

from distill.artifacts import sha256_file
from distill.config import Recipe
from distill.stages.common import up_to_date


def inputs(recipe: Recipe, run: Path) -> dict:
    wanted = {str(p.relative_to(run)): sha256_file(p) for p in sorted(run.glob("**/metrics.json"))
              if "report" not in p.relative_to(run).parts}
    wanted["recipe"] = recipe.section_hash("data", "student", "teacher", "distill", "eval", "bench")
    return wanted


def run(recipe: Recipe, run: Path, out: Path | None = None) -> dict:
    from distill.report import write_report
    out = out or run / "report"
    wanted = inputs(recipe, run)
    if (report := up_to_date(out / "report.json", wanted)) is not None:
        print(f"report up to date in {out}")
        return report
    return write_report(run, recipe, out, wanted)
