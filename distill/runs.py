"""What a run is: its folders, the models it holds, and when each stage's artifact is up to date.

    RUN/recipe.yaml        the resolved recipe of the last command (after --set)
    RUN/split/             the leave-one-out split                   anyo prepare
    RUN/mostpop/           MostPop metrics                           anyo mostpop
    RUN/student_alone/     SASRec trained alone (the CF model)       anyo student train
    RUN/teacher/           LLM retriever: adapter + heads            anyo teacher train
    RUN/teacher_cache/     teacher top-K for training positions      anyo teacher infer
    RUN/student_distilled/ student trained from the cache            anyo distill
    RUN/report/            teacher vs student                        anyo bench
    RUN/llara/             the LLaRA-style generative baseline       anyo baseline llara
    RUN/seeds/NAME-S/      the other seeds of a seeded model (`--seeds`)

Every stage's artifact records `inputs`, the hashes it was built from; it is up to date when the record is
intact and its inputs equal what this module computes now. The stages, the report, `anyo verify` and
export all ask here, so "stale" has one definition, and `MODELS` is the one table of the models a run
holds (folder name -> label, loader, inputs), looked up by name, never by display label.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from distill.artifacts import check_record, json_digest, read_json, read_record, sha256_file
from distill.baselines import MostPop
from distill.cache import cache_key
from distill.config import Recipe
from distill.data import Split
from distill.histories import Histories
from distill.errors import AnyoError, ArtifactError, ConfigError
from distill.resume import clear_resume
from student.model import load_student
from teacher.infer import wrap_backend
from teacher.model import load_teacher

STAGE_FOLDERS = ("split", "mostpop", "student_alone", "teacher", "teacher_cache", "student_distilled", "report",
                 "seeds", "llara")
STAGE_MARKERS = ("manifest.json", "metrics.json", "teacher.json", "config.json", "report.json", "recipe.yaml")


class Retriever(Protocol):
    def encode(self, histories: Histories) -> np.ndarray: ...   # (B, D) float32 query vectors
    def item_vectors(self) -> np.ndarray: ...                    # (N+1, D) float32, row 0 padding


# ---------------------------------------------------------------- folders

def model_dir(run: Path, name: str, seed: int, recipe: Recipe) -> Path:
    """RUN/NAME for the recipe's seed, RUN/seeds/NAME-SEED for the others."""
    return run / name if seed == recipe.seed else run / "seeds" / f"{name}-{seed}"


def model_dirs(run: Path, name: str) -> list[Path]:
    """RUN/NAME and its extra seeds RUN/seeds/NAME-S, those that hold a finished model."""
    dirs = [run / name] + sorted((run / "seeds").glob(f"{name}-*"))
    return [d for d in dirs if (d / "metrics.json").is_file()]


def _holds_artifacts(folder: Path) -> bool:
    return any((folder / m).is_file() for m in STAGE_MARKERS)


def check_file_target(path: Path, option: str) -> None:
    """A file a command will write: not a folder, and not inside a run's stage folder or the run itself."""
    if path.is_dir():
        raise ConfigError(f"{option} {path}: is a folder, expected a file path")
    if _holds_artifacts(path.parent):
        raise ConfigError(f"{option} {path}: {path.parent} holds a run's artifacts; write elsewhere")


def check_folder_target(path: Path, run: Path, option: str, keep: str) -> None:
    """A folder a command will replace whole: never the run, a folder above it, or another stage's folder,
    and, if it exists, only a previous output of the same command (it holds `keep`)."""
    target, root = path.resolve(), run.resolve()
    if target == root or target in root.parents:
        raise ConfigError(f"{option} {path}: would replace the run folder {run}")
    if root in target.parents:
        parts = target.relative_to(root).parts
        top = parts[0]
        if (top in STAGE_FOLDERS and parts != ("report",)) or top.endswith((".resume", ".partial", ".events")) \
                or ".resume.broken-" in top:
            raise ConfigError(f"{option} {path}: is inside the run's stage folder {run / top}; choose a new folder")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path}: is a file, expected a folder")
    if path.is_dir() and any(path.iterdir()) and not (path / keep).is_file():
        raise ConfigError(f"{option} {path}: exists and is not an earlier output of this command "
                          f"(no {keep}); choose a new folder")


def check_run_folder(run: Path) -> None:
    """A folder that holds a prepared run (the commands that read a whole run start here)."""
    if not run.is_dir():
        raise ConfigError(f"{run}: no such run folder")
    if not (run / "split" / "manifest.json").is_file():
        what = "an empty folder" if not any(run.iterdir()) else "not a run folder"
        raise ConfigError(f"{run}: {what} (no split/manifest.json; `anyo run RECIPE --out {run}` makes one)")


# ---------------------------------------------------------------- each stage's inputs

def mostpop_inputs(recipe: Recipe, run: Path, split: Split, seed: int) -> dict:
    return {"split_hash": split.hash, "eval": recipe.section_hash("eval")}


