"""Harness search speed vs raw FAISS vs torch matmul+topk, on the same random vectors.

    python benchmarks/harness_speed.py [--queries 10000 --items 1000000 --dim 64 --k 10]

Prints queries/s for each and the harness/raw-FAISS ratio (target: overhead < 10%).
The harness searches its queries in fixed-size batches, so its memory does not
grow with the number of queries.
"""

from __future__ import annotations

import argparse
import resource
import time

import faiss
import numpy as np
import torch

from distill.search import ItemIndex


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2, help="best of N interleaved rounds")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    items = rng.standard_normal((args.items + 1, args.dim), dtype=np.float32)
    queries = rng.standard_normal((args.queries, args.dim), dtype=np.float32)

    harness = ItemIndex(items)
    raw = faiss.IndexFlatIP(args.dim)
    raw.add(items)
    t_items = torch.from_numpy(items)

    def torch_topk():
        for lo in range(0, args.queries, 512):
            torch.topk(torch.from_numpy(queries[lo:lo + 512]) @ t_items.T, args.k, dim=1)

    methods = {
        "harness (IndexFlatIP, batched, tie-break, padding/exclusion mask)": lambda: harness.search(queries, args.k),
        "raw faiss.IndexFlatIP.search": lambda: raw.search(queries, args.k),
        "torch matmul + topk (512-query batches)": torch_topk,
    }
    # rounds interleave the methods so a slow spell of a shared machine does not land on one of them
    results = {name: float("inf") for name in methods}
    for _ in range(args.repeats):
        for name, fn in methods.items():
            t = time.perf_counter()
            fn()
            results[name] = min(results[name], time.perf_counter() - t)
    print(f"{args.queries} queries x {args.items} items x {args.dim} dims, top-{args.k}, "
          f"{torch.get_num_threads()} threads, faiss {faiss.__version__}\n")
    print("| method | seconds | queries/s |\n|---|---|---|")
    for name, sec in results.items():
        print(f"| {name} | {sec:.2f} | {args.queries / sec:,.0f} |")
    h, r = list(results.values())[:2]
    print(f"\nharness / raw FAISS time ratio: {h / r:.3f} (overhead {100 * (h / r - 1):+.1f}%)")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB "
          f"(item matrix alone: {items.nbytes / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
