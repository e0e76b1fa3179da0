"""`anyo verify RUN`: one line per artifact — ok, stale (built from other inputs) or corrupt."""

from __future__ import annotations

from pathlib import Path

from distill.artifacts import read_json
from distill.errors import AnyoError


def _check(name: str, fn) -> tuple[str, str, str]:
    try:
        return name, "ok", fn() or ""
    except AnyoError as e:
        text = str(e)
        state = "stale" if "built from" in text or "trained on split" in text else "corrupt"
        return name, state, text


def verify_run(run: Path) -> list[tuple[str, str, str]]:
    from distill.cache import TeacherCache
    from distill.data import load_split
    from student.model import load_student
    from teacher.model import checkpoint_hash

    split = None
    rows = []

    def check_split():
        nonlocal split
        split = load_split(run / "split")
        return f"hash {split.hash}"

    rows.append(_check("split", check_split))
    if split is None:
        return rows
    for name in ("student_alone", "student_distilled"):
        for folder in [run / name] + sorted((run / "seeds").glob(f"{name}-*")):
            if folder.is_dir():
                rows.append(_check(str(folder.relative_to(run)), lambda f=folder: load_student(f, split.hash, split.n_items) and ""))

    def check_teacher():
        meta = read_json(run / "teacher" / "teacher.json")
        if meta.get("split_hash") != split.hash:
            raise AnyoError(f"teacher built from split {meta.get('split_hash')}, the run's split is {split.hash}")
        if checkpoint_hash(run / "teacher") != meta.get("checkpoint_hash"):
            raise AnyoError("adapter or heads do not match teacher.json")
        return f"checkpoint {meta['checkpoint_hash']}"

    if (run / "teacher").is_dir():
        rows.append(_check("teacher", check_teacher))

    def check_cache():
        cache = TeacherCache(run / "teacher_cache", split.hash, split.n_items)
        teacher = read_json(run / "teacher" / "teacher.json")["checkpoint_hash"]
        if cache.manifest["teacher_hash"] != teacher:
            raise AnyoError(f"cache built from teacher {cache.manifest['teacher_hash']}, the run's teacher is {teacher}")
        return f"{len(cache)} queries, K={cache.k}"

    if (run / "teacher_cache").is_dir():
        rows.append(_check("teacher_cache", check_cache))

    def check_report():
        report = read_json(run / "report" / "report.json")
        if report.get("split_hash") != split.hash:
            raise AnyoError(f"report built from split {report.get('split_hash')}, the run's split is {split.hash}")

    if (run / "report").is_dir():
        rows.append(_check("report", check_report))
    return rows


def cmd_verify(args) -> int:
    rows = verify_run(Path(args.run))
    width = max(len(r[0]) for r in rows)
    for name, state, why in rows:
        print(f"{name:<{width}}  {state:<7}  {why}")
    return 0 if all(state == "ok" for _, state, _ in rows) else 1
