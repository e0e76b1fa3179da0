"""Variable-length item lists in CSR form: the users' histories every module passes around."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Histories:
    """Variable-length item lists in CSR form: row u is flat[offsets[u]:offsets[u+1]]."""

    flat: np.ndarray     # (total,) int64
    offsets: np.ndarray  # (n+1,) int64

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @classmethod
    def from_rows(cls, rows) -> "Histories":
        rows = [np.asarray(r, dtype=np.int64) for r in rows]
        offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
        flat = np.concatenate(rows) if rows else np.empty(0, np.int64)
        return cls(flat.astype(np.int64), offsets)

    def row(self, u: int) -> np.ndarray:
        return self.flat[self.offsets[u]: self.offsets[u + 1]]

    def __iter__(self):
        return (self.row(u) for u in range(len(self)))

    def row_ids(self) -> np.ndarray:
        """Row index of every element of `flat`."""
        return np.repeat(np.arange(len(self)), self.lengths)

    def take(self, rows: np.ndarray) -> "Histories":
        rows = np.asarray(rows)
        lens = self.lengths[rows]
        offsets = np.concatenate([[0], np.cumsum(lens)])
        starts = np.repeat(self.offsets[rows] - offsets[:-1], lens)
        return Histories(self.flat[starts + np.arange(offsets[-1])], offsets)

    def truncate_left(self, cut: np.ndarray) -> "Histories":
        """Drop the last `cut[u]` items of every row."""
        lens = self.lengths - cut
        keep = (np.arange(len(self.flat)) - np.repeat(self.offsets[:-1], self.lengths)) < np.repeat(lens, self.lengths)
        return Histories(self.flat[keep], np.concatenate([[0], np.cumsum(lens)]))

    def padded(self, max_len: int) -> np.ndarray:
        """Left-padded (n, max_len) matrix of the last `max_len` items of each row (0 = padding)."""
        n = len(self)
        out = np.zeros((n, max_len), dtype=np.int64)
        lens = self.lengths
        take = np.minimum(lens, max_len)
        rows = np.repeat(np.arange(n), take)
        within = np.arange(take.sum()) - np.repeat(np.cumsum(take) - take, take)
        src = np.repeat(self.offsets[1:] - take, take) + within
        out[rows, max_len - np.repeat(take, take) + within] = self.flat[src]
        return out
