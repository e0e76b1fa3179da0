"""The report's bootstrap: three levels (teachers, student seeds, users), seeds paired by id."""

import numpy as np
import pytest

from distill.stats import levels, nested_bootstrap

MU = 0.01


def simulate(rng, teachers: int, seeds: int, n: int, sd_teacher: float) -> tuple[dict, dict]:
    """A (teachers x seeds x users) distilled against B (seeds x users, no teacher): A - B = MU plus a
    teacher effect drawn with sd `sd_teacher` (the known teacher variance), a small seed effect and user noise."""
    b = {None: {s: rng.normal(0, 0.1, n) for s in range(seeds)}}
    effect = rng.normal(0, sd_teacher, teachers)
    a = {t: {s: b[None][s] + MU + effect[t] + rng.normal(0, 0.002) + rng.normal(0, 0.1, n) for s in range(seeds)}
         for t in range(teachers)}
    return a, b


def coverage(reps: int, teachers: int, sd_teacher: float) -> float:
    rng = np.random.default_rng(0)
    hits = 0
    for r in range(reps):
        a, b = simulate(rng, teachers, 4, 200, sd_teacher)
        lo, hi = nested_bootstrap(a, b, n_boot=400, seed=r)["ci95"]
        hits += lo < MU < hi
    return hits / reps


def test_three_level_bootstrap_covers_the_teacher_variance():
    # 8 teachers whose effect varies (sd 0.02, twice the difference itself): the interval must cover
    # the population difference about 95% of the time; one teacher's two-level interval (the report before
    # teacher seeds) treats its teacher as fixed and misses it most of the time
    assert coverage(200, teachers=8, sd_teacher=0.02) >= 0.88
    assert coverage(200, teachers=1, sd_teacher=0.02) <= 0.6
    assert coverage(100, teachers=8, sd_teacher=0.0) >= 0.88       # no teacher variance: still nominal


def test_bootstrap_pairs_teachers_and_seeds_by_id():
    rng = np.random.default_rng(1)
    n = 500
    teacher = {t: {None: rng.random(n)} for t in (0, 1, 2)}
    distilled = {t: {s: teacher[t][None] + 0.01 * (t + 1) + 0.001 * s for s in (0, 1)} for t in (0, 1, 2)}
    c = nested_bootstrap(distilled, teacher)
    assert c["ci_method"] == "teachers+seeds+users" and c["teachers"] == [3, 3] and c["seeds"] == [2, 1]
    assert [d["diff"] for d in c["per_teacher"]] == pytest.approx([0.0105, 0.0205, 0.0305])
    assert {(d["teacher"], d["seed"]): d["diff"] for d in c["per_seed"]}[(2, 1)] == pytest.approx(0.031)
    assert c["ci95"][0] < c["mean_diff"] < c["ci95"][1]


def test_seeds_paired_by_id_survive_a_reordering_of_seed_folders():
    rng = np.random.default_rng(2)
    n = 300
    alone = {s: rng.random(n) for s in (0, 1, 9, 10)}
    distilled = {s: alone[s] + 0.01 * s for s in alone}               # the gain depends on the seed
    rows = [(None, s, v) for s, v in distilled.items()]
    found_in_order = nested_bootstrap(levels(rows), levels([(None, s, v) for s, v in alone.items()]))
    # folders listed in another order (e.g. sorted as text: seed 10 before seed 9): the same pairs
    shuffled = nested_bootstrap(levels(rows[::-1]), levels([(None, s, alone[s]) for s in (10, 0, 9, 1)]))
    assert shuffled == found_in_order
    assert {d["seed"]: d["diff"] for d in shuffled["per_seed"]} == pytest.approx({0: 0.0, 1: 0.01, 9: 0.09, 10: 0.1})
    with pytest.raises(ValueError, match="listed twice"):
        levels(rows + rows[:1])
