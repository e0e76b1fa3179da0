"""Alignment of the student's user vector to the teacher's query vector.

cosine:  L = mean_p (1 - cos(W h_p, q_p))
infonce: L = CE over the batch of cos(W h_p, q_p') / tau, the matching pair as the positive
W is a learned linear map from the student's width d to the teacher's width D.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class EmbeddingAlignment(nn.Module):
    needs_teacher = True

    def __init__(self, student_dim: int, teacher_dim: int, kind: str = "cosine", tau: float = 0.1):
        super().__init__()
        self.map = nn.Linear(student_dim, teacher_dim, bias=False)
        self.kind, self.tau = kind, tau

    def forward(self, inputs) -> torch.Tensor:
        t = inputs.teacher
        s = F.normalize(self.map(inputs.hidden[t.rows]), dim=-1)          # (P_t, D)
        q = F.normalize(t.query.detach(), dim=-1)                         # (P_t, D)
        if self.kind == "cosine":
            return (1 - (s * q).sum(-1)).mean()
        logits = s @ q.T / self.tau
        return F.cross_entropy(logits, torch.arange(len(s), device=s.device))
