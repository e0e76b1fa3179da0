"""One registry of the models a run holds: name -> folder, label, loader.

Every model the harness scores is a `Retriever`: histories in, (B, D) query vectors
out, and an (N+1, D) item table (row 0 padding). The report, the serving-cost
measurement, `anyo verify` and the CLI find models here, never by display label.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from distill.data import Histories, Split
from distill.stages import cf_control
from distill.stages import distill as distill_stage
from distill.stages import mostpop as mostpop_stage
from distill.stages import student as student_stage
from distill.stages import teacher as teacher_stage
from distill.teacher_seeds import FOLDER as TEACHERS_FOLDER
from distill.teacher_seeds import teacher_roots


class Retriever(Protocol):
    def encode(self, histories: Histories) -> np.ndarray: ...   # (B, D) float32 query vectors
    def item_vectors(self) -> np.ndarray: ...                    # (N+1, D) float32, row 0 padding


@dataclass(frozen=True)
class ModelEntry:
    name: str                                       # folder name inside RUN (seeds: RUN/seeds/NAME-S)
    label: str                                      # how reports call it
    load: Callable[[Path, Split, str], Retriever]   # (run folder, split, inference backend) -> retriever
    inputs: Callable[..., dict]                     # (recipe, run, split, seed, root) -> what its record must hold
    seeded: bool = False                            # trained once per seed with `--seeds`
    per_teacher: bool = False                       # one per teacher seed (`--teacher-seeds`), in its teacher root
    cost: bool = True                               # its serving cost is measured (not when another row's is its own)


def _mostpop(run: Path, split: Split, backend: str) -> Retriever:
    from distill.baselines import MostPop
    return MostPop(split)


def _student(name: str):
    def load(run: Path, split: Split, backend: str) -> Retriever:
        from student.model import load_student
        return load_student(run / name, split.hash, split.n_items)[0]
    return load


def _teacher(run: Path, split: Split, backend: str) -> Retriever:
    from teacher.infer import wrap_backend
    from teacher.model import load_teacher
    model, _ = load_teacher(run / "teacher", run / "student_alone", split)
    return wrap_backend(model, backend)


def _at_run(inputs: Callable[..., dict]) -> Callable[..., dict]:
    """A stage's inputs(recipe, run, split, seed), which do not depend on the teacher root."""
    return lambda recipe, run, split, seed, root: inputs(recipe, run, split, seed)


MODELS = {e.name: e for e in (
    ModelEntry("mostpop", "MostPop", _mostpop, _at_run(mostpop_stage.inputs)),
    ModelEntry("student_alone", "student alone", _student("student_alone"), _at_run(student_stage.inputs),
               seeded=True),
    ModelEntry("teacher", "teacher", _teacher, _at_run(teacher_stage.inputs), per_teacher=True),
    ModelEntry("student_distilled", "distilled student", _student("student_distilled"),
               lambda recipe, run, split, seed, root: distill_stage.inputs(recipe, run, split, seed,
                                                                           root / "teacher_cache"),
               seeded=True, per_teacher=True),
    ModelEntry(cf_control.NAME, "distilled from the CF model alone", _student(cf_control.NAME),
               _at_run(cf_control.inputs), seeded=True, cost=False),
)}
STAGE_FOLDERS = ("split", "mostpop", "student_alone", "teacher", "teacher_cache", "student_distilled", "report",
                 "seeds", "llara", cf_control.CACHE, cf_control.NAME, TEACHERS_FOLDER)


def model_folders(run: Path, recipe, name: str) -> list[tuple[Path, int | None, Path]]:
    """(folder, teacher seed, teacher root) of every folder of the model that exists: RUN/NAME and its
    extra seeds RUN/seeds/NAME-S, in every teacher root (distill.teacher_seeds) for a model per teacher
    (teacher seed None for the others)."""
    entry = MODELS[name]
    roots = teacher_roots(run, recipe) if entry.per_teacher else [(None, Path(run))]
    found = []
    for teacher, root in roots:
        dirs = [root / name] + (sorted((root / "seeds").glob(f"{name}-*")) if entry.seeded else [])
        found += [(d, teacher, root) for d in dirs if d.is_dir()]
    return found


def current_records(run: Path, recipe, split: Split, name: str) -> tuple[list[tuple[Path, dict, int | None]],
                                                                        list[Path]]:
    """(folder, metrics record, teacher seed) of each of the model's seeds built from exactly this recipe's
    inputs, and the folders that are stale (built from other inputs: another recipe, split or upstream model)."""
    from distill.artifacts import check_record
    from distill.errors import AnyoError
    entry, current, stale = MODELS[name], [], []
    for folder, teacher, root in model_folders(run, recipe, name):
        if not (folder / "metrics.json").is_file():
            continue
        record = check_record(folder / "metrics.json")  # an edited record is an error, never a result
        try:
            ok = record.get("inputs") == entry.inputs(recipe, run, split, record.get("seed", recipe.seed), root)
        except (AnyoError, OSError):  # an upstream artifact is missing
            ok = False
        (current if ok else stale).append((folder, record, teacher) if ok else folder)
    return current, stale


def load_retriever(run: Path, split: Split, name: str, backend: str = "hf") -> Retriever:
    return MODELS[name].load(Path(run), split, backend)
