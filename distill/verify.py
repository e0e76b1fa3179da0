"""`anyo verify RUN`: one line per artifact — ok, stale, corrupt or incomplete — and a non-zero exit
unless every artifact is ok.

- stale: intact, but built from other inputs than the run's recipe (RUN/recipe.yaml), split or
  upstream model (a StaleError);
- corrupt: its files do not match its own record, or cannot be read at all;
- incomplete: a stage that was interrupted (a resume folder, a cache still being written).
Every check catches everything: a malformed file is reported, never a traceback.

`verify_run` is the one check of a run: `anyo verify` prints its rows, `anyo export` refuses a run with a row
that is not ok (`check_run`). What seals each artifact: docs/run-layout.md.
"""

from __future__ import annotations

from pathlib import Path

from distill.artifacts import check_sealed_folder, load_array
from distill.cache import TeacherCache
from distill.config import load_recipe
from distill.data import load_split
from distill.errors import ArtifactError, ConfigError, StaleError
from distill.runs import (CF_CACHE, EXTERNAL, MODELS, cache_up_to_date, cf_cache_up_to_date, llara_inputs, model_folders,
                          report_inputs, symlink_message, symlinks, teacher_roots)
from student.model import load_student
from teacher.checkpoint import check_teacher

Row = tuple[str, str, str]


def _check(name: str, fn) -> Row:
    try:
        return name, "ok", fn() or ""
    except StaleError as e:
        return name, "stale", str(e)
    except Exception as e:  # noqa: BLE001 — anything unreadable is corrupt, and verify must never crash
        return name, "corrupt", str(e).splitlines()[0] if str(e) else type(e).__name__


def _record(folder: Path, split) -> dict:
    """metrics.json, the files it seals (every file of the stage) and test_ranks.npy, checked against the split."""
    record = check_sealed_folder(folder / "metrics.json")
    if not isinstance(record.get("metrics"), dict) or "NDCG@10" not in record["metrics"]:
        raise ValueError(f"{folder / 'metrics.json'}: not a metrics record (no metrics.NDCG@10)")
    ranks = load_array(folder / "test_ranks.npy")
    if ranks.shape != (split.n_users,):
        raise ValueError(f"{folder / 'test_ranks.npy'}: shape {ranks.shape}, expected ({split.n_users},)")
    if record.get("split_hash") != split.hash:
        raise StaleError(f"{folder / 'metrics.json'}: built from split {record.get('split_hash')}, "
                         f"the run's split is {split.hash}")
    return record


def _model_rows(run: Path, recipe, split) -> list[Row]:
    rows = []
    for name, entry in MODELS.items():
        for folder, _, root in model_folders(run, recipe, name):
            def check(folder=folder, entry=entry, name=name, root=root):
                record = _record(folder, split)
                if name == "teacher":
                    check_teacher(folder, run / "student_alone", split.hash)
                elif name not in ("mostpop", EXTERNAL):  # nothing to load: a baseline, imported vectors
                    load_student(folder, split.hash, split.n_items)
                if record.get("inputs") != entry.inputs(recipe, run, split, record.get("seed", recipe.seed), root):
                    raise StaleError(f"{folder / 'metrics.json'}: built from other inputs than the run's recipe "
                                     f"and upstream artifacts")
                return f"test NDCG@10 {record['metrics']['NDCG@10']:.4f}"
            rows.append(_check(str(folder.relative_to(run)), check))
    return rows


def _generative_row(run: Path, recipe, split) -> Row:
    """RUN/llara: its sealed record, built from this run's split, CF model and recipe sections."""
    def check():
        record = check_sealed_folder(run / "llara" / "metrics.json")
        if record.get("inputs") != llara_inputs(recipe, run, split, record.get("seed", recipe.seed)):
            raise StaleError("llara/metrics.json: built from other inputs than the run's recipe and CF model")
        return f"test HR@1 {record['candidates']['HR@1']:.4f} (20 candidates)"
    return _check("llara", check)


