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
    RUN/cf_teacher_cache/  the CF model alone as a teacher (w = 1)   the control, built by anyo run / bench
    RUN/teacher_external/  an imported teacher's quality (its vectors)  anyo teacher import
    RUN/student_cf_distilled/  a student distilled from it           anyo distill --cf-teacher
    RUN/seeds/NAME-S/      the other seeds of a seeded model (`--seeds`)
    RUN/teachers/seed-T/   teacher/, teacher_cache/, student_distilled/, seeds/ of teacher seed T other than
                           the recipe's (`--teacher-seeds`); every teacher reads RUN/student_alone, every
                           distilled student starts from the student alone of its own seed

Every stage's artifact records `inputs`, the hashes it was built from; it is up to date when the record is
intact and its inputs equal what this module computes now. The stages, the report, `anyo verify` and
export all ask here, so "stale" has one definition, and `MODELS` is the one table of the models a run
holds (folder name -> label, loader, inputs), looked up by name, never by display label.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import re

import numpy as np

from distill.artifacts import check_record, check_sealed_folder, json_digest, read_json, read_record, sha256_file
from distill.baselines import MostPop
from distill.cache import cache_key
from distill.config import Recipe
from distill.data import Split
from distill.histories import Histories
from distill.search import RANKING_PROTOCOL
from distill.errors import AnyoError, ArtifactError, ConfigError
from distill.resume import clear_resume
from student.model import load_student
from teacher.cf_only import cf_cache_key
from teacher.imported import imported_cache_key
from teacher.infer import wrap_backend
from teacher.checkpoint import load_teacher

CF_CACHE = "cf_teacher_cache"        # the CF-only control: the CF model alone as a teacher
CF_DISTILLED = "student_cf_distilled"
EXTERNAL = "teacher_external"        # an imported teacher's quality, scored from its imported vectors
TEACHERS = "teachers"                # RUN/teachers/seed-T: the teachers of seeds other than the recipe's
STAGE_FOLDERS = ("split", "mostpop", "student_alone", "teacher", "teacher_cache", "student_distilled", "report",
                 "seeds", "llara", CF_CACHE, CF_DISTILLED, TEACHERS, EXTERNAL)
STAGE_MARKERS = ("manifest.json", "metrics.json", "teacher.json", "config.json", "report.json", "recipe.yaml")


class Retriever(Protocol):
    def encode(self, histories: Histories) -> np.ndarray: ...   # (B, D) float32 query vectors
    def item_vectors(self) -> np.ndarray: ...                    # (N+1, D) float32, row 0 padding


# ---------------------------------------------------------------- folders

def model_dir(run: Path, name: str, seed: int, recipe: Recipe) -> Path:
    """RUN/NAME for the recipe's seed, RUN/seeds/NAME-SEED for the others."""
    return run / name if seed == recipe.seed else run / "seeds" / f"{name}-{seed}"


_TEACHER_SEED = re.compile(r"seed-(\d+)")


def teacher_root(run: Path, recipe: Recipe, seed: int) -> Path:
    """The folder holding teacher/, teacher_cache/ and the distilled students of teacher seed `seed`."""
    return Path(run) if seed == recipe.seed else Path(run) / TEACHERS / f"seed-{seed}"


def teacher_roots(run: Path, recipe: Recipe) -> list[tuple[int, Path]]:
    """(teacher seed, root) of every teacher root the run holds, the recipe's seed first, then by seed; a
    folder's teacher seed is read from its name, never from its order."""
    others = []
    for p in (Path(run) / TEACHERS).glob("seed-*"):
        if (m := _TEACHER_SEED.fullmatch(p.name)) and p.is_dir() and int(m.group(1)) != recipe.seed:
            others.append((int(m.group(1)), p))
    return [(recipe.seed, Path(run))] + sorted(others)


def teacher_seed_list(recipe: Recipe, n: int) -> list[int]:
    """The seeds of `--teacher-seeds n`: the recipe's seed, then the next n - 1 (as `--seeds`)."""
    return [recipe.seed + i for i in range(n)]


def _holds_artifacts(folder: Path) -> bool:
    return any((folder / m).is_file() for m in STAGE_MARKERS)


