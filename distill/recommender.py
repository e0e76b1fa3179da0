"""The one serving path: batch-encode histories with the SASRec, score, mask, top-K.

Used by `anyo recommend`, `anyo serve` and `benchmarks/serve_load.py`. It returns what
the evaluation harness (`distill/harness.py`) returns for the same user vectors:

* padding (item 0) and, by default, every item of the history are never returned;
* items ordered by score, ties broken by the lower item id;
* when fewer than k items remain the tail is id -1, score -inf.

Catalogues up to `TORCH_MAX_ITEMS` rows are scored exactly in torch: one matmul
U @ items.T, exclusions written as one flat scatter of -inf, `torch.topk(k + 1)`; a row whose
(k+1)-th score equals its k-th (a tie across the cut) is re-ranked with a stable sort,
so the tie-break is the harness's, not topk's arbitrary one. Larger catalogues go
through the harness's own `ItemIndex.search` with `Exclusions` (FAISS).
"""

from __future__ import annotations

import numpy as np
import torch

from distill.histories import Histories
from distill.search import Exclusions, ItemIndex

TORCH_MAX_ITEMS = 200_000  # item-table rows up to which scores are a dense matmul in torch
ENCODE_CHUNK = 256         # users per encoder pass: a large batch is encoded in chunks whose activations
                           # stay in cache (on the 2-core sandbox 1,024 at once was about 1.7x slower)


class Recommender:
    """Top-K next items for histories of internal item ids (1..N) with one SASRec."""

    def __init__(self, model, item_vectors: np.ndarray | None = None, torch_max_items: int = TORCH_MAX_ITEMS,
                 index: ItemIndex | None = None):
        self.model = model.eval()
        self.max_len = int(model.cfg.max_len)
        table = model.item_vectors() if item_vectors is None else item_vectors
        self.items = torch.from_numpy(np.ascontiguousarray(table, dtype=np.float32))   # (N+1, d)
        self.items_t = self.items.t().contiguous()           # (d, N+1): the matmul reads rows contiguously
        self.n_rows = self.items.shape[0]
        self.use_torch = self.n_rows <= torch_max_items
        self._index = index
        if not self.use_torch and self._index is None:
            self._index = ItemIndex(self.items.numpy())

    @property
    def n_items(self) -> int:
        return self.n_rows - 1

    # ------------------------------------------------------------ encoding

    def encode(self, histories: Histories) -> torch.Tensor:
        """(B, d) user vectors; each history left-padded to the batch's longest (at most max_len).

        Positions count back from the most recent item, so trimming common left padding
        does not change a user's vector."""
        width = max(1, min(self.max_len, int(histories.lengths.max()) if len(histories) else 1))
        padded = torch.from_numpy(histories.padded(width))
        with torch.inference_mode():
            if len(padded) <= ENCODE_CHUNK:
                return self.model.encode_users(padded)
            return torch.cat([self.model.encode_users(padded[i:i + ENCODE_CHUNK])
                              for i in range(0, len(padded), ENCODE_CHUNK)])

    # ------------------------------------------------------------ search

    def top_k(self, histories: Histories, k: int, exclude_seen: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(B, k) item ids and scores for a batch of histories (ids 1..N, oldest first)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if len(histories.flat) and (histories.flat.min() < 1 or histories.flat.max() >= self.n_rows):
            raise ValueError(f"item ids must be in 1..{self.n_items}")
        users = self.encode(histories)
        if not self.use_torch:
            exclude = Exclusions.from_histories(histories, self.n_rows) if exclude_seen else None
            return self._index.search(users.numpy(), k, exclude)
        with torch.inference_mode():
            return self._torch_top_k(users, histories, k, exclude_seen)

    def _torch_top_k(self, users: torch.Tensor, histories: Histories, k: int, exclude_seen: bool):
        scores = users @ self.items_t                                       # (B, N+1)
        neg = float("-inf")
        scores[:, 0] = neg
        if exclude_seen and len(histories.flat):
            # every history item, not only the last max_len the encoder reads; one flat scatter
            flat = torch.from_numpy(histories.row_ids() * self.n_rows + histories.flat)
            scores.view(-1).index_fill_(0, flat, neg)
        depth = min(k + 1, self.n_rows)
        vals, ids = torch.topk(scores, depth, dim=1, largest=True, sorted=True)
        if depth > k:
            # a tie across the cut: topk may have kept a higher id than an equal-scoring item left out
            cut = torch.nonzero(vals[:, k] == vals[:, k - 1]).flatten()
            vals, ids = vals[:, :k].clone(), ids[:, :k].clone()
            if len(cut):
                v, i = torch.sort(scores[cut], dim=1, descending=True, stable=True)
                vals[cut], ids[cut] = v[:, :k], i[:, :k]
        # within the list: higher score first, then lower id (topk leaves the order of ties open)
        order = torch.argsort(ids, dim=1)
        ids, vals = ids.gather(1, order), vals.gather(1, order)
        order = torch.argsort(vals, dim=1, descending=True, stable=True)
        ids, vals = ids.gather(1, order), vals.gather(1, order)
        ids = ids.masked_fill(torch.isneginf(vals), -1)
        ids, vals = ids.numpy(), vals.numpy()
        if ids.shape[1] < k:  # catalogue smaller than k
            pad = k - ids.shape[1]
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
            vals = np.pad(vals, ((0, 0), (0, pad)), constant_values=-np.inf)
        return ids, vals

    def recommend(self, rows: list, k: int = 10, exclude_seen: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Lists of internal ids -> (B, k) ids and scores."""
        return self.top_k(Histories.from_rows(rows), k, exclude_seen)
