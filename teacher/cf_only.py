"""The CF-only teacher: the CF model a teacher blends with, alone (the blend at w = 1, no LLM).

It answers `get_teacher_outputs` as the LLM teacher does at w = 1: the query is the CF model's user
vector, the top-K comes from the same harness index over the CF item table with the same history
masking, and the scores are divided by the same `teacher.temperature`. Its cache
(`build_cf_cache`) has the teacher cache's format, positions and shards, so a student distilled from
it is the control "distilled from the CF model alone": what distillation gives without the LLM.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from distill.cache import cache_key, complete_cache, staging_dir
from distill.config import Recipe
from distill.data import Split
from distill.histories import Histories
from distill.positions import scored_positions
from distill.search import ItemIndex, ranking_exclusions
from student.model import SASRec
from teacher.guard import check_validation
from teacher.infer import pending_shards, score_shards
from teacher.model import TeacherOutputs


class CFOnlyTeacher:
    def __init__(self, cf: SASRec, temperature: float):
        self.cf = cf.eval()
        self.temperature = temperature
        self.dim = cf.cfg.hidden_size
        self._index: ItemIndex | None = None

    def item_vectors(self) -> np.ndarray:
        return self.cf.item_vectors()

    @torch.inference_mode()
    def get_teacher_outputs(self, histories: Histories, k: int, mask_history: bool = True,
                            index: str = "Flat") -> TeacherOutputs:
        if self._index is None or self._index.kind != index:
            self._index = ItemIndex(self.item_vectors(), index)
        q = self.cf.encode_users(torch.from_numpy(histories.padded(self.cf.cfg.max_len))).float()
        exclude = ranking_exclusions(histories, self.cf.cfg.n_items + 1, mask_history)
        ids, scores = self._index.search(q.numpy(), k, exclude)
        return TeacherOutputs(q, torch.from_numpy(ids), torch.from_numpy(scores) / self.temperature)


def cf_cache_key(recipe: Recipe, split: Split, cf_sha256: str) -> dict:
    """What a CF-only cache is built from: the teacher cache's key, the CF model in the teacher's place."""
    return cache_key(recipe, split, f"cf-only:{cf_sha256}")


def build_cf_cache(recipe: Recipe, split: Split, cf: SASRec, cf_sha256: str, out: Path,
                   recorded_valid: float | None = None) -> dict:
    """Write the CF-only cache at `out` (through OUT.partial/, complete shards kept on a rerun); its
    validation rows must give the CF model's `recorded_valid` NDCG@10 (guard.check_validation)."""
    d = recipe.distill
    teacher = CFOnlyTeacher(cf, recipe.teacher.temperature)
    users, t = scored_positions(split, d.positions)
    meta = {**cf_cache_key(recipe, split, cf_sha256), "dim": teacher.dim}
    n_shards = -(-split.n_users // d.shard_users)
    staging = staging_dir(out)
    staging.mkdir(parents=True, exist_ok=True)
    todo = pending_shards(staging, list(range(n_shards)), meta)
    total, _, seconds = score_shards(teacher, lambda h: h.lengths, teacher.dim, recipe, split, users, t, todo,
                                     staging, meta, "CF-only teacher cache")
    items = teacher.item_vectors()
    valid = check_validation(staging, n_shards, split, items, recipe, recorded_valid, "the CF model")
    manifest = complete_cache(staging, out, n_shards, meta, items, {
        "teacher": {"kind": "cf-only", "cf_weight": 1.0}, "valid_check": valid,
        "guard": {"checked": False, "reason": "the CF model alone: no LLM, nothing to compare"}})
    print(f"CF-only teacher cache: {total} queries in {seconds:.1f}s at {out}")
    return manifest
