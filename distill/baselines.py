"""MostPop: every user gets the most popular training items. The floor of every report.

It plugs into the harness like any model: a 1-d user vector of ones and a 1-d
item "vector" holding the item's training count, so inner product = popularity.
"""

from __future__ import annotations

import numpy as np

from distill.data import Split

from distill.histories import Histories


class MostPop:
    def __init__(self, split: Split):
        self.popularity = split.item_popularity().astype(np.float32)
        self.popularity[0] = 0.0

    def encode(self, histories: Histories) -> np.ndarray:
        return np.ones((len(histories), 1), dtype=np.float32)

    def flops_per_user(self, histories: Histories) -> np.ndarray:
        return np.full(len(histories), 2.0 * len(self.popularity))   # the scoring product alone

    def item_vectors(self) -> np.ndarray:
        return self.popularity[:, None]
