"""What every stage shares: writing a finished training stage, the summary table."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from distill.artifacts import folder_files, write_record
from distill.events import keep_events
from distill.resume import clear_resume


def finish_training(out: Path, record: dict) -> dict:
    """Seal the stage: metrics.json holds the sha256 of every file of `out` (weights, config, ranks, adapter)."""
    record = write_record(out / "metrics.json", record, files=folder_files(out, "metrics.json"))
    keep_events(out)
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
