"""Serving cost of each model, measured on this machine.

Each model is measured in its own child process, forked from a forkserver that
has already imported torch, so its peak resident memory is its own (on top of
the interpreter and torch, the same for every model) and no child pays for the
imports. Every model serves the same users (recipe section `bench`): latency per user at
batch 1 (encode + top-10 search under the ranking protocol of `eval.mask_history`, model loading excluded),
and a throughput sweep over batch sizes (median of its passes); the report compares each
model's best throughput, and the FLOPs per user each model's shapes imply.

A student (a model `anyo export` can serve) is measured through `distill.recommender.Recommender` on its
default runtime, the path `anyo recommend` and `anyo serve` run; the teacher and MostPop through their own
retriever and the harness's search.
`python -m distill.serving RUN NAME [BACKEND]` measures one model (a name in distill.runs.MODELS) from the shell.
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import sys
import time
from pathlib import Path

import numpy as np

from distill.config import BenchConfig
from distill.data import Split, load_split
from distill.recommender import Recommender
from distill.runs import MODELS, load_retriever
from distill.search import ItemIndex, ranking_exclusions

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


def measure(run: Path, name: str, backend: str, bench, mask_history: bool = True) -> dict:
    """One model's serving cost: encode + top-10 search under the ranking protocol, model loading excluded.
    Every model serves the same users: `bench.latency_users` one at a time, then the first `bench.users`
    test users at each batch size of `bench.batch_sizes` (median of `bench.passes` passes)."""
    split = load_split(run / "split")
    model = load_retriever(run, split, name, backend)
    items = model.item_vectors()
    params, trained = parameter_counts(model)
    hist = split.history("test")
    extra = {}
    if MODELS[name].exportable:  # what `anyo serve` runs
        rec = Recommender(model)
        extra["runtime"] = rec.runtime

        def serve(users: np.ndarray) -> None:
            rec.top_k(hist.take(users), 10, mask_history)
    else:
        index = ItemIndex(items)

        def serve(users: np.ndarray) -> None:
            rows = hist.take(users)
            index.search(model.encode(rows), 10, ranking_exclusions(rows, len(items), mask_history))

    serve(np.arange(2))  # warm-up
    lat = []
    for u in np.random.default_rng(0).choice(split.n_users, size=min(bench.latency_users, split.n_users),
                                             replace=False):
        t = clock()
        serve(np.array([u]))
        lat.append((clock() - t) * 1000)
    users = np.arange(min(bench.users or split.n_users, split.n_users))
    sweep = {}
    for batch in bench.batch_sizes:
        passes = []
        for _ in range(bench.passes):
            t = clock()
            for lo in range(0, len(users), batch):
                serve(users[lo:lo + batch])
            passes.append(clock() - t)
        sweep[str(batch)] = len(users) / float(np.median(passes))
    return {"params": int(params), "trainable_params": int(trained),
            "checkpoint_bytes": int(_dir_bytes(run / name)) if params else 0,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "latency_ms": {"p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
                           "users": len(lat)},
            "throughput_users_per_s": max(sweep.values()), "throughput_by_batch": sweep, "users": len(users),
            "flops_per_user": float(np.mean(model.flops_per_user(hist.take(users)))), **extra}


def measure_costs(run: Path, split: Split, names: list[str], bench, mask_history: bool = True) -> dict:
    """Cost of each model by name; the teacher's top-level figures are its first backend's."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "distill.serving"])
    out = {}
    for name in names:
        for backend in bench.teacher_backends if name == "teacher" else ["hf"]:
            pool = ctx.Pool(processes=1)  # a fresh child per model: its own peak RSS
            try:
                cost = pool.apply(measure, (run, name, backend, bench, mask_history))
            except Exception as e:
                raise RuntimeError(f"measuring {name} ({backend}) failed: {e}") from e
            finally:
                pool.close()
                pool.join()
            out.setdefault(name, cost)
            if name == "teacher":
                out[name].setdefault("backends", {})[backend] = {
                    k: cost[k] for k in ("latency_ms", "throughput_users_per_s", "throughput_by_batch",
                                         "peak_rss_bytes")}
    return out


if __name__ == "__main__":
    print(json.dumps(measure(Path(sys.argv[1]), sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "hf",
                             BenchConfig())))
