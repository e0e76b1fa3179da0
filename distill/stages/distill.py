"""Stage `distill`: the student trained from a teacher cache, in RUN/student_distilled (or RUN/NAME).

The cache is RUN/teacher_cache by default; a student distilled from another cache (another teacher seed's,
RUN/teachers/seed-T/teacher_cache, or the CF-only control's, RUN/cf_teacher_cache) is written beside it:
CACHE_PARENT/NAME, its extra seeds CACHE_PARENT/seeds/NAME-S. It always starts from the student alone of its
own seed (RUN/student_alone, RUN/seeds/student_alone-S)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from distill.cache import TeacherCache
from distill.config import Recipe
from distill.data import Split
from distill.errors import ConfigError
from distill.losses import (EmbeddingAlignment, ImportanceRankingKD, PairwiseRankingKD, SoftTargetKL, TeacherTargets,
                            WeightedLoss)
from distill.runs import distill_inputs, finished_training, model_dir
from distill.stages.common import finish_training
from student.cold_start import init_cold_rows
from student.embedding_distillation import CollaborativeEmbedding
from student.model import load_student
from student.train import own_loss, train_and_save


def distillation_loss(recipe: Recipe, split: Split, teacher_dim: int) -> WeightedLoss:
    """own + KL + pairwise + importance-aware ranking + alignment, weighted as the recipe declares
    (a term of weight 0 is never built)."""
    d = recipe.distill
    return WeightedLoss({
        "own": (d.own_weight, lambda: own_loss(recipe, split, exclude_unseen=not d.cold_negatives)),
        "kd": (d.kd_weight, lambda: SoftTargetKL(d.temperature)),
        "pairwise": (d.pairwise_weight,
                     lambda: PairwiseRankingKD(split.n_items, d.pairwise_lambda, d.pairwise_negatives)),
        "ird": (d.ird_weight, lambda: ImportanceRankingKD(split.n_items, d.ird_k, d.ird_lambda, d.ird_gammas,
                                                          d.ird_temperature, d.ird_negatives)),
        "align": (d.align_weight, lambda: EmbeddingAlignment(recipe.student.hidden_size, teacher_dim, d.align)),
    })


def teacher_item_side(cache: TeacherCache) -> np.ndarray:
    """(N+1, D_T) the teacher item vectors distillation reads: the text part when the teacher has one (what
    the LLM adds, and the only part a cold item has), else its item table."""
    return np.asarray(cache.items("text" if "text" in cache.item_parts else None))


def text_tower_rows(split: Split, which: str) -> np.ndarray | None:
    """The item ids whose rows are their CED text term alone (distill.ced_text_rows); None: every row keeps its ID."""
    if which == "none":
        return None
    items = np.arange(1, split.n_items + 1)
    return items if which == "all" else items[split.item_popularity()[1:] == 0]


def cache_lookup(cache: TeacherCache, k: int):
    """The trainer's (users, positions) -> TeacherTargets view of the cache."""
    def lookup(users: np.ndarray, positions: np.ndarray) -> TeacherTargets:
        rows = cache.lookup(users, positions, k)
        return TeacherTargets(torch.from_numpy(np.flatnonzero(rows.found)), torch.from_numpy(rows.topk_ids),
                              torch.from_numpy(np.ascontiguousarray(rows.topk_scores)),
                              torch.from_numpy(np.ascontiguousarray(rows.query)))
    return lookup


def run(recipe: Recipe, run: Path, split: Split, seed: int, name: str = "student_distilled",
        cache_dir: Path | None = None) -> dict:
    d = recipe.distill
    cache_dir = run / "teacher_cache" if cache_dir is None else cache_dir
    cache = TeacherCache(cache_dir, split.hash, split.n_items)
    if d.k > cache.k:
        raise ConfigError(f"distill.k: {d.k} is larger than the cache's K = {cache.k} ({cache.folder})")
    if cache.dim == 0 and d.align_weight > 0:
        raise ConfigError(f"distill.align_weight: the teacher in {cache.folder} has no query vectors (top-K lists "
                          "imported alone); set it to 0 or import the query vectors too")
    if cache.item_table.shape[1] == 0 and (d.ced_weight > 0 or d.cold_init):
        raise ConfigError(f"distill.{'ced_weight' if d.ced_weight > 0 else 'cold_init'}: the teacher in "
                          f"{cache.folder} has no item vectors; import them with --items, or turn it off")
    out = model_dir(cache_dir.parent, name, seed, recipe)
    wanted = distill_inputs(recipe, run, split, seed, cache_dir)
    if (record := finished_training(out, wanted)) is not None:
        print(f"distilled student (seed {seed}) up to date in {out}")
        return record
    init = load_student(model_dir(run, "student_alone", seed, recipe), split.hash, split.n_items)[0] \
        if d.warm_start else None
    teacher_items = teacher_item_side(cache)
    extra = {}
    for option, on in (("cold_init", d.cold_init), ("ced_text_rows", d.ced_text_rows != "none")):
        if on and "text" not in cache.item_parts:
            raise ConfigError(f"distill.{option}: the teacher in {cache.folder} has no text item side "
                              "(teacher.item_side text or both)")
    if d.cold_init:
        extra["cold_rows_initialised"] = init_cold_rows(init, teacher_items, split.item_popularity())
    torch.manual_seed(seed)  # the alignment map's initial weights must not depend on what ran before
    loss = distillation_loss(recipe, split, cache.dim)
    text_rows = text_tower_rows(split, d.ced_text_rows)
    prior = (lambda: CollaborativeEmbedding(teacher_items, recipe.student.hidden_size, d.ced_weight, text_rows)) \
        if d.ced_weight > 0 else None
    weights = {**loss.weights, **({"ced": d.ced_weight} if prior else {})}
    if text_rows is not None:
        extra["text_tower_rows"] = int(len(text_rows))
    record = train_and_save(recipe, split, out, seed, loss, teacher=cache_lookup(cache, d.k),
                            desc=f"distilled seed {seed}", inputs=wanted,
                            extra={"loss_weights": weights, "recipe": recipe.to_dict(), **extra,
                                   "teacher_item_part": "text" if "text" in cache.item_parts else "cf"},
                            init=init, epochs=d.epochs, item_prior=prior)
    return finish_training(out, record)
