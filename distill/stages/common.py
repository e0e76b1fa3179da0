"""What every stage shares: the up-to-date check, seed folders, the summary table."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from distill.artifacts import check_record, write_record
from distill.config import Recipe
from distill.errors import ArtifactError
from distill.resume import clear_resume


def model_dir(run: Path, name: str, seed: int, recipe: Recipe) -> Path:
    """RUN/NAME for the recipe's seed, RUN/seeds/NAME-SEED for the others."""
    return run / name if seed == recipe.seed else run / "seeds" / f"{name}-{seed}"


def up_to_date(path: Path, inputs: dict) -> dict | None:
    """The record at `path` if it is intact (check_record) and was built from exactly `inputs`; a record
    that cannot be read, was edited or lists a truncated file is not up to date: the stage is rebuilt."""
    if path.is_file():
        try:
            record = check_record(path)
        except ArtifactError:
            return None
        if record.get("inputs") == inputs:
            return record
    return None


def finished_training(out: Path, inputs: dict) -> dict | None:
    """The training stage's metrics if `out` was trained from exactly `inputs`. A resume folder beside a
    finished stage (the run was killed between writing metrics.json and removing it) is removed."""
    record = up_to_date(out / "metrics.json", inputs)
    if record is not None:
        clear_resume(out)
    return record


def finish_training(out: Path, record: dict) -> dict:
    ranks = out / "test_ranks.npy"
    record = write_record(out / "metrics.json", record, files=[ranks] if ranks.is_file() else [])
    clear_resume(out)
    return record


def table_row(record: dict) -> dict:
    row = dict(record["metrics"])
    row["HR@1(cand)"] = record.get("candidates", {}).get("HR@1", float("nan"))
    return row


def mean_row(records: list[dict]) -> dict:
    rows = [table_row(r) for r in records]
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def print_table(rows: dict[str, dict], keys=("HR@10", "NDCG@10", "MRR@10", "HR@1(cand)")) -> None:
    width = max(len(n) for n in rows) + 2
    print(f"{'model':<{width}}" + "".join(f"{k:>12}" for k in keys))
    for name, m in rows.items():
        print(f"{name:<{width}}" + "".join(f"{m.get(k, float('nan')):>12.4f}" for k in keys))
