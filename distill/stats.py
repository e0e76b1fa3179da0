"""Statistics of the report: per-user NDCG, bootstrap intervals over users, and over teachers, seeds and users.

A comparison of two models A and B uses per-user values (e.g. NDCG@10 on test), one row
per trained (teacher, student seed), keyed by those ids (`levels`), the same n users in the same order.

- `paired_bootstrap` resamples users only, each user's value averaged over seeds: it treats
  the trained models as fixed, so it is too narrow when seeds disagree.
- `nested_bootstrap` resamples teachers, then student seeds, then users (three-level; two-level when
  neither model has several teachers): each replicate draws the teachers with replacement, the seeds
  with replacement within each drawn teacher (the same draws for A and B where they share the ids, as a
  distilled student and the student alone it starts from share the student seed), and n users with
  replacement (the same users for A and B), so the interval includes the teacher-to-teacher and
  seed-to-seed variance.
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


def _grid(levels: dict) -> tuple[np.ndarray, list, list]:
    """{teacher id: {seed id: (n,) values}} -> (T, S, n) array, teacher ids, seed ids (both sorted; the
    seeds every teacher has). A model without a teacher level has the one teacher id None, a model
    without seeds (a teacher) the one seed id None."""
    order = lambda ids: sorted(ids, key=lambda x: (x is not None, x))
    teachers = order(levels)
    seeds = order(set.intersection(*(set(levels[t]) for t in teachers)))
    if not seeds:
        raise ValueError("no seed is shared by every teacher")
    grid = np.stack([np.stack([np.asarray(levels[t][s], np.float64) for s in seeds]) for t in teachers])
    return grid, teachers, seeds


def _draws(rng, shape: tuple, ids_a: list, ids_b: list) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap indices (shape + (m,)) into A's and B's ids at one level: shared when the ids are the
    same (paired); a model with a single id always draws it (no variance at this level), in step with
    the other model's draws; otherwise independent."""
    if ids_a == ids_b or len(ids_a) == 1 or len(ids_b) == 1:
        m = max(len(ids_a), len(ids_b))
        d = rng.integers(0, m, shape + (m,))
        return (d if len(ids_a) == m else np.zeros_like(d)), (d if len(ids_b) == m else np.zeros_like(d))
    return rng.integers(0, len(ids_a), shape + (len(ids_a),)), rng.integers(0, len(ids_b), shape + (len(ids_b),))


def _match(ids_a: list, ids_b: list, i: int):
    """B's counterpart of A's i-th id: the same id when paired, B's only one, or all of B's (a slice)."""
    return i if ids_a == ids_b else 0 if len(ids_b) == 1 else slice(None)


def nested_bootstrap(a: dict, b: dict, n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean of A - B over per-user values and its 95% interval from a three-level bootstrap: teachers,
    then student seeds within each drawn teacher, then users.

    a, b: {teacher id: {seed id: (n,) per-user values}}, the same n users in the same order. A level is
    paired by id when both models have the same ids there (a distilled student and its teacher share the
    teacher seed; a distilled student and the student alone it starts from share the student seed); a
    model with a single id at a level (the student alone has no teacher; a teacher has no student seed)
    contributes no variance there. Users are always the same users for A and B. With one teacher on both
    sides this is the two-level bootstrap (seeds, then users).
    """
    A, ta, sa = _grid(a)
    B, tb, sb = _grid(b)
    n = A.shape[2]
    if B.shape[2] != n:
        raise ValueError(f"A has {n} users, B {B.shape[2]}")
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).T / n       # (n, B): the users drawn
    ma, mb = A @ weights, B @ weights                                           # (T, S, B): each draw's mean
    t_a, t_b = _draws(rng, (n_boot,), ta, tb)                                   # (B, m_a), (B, m_b)
    if t_a.shape == t_b.shape:                                                  # teachers drawn in step
        s_a, s_b = _draws(rng, t_a.shape, sa, sb)                               # (B, m, S)
    else:
        s_a = rng.integers(0, len(sa), t_a.shape + (len(sa),))
        s_b = rng.integers(0, len(sb), t_b.shape + (len(sb),))
    col = np.arange(n_boot)[:, None, None]
    means = ma[t_a[:, :, None], s_a, col].mean(axis=(1, 2)) - mb[t_b[:, :, None], s_b, col].mean(axis=(1, 2))
    per_seed = [{"teacher": t, "seed": s, "diff": float(A[i, j].mean() - B[_match(ta, tb, i), _match(sa, sb, j)].mean())}
                for i, t in enumerate(ta) for j, s in enumerate(sa)]
    per_teacher = [{"teacher": t, "diff": float(A[i].mean() - B[_match(ta, tb, i)].mean())} for i, t in enumerate(ta)]
    return {"mean_diff": float(A.mean() - B.mean()), "ci95": _interval(means),
            "ci_method": "teachers+seeds+users" if max(len(ta), len(tb)) > 1 else "seeds+users",
            "per_seed": per_seed, "per_teacher": per_teacher, "teachers": [len(ta), len(tb)],
            "seeds": [len(sa), len(sb)]}


def levels(rows) -> dict:
    """{teacher id: {seed id: values}} from (teacher id, seed id, values) rows in any order: a model's
    seeds are keyed by the seed they were trained with, never by the order their folders were found in."""
    out: dict = {}
    for teacher, seed, values in rows:
        if seed in out.setdefault(teacher, {}):
            raise ValueError(f"teacher {teacher}, seed {seed}: listed twice")
        out[teacher][seed] = values
    return out
