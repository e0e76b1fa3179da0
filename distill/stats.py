"""Statistics of the report: per-user NDCG, bootstrap intervals over users and over seeds and users.

A comparison of two models A and B uses per-user values (e.g. NDCG@10 on test), one row
per trained seed: `a` is (S_a, n), `b` is (S_b, n), the same n users in the same order.

- `paired_bootstrap` resamples users only, each user's value averaged over seeds: it treats
  the trained models as fixed, so it is too narrow when seeds disagree.
- `seed_bootstrap` resamples seeds, then users (two-level): each replicate draws S seeds with
  replacement (the same seed indices for A and B when they have the same seeds, as a distilled
  student and the student alone it starts from do) and n users with replacement (the same users
  for A and B), so the interval includes the seed-to-seed variance.
"""

from __future__ import annotations

import numpy as np


def ndcg_per_user(ranks: np.ndarray, k: int = 10) -> np.ndarray:
    return np.where((ranks >= 0) & (ranks < k), 1.0 / np.log2(np.clip(ranks, 0, None) + 2.0), 0.0)


def _interval(means: np.ndarray) -> list[float]:
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def mean_ci(values: np.ndarray, n_boot: int = 2000, seed: int = 0) -> list[float]:
    """95% percentile bootstrap interval of the mean over users."""
    rng = np.random.default_rng(seed)
    values = np.asarray(values, np.float64)
    return _interval(values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1))


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean of a - b over users and its 95% percentile interval, users resampled (a, b: (n,))."""
    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(n_boot, len(diff)))].mean(axis=1)
    return {"mean_diff": float(diff.mean()), "ci95": _interval(means), "ci_method": "users"}


def seed_bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean of A - B and its 95% two-level interval (seeds, then users), with the per-seed differences.

    a: (S_a, n), b: (S_b, n). With S_a == S_b the seeds are paired (row s of A with row s of B);
    a model with one seed (S = 1) contributes no seed variance, and the result says so.
    """
    a, b = np.atleast_2d(np.asarray(a, np.float64)), np.atleast_2d(np.asarray(b, np.float64))
    n = a.shape[1]
    paired = len(a) == len(b)
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n, size=(n_boot, 1, n))                           # (B, 1, n)

    def draw(x: np.ndarray, idx: np.ndarray) -> np.ndarray:                   # (B, S) seeds -> (B,) means
        return np.take_along_axis(x[idx], users, axis=2).mean(axis=(1, 2))

    idx_a = rng.integers(0, len(a), size=(n_boot, len(a)))
    idx_b = idx_a if paired else rng.integers(0, len(b), size=(n_boot, len(b)))
    means = draw(a, idx_a) - draw(b, idx_b)
    per_seed = (a - b).mean(axis=1) if paired else a.mean(axis=1) - b.mean()   # each seed of A against B
    return {"mean_diff": float(a.mean() - b.mean()), "ci95": _interval(means), "ci_method": "seeds+users",
            "per_seed": [float(d) for d in per_seed], "seeds": [len(a), len(b)]}
