"""Serving cost of each model, measured on this machine.

Each model is measured in its own child process, forked from a forkserver that
has already imported torch, so its peak resident memory is its own (on top of
the interpreter and torch, the same for every model) and no child pays for the
imports. Latency is per user at batch 1 (encode + top-10 search with history
masking), model loading excluded; throughput is users/s at a large batch
(median of 3 passes).
`python -m distill.serving RUN NAME [BACKEND]` measures one model (registry name) from the shell.
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import sys
import time
from pathlib import Path

import numpy as np

from distill.data import Split, load_split
from distill.harness import Exclusions, ItemIndex
from distill.registry import load_retriever

LATENCY_USERS = {"teacher": 8}   # per model name; the others: 200
THROUGHPUT_USERS = {"teacher": 64}
THROUGHPUT_PASSES = 3  # the median pass counts: one pass is at the mercy of a noisy machine
clock = time.perf_counter  # module-level so a test can substitute a fake clock


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def parameter_counts(model) -> tuple[int, int]:
    """(parameters, trained parameters) of a retriever; MostPop has none."""
    if not hasattr(model, "parameters"):
        return 0, 0
    params = sum(p.numel() for p in model.parameters() if not p.is_meta)
    trained = model.trained_parameter_count() if hasattr(model, "trained_parameter_count") else params
    return params, trained


def measure(run: Path, name: str, backend: str = "hf") -> dict:
    split = load_split(run / "split")
    model = load_retriever(run, split, name, backend)
    items = model.item_vectors()
    params, trained = parameter_counts(model)
    index = ItemIndex(items)
    hist = split.history("test")
    rng = np.random.default_rng(0)

    def serve(users: np.ndarray) -> None:
        rows = hist.take(users)
        index.search(model.encode(rows), 10, Exclusions.from_histories(rows, len(items)))

    serve(np.arange(2))  # warm-up
    lat = []
    for u in rng.choice(split.n_users, size=min(LATENCY_USERS.get(name, 200), split.n_users), replace=False):
        t = clock()
        serve(np.array([u]))
        lat.append((clock() - t) * 1000)
    n = min(THROUGHPUT_USERS.get(name, split.n_users), split.n_users)
    batch = 1024 if name != "teacher" else 32
    passes = []
    for _ in range(THROUGHPUT_PASSES):
        t = clock()
        for lo in range(0, n, batch):
            serve(np.arange(lo, min(n, lo + batch)))
        passes.append(clock() - t)
    throughput = n / float(np.median(passes))
    return {"params": int(params), "trainable_params": int(trained),
            "checkpoint_bytes": int(_dir_bytes(run / name)) if params else 0,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "latency_ms": {"p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95))},
            "throughput_users_per_s": float(throughput)}


def measure_costs(run: Path, split: Split, names: list[str], teacher_backends: list[str]) -> dict:
    """Cost of each model by name; the teacher's top-level figures are its first backend's."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "distill.serving"])
    out = {}
    for name in names:
        for backend in teacher_backends if name == "teacher" else ["hf"]:
            pool = ctx.Pool(processes=1)  # a fresh child per model: its own peak RSS
            try:
                cost = pool.apply(measure, (run, name, backend))
            except Exception as e:
                raise RuntimeError(f"measuring {name} ({backend}) failed: {e}") from e
            finally:
                pool.close()
                pool.join()
            out.setdefault(name, cost)
            if name == "teacher":
                out[name].setdefault("backends", {})[backend] = {
                    k: cost[k] for k in ("latency_ms", "throughput_users_per_s", "peak_rss_bytes")}
    return out


if __name__ == "__main__":
    print(json.dumps(measure(Path(sys.argv[1]), *sys.argv[2:])))
