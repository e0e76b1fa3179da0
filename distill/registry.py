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
from distill.stages import distill as distill_stage
from distill.stages import mostpop as mostpop_stage
from distill.stages import student as student_stage
from distill.stages import teacher as teacher_stage


class Retriever(Protocol):
    def encode(self, histories: Histories) -> np.ndarray: ...   # (B, D) float32 query vectors
    def item_vectors(self) -> np.ndarray: ...                    # (N+1, D) float32, row 0 padding


@dataclass(frozen=True)
class ModelEntry:
    name: str                                       # folder name inside RUN (seeds: RUN/seeds/NAME-S)
    label: str                                      # how reports call it
    load: Callable[[Path, Split, str], Retriever]   # (run folder, split, inference backend) -> retriever
    inputs: Callable[..., dict]                     # (recipe, run, split, seed) -> what its record must hold
    seeded: bool = False                            # trained once per seed with `--seeds`


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


MODELS = {e.name: e for e in (
    ModelEntry("mostpop", "MostPop", _mostpop, mostpop_stage.inputs),
    ModelEntry("student_alone", "student alone", _student("student_alone"), student_stage.inputs, seeded=True),
    ModelEntry("teacher", "teacher", _teacher, teacher_stage.inputs),
    ModelEntry("student_distilled", "distilled student", _student("student_distilled"), distill_stage.inputs,
               seeded=True),
)}
STAGE_FOLDERS = ("split", "mostpop", "student_alone", "teacher", "teacher_cache", "student_distilled", "report",
                 "seeds", "llara")


def model_dirs(run: Path, name: str) -> list[Path]:
    """RUN/NAME and its extra seeds RUN/seeds/NAME-S, those that hold a finished model."""
    dirs = [run / name] + sorted((run / "seeds").glob(f"{name}-*"))
    return [d for d in dirs if (d / "metrics.json").is_file()]


def current_records(run: Path, recipe, split: Split, name: str) -> tuple[list[tuple[Path, dict]], list[Path]]:
    """(folder, metrics record) of each of the model's seeds built from exactly this recipe's inputs, and
    the folders that are stale (built from other inputs: another recipe, split or upstream model)."""
    from distill.artifacts import check_record
    from distill.errors import AnyoError
    entry, current, stale = MODELS[name], [], []
    for folder in model_dirs(run, name):
        record = check_record(folder / "metrics.json")  # an edited record is an error, never a result
        try:
            ok = record.get("inputs") == entry.inputs(
                recipe, run, split, record.get("seed", recipe.seed))
        except (AnyoError, OSError):  # an upstream artifact is missing
            ok = False
        (current if ok else stale).append((folder, record) if ok else folder)
    return current, stale


def load_retriever(run: Path, split: Split, name: str, backend: str = "hf") -> Retriever:
    return MODELS[name].load(Path(run), split, backend)
