"""Synthetic interactions with Zipf item popularity and sequential structure, written as Parquet.

    python benchmarks/make_synthetic.py --interactions 1000000 --items 100000 --out /tmp/syn-1e6.parquet

Each user's sequence is a random walk over the item catalogue: the next item is, with
probability `--follow`, one of the few items after the previous one (item i tends to be
followed by i+1..i+3), else a draw from a Zipf(--zipf) popularity. Timestamps are one a
step with coarse clock ticks, so ties occur. Columns: user_id (int64), item_id (int64),
timestamp (int64); `--items-out` also writes item_id, title.
"""

from __future__ import annotations

import argparse

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def synthetic(n_interactions: int, n_items: int, mean_len: int = 50, zipf: float = 1.1, follow: float = 0.5,
              seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    n_users = max(1, n_interactions // mean_len)
    lens = rng.multinomial(n_interactions - 3 * n_users, np.full(n_users, 1 / n_users)) + 3 if n_users > 1 \
        else np.array([n_interactions])
    user = np.repeat(np.arange(n_users, dtype=np.int64), lens)
    ranks = np.arange(1, n_items + 1, dtype=np.float64)
    p = ranks ** -zipf
    p /= p.sum()
    perm = rng.permutation(n_items)  # popular items spread over the id space
    pop = perm[np.searchsorted(np.cumsum(p), rng.random(n_interactions)).clip(max=n_items - 1)]
    step = rng.integers(1, 4, n_interactions)
    follows = rng.random(n_interactions) < follow
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    follows[starts] = False
    # item_t = pop_t where not following, else item_{t-1} + step_t: a cumulative sum restarted at each
    # non-following position (vectorised random walk)
    anchor = np.where(follows, 0, pop)
    seg = np.cumsum(~follows) - 1
    base = anchor[np.flatnonzero(~follows)][seg]
    within = np.where(follows, step, 0)
    c = np.cumsum(within)
    seg_start_c = c[np.flatnonzero(~follows)][seg]
    item = (base + c - seg_start_c) % n_items
    t_in_user = np.arange(n_interactions) - np.repeat(starts, lens)
    ts = 1_600_000_000 + t_in_user * 60 // 120 * 120 + user % 1000  # two steps per 2-minute tick: ties
    return pa.table({"user_id": user, "item_id": item.astype(np.int64), "timestamp": ts.astype(np.int64)})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--interactions", type=int, default=1_000_000)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--mean-len", type=int, default=50)
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--items-out")
    a = ap.parse_args(argv)
    table = synthetic(a.interactions, a.items, a.mean_len, a.zipf, seed=a.seed)
    pq.write_table(table, a.out)
    if a.items_out:
        ids = np.arange(a.items, dtype=np.int64)
        pq.write_table(pa.table({"item_id": ids, "title": [f"item {i}" for i in ids.tolist()]}), a.items_out)
    print(f"{a.out}: {table.num_rows} interactions, {len(np.unique(table['user_id'].to_numpy()))} users")


if __name__ == "__main__":
    main()