def student_inputs(recipe: Recipe, run: Path, split: Split, seed: int) -> dict:
    return {"split_hash": split.hash, "recipe": recipe.section_hash("data", "student", "eval"), "seed": seed}


def teacher_inputs(recipe: Recipe, run: Path, split: Split, seed: int) -> dict:
    return {"split_hash": split.hash, "recipe": recipe.section_hash("data", "student", "teacher", "eval"),
            "seed": seed, "cf_sha256": sha256_file(run / "student_alone" / "model.safetensors")}


def distill_inputs(recipe: Recipe, run: Path, split: Split, seed: int) -> dict:
    wanted = {"split_hash": split.hash, "recipe": recipe.section_hash("data", "student", "distill", "eval"),
              "seed": seed, "cache_sha256": sha256_file(run / "teacher_cache" / "manifest.json")}
    if recipe.distill.warm_start:
        wanted["init_sha256"] = sha256_file(model_dir(run, "student_alone", seed, recipe) / "model.safetensors")
    return wanted


def llara_inputs(recipe: Recipe, run: Path, split: Split, seed: int) -> dict:
    return {"split_hash": split.hash, "recipe": recipe.section_hash("data", "teacher", "llara"),
            "seed": seed, "cf_sha256": sha256_file(run / "student_alone" / "model.safetensors")}


def report_inputs(recipe: Recipe, run: Path) -> dict:
    """Every model's metrics.json (the report reads nothing else of them) and the sections it reports on."""
    wanted = {str(p.relative_to(run)): sha256_file(p) for p in sorted(run.glob("**/metrics.json"))
              if "report" not in p.relative_to(run).parts}
    wanted["recipe"] = recipe.section_hash("data", "student", "teacher", "distill", "eval", "bench")
    return wanted


# ---------------------------------------------------------------- up to date

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


def cache_up_to_date(recipe: Recipe, run: Path, split: Split) -> dict | None:
    """The cache's manifest if it is intact and was built from this run's split, teacher and options."""
    out = run / "teacher_cache"
    if not (out / "manifest.json").is_file():
        return None
    key = cache_key(recipe, split, read_record(run / "teacher" / "teacher.json", "checkpoint_hash")["checkpoint_hash"])
    try:
        manifest = read_json(out / "manifest.json")
    except ArtifactError:  # unreadable: not up to date, inference rebuilds the cache
        return None
    if not isinstance(manifest, dict) or json_digest({k: v for k, v in manifest.items() if k != "manifest_sha256"}) \
            != manifest.get("manifest_sha256"):
        return None
    return manifest if all(manifest.get(k) == v for k, v in key.items()) else None


# ---------------------------------------------------------------- the models a run holds

@dataclass(frozen=True)
class ModelEntry:
    name: str                                       # folder name inside RUN (seeds: RUN/seeds/NAME-S)
    label: str                                      # how reports call it
    load: Callable[[Path, Split, str], Retriever]   # (run folder, split, inference backend) -> retriever
    inputs: Callable[..., dict]                     # (recipe, run, split, seed) -> what its record must hold
    seeded: bool = False                            # trained once per seed with `--seeds`
    exportable: bool = False                        # a SASRec `anyo export` can serve


def _mostpop(run: Path, split: Split, backend: str) -> Retriever:
    return MostPop(split)


def _student(name: str):
    def load(run: Path, split: Split, backend: str) -> Retriever:
        return load_student(run / name, split.hash, split.n_items)[0]
    return load


def _teacher(run: Path, split: Split, backend: str) -> Retriever:
    model, _ = load_teacher(run / "teacher", run / "student_alone", split)
    return wrap_backend(model, backend)


MODELS = {e.name: e for e in (
    ModelEntry("mostpop", "MostPop", _mostpop, mostpop_inputs),
    ModelEntry("student_alone", "student alone", _student("student_alone"), student_inputs, seeded=True,
               exportable=True),
    ModelEntry("teacher", "teacher", _teacher, teacher_inputs),
    ModelEntry("student_distilled", "distilled student", _student("student_distilled"), distill_inputs,
               seeded=True, exportable=True),
)}


def current_records(run: Path, recipe: Recipe, split: Split, name: str) -> tuple[list[tuple[Path, dict]], list[Path]]:
    """(folder, metrics record) of each of the model's seeds built from exactly this recipe's inputs, and
    the folders that are stale (built from other inputs: another recipe, split or upstream model)."""
    entry, current, stale = MODELS[name], [], []
    for folder in model_dirs(run, name):
        record = check_record(folder / "metrics.json")  # an edited record is an error, never a result
        try:
            ok = record.get("inputs") == entry.inputs(recipe, run, split, record.get("seed", recipe.seed))
        except (AnyoError, OSError):  # an upstream artifact is missing
            ok = False
        (current if ok else stale).append((folder, record) if ok else folder)
    return current, stale


def load_retriever(run: Path, split: Split, name: str, backend: str = "hf") -> Retriever:
    return MODELS[name].load(Path(run), split, backend)
