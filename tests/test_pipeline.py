"""End-to-end on the tiny recipe: `anyo run`, the teacher cache, and the report."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import RECIPE, sets
from distill.artifacts import folder_files, write_record
from distill.cache import TeacherCache, memmap_tensors
from distill.cli import main
from distill.config import load_recipe
from distill.data import load_split
from distill.errors import ArtifactError


def test_run_writes_every_stage(tiny_run):
    run, _ = tiny_run
    for path in ["split/manifest.json", "mostpop/metrics.json", "student_alone/model.safetensors",
                 "student_alone/metrics.json", "teacher/adapter/adapter_model.safetensors", "teacher/heads.safetensors",
                 "teacher/metrics.json", "teacher_cache/manifest.json", "student_distilled/metrics.json",
                 "report/report.json", "report/report.md", "report/quality.png", "report/quality_vs_latency.png"]:
        assert (run / path).is_file(), path
        assert (run / path).stat().st_size > 0
    m = json.loads((run / "student_alone" / "metrics.json").read_text())
    assert {"metrics", "stage", "best_epoch", "train_seconds", "split_hash", "seed", "valid_metrics"} <= set(m)
    t = json.loads((run / "teacher" / "metrics.json").read_text())
    assert {"examples_per_second", "train_seconds", "candidates"} <= set(t) and "HR@1" in t["candidates"]
    alone = t["llm_alone"]                              # the LLM retriever at w = 0, with its test buckets
    assert "NDCG@10" in alone["valid"] and "NDCG@10" in alone["test"]
    assert sum(b["users"] for b in alone["by_popularity"].values()) == len(load_split(run / "split").targets("test"))


def test_teacher_keeps_the_best_blend_on_validation(tiny_run, tiny_recipe):
    run, _ = tiny_run
    t = json.loads((run / "teacher" / "metrics.json").read_text())
    cf = json.loads((run / "student_alone" / "metrics.json").read_text())
    best = next(c for c in t["curve"] if c["epoch"] == t["best_epoch"])
    assert t["cf_weight"] == best["cf_weight"] and t["cf_weight"] in tiny_recipe.teacher.cf_weights
    # the grid holds 0 (the LLM alone) and 1 (the CF retriever, the student alone): the blend is never worse
    assert {0.0, 1.0} <= set(tiny_recipe.teacher.cf_weights)
    assert t["valid_metrics"]["NDCG@10"] == best["valid_NDCG@10"]
    assert best["valid_NDCG@10"] >= max(best["valid_NDCG@10_llm"], cf["valid_metrics"]["NDCG@10"]) - 1e-12


def test_rerun_skips_every_stage(tiny_run, capsys):
    run, overrides = tiny_run
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*.safetensors")}
    # a run killed between writing a stage's metrics.json and removing its resume folder leaves one behind
    leftovers = [run / f"{name}.resume" for name in ("student_alone", "teacher", "student_distilled")]
    for folder in leftovers:
        folder.mkdir()
        (folder / "state.json").write_text("{}")
    capsys.readouterr()
    assert main(["run", RECIPE, "--out", str(run)] + sets(overrides)) == 0
    out = capsys.readouterr().out
    for stage in ("split up to date", "student alone (seed 0) up to date", "teacher (seed 0) up to date",
                  "teacher cache up to date", "distilled student (seed 0) up to date", "report up to date"):
        assert stage in out
    assert before == {p: p.stat().st_mtime_ns for p in run.rglob("*.safetensors")}
    assert not any(folder.exists() for folder in leftovers)


def test_report_schema(tiny_run):
    run, _ = tiny_run
    r = json.loads((run / "report" / "report.json").read_text())
    assert {"split_hash", "machine", "models", "comparisons"} <= set(r)
    for name, label in (("mostpop", "MostPop"), ("student_alone", "student alone"), ("teacher", "teacher"),
                        ("student_distilled", "distilled student")):   # keyed by name, shown by label
        m = r["models"][name]
        assert m["label"] == label
        assert {"metrics", "metrics_std", "seeds", "params", "trainable_params", "checkpoint_bytes",
                "peak_rss_bytes", "latency_ms", "throughput_users_per_s"} <= set(m)
        assert set(m["latency_ms"]) == {"p50", "p95", "users"}
    assert set(r["models"]["teacher"]["backends"]) == {"hf"}  # the tiny recipe's bench.teacher_backends
    assert "latency_ms" not in r["models"]["student_cf_distilled"]   # the distilled student's cost
    for m in (m for m in r["models"].values() if "latency_ms" in m):   # every model on the same users
        assert m["latency_ms"]["users"] == 20 and m["users"] == 40 and set(m["throughput_by_batch"]) == {"1", "32"}
        assert m["throughput_users_per_s"] == max(m["throughput_by_batch"].values())
    flops = {n: r["models"][n]["flops_per_user"] for n in ("mostpop", "student_alone", "teacher")}
    assert flops["teacher"] > flops["student_alone"] > flops["mostpop"] > 0
    assert r["models"]["teacher"]["params"] > r["models"]["student_distilled"]["params"] > 0
    for name in ("student_alone", "teacher", "student_distilled"):   # the curves the report draws
        curve = r["models"][name]["curves"][0]
        assert {"epoch", "train_loss", "valid_NDCG@10", "examples_per_second"} <= set(curve[0])
    for key in ("distilled_vs_alone", "distilled_vs_teacher", "llm_vs_cf_teacher", "cf_teacher_vs_alone"):
        ci = r["comparisons"][key]["NDCG@10"]
        assert ci["ci95"][0] <= ci["mean_diff"] <= ci["ci95"][1] and ci["ci_method"] == "seeds+users"
        assert len(ci["per_seed"]) == 1


def copy_run(run: Path, dest: Path, *extra: str) -> Path:
    for part in ("split", "student_alone", "teacher", *extra):
        shutil.copytree(run / part, dest / part)
    return dest


def cache_arrays(folder: Path) -> dict:
    c = TeacherCache(folder)
    return {f"{i}/{k}": np.asarray(v) for i, t in enumerate(c.shards) for k, v in t.items()}


def infer(run, overrides, *extra):
    return main(["teacher", "infer", RECIPE, "--out", str(run)] + sets(overrides) + list(extra))


def test_deepspeed_and_hf_backends_agree(tiny_run, tmp_path):
    run, overrides = tiny_run
    a = copy_run(run, tmp_path / "a")
    b = copy_run(run, tmp_path / "b")
    assert infer(a, overrides, "--backend", "hf") == 0
    assert infer(b, overrides, "--backend", "deepspeed") == 0
    ca, cb = TeacherCache(a / "teacher_cache"), TeacherCache(b / "teacher_cache")
    for sa, sb in zip(ca.shards, cb.shards):
        assert np.array_equal(sa["topk_ids"], sb["topk_ids"])
        assert np.allclose(sa["topk_scores"], sb["topk_scores"], atol=1e-4)


def test_resume_after_crash_equals_clean_run(tiny_run, tmp_path):
    run, overrides = tiny_run
    clean = cache_arrays(run / "teacher_cache")
    crashed = copy_run(run, tmp_path / "c")
    staging = crashed / "teacher_cache.partial"
    shutil.copytree(run / "teacher_cache", staging)
    # a crash after the first shard: later shards and the manifest never written, a temp file left behind
    for p in sorted(staging.glob("shard-*"))[1:]:
        p.unlink()
    (staging / "manifest.json").unlink()
    (staging / ".shard-00001.safetensors.x.tmp").write_bytes(b"partial")
    kept = (staging / "shard-00000.safetensors").stat().st_mtime_ns
    assert infer(crashed, overrides) == 0
    assert (crashed / "teacher_cache" / "shard-00000.safetensors").stat().st_mtime_ns == kept  # not rescored
    assert not staging.exists()
    resumed = cache_arrays(crashed / "teacher_cache")
    assert clean.keys() == resumed.keys()
    assert all(np.array_equal(clean[k], resumed[k]) for k in clean)


def test_tampered_or_foreign_cache_is_refused(tiny_run, tmp_path):
    run, _ = tiny_run
    cache = tmp_path / "cache"
    shutil.copytree(run / "teacher_cache", cache)
    with pytest.raises(ArtifactError, match="cache built from split"):
        TeacherCache(cache, split_hash="another")
    shard = sorted(cache.glob("shard-*"))[1]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"{shard.name}: sha256 does not match"):
        TeacherCache(cache)


def test_lookup_returns_the_right_rows(tiny_run):
    run, _ = tiny_run
    cache = TeacherCache(run / "teacher_cache")
    shard = memmap_tensors(run / "teacher_cache" / "shard-00001.safetensors")
    users = np.array([shard["user"][3], 10_000, shard["user"][0]])
    pos = np.array([shard["position"][3], 1, shard["position"][0]])
    rows = cache.lookup(users, pos, k=3)
    assert rows.found.tolist() == [True, False, True]
    assert np.array_equal(rows.topk_ids, shard["topk_ids"][[3, 0], :3])
    assert np.array_equal(rows.query, shard["query"][[3, 0]])
    with pytest.raises(ArtifactError, match="larger than the cache's K"):
        cache.lookup(users, pos, k=99)


def test_two_process_gloo_sharding_equals_one_process(tiny_run, launcher, tmp_path):
    run, overrides = tiny_run
    two = copy_run(run, tmp_path / "two")
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533"}
    argv = ["teacher", "infer", RECIPE, "--out", str(two)] + sets(overrides)
    logs = [tmp_path / f"rank{r}.log" for r in range(2)]
    pids = [launcher.start(argv, log, dict(env, RANK=str(r), LOCAL_RANK=str(r))) for r, log in enumerate(logs)]
    for pid, log in zip(pids, logs):
        assert launcher.wait(pid, log, timeout=600) == 0, log.read_text()[-3000:]
    one, many = cache_arrays(run / "teacher_cache"), cache_arrays(two / "teacher_cache")
    assert one.keys() == many.keys()
    assert all(np.array_equal(one[k], many[k]) for k in one)


def test_bootstrap_ci_covers_a_known_difference():
    from distill.stats import paired_bootstrap
    rng = np.random.default_rng(0)
    n, shift, noise = 2000, 0.05, 0.02
    b = rng.random(n)
    a = b + shift + rng.normal(0, noise, n)                      # per-user difference: mean 0.05, sd 0.02
    ci = paired_bootstrap(a, b)
    assert ci["mean_diff"] == pytest.approx(shift, abs=3 * noise / np.sqrt(n))
    lo, hi = ci["ci95"]
    assert lo < shift < hi
    assert (hi - lo) == pytest.approx(2 * 1.96 * noise / np.sqrt(n), rel=0.15)  # the analytic 95% width


def test_distill_refuses_cache_from_another_split(tiny_run, tmp_path, capsys):
    run, overrides = tiny_run
    other = copy_run(run, tmp_path / "o", "teacher_cache")
    rc = main(["distill", RECIPE, "--out", str(other)] + sets(overrides) + ["--set", "data.seed=99"])
    assert rc == 2
    assert "cache built from split" in capsys.readouterr().err


def test_verify_reports_ok_then_corrupt_and_stale(tiny_run, tmp_path, capsys):
    run, _ = tiny_run
    assert main(["verify", str(run)]) == 0
    copy = tmp_path / "v"
    shutil.copytree(run, copy)
    shard = sorted((copy / "teacher_cache").glob("shard-*"))[0]
    shard.write_bytes(shard.read_bytes()[:-4])
    alone = copy / "student_alone"
    meta = json.loads((alone / "config.json").read_text())
    meta["split_hash"] = "0000"
    (alone / "config.json").write_text(json.dumps(meta))
    # sealed as a stage trained on another split would be (an edited file alone is corrupt: test_destructive)
    write_record(alone / "metrics.json", json.loads((alone / "metrics.json").read_text()),
                 files=folder_files(alone, "metrics.json", "tb"))
    capsys.readouterr()
    assert main(["verify", str(copy)]) == 1
    lines = {l.split()[0]: l for l in capsys.readouterr().out.splitlines()}
    assert " ok " in lines["split"] + " "
    assert "stale" in lines["student_alone"] and "corrupt" in lines["teacher_cache"]


def test_latency_excludes_model_loading(tiny_run, monkeypatch):
    """A fake clock ticks 1 ms per reading and jumps 1000 s while the model loads:
    any timed window that contained the load would show it."""
    from distill import serving
    run, _ = tiny_run
    now = [0.0]

    def tick():
        now[0] += 1e-3
        return now[0]

    real = serving.load_retriever

    def slow_load(*args):
        now[0] += 1000.0
        return real(*args)

    served = []

    class Counted(serving.Recommender):  # a student is timed through what `anyo serve` runs
        def top_k(self, histories, k, exclude_seen=True):
            served.append(len(histories))
            return super().top_k(histories, k, exclude_seen)

    monkeypatch.setattr(serving, "clock", tick)
    monkeypatch.setattr(serving, "load_retriever", slow_load)
    monkeypatch.setattr(serving, "Recommender", Counted)
    from distill.config import BenchConfig
    cost = serving.measure(run, "student_alone", "hf", BenchConfig(batch_sizes=[1, 1024], latency_users=30))
    assert cost["runtime"] == "onnxruntime" and served[:31] == [2] + [1] * 30
    assert cost["latency_ms"]["p50"] == pytest.approx(1.0) and cost["latency_ms"]["p95"] == pytest.approx(1.0)
    n_users = load_split(run / "split").n_users
    assert cost["throughput_by_batch"] == pytest.approx({"1": n_users / 1e-3, "1024": n_users / 1e-3})  # 2 readings
    assert cost["latency_ms"]["users"] == 30


def test_run_records_its_recipe_and_bench_then_run_remeasures_nothing(tiny_run, tmp_path, capsys):
    run = tmp_path / "r"
    shutil.copytree(tiny_run[0], run)
    recorded = load_recipe(run / "recipe.yaml")
    assert recorded.to_dict() == load_recipe(RECIPE, tiny_run[1]).to_dict()
    shutil.rmtree(run / "report")
    assert main(["bench", str(run)]) == 0
    before = (run / "report" / "report.json").read_bytes()
    capsys.readouterr()
    assert main(["run", str(run / "recipe.yaml"), "--out", str(run)]) == 0
    assert "report up to date" in capsys.readouterr().out
    assert (run / "report" / "report.json").read_bytes() == before


def test_report_and_verify_leave_out_seeds_built_from_another_recipe(tiny_run, tmp_path, capsys):
    run = tmp_path / "s"
    shutil.copytree(tiny_run[0], run)
    foreign = run / "seeds" / "student_alone-7"
    shutil.copytree(run / "student_alone", foreign)
    record = json.loads((foreign / "metrics.json").read_text())
    record["seed"], record["inputs"]["seed"], record["inputs"]["recipe"] = 7, 7, "another-recipe"
    write_record(foreign / "metrics.json", record, files=folder_files(foreign, "metrics.json", "tb"))  # as if trained so
    assert main(["bench", str(run), "--no-cost"]) == 0
    r = json.loads((run / "report" / "report.json").read_text())
    assert r["models"]["student_alone"]["seeds"] == 1 and r["stale"] == ["seeds/student_alone-7"]
    capsys.readouterr()
    assert main(["verify", str(run)]) == 1
    lines = {l.split()[0]: l.split()[1] for l in capsys.readouterr().out.splitlines()}
    assert lines["seeds/student_alone-7"] == "stale" and lines["student_alone"] == "ok"


def test_two_level_bootstrap_includes_the_seed_spread():
    from distill.stats import nested_bootstrap, paired_bootstrap
    by_seed = lambda x: {None: dict(enumerate(x))}                     # (seeds, n) -> one teacher's seeds
    rng = np.random.default_rng(1)
    n, seeds, shift = 3000, 5, 0.01
    b = rng.random((seeds, n))
    offsets = np.array([-0.03, -0.01, 0.0, 0.02, 0.04])                 # seed-to-seed spread of A - B
    a = b + shift + offsets[:, None] + rng.normal(0, 0.01, (seeds, n))
    two = nested_bootstrap(by_seed(a), by_seed(b))
    users_only = paired_bootstrap(a.mean(axis=0), b.mean(axis=0))
    width = lambda c: c["ci95"][1] - c["ci95"][0]
    assert width(two) > 3 * width(users_only)
    assert two["ci95"][0] < shift + offsets.mean() < two["ci95"][1]
    assert [p["diff"] for p in two["per_seed"]] == pytest.approx((shift + offsets).tolist(), abs=0.002)
    assert two["mean_diff"] == pytest.approx(users_only["mean_diff"])
    single = nested_bootstrap(by_seed(a), by_seed(b[:1]))                # B with one seed: unpaired
    assert len(single["per_seed"]) == seeds and single["seeds"] == [seeds, 1]
    assert two["ci_method"] == "seeds+users"


def test_merge_completes_the_cache_from_its_shards(tiny_run, tmp_path):
    # shards written by separate jobs: merge adds the teacher's item vectors without loading the LLM
    run, overrides = tiny_run
    other = copy_run(run, tmp_path / "m")
    (other / "teacher_cache.partial").mkdir()
    for p in (run / "teacher_cache").glob("shard-*.safetensors"):
        shutil.copy(p, other / "teacher_cache.partial" / p.name)
    assert infer(other, overrides, "--merge") == 0
    one, merged = TeacherCache(run / "teacher_cache"), TeacherCache(other / "teacher_cache")
    assert np.array_equal(one.item_table, merged.item_table)
    assert cache_arrays(run / "teacher_cache").keys() == cache_arrays(other / "teacher_cache").keys()


def test_distill_with_collaborative_embedding_saves_a_plain_student(tiny_run, tmp_path):
    # the DLLM2Rec item-table term is trained, recorded and folded into the saved item table
    run, overrides = tiny_run
    other = copy_run(run, tmp_path / "c", "teacher_cache")
    rc = main(["distill", RECIPE, "--out", str(other)] + sets(overrides) + ["--set", "distill.ced_weight=0.5"])
    assert rc == 0
    record = json.loads((other / "student_distilled" / "metrics.json").read_text())
    assert record["loss_weights"]["ced"] == 0.5
    from safetensors.numpy import load_file
    weights = load_file(str(other / "student_distilled" / "model.safetensors"))
    assert not any(k.startswith("item_prior") for k in weights)   # folded into item_emb
    plain = load_file(str(run / "student_distilled" / "model.safetensors"))
    assert weights.keys() == plain.keys()
    # the saved (folded) student scores what its record says, so the prior was folded, not dropped
    from distill.harness import evaluate
    from student.model import load_student
    split = load_split(other / "split")
    model, _ = load_student(other / "student_distilled", split.hash, split.n_items)
    ev = load_recipe(RECIPE, overrides).eval
    again = evaluate(split, model.encode(split.history("test")), model.item_vectors(), "test", ev.ks,
                     ev.mask_history).metrics
    assert again["NDCG@10"] == pytest.approx(record["metrics"]["NDCG@10"], abs=1e-9)


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_verify_without_a_run_says_so_in_one_line(tmp_path, capsys, make):
    run = tmp_path / "nothing"
    if make == "empty":
        run.mkdir()
    assert main(["verify", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(run) in err and "no run to verify" in err


def test_training_stages_leave_tensorboard_events(tiny_run):
    """RUN/STAGE/tb/ holds what TensorBoard reads: loss and learning rate by step, validation by epoch."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run, _ = tiny_run
    for stage in ("student_alone", "teacher", "student_distilled"):
        events = EventAccumulator(str(run / stage / "tb"))
        events.Reload()
        tags = set(events.Tags()["scalars"])
        assert {"train/loss", "train/learning_rate", "epoch/valid_NDCG@10", "epoch/examples_per_second"} <= tags
        curve = json.loads((run / stage / "metrics.json").read_text())["curve"]
        assert [e.value for e in events.Scalars("epoch/valid_NDCG@10")] == pytest.approx(
            [c["valid_NDCG@10"] for c in curve])
        assert not (run / f"{stage}.events").exists()