def symlinks(folder: Path) -> list[Path]:
    """Every symbolic link under `folder`, sorted (links to folders are not followed)."""
    found = []
    for root, dirs, files in os.walk(folder):
        found += [Path(root) / name for name in dirs + files if (Path(root) / name).is_symlink()]
    return sorted(found)


def symlink_message(link: Path) -> str:
    return (f"{link}: is a symbolic link (to {os.readlink(link)}); anyo reads and writes only the files it "
            f"wrote: replace the link with a copy of its target")


def check_no_symlinks(run: Path) -> None:
    """A run folder a command will write into holds no symbolic link (a write or a rename could land elsewhere)."""
    links = symlinks(run) if run.is_dir() else []
    if links:
        raise ConfigError(symlink_message(links[0]))


def _refuse_symlink(path: Path, option: str) -> None:
    if path.is_symlink():
        raise ConfigError(f"{option} {path}: is a symbolic link (to {os.readlink(path)}); write to a real path")


def check_file_target(path: Path, option: str, inputs: dict[str, str], command: str) -> None:
    """A file `command` will write: not a symbolic link, a folder, a file in a run's stage folder or the run
    itself, nor one of its `inputs` (option -> path); if it exists, an earlier output of the same command (a
    record it sealed, naming it): a file anyo did not write is never replaced."""
    _refuse_symlink(path, option)
    if path.is_dir():
        raise ConfigError(f"{option} {path}: is a folder, expected a file path")
    if _holds_artifacts(path.parent):
        raise ConfigError(f"{option} {path}: {path.parent} holds a run's artifacts; write elsewhere")
    if not path.exists():
        return
    for name, given in inputs.items():
        if Path(given).exists() and path.samefile(given):
            raise ConfigError(f"{option} {path}: is the input {name}; write elsewhere")
    try:
        ours = check_record(path).get("command") == command
    except ArtifactError:
        ours = False
    if not ours:
        raise ConfigError(f"{option} {path}: exists and was not written by `{command}`; choose a new file "
                          f"(nothing was written)")


def check_apart_from_inputs(run: Path, inputs: dict[str, str | None]) -> None:
    """The run folder of a recipe command is none of the files and folders the recipe reads (`inputs`: key ->
    path), is not inside one, and holds none."""
    target = run.resolve()
    for key, given in inputs.items():
        if not given or not Path(given).exists():
            continue
        source = Path(given).resolve()
        where = "is" if source == target else "is inside" if source in target.parents else \
            "contains" if target in source.parents else None
        if where:
            raise ConfigError(f"--out {run}: {where} the recipe's input {key} ({given}); choose a run folder apart "
                              f"from the data and models it reads")


def check_folder_target(path: Path, run: Path, option: str, keep: str) -> None:
    """A folder a command will replace whole: never the run, a folder above it, or another stage's folder,
    and, if it exists, only a previous output of the same command (it holds `keep`)."""
    _refuse_symlink(path, option)
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
    return {"split_hash": split.hash, "eval": recipe.section_hash("eval"), "protocol": RANKING_PROTOCOL}


def student_inputs(recipe: Recipe, run: Path, split: Split, seed: int) -> dict:
    return {"split_hash": split.hash, "recipe": recipe.section_hash("data", "student", "eval"), "seed": seed,
            "protocol": RANKING_PROTOCOL}


def teacher_inputs(recipe: Recipe, run: Path, split: Split, seed: int) -> dict:
    return {"split_hash": split.hash, "recipe": recipe.section_hash("data", "student", "teacher", "eval"),
            "seed": seed, "cf_sha256": sha256_file(run / "student_alone" / "model.safetensors"),
            "protocol": RANKING_PROTOCOL, **deepspeed_file_input(recipe)}


def deepspeed_file_input(recipe: Recipe) -> dict:
    """The content hash of teacher.deepspeed_config, so an edited file makes the LLM stages stale."""
    path = recipe.teacher.deepspeed_config
    if path is None:
        return {}
    if not Path(path).is_file():
        raise ConfigError(f"teacher.deepspeed_config: {path}: no such file")
    return {"deepspeed_config_sha256": sha256_file(Path(path))}


