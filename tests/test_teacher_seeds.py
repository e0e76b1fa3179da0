"""`anyo run --teacher-seeds N`: N teachers, each with its cache and distilled students; a three-level report."""

import json
import shutil

from helpers import RECIPE, sets
from distill.cli import main


def test_teacher_seeds_train_each_teacher_its_cache_and_students(tiny_run, tmp_path, capsys):
    src, overrides = tiny_run
    run = tmp_path / "t"
    shutil.copytree(src, run)            # teacher 0 and student seed 0 are up to date; the rest is trained
    assert main(["run", RECIPE, "--out", str(run), "--seeds", "2", "--teacher-seeds", "2"] + sets(overrides)) == 0
    other = run / "teachers" / "seed-1"
    for path in ("teacher/metrics.json", "teacher_cache/manifest.json", "student_distilled/metrics.json",
                 "seeds/student_distilled-1/metrics.json"):
        assert (other / path).is_file(), path
    assert json.loads((other / "teacher" / "metrics.json").read_text())["seed"] == 1
    r = json.loads((run / "report" / "report.json").read_text())
    teacher, distilled = r["models"]["teacher"], r["models"]["student_distilled"]
    assert (teacher["teachers"], teacher["seeds"]) == (2, 2) and (distilled["teachers"], distilled["seeds"]) == (2, 4)
    assert set(teacher["NDCG@10_by_teacher"]) == {"0", "1"}
    for key, teachers in (("distilled_vs_alone", [2, 1]), ("distilled_vs_teacher", [2, 2]),
                          ("llm_vs_cf_teacher", [2, 1])):
        c = r["comparisons"][key]["NDCG@10"]
        assert c["ci_method"] == "teachers+seeds+users" and c["teachers"] == teachers, key
        assert {(p["teacher"], p["seed"]) for p in c["per_seed"]} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    md = (run / "report" / "report.md").read_text()
    assert "| distilled student | 2 teachers x 2 seeds |" in md and "| teacher | 2 teachers |" in md
    assert "The teacher was trained once" not in md
    capsys.readouterr()
    assert main(["verify", str(run)]) == 0
    lines = {l.split()[0]: l.split()[1] for l in capsys.readouterr().out.splitlines()}
    assert lines["teachers/seed-1/teacher_cache"] == "ok" and lines["cf_teacher_cache"] == "ok"
    assert lines["teachers/seed-1/seeds/student_distilled-1"] == "ok"
