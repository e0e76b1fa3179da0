"""Uniform negatives for the teacher terms, never a positive: not the true next item, not an item of
the user's history, and not one of the given teacher items. A draw that hits one is masked out."""

from __future__ import annotations

import torch


def sample_negatives(inputs, rows: torch.Tensor, n_items: int, num: int,
                     teacher_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P_t, num) item ids drawn uniformly from 1..N and a (P_t, num) mask of the valid ones."""
    ids = torch.randint(1, n_items + 1, (len(rows), num), device=teacher_ids.device)
    forbidden = [teacher_ids, inputs.targets[rows, None]]
    if inputs.history is not None:
        forbidden.append(inputs.history[rows])
    taken = torch.cat(forbidden, dim=1)                                   # (P_t, M)
    return ids, ~(ids[:, :, None] == taken[:, None, :]).any(-1)
