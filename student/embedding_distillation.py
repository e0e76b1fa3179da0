"""Collaborative embedding distillation (DLLM2Rec: Cui et al., "Distillation Matters: Empowering
Sequential Recommenders to Match the Performance of Large Language Models", RecSys 2024, Sec. 3.3).

The student's item embedding is its own collaborative vector plus a learned projection of the
teacher's item-side vector:

    e_i = e_i^S + gamma * W e_i^T          W: (d, D_T), no bias, so the padding row stays 0

DLLM2Rec adds the projection on the input side of a model whose output layer is separate; anyo's
SASRec ties its input and output item tables, so the sum is the item table on both sides. e^T is the
teacher's text item vectors when it has a text item side (teacher.item_side text or both: the part of the
cache's `items.safetensors` its manifest names `text`), else the cache's item table (which is then the CF
table itself, so the term only reparametrises the student); scaled to a mean row norm of 1 so that gamma
means the same for every teacher. Through the shared W a cold item's row gets W e^T of its text.
The term is trained with the student and folded into e^S when training ends (`SASRec.fold_item_prior`):
the saved student is a plain SASRec and serves at the same cost.

With `text_rows` (distill.ced_text_rows) those items are a text item tower: their ID part is held at 0
(e_i = gamma W e_i^T), so no random start and no "not this one" gradient reaches their rows. `unseen`: a cold
row is what the shared W learns on the seen items' text; `all`: the student has no ID table at all, every
item (input and output side) is its text, so a cold item is placed exactly as a seen one with that text.
W starts at 0 (DLLM2Rec initialises it at random), so a warm-started student starts exactly where the
student alone ended; weight decay shrinks e and W separately, not their sum.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn


class CollaborativeEmbedding(nn.Module):
    """(N+1, d) ID table e -> item table e + gamma * W e^T, from a fixed (N+1, D_T) teacher item table;
    the ID part of the rows in `text_rows` (item ids) is held at 0."""

    def __init__(self, teacher_items: np.ndarray, hidden_size: int, gamma: float,
                 text_rows: np.ndarray | None = None):
        super().__init__()
        table = torch.tensor(np.asarray(teacher_items, dtype=np.float32))          # (N+1, D_T)
        table[0] = 0                                                                 # padding
        scale = table[1:].norm(dim=1).mean().clamp(min=1e-12)
        self.register_buffer("teacher_items", table / scale, persistent=False)
        self.proj = nn.Linear(table.shape[1], hidden_size, bias=False)
        nn.init.zeros_(self.proj.weight)
        self.gamma = gamma
        keep = torch.ones(len(table), 1)
        if text_rows is not None:
            keep[torch.as_tensor(np.asarray(text_rows, dtype=np.int64))] = 0
        self.register_buffer("id_part", keep, persistent=False)                    # (N+1, 1)

    def forward(self, id_table: torch.Tensor) -> torch.Tensor:
        return id_table * self.id_part + self.gamma * self.proj(self.teacher_items)  # (N+1, d)
