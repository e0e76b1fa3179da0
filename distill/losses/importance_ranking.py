"""Importance-aware ranking distillation (DLLM2Rec: Cui et al., "Distillation Matters: Empowering
Sequential Recommenders to Match the Performance of Large Language Models", RecSys 2024).

Each of the teacher's top-K items (ranks r = 1..K) is a positive for the student, weighted by

    w_pos(r)  = exp(-r / lambda) / sum_r' exp(-r' / lambda)            position-aware
    w_conf(r) = softmax_r(teacher score / tau)                          confidence-aware
    w_cons(r) = 1[item r is in the student's current top-K] + 1e-8      consistency-aware
    w(r)      = normalise_r(g_pos w_pos + g_conf w_conf + g_cons w_cons)

    L = mean_p sum_r w(r) * mean_j BCE(s_{top_r} positive, s_{neg_j} negative)
      = - mean_p sum_r w(r) * mean_j [log sigmoid(s_{top_r}) + log sigmoid(-s_{neg_j})]

with uniform negatives outside the teacher's top-K, the target and the history. DLLM2Rec's teacher
confidence is a distance (lower is better, weighted by exp(-c)); anyo's teacher scores are logits
(higher is better), hence the softmax. The consistency weight needs the student's scores over the
whole catalogue (one (P, N) matrix per batch, as the full-softmax own loss computes anyway).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from distill.losses.negatives import sample_negatives


class ImportanceRankingKD(nn.Module):
    needs_teacher = True

    def __init__(self, n_items: int, k: int = 10, lam: float = 1.0, gammas=(0.3, 0.5, 0.1),
                 temperature: float = 1.0, num_negatives: int = 1):
        super().__init__()
        self.n_items, self.k, self.lam, self.tau, self.num_negatives = n_items, k, lam, temperature, num_negatives
        self.g_pos, self.g_conf, self.g_cons = gammas

    def weights(self, scores: torch.Tensor, teacher_ids: torch.Tensor, teacher_scores: torch.Tensor) -> torch.Tensor:
        """(P, K) importance weights from the student's (P, N+1) scores and the teacher's top-K."""
        K = teacher_ids.shape[1]
        r = torch.arange(1, K + 1, dtype=scores.dtype, device=scores.device)
        w_pos = torch.softmax(-r / self.lam, dim=0).expand(len(teacher_ids), K)
        w_conf = torch.softmax(teacher_scores.detach() / self.tau, dim=-1)
        masked = scores.detach().clone()
        masked[:, 0] = float("-inf")                                          # padding is never ranked
        student_top = masked.topk(K, dim=-1).indices                          # (P, K)
        w_cons = (teacher_ids[:, :, None] == student_top[:, None, :]).any(-1).to(scores.dtype) + 1e-8
        w = self.g_pos * w_pos + self.g_conf * w_conf + self.g_cons * w_cons
        return w / w.sum(-1, keepdim=True)

    def forward(self, inputs) -> torch.Tensor:
        t = inputs.teacher
        ids, teacher_scores = t.ids[:, :self.k], t.scores[:, :self.k]
        h = inputs.hidden[t.rows]                                             # (P_t, d)
        scores = h @ inputs.item_table.T                                      # (P_t, N+1)
        w = self.weights(scores, ids, teacher_scores)                         # (P_t, K)
        pos = torch.gather(scores, 1, ids)                                    # (P_t, K)
        neg_ids, valid = sample_negatives(inputs, t.rows, self.n_items, self.num_negatives, t.ids)
        neg_term = (F.logsigmoid(-torch.gather(scores, 1, neg_ids)) * valid).sum(-1) \
            / valid.sum(-1).clamp(min=1)                                      # (P_t,)
        per_item = F.logsigmoid(pos) + neg_term[:, None]                      # (P_t, K)
        return -(w * per_item).sum(-1).mean()
