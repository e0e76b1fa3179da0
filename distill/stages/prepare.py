"""Stage `prepare`: the leave-one-out split in RUN/split (distill.data)."""

from __future__ import annotations

from pathlib import Path

from distill.config import Recipe
from distill.data import Split, prepare
from distill.distributed import world


def run(recipe: Recipe, run: Path) -> Split:
    """The split, written by rank 0 first when a launcher started N ranks (the others then read it)."""
    split, built = world().main_first(lambda: prepare(recipe.data, run / "split"))
    m = split.manifest
    print(f"split {'written to' if built else 'up to date in'} {run / 'split'}: {m['n_users']} users, "
          f"{m['n_items']} items, {m['n_interactions']} interactions, {m['dropped_users']} users dropped "
          f"(hash {split.hash})")
    return split
