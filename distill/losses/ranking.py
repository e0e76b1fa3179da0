"""Position-weighted ranking distillation (Tang & Wang, KDD 2018).

L = - sum_r w_r * mean_j log sigmoid(s_{top_r} - s_{neg_j}),   w_r = exp(-r/lambda) / sum exp(-r'/lambda)
top_r the teacher's rank-r item (r = 0..K-1), neg_j uniform items outside the teacher's top-K.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RankingDistillation(nn.Module):
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
        neg_ids = torch.randint(1, self.n_items + 1, (len(h), self.num_negatives), device=h.device)
        neg = torch.einsum("pd,pjd->pj", h, inputs.item_table[neg_ids])   # (P_t, J)
        valid = ~(neg_ids[:, :, None] == t.ids[:, None, :]).any(-1)       # negatives outside top-K
        pair = F.logsigmoid(top[:, :, None] - neg[:, None, :])            # (P_t, K, J)
        per_rank = (pair * valid[:, None, :]).sum(-1) / valid.sum(-1, keepdim=True).clamp(min=1)
        return -(per_rank * w).sum(-1).mean()
