"""Stage `bench`: the teacher-vs-student report in RUN/report (distill.report), rebuilt only when a model's
metrics or the recipe's `bench` section changed (cost measurements take minutes)."""

from __future__ import annotations

from pathlib import Path

from distill.config import Recipe
from distill.report import write_report
from distill.runs import report_inputs, up_to_date


def run(recipe: Recipe, run: Path, out: Path | None = None) -> dict:
    out = out or run / "report"
    wanted = report_inputs(recipe, run)
    if (report := up_to_date(out / "report.json", wanted)) is not None:
        print(f"report up to date in {out}")
        return report
    return write_report(run, recipe, out, wanted)
