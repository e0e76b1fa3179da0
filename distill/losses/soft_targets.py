"""Soft-target KD over the teacher's top-K items (Hinton et al., temperature-scaled).

L = T^2 * KL( softmax(t / T) || softmax(s / T) ), both softmaxes over the same K items,
t the teacher's top-K scores, s the student's scores h.E[top-K]. Mean over positions.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SoftTargetKL(nn.Module):
    needs_teacher = True

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.T = temperature

    def forward(self, inputs) -> torch.Tensor:
        t = inputs.teacher
        h = inputs.hidden[t.rows]                                         # (P_t, d)
        s = torch.einsum("pd,pkd->pk", h, inputs.item_table[t.ids])       # (P_t, K)
        p_teacher = F.softmax(t.scores.detach() / self.T, dim=-1)
        log_p_student = F.log_softmax(s / self.T, dim=-1)
        return F.kl_div(log_p_student, p_teacher, reduction="batchmean") * self.T ** 2
