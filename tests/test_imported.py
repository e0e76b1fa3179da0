"""Bring your own teacher: `anyo teacher import` / `export-cache` and the Python protocol (teacher/imported.py)."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import RECIPE, sets, tiny_recipe_overrides

from distill.cache import TeacherCache
from distill.cli import main
from distill.config import load_recipe
from distill.data import load_split
from distill.harness import evaluate
from distill.positions import training_positions


@pytest.fixture(scope="module")
def source_run(tmp_path_factory, toy_data):
    """A run with the student alone and, as its teacher cache, the CF model's (built without any LLM),
    exported in the public layout."""
    from student.model import load_student
    from teacher.cf_only import build_cf_cache
    base = tmp_path_factory.mktemp("byot")
    overrides = tiny_recipe_overrides(toy_data, base / "no-llm")
    run = base / "a"
    assert main(["student", "train", RECIPE, "--out", str(run)] + sets(overrides)) == 0
    recipe, split = load_recipe(RECIPE, overrides), load_split(run / "split")
    cf, _ = load_student(run / "student_alone", split.hash, split.n_items)
    build_cf_cache(recipe, split, cf, "cf", run / "teacher_cache")
    assert main(["teacher", "export-cache", str(run), "--out", str(base / "t.parquet")]) == 0
    return run, overrides, base / "t.parquet", base / "t.items.parquet"


def new_run(source, path):
    """A second run folder of the same split and student alone, without a teacher cache."""
    path.mkdir()
    for stage in ("split", "student_alone"):
        shutil.copytree(source / stage, path / stage)
    return path


def tensors(folder):
    c = TeacherCache(folder)
    return {f"{i}/{k}": np.asarray(v) for i, t in enumerate(c.shards) for k, v in t.items()}


def test_export_then_import_gives_the_same_cache_and_student(source_run, tmp_path):
    run, overrides, topk, items = source_run
    b = new_run(run, tmp_path / "b")
    assert main(["teacher", "import", RECIPE, "--out", str(b), "--topk", str(topk), "--items", str(items)]
                + sets(overrides)) == 0
    a_t, b_t = tensors(run / "teacher_cache"), tensors(b / "teacher_cache")
    assert a_t.keys() == b_t.keys()
    for key in a_t:
        assert a_t[key].dtype == b_t[key].dtype and np.array_equal(a_t[key], b_t[key]), key
    assert (run / "teacher_cache" / "items.safetensors").read_bytes() == \
        (b / "teacher_cache" / "items.safetensors").read_bytes()
    m = TeacherCache(b / "teacher_cache").manifest
    assert m["teacher"]["kind"] == "external" and [s["role"] for s in m["teacher"]["sources"]] == ["topk", "items"]
    assert m["coverage"]["rows"] == sum(len(v) for k, v in a_t.items() if k.endswith("/user"))
    # the same student seed distilled from either cache: the same test ranks
    for r in (run, b):
        assert main(["distill", RECIPE, "--out", str(r)] + sets(overrides)) == 0
    assert np.array_equal(np.load(run / "student_distilled" / "test_ranks.npy"),
                          np.load(b / "student_distilled" / "test_ranks.npy"))
    # verify and the report (`anyo bench`'s stage, here without its CF-only control) treat it as any cache; the
    # report labels the teacher external, scored by the harness
    assert main(["verify", str(b)]) == 0
    from distill.stages import report as report_stage
    report_stage.run(load_recipe(b / "recipe.yaml", ["bench.measure_cost=false"]), b)
    report = json.loads((b / "report" / "report.json").read_text())
    cf_alone = json.loads((run / "student_alone" / "metrics.json").read_text())["metrics"]["NDCG@10"]
    ext = report["models"]["teacher_external"]
    assert ext["label"] == "external teacher (imported)" and ext["metrics"]["NDCG@10"] == pytest.approx(cf_alone)
    assert "distilled_vs_external_teacher" in report["comparisons"]
    # a second import of the same files is byte for byte the first
    first = {p.name: p.read_bytes() for p in (b / "teacher_cache").iterdir()}
    assert main(["teacher", "import", RECIPE, "--out", str(b), "--topk", str(topk), "--items", str(items)]
                + sets(overrides)) == 0
    assert {p.name: p.read_bytes() for p in (b / "teacher_cache").iterdir()} == first


def test_imported_vectors_give_the_harness_top_k(source_run, tmp_path):
    run, overrides, topk, _ = source_run
    cache = TeacherCache(run / "teacher_cache")
    table = pq.read_table(topk).select(["user", "position", "query"])
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps(r) + "\n" for r in table.to_pylist()))
    np.save(tmp_path / "items.npy", np.asarray(cache.item_table))
    b = new_run(run, tmp_path / "b")
    assert main(["teacher", "import", RECIPE, "--out", str(b), "--queries", str(queries), "--items",
                 str(tmp_path / "items.npy")] + sets(overrides)) == 0
    imported = TeacherCache(b / "teacher_cache")
    split = load_split(run / "split")
    users, lengths = np.arange(split.n_users), split.sequences.lengths
    got = imported.lookup(users, lengths - 1)
    # the harness on the same vectors: its test top-K (the target is never masked there, so compare the users
    # whose target is not an earlier item of theirs)
    res = evaluate(split, got.query, np.asarray(cache.item_table), "test", ks=[5, 10])
    fresh = np.array([t not in h for t, h in zip(split.targets("test"), split.history("test"))])
    assert fresh.sum() > 30 and np.array_equal(got.topk_ids[fresh], res.topk[fresh, :imported.k])
    # and the CF model's own cache, built from the same vectors: the same lists, scores without temperature
    own = cache.lookup(users, lengths - 1)
    temperature = load_recipe(RECIPE, overrides).teacher.temperature
    assert np.array_equal(got.topk_ids, own.topk_ids)
    np.testing.assert_allclose(got.topk_scores / temperature, own.topk_scores, rtol=1e-6)


def test_a_partial_top_k_import_trains(source_run, tmp_path):
    run, overrides, topk, _ = source_run
    split = load_split(run / "split")
    rows = pq.read_table(topk).select(["user", "position", "items"]).to_pylist()
    lengths = dict(zip(split.users, split.sequences.lengths.tolist()))
    kept = [r for r in rows if r["position"] < lengths[r["user"]] - 2 and r["position"] % 2 == 0]  # training only
    csv = tmp_path / "topk.csv"
    csv.write_text("user,position,items\n" + "".join(f"{r['user']},{r['position']},{' '.join(r['items'])}\n"
                                                     for r in kept))
    b = new_run(run, tmp_path / "b")
    assert main(["teacher", "import", RECIPE, "--out", str(b), "--topk", str(csv)] + sets(overrides)) == 0
    m = TeacherCache(b / "teacher_cache").manifest
    assert m["coverage"]["rows"] == m["coverage"]["training_positions"] == len(kept) < len(rows)
    assert m["coverage"]["of_training_positions"] == len(training_positions(split)[0])
    assert m["teacher"]["scores"] == "-ln(rank)" and m["dim"] == 0
    assert not (b / "teacher_external").exists()    # no vectors: the teacher's quality is not measured
    # without query vectors the alignment term cannot train: one line, exit 2
    assert main(["distill", RECIPE, "--out", str(b)] + sets(overrides)) == 2
    assert main(["distill", RECIPE, "--out", str(b)] + sets(overrides + ["distill.align_weight=0"])) == 0
    record = json.loads((b / "student_distilled" / "metrics.json").read_text())
    assert record["loss_weights"]["kd"] > 0 and np.isfinite(record["metrics"]["NDCG@10"])
    cache = TeacherCache(b / "teacher_cache")
    first = cache.lookup(np.array([split.users.index(kept[0]["user"])]), np.array([kept[0]["position"]]))
    np.testing.assert_allclose(first.topk_scores[0], -np.log(np.arange(1, cache.k + 1)), rtol=1e-6)


def _edit(rows, i, **change):
    out = [dict(r) for r in rows]
    out[i].update(change)
    return out


MALFORMED = {  # name: (edit of the exported rows, the row and column the message must name)
    "unknown user": (lambda r: _edit(r, 3, user="nobody"), 3, "user"),
    "unknown item": (lambda r: _edit(r, 4, items=r[4]["items"][:-1] + ["no-such-item"]), 4, "items"),
    "position 0": (lambda r: _edit(r, 5, position=0), 5, "position"),
    "position past the test item": (lambda r: _edit(r, 6, position=999), 6, "position"),
    "duplicate row": (lambda r: r[:8] + [r[2]] + r[8:], 8, "position"),
    "wrong length": (lambda r: _edit(r, 7, items=r[7]["items"][:-1], scores=r[7]["scores"][:-1]), 7, "items"),
    "scores of the wrong length": (lambda r: _edit(r, 2, scores=r[2]["scores"][:-1]), 2, "scores"),
    "NaN score": (lambda r: _edit(r, 9, scores=[float("nan")] + r[9]["scores"][1:]), 9, "scores"),
    "scores not best first": (lambda r: _edit(r, 1, scores=r[1]["scores"][::-1]), 1, "scores"),
    "an item twice": (lambda r: _edit(r, 2, items=[r[2]["items"][0]] * len(r[2]["items"])), 2, "items"),
    "NaN in a query": (lambda r: _edit(r, 4, query=[float("nan")] + r[4]["query"][1:]), 4, "query"),
}


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_files_are_refused_with_file_row_and_column(source_run, tmp_path, capsys, case, fmt):
    run, overrides, topk, _ = source_run
    edit, row, column = MALFORMED[case]
    rows = edit(pq.read_table(topk).to_pylist())
    path = tmp_path / f"bad.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    b = new_run(run, tmp_path / "b")
    capsys.readouterr()
    assert main(["teacher", "import", RECIPE, "--out", str(b), "--topk", str(path)] + sets(overrides)) == 2
    err = capsys.readouterr().err.strip()
    want = f"anyo: error: {path}: row {row}, column `{column}`"
    if fmt == "jsonl" and case.startswith("NaN"):     # NaN is not JSON: the reader refuses the line itself
        want = f"anyo: error: {path}:{row + 1}: not valid JSON"
    assert err.count("\n") == 0 and err.startswith(want), err
    assert not (b / "teacher_cache").exists() and not (b / "teacher_cache.partial").exists()


def test_item_vector_files_are_checked(source_run, tmp_path, capsys):
    run, overrides, topk, items = source_run
    b = new_run(run, tmp_path / "b")
    table = pq.read_table(items).to_pylist()
    bad = tmp_path / "items.parquet"
    pq.write_table(pa.Table.from_pylist(table[:-1]), bad)    # the last item has no vector
    np.save(tmp_path / "short.npy", np.zeros((5, 3), np.float32))
    for files, message in (([str(bad)], f"{bad}: column `item`: no vector for item {table[-1]['item']!r}"),
                           ([str(tmp_path / "short.npy")], f"{tmp_path / 'short.npy'}: 5 rows, expected")):
        capsys.readouterr()
        assert main(["teacher", "import", RECIPE, "--out", str(b), "--topk", str(topk), "--items", *files]
                    + sets(overrides)) == 2
        assert message in capsys.readouterr().err
    assert main(["teacher", "import", RECIPE, "--out", str(b), "--queries", str(topk)] + sets(overrides)) == 2
    assert not (b / "teacher_cache").exists()


def test_positions_given_as_timestamps(source_run, tmp_path, capsys):
    from distill.data import sequence_times
    run, overrides, topk, _ = source_run
    recipe, split = load_recipe(RECIPE, overrides), load_split(run / "split")
    times = sequence_times(recipe.data, split)
    row_of = {u: i for i, u in enumerate(split.users)}
    rows = pq.read_table(topk).select(["user", "position", "items"]).to_pylist()
    at = lambda r: times[split.sequences.offsets[row_of[r["user"]]] + r["position"] - 1]  # noqa: E731
    after = lambda r: times[split.sequences.offsets[row_of[r["user"]]] + r["position"]]  # noqa: E731
    kept = [r for r in rows if at(r) < after(r)]      # the prefix ends at a change of time
    assert len(kept) > len(rows) // 2
    path = tmp_path / "topk.jsonl"
    path.write_text("".join(json.dumps({"user": r["user"], "timestamp": float(at(r)), "items": r["items"]}) + "\n"
                            for r in kept))
    b = new_run(run, tmp_path / "b")
    assert main(["teacher", "import", RECIPE, "--out", str(b), "--topk", str(path)] + sets(overrides)) == 0
    cache = TeacherCache(b / "teacher_cache")
    users = np.array([row_of[r["user"]] for r in kept])
    found = cache.lookup(users, np.array([r["position"] for r in kept]))
    assert found.found.all() and len(cache) == len(kept)
    assert [split.items[i] for i in found.topk_ids[0]] == kept[0]["items"]
    bad = [dict(kept[0], timestamp=float(at(kept[0])) + 0.5)] + [{"user": r["user"], "timestamp": float(at(r)),
                                                                   "items": r["items"]} for r in kept[1:]]
    path.write_text("".join(json.dumps({k: r[k] for k in ("user", "timestamp", "items")}) + "\n" for r in bad))
    shutil.rmtree(b / "teacher_cache")
    capsys.readouterr()
    assert main(["teacher", "import", RECIPE, "--out", str(b), "--topk", str(path)] + sets(overrides)) == 2
    assert f"{path}: row 0, column `timestamp`: user {kept[0]['user']!r} has no interaction at" in capsys.readouterr().err
    assert not (b / "teacher_cache").exists()


def test_any_object_with_get_teacher_outputs_fills_the_cache(source_run, tmp_path):
    from distill.errors import DataError
    from distill.stages.external import run_teacher
    from student.model import load_student
    from teacher.cf_only import CFOnlyTeacher
    run, overrides, _, _ = source_run
    recipe, split = load_recipe(RECIPE, overrides), load_split(run / "split")
    cf, _ = load_student(run / "student_alone", split.hash, split.n_items)
    b = new_run(run, tmp_path / "b")
    run_teacher(recipe, b, split, CFOnlyTeacher(cf, recipe.teacher.temperature))  # called as (histories, k)
    a_t, b_t = tensors(run / "teacher_cache"), tensors(b / "teacher_cache")
    assert a_t.keys() == b_t.keys() and all(np.array_equal(a_t[key], b_t[key]) for key in a_t)
    assert TeacherCache(b / "teacher_cache").manifest["teacher"]["sources"] == [{"role": "python",
                                                                                "object": "CFOnlyTeacher"}]
    assert (b / "teacher_external" / "metrics.json").is_file()

    class Broken(CFOnlyTeacher):   # returns the padding item 0 in one list
        def get_teacher_outputs(self, histories, k):
            o = super().get_teacher_outputs(histories, k)
            o.topk_ids = o.topk_ids.clone()
            o.topk_ids[0, 1] = 0
            return o

    c = new_run(run, tmp_path / "c")
    with pytest.raises(DataError, match=r"Broken.get_teacher_outputs: row 0, topk_ids: an id outside 1\.\."):
        run_teacher(recipe, c, split, Broken(cf, recipe.teacher.temperature))
    assert not (c / "teacher_cache").exists() and not (c / "teacher_cache.partial").exists()
