"""Teacher seeds: where each trained teacher, its cache and its distilled students live.

The teacher of the recipe's seed is the run's own (RUN/teacher, RUN/teacher_cache,
RUN/student_distilled, RUN/seeds/student_distilled-S); a teacher trained with another seed T
(`anyo run --teacher-seeds N`, `anyo teacher train --seed T`) has the same layout under
RUN/teachers/seed-T/. Every teacher reads the same CF model, RUN/student_alone, and every
distilled student starts from the student alone of its own student seed, RUN/student_alone or
RUN/seeds/student_alone-S. A folder's teacher seed is read from its path, never from its order.
"""

from __future__ import annotations

import re
from pathlib import Path

FOLDER = "teachers"
_SEED = re.compile(r"seed-(\d+)")


def teacher_root(run: Path, recipe, seed: int) -> Path:
    """The folder holding teacher/, teacher_cache/ and the distilled students of teacher seed `seed`."""
    return Path(run) if seed == recipe.seed else Path(run) / FOLDER / f"seed-{seed}"


def teacher_roots(run: Path, recipe) -> list[tuple[int, Path]]:
    """(teacher seed, root) of every teacher root the run holds, the recipe's seed first, then by seed."""
    others = []
    for p in (Path(run) / FOLDER).glob("seed-*"):
        if (m := _SEED.fullmatch(p.name)) and p.is_dir() and int(m.group(1)) != recipe.seed:
            others.append((int(m.group(1)), p))
    return [(recipe.seed, Path(run))] + sorted(others)


def teacher_seed_list(recipe, n: int) -> list[int]:
    """The seeds of `--teacher-seeds n`: the recipe's seed, then the next n - 1 (as `--seeds`)."""
    return [recipe.seed + i for i in range(n)]