def distill_inputs(recipe: Recipe, run: Path, split: Split, seed: int, cache: Path | None = None) -> dict:
    """A student distilled from `cache` (default RUN/teacher_cache), starting from its seed's student alone."""
    cache = run / "teacher_cache" if cache is None else cache
    wanted = {"split_hash": split.hash, "recipe": recipe.section_hash("data", "student", "distill", "eval"),
              "seed": seed, "cache_sha256": sha256_file(cache / "manifest.json"), "protocol": RANKING_PROTOCOL}
    if recipe.distill.warm_start:
        wanted["init_sha256"] = sha256_file(model_dir(run, "student_alone", seed, recipe) / "model.safetensors")
    return wanted


def cf_control_recipe(recipe: Recipe) -> Recipe:
    """The recipe the CF-only control distils with: the recipe's own, less what only a teacher with a text item
    side can give (`distill.cold_init`, the text tower `distill.ced_text_rows`: CED then reads the CF model's
    item table); the control is what the same distillation gives without any LLM."""
    return dataclasses.replace(recipe, distill=dataclasses.replace(recipe.distill, cold_init=False,
                                                                   ced_text_rows="none"))


def external_teacher_inputs(recipe: Recipe, run: Path, split: Split, seed: int) -> dict:
    """An imported teacher's metrics: scored from the query and item vectors of RUN/teacher_cache."""
    return {"split_hash": split.hash, "eval": recipe.section_hash("eval"), "protocol": RANKING_PROTOCOL,
            "cache_sha256": sha256_file(run / "teacher_cache" / "manifest.json")}


def llara_inputs(recipe: Recipe, run: Path, split: Split, seed: int) -> dict:
    return {"split_hash": split.hash, "recipe": recipe.section_hash("data", "teacher", "llara"),
            "seed": seed, "cf_sha256": sha256_file(run / "student_alone" / "model.safetensors"),
            **deepspeed_file_input(recipe)}


def report_inputs(recipe: Recipe, run: Path) -> dict:
    """Every model's metrics.json (the report reads nothing else of them) and the sections it reports on."""
    wanted = {str(p.relative_to(run)): sha256_file(p) for p in sorted(run.glob("**/metrics.json"))
              if "report" not in p.relative_to(run).parts}
    wanted["recipe"] = recipe.section_hash("data", "student", "teacher", "distill", "eval", "bench")
    return wanted


# ---------------------------------------------------------------- up to date

def up_to_date(path: Path, inputs: dict) -> dict | None:
    """The record at `path` if it and its folder are intact (check_sealed_folder) and it was built from exactly
    `inputs`; a record that cannot be read, was edited, lists a truncated file or leaves a file of its folder out
    is not up to date: the stage is rebuilt."""
    if path.is_file():
        try:
            record = check_sealed_folder(path)
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


def current_manifest(folder: Path, key: dict) -> dict | None:
    """The manifest of the cache in `folder` if it is intact and was built from exactly `key`."""
    if not (folder / "manifest.json").is_file():
        return None
    try:
        manifest = read_json(folder / "manifest.json")
    except ArtifactError:  # unreadable: not up to date, inference rebuilds the cache
        return None
    if not isinstance(manifest, dict) or json_digest({k: v for k, v in manifest.items() if k != "manifest_sha256"}) \
            != manifest.get("manifest_sha256"):
        return None
    return manifest if all(manifest.get(k) == v for k, v in key.items()) else None


def cache_up_to_date(recipe: Recipe, run: Path, split: Split, teacher_seed: int | None = None) -> dict | None:
    """The teacher cache's manifest if it was built from this run's split, that teacher and the options."""
    root = teacher_root(run, recipe, recipe.seed if teacher_seed is None else teacher_seed)
    if not (root / "teacher_cache" / "manifest.json").is_file():
        return None
    if not (root / "teacher" / "teacher.json").is_file() and (key := imported_key(recipe, split, root)) is not None:
        return current_manifest(root / "teacher_cache", key)
    teacher_hash = read_record(root / "teacher" / "teacher.json", "checkpoint_hash")["checkpoint_hash"]
    return current_manifest(root / "teacher_cache", cache_key(recipe, split, teacher_hash))


def imported_key(recipe: Recipe, split: Split, root: Path) -> dict | None:
    """The key an imported cache (`anyo teacher import`) in ROOT/teacher_cache must show, None for any other."""
    try:
        m = read_json(root / "teacher_cache" / "manifest.json")
    except ArtifactError:
        return None
    if not isinstance(m, dict) or not isinstance(m.get("teacher"), dict) or m["teacher"].get("kind") != "external":
        return None
    return imported_cache_key(recipe, split, m.get("teacher_hash"), m.get("k"))


