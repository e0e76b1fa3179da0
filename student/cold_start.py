"""Cold rows of the student's item table from the teacher's text item vectors (`distill.cold_init`).

An item never seen in training has a student row that only ever received "not this one" gradients. The
teacher's text vector t_i (teacher/item_text.py) says what the item is. A ridge regression fitted on the
items seen in training maps the teacher's text space onto the student's item space,

    W* = argmin_W  sum_{i seen} |e_i - W t_i|^2 + lam |W|^2          (d, D_T), lam small (stability only)

and each cold row starts at W* t_i: where the student puts items whose text reads like it.
"""

from __future__ import annotations

import numpy as np
import torch


def ridge_map(teacher_items: np.ndarray, student_items: np.ndarray, rows: np.ndarray, lam: float = 0.01) -> np.ndarray:
    """(N+1, d) every item's teacher vector mapped by the ridge regression fitted on `rows` (the seen items);
    `lam` is relative to the mean diagonal of x^T x, so it means the same for every teacher."""
    t = np.asarray(teacher_items, dtype=np.float64)                                  # (N+1, D_T)
    x, y = t[rows], np.asarray(student_items, dtype=np.float64)[rows]               # (S, D_T), (S, d)
    gram = x.T @ x                                                                   # (D_T, D_T)
    w = np.linalg.solve(gram + lam * np.trace(gram) / len(gram) * np.eye(len(gram)), x.T @ y)   # (D_T, d)
    return (t @ w).astype(np.float32)


@torch.no_grad()
def init_cold_rows(model, teacher_text: np.ndarray, popularity: np.ndarray) -> int:
    """Write W* t_i into the student's rows of the items with no training interaction; returns how many."""
    seen = np.flatnonzero(popularity > 0)
    cold = np.flatnonzero(popularity == 0)
    cold = cold[cold > 0]                                                            # never the padding row
    if not len(cold) or not len(seen):
        return 0
    mapped = ridge_map(teacher_text, model.item_emb.weight.detach().numpy(), seen)
    model.item_emb.weight[torch.from_numpy(cold)] = torch.from_numpy(mapped[cold])
    return int(len(cold))
