"""How anyo scales: prepare, a student epoch, the harness's indexes, the teacher cache, sharded inference.

    python benchmarks/scale.py [--prepare 1e5,1e6,1e7] [--student 1e4,1e5,1e6] [--harness 1e5,1e6]
                               [--cache 1e5,1e6] [--gloo 4] [--out benchmarks/scale.md]

Every size runs in a fresh subprocess (`--worker`), which reports its wall time and its peak
RSS (resource.getrusage ru_maxrss), so one size's memory never hides another's. Writes the
table to --out (Markdown, dated, with this command) and a plot next to it (scale.png).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- workers (each in its own process)

def work_prepare(n: int, tmp: Path) -> dict:
    from make_synthetic import synthetic
    import pyarrow.parquet as pq
    path = tmp / f"syn-{n}.parquet"
    pq.write_table(synthetic(n, max(1000, n // 20)), path)
    del_rss = peak_mib()
    os.environ["HF_DATASETS_CACHE"] = str(tmp / "hf")
    from distill.config import DataConfig
    from distill import data
    cfg = DataConfig(format="parquet", path=str(path))
    t0 = time.perf_counter()
    d = data._read_data(cfg)
    t1 = time.perf_counter()
    split = data._finish(d, cfg)
    t2 = time.perf_counter()
    return {"size": n, "seconds": t2 - t0, "read_sort_hash_s": t1 - t0, "negatives_s": t2 - t1,
            "users": split.n_users, "items": split.n_items, "per_s": n / (t2 - t0), "rss_before_mib": del_rss}


def work_student(n_items: int, tmp: Path, users: int = 2000, mean_len: int = 50) -> dict:
    import torch
    from distill.config import load_recipe
    from distill.data import Split
    from distill.histories import Histories
    from distill.losses import WeightedLoss
    from student.train import StudentTask, build_student, own_loss
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    lens = rng.integers(10, 2 * mean_len - 10, users)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    flat = rng.integers(1, n_items + 1, offsets[-1]).astype(np.int64)
    split = Split([str(u) for u in range(users)], ["[PAD]"] + [str(i) for i in range(n_items)],
                  [""] * (n_items + 1), Histories(flat, offsets), {}, {"hash": "synthetic"})
    recipe = load_recipe(ROOT / "recipes" / "ml100k.yaml", ["student.loss=sampled", "student.num_negatives=256",
                                                            "student.batch_size=128"])
    torch.manual_seed(0)
    model = build_student(recipe, split)
    loss = WeightedLoss({"own": (1.0, lambda: own_loss(recipe, split))})
    task = StudentTask(model, split, recipe, loss)
    opt = torch.optim.AdamW(task.parameters(), lr=1e-3)
    rss0 = peak_mib()
    task.train()
    t0 = time.perf_counter()
    for rows in task.batches(rng, torch.Generator().manual_seed(0)):
        out = task.step(rows)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    sec = time.perf_counter() - t0
    table = (n_items + 1) * model.cfg.hidden_size * 4
    return {"size": n_items, "seconds": sec, "windows": len(task.windows.inputs), "interactions": int(offsets[-1]),
            "table_mib": table / 2**20, "table_with_adam_mib": 4 * table / 2**20, "rss_after_build_mib": rss0}


def clustered(n: int, d: int, rng, centers: int = 1000) -> np.ndarray:
    c = rng.normal(size=(centers, d)).astype(np.float32)
    x = c[rng.integers(0, centers, n)] + 0.5 * rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def work_harness(n_items: int, tmp: Path, queries: int = 1000, dim: int = 64) -> dict:
    import faiss
    from distill.search import ItemIndex
    faiss.omp_set_num_threads(2)
    rng = np.random.default_rng(0)
    items = np.vstack([np.zeros((1, dim), np.float32), clustered(n_items, dim, rng)])
    q = clustered(queries, dim, rng)
    rows = []
    exact_ids, exact_s = None, None
    built: dict = {}
    for spec in ["Flat", "IVF1024,Flat?nprobe=16", "IVF1024,Flat?nprobe=32", "IVF1024,Flat?nprobe=64",
                 "HNSW32?efSearch=64", "HNSW32?efSearch=128"]:
        factory, params = spec.partition("?")[::2]
        t0 = time.perf_counter()
        if factory not in built:  # one build per factory string; the search parameter is set on it
            built[factory] = ItemIndex(items, factory)
        index = built[factory]
        if params:
            faiss.ParameterSpace().set_index_parameters(index.index, params)
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        ids, _ = index.search(q, 10)
        sec = time.perf_counter() - t0
        if exact_ids is None:
            exact_ids, exact_s = ids, sec
        recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), exact_ids.tolist())]))
        rows.append({"index": spec, "build_s": build, "search_s": sec, "recall@10": recall,
                     "speedup": exact_s / sec})
        with open(tmp / f"harness-{n_items}.jsonl", "a") as f:  # kept if the process runs out of time
            f.write(json.dumps(rows[-1]) + "\n")
    return {"size": n_items, "queries": queries, "rows": rows}


def work_cache(n: int, tmp: Path, k: int = 50, dim: int = 64, shard: int = 20_000) -> dict:
    from distill.cache import TeacherCache, complete_cache, shard_name, staging_dir, write_shard
    rng = np.random.default_rng(0)
    out = tmp / f"cache-{n}"
    staging = staging_dir(out)
    staging.mkdir(parents=True)
    meta = {"split_hash": "synthetic", "k": k, "dim": dim}
    n_shards = -(-n // shard)
    t0 = time.perf_counter()
    for i in range(n_shards):
        m = min(shard, n - i * shard)
        users = np.arange(i * shard, i * shard + m)
        write_shard(staging / shard_name(i), {
            "user": users, "position": np.ones(m, np.int64), "query": rng.normal(size=(m, dim)).astype(np.float32),
            "topk_ids": rng.integers(1, 100_000, (m, k)).astype(np.int32),
            "topk_scores": rng.normal(size=(m, k)).astype(np.float32)}, meta)
    complete_cache(staging, out, n_shards, meta, np.zeros((100_001, dim), np.float32))
    write_s = time.perf_counter() - t0
    rss_write = peak_mib()
    t0 = time.perf_counter()
    cache = TeacherCache(out)
    open_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    total = 0.0
    for _ in range(0, n, 4096):  # the distillation's access pattern: a batch of (user, position) pairs
        users = rng.integers(0, n, 4096)
        rows = cache.lookup(users, np.ones(4096, np.int64))
        total += float(rows.topk_scores[:, 0].sum())
    read_s = time.perf_counter() - t0
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    anon, mapped = (int(status[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile"))
    size = sum(p.stat().st_size for p in out.iterdir())
    shutil.rmtree(out)
    return {"size": n, "write_s": write_s, "open_s": open_s, "read_s": read_s, "mib": size / 2**20,
            "rss_after_write_mib": rss_write, "anon_after_read_mib": anon, "file_pages_after_read_mib": mapped}


WORKERS = {"prepare": work_prepare, "student": work_student, "harness": work_harness, "cache": work_cache}


def run_worker(kind: str, size: int, tmp: Path, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, str(size), "--tmp", str(tmp)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2")
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        partial = tmp / f"{kind}-{size}.jsonl"
        r = {"size": size, "error": f"did not finish in {timeout:.0f} s"}
        if partial.is_file():  # the rows finished before the limit
            r = {"size": size, "peak_mib": float("nan"), "rows": [json.loads(x) for x in partial.read_text().splitlines()],
                 "note": r["error"]}
        return r
    if p.returncode != 0:
        return {"size": size, "error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"rc {p.returncode}"}
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r["process_s"] = time.perf_counter() - t0
    return r


# ---------------------------------------------------------------- sharded inference on gloo ranks

def gloo(ranks: int, tmp: Path) -> dict:
    """A tiny recipe's teacher cache written by `ranks` gloo processes equals the one-process cache."""
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import RECIPE, sets, tiny_recipe_overrides, write_dataset, write_tiny_llama
    data, model = write_dataset(tmp / "toy"), write_tiny_llama(tmp / "llama")
    ov = sets(tiny_recipe_overrides(data, model))
    run = tmp / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    anyo = [sys.executable, "-m", "distill.cli"]
    for stage in (["prepare"], ["student", "train"], ["teacher", "train"], ["teacher", "infer"]):
        subprocess.run(anyo + stage + [RECIPE, "--out", str(run)] + ov, check=True, env=env, capture_output=True)
    many = tmp / "many"
    many.mkdir()
    for part in ("split", "student_alone", "teacher", "recipe.yaml"):
        (shutil.copytree if (run / part).is_dir() else shutil.copy)(run / part, many / part)
    t0 = time.perf_counter()
    procs = [subprocess.Popen(anyo + ["teacher", "infer", RECIPE, "--out", str(many)] + ov, env=dict(
        env, WORLD_SIZE=str(ranks), RANK=str(r), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT="29541"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in range(ranks)]
    codes = [p.wait(timeout=900) for p in procs]
    sec = time.perf_counter() - t0
    from distill.cache import TeacherCache
    a, b = TeacherCache(run / "teacher_cache"), TeacherCache(many / "teacher_cache")
    equal = len(a.shards) == len(b.shards) and all(
        np.array_equal(np.asarray(x[f]), np.asarray(y[f])) for x, y in zip(a.shards, b.shards) for f in x)
    return {"ranks": ranks, "exit_codes": codes, "seconds": sec, "shards": len(b.shards), "queries": len(b),
            "equal_to_one_rank": bool(equal)}


# ---------------------------------------------------------------- report

def sizes(text: str) -> list[int]:
    return [int(float(s)) for s in text.split(",") if s.strip()] if text else []


def fmt(x, digits=2):
    if isinstance(x, float):
        return f"{x:,.{digits}f}" if x == x else "—"   # NaN: not measured (a worker that ran out of time)
    return f"{x:,}" if isinstance(x, int) else str(x)


def write_report(res: dict, out: Path, command: str, date: str) -> None:
    commands = res.get("commands") or [command]
    lines = [f"# Scale benchmark ({date})", "", "; ".join(f"`{c}`" for c in commands) + " (each run keeps the sections "
             "it did not rerun) — 2-core x86_64 CPU VM, no GPU; every size in a fresh process; peak RSS = that "
             "process's ru_maxrss.", ""]
    if res.get("prepare"):
        lines += ["## prepare (Parquet -> split)", "", "| interactions | users | items | seconds | read+sort+hash s | "
                  "negatives s | interactions/s | peak RSS MiB |", "|---|---|---|---|---|---|---|---|"]
        for r in res["prepare"]:
            lines.append(f"| {r['size']:,} | " + (" | ".join([fmt(r["users"]), fmt(r["items"]), fmt(r["seconds"]),
                         fmt(r["read_sort_hash_s"]), fmt(r["negatives_s"]), fmt(r["per_s"], 0), fmt(r["peak_mib"], 0)])
                         if "error" not in r else r["error"] + " | | | | | | |") + " |")
        lines.append("")
    if res.get("student"):
        lines += ["## one student epoch, sampled softmax (256 negatives), 64d x 2, batch 128", "",
                  "| items | windows | seconds | peak RSS MiB | item table MiB (x4 with grad + Adam) |",
                  "|---|---|---|---|---|"]
        for r in res["student"]:
            lines.append(f"| {r['size']:,} | " + (f"{r['windows']:,} | {fmt(r['seconds'])} | {fmt(r['peak_mib'], 0)} | "
                         f"{fmt(r['table_mib'], 0)} ({fmt(r['table_with_adam_mib'], 0)})" if "error" not in r
                         else r["error"] + " | | | |") + " |")
        lines.append("")
    if res.get("harness"):
        lines += ["## harness: exact against approximate indexes (1,000 queries, 64 d, top-10)", "",
                  "| items | index | build s | search s | recall@10 | speed-up | peak RSS MiB |",
                  "|---|---|---|---|---|---|---|"]
        for r in res["harness"]:
            if "error" in r:
                lines.append(f"| {r['size']:,} | {r['error']} | | | | | |")
                continue
            for row in r["rows"]:
                lines.append(f"| {r['size']:,} | `{row['index']}` | {fmt(row['build_s'])} | {fmt(row['search_s'], 3)} | "
                             f"{row['recall@10']:.3f} | {fmt(row['speedup'], 1)}x | {fmt(r.get('peak_mib', '—'), 0)} |")
        lines.append("")
    if res.get("cache"):
        lines += ["## teacher cache: write (shards of 20,000) and read (open + lookups of 4,096 pairs)", "",
                  "| prompts | MiB on disk | write s | open s | read s | RSS after write MiB | after read: anonymous "
                  "MiB | after read: mapped file pages MiB | peak RSS MiB |", "|---|---|---|---|---|---|---|---|---|"]
        for r in res["cache"]:
            lines.append(f"| {r['size']:,} | " + (" | ".join(fmt(r.get(k, "—"), d) for k, d in (
                ("mib", 0), ("write_s", 2), ("open_s", 2), ("read_s", 2), ("rss_after_write_mib", 0),
                ("anon_after_read_mib", 0), ("file_pages_after_read_mib", 0), ("peak_mib", 0)))
                if "error" not in r else r["error"] + " | | | | | | |") + " |")
        lines += ["", "Peak RSS counts the shards' memory-mapped pages that the lookups touched (page cache the OS "
                  "can drop); the process's own memory is the anonymous part, which grows only by the sorted (user, "
                  "position) index (24 bytes a prompt, plus what building it leaves with the allocator).", ""]
    if res.get("gloo"):
        g = res["gloo"]
        lines += ["## sharded inference", "", f"{g['ranks']} gloo ranks on the tiny recipe (toy data, 2-layer "
                  f"random Llama): exit codes {g['exit_codes']}, {g['queries']} queries in {g['shards']} shards, "
                  f"{fmt(g['seconds'], 1)} s, merged cache equal to the one-rank cache: **{g['equal_to_one_rank']}**.", ""]
    out.write_text("\n".join(lines) + "\n")
    (out.with_suffix(".json")).write_text(json.dumps(res, indent=1) + "\n")


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    parts = [k for k in ("prepare", "student", "cache") if res.get(k)]
    if not parts:
        return
    fig, axes = plt.subplots(2, len(parts), figsize=(4.5 * len(parts), 7), squeeze=False)
    for j, k in enumerate(parts):
        ok = [r for r in res[k] if "error" not in r]
        x = [r["size"] for r in ok]
        secs = [r.get("seconds", r.get("write_s")) for r in ok]
        axes[0][j].loglog(x, secs, "o-")
        axes[0][j].set_title(f"{k}: seconds")
        axes[1][j].semilogx(x, [r["peak_mib"] for r in ok], "o-")
        axes[1][j].set_title(f"{k}: peak RSS (MiB)")
        axes[1][j].set_xlabel({"prepare": "interactions", "student": "items", "cache": "prompts"}[k])
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", nargs=2)
    ap.add_argument("--tmp")
    ap.add_argument("--prepare", default="1e5,1e6,1e7")
    ap.add_argument("--student", default="1e4,1e5,1e6")
    ap.add_argument("--harness", default="1e5,1e6")
    ap.add_argument("--cache", default="1e5,1e6")
    ap.add_argument("--gloo", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "scale.md"))
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    a = ap.parse_args(argv)
    if a.worker:
        kind, size = a.worker
        r = WORKERS[kind](int(size), Path(a.tmp))
        r["peak_mib"] = peak_mib()
        print(json.dumps(r))
        return
    command = "python benchmarks/scale.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    previous = Path(a.out).with_suffix(".json")
    res = json.loads(previous.read_text()) if previous.is_file() else {}   # sections not rerun are kept
    res["date"] = a.date
    res["commands"] = res.get("commands", []) + [command]
    with tempfile.TemporaryDirectory(prefix="anyo-scale-") as tmp:
        for kind in ("prepare", "student", "harness", "cache"):
            if not sizes(getattr(a, kind)):
                continue
            res[kind] = []
            for n in sizes(getattr(a, kind)):
                r = run_worker(kind, n, Path(tmp), a.timeout)
                print(kind, json.dumps(r), flush=True)
                res[kind].append(r)
                write_report(res, Path(a.out), command, a.date)
        if a.gloo:
            (Path(tmp) / "gloo").mkdir()
            res["gloo"] = gloo(a.gloo, Path(tmp) / "gloo")
            print("gloo", json.dumps(res["gloo"]), flush=True)
    write_report(res, Path(a.out), command, a.date)
    plot(res, Path(a.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
