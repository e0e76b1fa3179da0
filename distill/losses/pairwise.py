"""Pairwise (BPR-style) distillation of the teacher's top-K, position-weighted.

L = - sum_r w_r * mean_j log sigmoid(s_{top_r} - s_{neg_j}),   w_r = exp(-r/lambda) / sum_r' exp(-r'/lambda)

top_r the teacher's rank-r item (r = 0..K-1); neg_j uniform items that are not in the teacher's
top-K, not the true next item and not in the user's history (distill.losses.negatives). The rank
weights follow Tang & Wang (KDD 2018); unlike their ranking distillation this is a pairwise
BPR loss of each top-K item against sampled negatives.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from distill.losses.negatives import sample_negatives


class PairwiseRankingKD(nn.Module):
    needs_teacher = True

    def __init__(self, n_items: int, lam: float = 10.0, num_negatives: int = 20):
        super().__init__()
        self.n_items, self.lam, self.num_negatives = n_items, lam, num_negatives

    def forward(self, inputs) -> torch.Tensor:
        t = inputs.teacher
        h = inputs.hidden[t.rows]                                          # (P_t, d)
        K = t.ids.shape[1]
        w = torch.exp(-torch.arange(K, dtype=h.dtype, device=h.device) / self.lam)
        w = w / w.sum()                                                    # (K,)
        top = torch.einsum("pd,pkd->pk", h, inputs.item_table[t.ids])     # (P_t, K)
        neg_ids, valid = sample_negatives(inputs, t.rows, self.n_items, self.num_negatives, t.ids)
        neg = torch.einsum("pd,pjd->pj", h, inputs.item_table[neg_ids])   # (P_t, J)
        pair = F.logsigmoid(top[:, :, None] - neg[:, None, :])            # (P_t, K, J)
        per_rank = (pair * valid[:, None, :]).sum(-1) / valid.sum(-1, keepdim=True).clamp(min=1)
        return -(per_rank * w).sum(-1).mean()