def _cache_rows(run: Path, recipe, split) -> list[Row]:
    """Every teacher seed's cache and the CF-only control's: intact, and built from this run's inputs."""
    def check(folder: Path, current):
        cache = TeacherCache(folder, split.hash, split.n_items)
        if current() is None:
            raise StaleError("cache built from another teacher or other distill options than the run's")
        return f"{len(cache)} queries, K={cache.k}"

    caches = [(root / "teacher_cache", lambda t=t: cache_up_to_date(recipe, run, split, t)) for t, root in
              teacher_roots(run, recipe)]
    caches.append((run / CF_CACHE, lambda: cf_cache_up_to_date(recipe, run, split)))
    return [_check(str(folder.relative_to(run)), lambda folder=folder, current=current: check(folder, current))
            for folder, current in caches if folder.is_dir()]


def _report_row(run: Path, recipe) -> Row:
    def check():
        report = check_sealed_folder(run / "report" / "report.json")
        if "models" not in report:
            raise ValueError("report/report.json: not a report")
        if report.get("inputs") != report_inputs(recipe, run):
            raise StaleError("report built from other metrics or bench options: rerun `anyo bench`")
    return _check("report", check)


def verify_run(run: Path) -> list[Row]:
    recipe_file = run / "recipe.yaml"
    found: dict = {}

    def recipe():
        found["recipe"] = load_recipe(recipe_file if recipe_file.is_file() else None)
        return "" if recipe_file.is_file() else "no recipe.yaml: checked against the default recipe"

    def split():
        found["split"] = load_split(run / "split")
        return f"hash {found['split'].hash}"

    rows = [_check("recipe", recipe), _check("split", split)]
    if "recipe" not in found or "split" not in found:
        return rows
    recipe, split = found["recipe"], found["split"]
    rows += _model_rows(run, recipe, split)
    if (run / "llara").is_dir():
        rows.append(_generative_row(run, recipe, split))
    rows += _cache_rows(run, recipe, split)
    if (run / "report").is_dir():
        rows.append(_report_row(run, recipe))
    roots = ["", "teachers/seed-*/"]
    leftovers = [p for r in roots for pattern in ("*.resume", "seeds/*.resume", "*.partial")
                 for p in sorted(run.glob(r + pattern))]
    for leftover in leftovers:
        rows.append((str(leftover.relative_to(run)), "incomplete", "interrupted; rerun the command to finish it"))
    for broken in [p for r in roots for pattern in ("*.resume.broken-*", "seeds/*.resume.broken-*")
                   for p in sorted(run.glob(r + pattern))]:
        rows.append((str(broken.relative_to(run)), "corrupt", "an unreadable resume state a rerun set aside: delete it"))
    return _symlink_rows(run, rows)


def _symlink_rows(run: Path, rows: list[Row]) -> list[Row]:
    """A row whose artifact holds a symbolic link is corrupt, whatever the link points to; a link outside every
    artifact gets its own row."""
    links, named = symlinks(run), []
    for i, (name, _, _) in enumerate(rows):
        where = run / ("recipe.yaml" if name == "recipe" else name)
        if inside := [link for link in links if link == where or where in link.parents]:
            rows[i] = (name, "corrupt", symlink_message(inside[0]))
            named += inside
    return rows + [(str(link.relative_to(run)), "corrupt", symlink_message(link)) for link in links
                   if link not in named]


def check_run(run: Path) -> None:
    """An ArtifactError naming the first artifact of `run` that `anyo verify` would not call ok."""
    for name, state, why in verify_run(run):
        if state != "ok":
            raise ArtifactError(f"{run}: `anyo verify` calls {name} {state}: {why}")


def cmd_verify(args) -> int:
    run = Path(args.run)
    if not run.is_dir() or not any(run.iterdir()):  # one line and exit 2, not a table of failures
        what = "no such folder" if not run.exists() else "not a folder" if not run.is_dir() else "an empty folder"
        raise ConfigError(f"{run}: {what}, there is no run to verify")
    rows = verify_run(run)
    width = max(len(r[0]) for r in rows)
    for name, state, why in rows:
        print(f"{name:<{width}}  {state:<10}  {why}")
    return 0 if all(state == "ok" for _, state, _ in rows) else 1
