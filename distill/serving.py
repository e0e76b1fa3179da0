"""Serving cost of each model, measured on this machine.

Each model is measured in its own child process, forked from a forkserver that
has already imported torch, so its peak resident memory is its own (on top of
the interpreter and torch, the same for every model) and no child pays for the
imports. Latency is per user at batch 1 (encode + top-10 search with history
masking), model loading excluded; throughput is users/s at a large batch
(median of 3 passes).
`python -m distill.serving RUN MODEL` measures one model from the shell.
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

LATENCY_USERS = {"MostPop": 200, "student alone": 200, "distilled student": 200, "teacher": 8}
THROUGHPUT_USERS = {"teacher": 64}
THROUGHPUT_PASSES = 3  # the median pass counts: one pass is at the mercy of a noisy machine
clock = time.perf_counter  # module-level so a test can substitute a fake clock


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def load_server(run: Path, split: Split, label: str):
    """(encode(list of histories) -> (B, d) array, item vectors, params, trainable params, checkpoint bytes)."""
    import torch
    from student.model import load_student
    if label == "MostPop":
        from distill.baselines import MostPop
        m = MostPop(split)
        return (lambda hs: m.encode_users(len(hs))), m.item_vectors(), 0, 0, 0
    if label in ("student alone", "distilled student"):
        folder = run / ("student_alone" if label == "student alone" else "student_distilled")
        model, _ = load_student(folder, split.hash, split.n_items)
        from distill.data import Histories

        @torch.inference_mode()
        def encode(hs):
            return model.encode_users(torch.from_numpy(Histories.from_rows(hs).padded(model.cfg.max_len))).numpy()
        n = sum(p.numel() for p in model.parameters())
        return encode, model.item_vectors().detach().numpy(), n, n, _dir_bytes(folder)
    from teacher.model import load_teacher
    cf, _ = load_student(run / "student_alone", split.hash, split.n_items)
    model, _ = load_teacher(run / "teacher", cf, split.titles, split.hash)
    backend = label.split("/")[1] if "/" in label else "hf"
    if backend == "deepspeed":
        from teacher.infer import wrap_backend
        model = wrap_backend(model, "deepspeed")
    params = sum(p.numel() for p in model.parameters() if not p.is_meta)
    trainable = sum(v.numel() for v in model.heads_state().values()) + sum(
        p.numel() for n, p in model.named_parameters() if "lora_" in n)
    encode = lambda hs: model.encode(hs).float().cpu().numpy()
    import torch
    return torch.inference_mode()(encode), model.item_table.detach().float().cpu().numpy(), params, trainable, _dir_bytes(run / "teacher")


def measure(run: Path, label: str) -> dict:
    split = load_split(run / "split")
    encode, items, params, trainable, ckpt = load_server(run, split, label)
    index = ItemIndex(items)
    hist = split.history("test")
    rng = np.random.default_rng(0)
    base = label.split("/")[0]

    def serve(users: np.ndarray) -> None:
        rows = [hist.row(u) for u in users]
        exclude = Exclusions.from_histories(hist.take(users), len(items))
        index.search(encode(rows), 10, exclude)

    serve(np.arange(2))  # warm-up
    lat = []
    for u in rng.choice(split.n_users, size=min(LATENCY_USERS.get(base, 200), split.n_users), replace=False):
        t = clock()
        serve(np.array([u]))
        lat.append((clock() - t) * 1000)
    n = min(THROUGHPUT_USERS.get(base, split.n_users), split.n_users)
    batch = 1024 if base != "teacher" else 32
    passes = []
    for _ in range(THROUGHPUT_PASSES):
        t = clock()
        for lo in range(0, n, batch):
            serve(np.arange(lo, min(n, lo + batch)))
        passes.append(clock() - t)
    throughput = n / float(np.median(passes))
    return {"params": int(params), "trainable_params": int(trainable), "checkpoint_bytes": int(ckpt),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "latency_ms": {"p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95))},
            "throughput_users_per_s": float(throughput)}


def measure_costs(run: Path, split: Split, labels: list[str], teacher_backends: list[str]) -> dict:
    """Cost of each model; the teacher's top-level figures are its first backend's."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "distill.serving"])
    out = {}
    for label in labels:
        variants = [f"{label}/{b}" for b in teacher_backends] if label == "teacher" else [label]
        for v in variants:
            pool = ctx.Pool(processes=1)  # a fresh child per model: its own peak RSS
            try:
                cost = pool.apply(measure, (run, v))
            except Exception as e:
                raise RuntimeError(f"measuring {v} failed: {e}") from e
            finally:
                pool.close()
                pool.join()
            if label == "teacher":
                out.setdefault(label, {}).update(cost if v == variants[0] else {})
                out[label].setdefault("backends", {})[v.split("/")[1]] = {
                    k: cost[k] for k in ("latency_ms", "throughput_users_per_s", "peak_rss_bytes")}
            else:
                out[label] = cost
    return out


if __name__ == "__main__":
    print(json.dumps(measure(Path(sys.argv[1]), sys.argv[2])))
