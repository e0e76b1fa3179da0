"""Distillation losses, composed as a weighted sum declared in the recipe (torchdistill style).

Every term takes one `LossInputs` (the student's hidden states at the predicted
positions, the true next items, the item table, and the teacher's outputs where
the cache has them) and returns a scalar. A term whose weight is 0 is never built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from distill.losses.alignment import EmbeddingAlignment
from distill.losses.importance_ranking import ImportanceRankingKD
from distill.losses.pairwise import PairwiseRankingKD
from distill.losses.soft_targets import SoftTargetKL
from distill.losses.softmax import NegativeSampler, SoftmaxLoss

__all__ = ["LossInputs", "TeacherTargets", "WeightedLoss", "SoftmaxLoss", "NegativeSampler",
           "SoftTargetKL", "PairwiseRankingKD", "ImportanceRankingKD", "EmbeddingAlignment"]


@dataclass
class TeacherTargets:
    """Teacher outputs for the rows of a batch that have them (`rows` indexes the batch)."""

    rows: torch.Tensor    # (P_t,) long, indices into the batch's positions
    ids: torch.Tensor     # (P_t, K) long, top-K item ids
    scores: torch.Tensor  # (P_t, K) float, teacher scores
    query: torch.Tensor   # (P_t, D) float, teacher query vectors


@dataclass
class LossInputs:
    hidden: torch.Tensor          # (P, d) student vectors at the predicted positions
    targets: torch.Tensor         # (P,) true next items
    item_table: torch.Tensor      # (N+1, d) student item table
    teacher: TeacherTargets | None = None
    history: torch.Tensor | None = None  # (P, T) items each position has read (0 = padding), kept out of negatives


class WeightedLoss(nn.Module):
    """sum_i weight_i * term_i(inputs); terms that need the teacher are skipped when it has no rows.

    Terms are given as (weight, factory): a term whose weight is 0 is never built, so it draws no
    random numbers and holds no parameters.
    """

    def __init__(self, terms: dict[str, tuple[float, Callable[[], nn.Module]]]):
        super().__init__()
        self.weights = {n: w for n, (w, _) in terms.items() if w > 0}
        self.terms = nn.ModuleDict({n: build() for n, (w, build) in terms.items() if w > 0})

    @property
    def needs_teacher(self) -> bool:
        return any(getattr(t, "needs_teacher", False) for t in self.terms.values())

    def forward(self, inputs: LossInputs) -> tuple[torch.Tensor, dict[str, float]]:
        total = inputs.hidden.new_zeros(())
        parts = {}
        for name, term in self.terms.items():
            if getattr(term, "needs_teacher", False) and (inputs.teacher is None or len(inputs.teacher.rows) == 0):
                continue
            value = term(inputs)
            parts[name] = value.item()
            total = total + self.weights[name] * value
        return total, parts