def cf_cache_up_to_date(recipe: Recipe, run: Path, split: Split) -> dict | None:
    """The CF-only control's cache manifest if it was built from this run's CF model, split and options."""
    cf_sha256 = sha256_file(run / "student_alone" / "model.safetensors")
    return current_manifest(run / CF_CACHE, cf_cache_key(recipe, split, cf_sha256))


# ---------------------------------------------------------------- the models a run holds

@dataclass(frozen=True)
class ModelEntry:
    name: str                                       # folder name inside RUN (seeds: RUN/seeds/NAME-S)
    label: str                                      # how reports call it
    load: Callable[[Path, Split, str], Retriever] | None  # (run, split, backend) -> retriever; None: nothing to run
    inputs: Callable[..., dict]                     # (recipe, run, split, seed, root) -> what its record must hold
    seeded: bool = False                            # trained once per seed with `--seeds`
    per_teacher: bool = False                       # one per teacher seed (`--teacher-seeds`), in its teacher root
    cost: bool = True                               # its serving cost is measured (not when another row's is its own)
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


def _at_run(inputs: Callable[..., dict]) -> Callable[..., dict]:
    """A stage's inputs(recipe, run, split, seed), which do not depend on the teacher root."""
    return lambda recipe, run, split, seed, root: inputs(recipe, run, split, seed)


MODELS = {e.name: e for e in (
    ModelEntry("mostpop", "MostPop", _mostpop, _at_run(mostpop_inputs)),
    ModelEntry("student_alone", "student alone", _student("student_alone"), _at_run(student_inputs), seeded=True,
               exportable=True),
    ModelEntry("teacher", "teacher", _teacher, _at_run(teacher_inputs), per_teacher=True),
    ModelEntry("student_distilled", "distilled student", _student("student_distilled"),
               lambda recipe, run, split, seed, root: distill_inputs(recipe, run, split, seed, root / "teacher_cache"),
               seeded=True, per_teacher=True, exportable=True),
    ModelEntry(CF_DISTILLED, "distilled from the CF model alone", _student(CF_DISTILLED),
               lambda recipe, run, split, seed, root: distill_inputs(cf_control_recipe(recipe), run, split, seed,
                                                                     run / CF_CACHE),
               seeded=True, cost=False),
    ModelEntry(EXTERNAL, "external teacher (imported)", None, _at_run(external_teacher_inputs), cost=False),
)}


def model_folders(run: Path, recipe: Recipe, name: str) -> list[tuple[Path, int | None, Path]]:
    """(folder, teacher seed, teacher root) of every folder of the model that exists: RUN/NAME and its
    extra seeds RUN/seeds/NAME-S, in every teacher root for a model per teacher (teacher seed None for
    the others)."""
    entry = MODELS[name]
    roots = teacher_roots(run, recipe) if entry.per_teacher else [(None, Path(run))]
    found = []
    for teacher, root in roots:
        dirs = [root / name] + (sorted((root / "seeds").glob(f"{name}-*")) if entry.seeded else [])
        found += [(d, teacher, root) for d in dirs if d.is_dir()]
    return found


def current_records(run: Path, recipe: Recipe, split: Split, name: str) -> tuple[list[tuple[Path, dict, int | None]],
                                                                                 list[Path]]:
    """(folder, metrics record, teacher seed) of each of the model's seeds built from exactly this recipe's
    inputs, and the folders that are stale (built from other inputs: another recipe, split or upstream model)."""
    entry, current, stale = MODELS[name], [], []
    for folder, teacher, root in model_folders(run, recipe, name):
        if not (folder / "metrics.json").is_file():
            continue
        record = check_sealed_folder(folder / "metrics.json")  # an edited record is an error, never a result
        try:
            ok = record.get("inputs") == entry.inputs(recipe, run, split, record.get("seed", recipe.seed), root)
        except (AnyoError, OSError):  # an upstream artifact is missing
            ok = False
        (current if ok else stale).append((folder, record, teacher) if ok else folder)
    return current, stale


def load_retriever(run: Path, split: Split, name: str, backend: str = "hf") -> Retriever:
    return MODELS[name].load(Path(run), split, backend)
