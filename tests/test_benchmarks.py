"""Every script in benchmarks/ runs on a tiny input, so none rots unseen (the figures they write are the
benchmark files' business; here each must finish and write its output)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import sets, tiny_recipe_overrides, write_tiny_llama

from distill.cli import main

ROOT = Path(__file__).parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py"))


def bench(script: str, *args, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *map(str, args)], cwd=cwd,
                       capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                                            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                                                            "HOME": str(cwd)})
    assert p.returncode == 0, f"{script}: {p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory):
    """A copy of the tiny run with its recorded recipe, which a benchmark may add to."""
    import shutil
    src, _ = tiny_run
    dst = tmp_path_factory.mktemp("bench") / "run"
    shutil.copytree(src, dst)
    return dst


def test_every_script_is_covered():
    covered = {"make_synthetic.py", "harness_speed.py", "scale.py", "distill_ablation.py", "teacher_inference.py",
               "serve_load.py", "serve_mixed.py", "student_vs_recbole.py", "seed_claims.py", "recbole_sasrec.py",
               "text_decides.py", "text_teacher.py", "external_teacher.py", "serving_profile.py",
               "slot_curve.py"}
    assert set(SCRIPTS) == covered, "a new benchmark script needs its smoke test here"


def test_make_synthetic(tmp_path):
    bench("make_synthetic.py", "--interactions", 3000, "--items", 200, "--out", tmp_path / "s.parquet",
          "--items-out", tmp_path / "items.parquet")
    assert (tmp_path / "s.parquet").stat().st_size > 0 and (tmp_path / "items.parquet").is_file()


def test_text_decides(tmp_path):
    bench("text_decides.py", "--out", tmp_path, "--users", 60, "--franchises", 40, "--standalone", 20)
    bayes = json.loads((tmp_path / "textdecides.bayes.json").read_text())
    assert (tmp_path / "textdecides.inter").is_file() and (tmp_path / "textdecides.item").is_file() and bayes


def test_text_teacher(run):
    p = bench("text_teacher.py", run)
    assert "| student alone |" in p.stdout or "student alone" in p.stdout


def test_slot_curve(run, tmp_path):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(run, out)
    bench("slot_curve.py", out / "recipe.yaml", "--out", out, "--at", "0", "--set", "teacher.examples=per_slot",
          "--set", "teacher.epochs=1")
    points = [json.loads(line) for line in (out / "teacher.curve.jsonl").read_text().splitlines()]
    assert len(points) == 1 and points[0]["steps"] == 0 and 0 <= points[0]["valid_NDCG@10_llm"] <= 1
    record = json.loads((out / "teacher" / "metrics.json").read_text())
    assert record["curve"][-1]["epoch"] == 1


def test_harness_speed():
    p = bench("harness_speed.py", "--queries", 64, "--items", 3000, "--dim", 16, "--repeats", 1)
    assert p.stdout.strip()


def test_scale(tmp_path):
    out = tmp_path / "scale.md"
    bench("scale.py", "--prepare", "2e4", "--student", "", "--harness", "", "--cache", "", "--gloo", 0,
          "--out", out, "--date", "2026-12-01")
    assert "interactions/s" in out.read_text() and json.loads(out.with_suffix(".json").read_text())["prepare"]


def test_distill_ablation(run, tmp_path):
    out = tmp_path / "ablation.md"
    bench("distill_ablation.py", "--recipe", run / "recipe.yaml", "--run", run, "--seeds", 1, "--out", out)
    assert "| student alone |" in out.read_text()


def test_teacher_inference(tiny_run, toy_data, tiny_llama):
    p = bench("teacher_inference.py", ROOT / "recipes" / "ml100k.yaml", "--prompts", 8,
              *sets(tiny_recipe_overrides(toy_data, tiny_llama)))
    assert "prompts/s" in p.stdout


def test_serve_load(tiny_run, tmp_path):
    export = tmp_path / "export"
    assert main(["export", str(tiny_run[0]), "--out", str(export)]) == 0
    out, store = tmp_path / "serving.md", tmp_path / "serve_load.json"
    out.write_text("# Serving benchmark\n\nkept\n")
    bench("serve_load.py", "--export", export, "--split", tiny_run[0] / "split", "--clients", 2, "--seconds", 1,
          "--max-requests", 40, "--in-process-threads", "1", "--json", store, "--out", out)
    text = out.read_text()
    assert text.startswith("# Serving benchmark\n\nkept\n") and text.count("serve_load.py: begin") == 1
    assert "| onnxruntime | onnxruntime | 1 |" in text and "| onnxruntime | onnxruntime | 2 | 1 x 1 |" in text
    assert set(json.loads(store.read_text())) == {"onnxruntime"}


def test_serving_profile(tiny_run, tmp_path):
    export = tmp_path / "export"
    assert main(["export", str(tiny_run[0]), "--out", str(export)]) == 0
    out, store = tmp_path / "serving.md", tmp_path / "profile.json"
    out.write_text("# Serving benchmark\n\nkept\n")
    for label in ("before", "after"):
        bench("serving_profile.py", "--export", export, "--split", tiny_run[0] / "split", "--threads", 1, "--runs", 1,
              "--singles", 4,
              "--label", label, "--json", store, "--out", out)
    text = out.read_text()
    assert text.startswith("# Serving benchmark\n\nkept\n") and text.count("serving_profile.py: begin") == 1
    assert "| before | onnxruntime | 1 | 1 |" in text and "| after | torch | 1 | 1,024 |" in text
    assert set(json.loads(store.read_text())) == {"before", "after"}


def test_serve_mixed(tiny_run, tmp_path):
    export = tmp_path / "export"
    assert main(["export", str(tiny_run[0]), "--out", str(export)]) == 0
    out = tmp_path / "serving.md"
    out.write_text("# Serving benchmark\n\nkept\n")
    bench("serve_mixed.py", "--export", export, "--clients", 2, "--seconds", 1, "--runs", 1, "--large-histories", 32,
          "--rate", 50,
          "--serve-args", "--piece-histories 8", "--out", out)
    text = out.read_text()
    assert text.startswith("# Serving benchmark\n\nkept\n") and text.count("Small requests while large") == 1
    assert "| small alone |" in text and "| small beside 1 client(s) sending 32 histories" in text
    assert "| large alone | – |" in text and "histories/s)" in text
    spec = importlib.util.spec_from_file_location("serve_mixed", ROOT / "benchmarks" / "serve_mixed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert text.count("p99 per run: ") == 3 and "95% intervals from resampling whole runs" in text
    assert "| small beside a spinning process at the batch lane's priority (control) |" in text
    alone = [np.arange(1, 101.0), np.arange(1, 51.0) * 3]   # beside = twice alone in every run: 2x, interval 2 to 2
    assert module.pooled_ratio(alone, [2 * a for a in alone], draws=50) == pytest.approx((2, 2, 2))
    ratio, lo, hi = module.pooled_ratio(alone, [alone[0], 4 * alone[1]], q=50, draws=200)  # one run 4x, one 1x
    assert 1 == lo < ratio < hi == 4
    module.write_section(out, f"{module.BEGIN}\nnewer figures\n{module.END}", module.BEGIN, module.END)
    assert out.read_text() == "# Serving benchmark\n\nkept\n\n" + module.BEGIN + "\nnewer figures\n" + module.END + "\n"


def test_student_vs_recbole(run, tmp_path):
    curve = tmp_path / "recbole.jsonl"
    curve.write_text("".join(json.dumps({"epoch": e, "train_seconds": 1.0 * e, "train_loss": 1.0, **{
        f"{s}_{m}@10": 0.1 * e for s in ("valid", "test") for m in ("hit", "ndcg", "mrr")}}) + "\n" for e in (1, 2)))
    out = tmp_path / "vs.md"
    bench("student_vs_recbole.py", "--recipe", run / "recipe.yaml", "--seeds", 0, "--recbole", curve, "--out", out)
    assert "RecBole" in out.read_text()


def test_seed_claims(run, tmp_path):
    causal = write_tiny_llama(tmp_path / "causal", causal=True)
    md = tmp_path / "claims.md"
    tiny = [f"teacher.model={causal}", "llara.examples_per_epoch=16", "llara.batch_size=8", "llara.epochs=1",
            "llara.valid_users=8", "llara.eval_batch_size=20", "llara.max_history=5"]
    bench("seed_claims.py", "--run", run, "--out", tmp_path / "models", "--users", 8, "--batch", 4,
          "--latency-users", 2, "--threads", 1, "--recipe", run / "recipe.yaml", *sets(tiny), "--md", md)
    assert "generative" in md.read_text()


@pytest.mark.skipif(importlib.util.find_spec("recbole") is None or importlib.util.find_spec("thop") is None,
                    reason="RecBole's own dependencies live in .venv-recbole (benchmarks/recbole_sasrec.py)")
def test_recbole_sasrec(tmp_path):
    bench("recbole_sasrec.py", "--budget-min", 0.01, "--out", tmp_path / "curve.jsonl")


def test_external_teacher(run, tmp_path):
    """The frozen backbone over the item texts, written in the public layout, imports as a teacher cache."""
    import shutil
    bench("external_teacher.py", run, "--out", tmp_path / "vectors", "--last", 2, cwd=tmp_path)  # HOME: its cache
    other = tmp_path / "run"
    other.mkdir()
    for stage in ("split", "student_alone"):
        shutil.copytree(run / stage, other / stage)
    shutil.copy(run / "recipe.yaml", other / "recipe.yaml")
    assert main(["teacher", "import", str(other / "recipe.yaml"), "--out", str(other), "--queries",
                 str(tmp_path / "vectors" / "queries.parquet"), "--items", str(tmp_path / "vectors" / "items.npy")]) == 0
    record = json.loads((other / "teacher_external" / "metrics.json").read_text())
    assert record["teacher"]["kind"] == "external" and 0 <= record["metrics"]["NDCG@10"] <= 1
