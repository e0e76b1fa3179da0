"""Variable-length item lists in CSR form: the users' histories every module passes around."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def within(counts: np.ndarray) -> np.ndarray:
    """0, 1, ..., c-1 for each count c, concatenated."""
    return np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)


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
        j = within(take)
        src = np.repeat(self.offsets[1:] - take, take) + j
        out[rows, max_len - np.repeat(take, take) + j] = self.flat[src]
        return out

    def padded_prefixes(self, rows: np.ndarray, lengths: np.ndarray, max_len: int) -> np.ndarray:
        """Left-padded (S, max_len) matrix of the last `max_len` items of each prefix row(rows[s])[:lengths[s]]
        (the same rows as `padded` gives for those prefixes, without building them)."""
        rows, lengths = np.asarray(rows, np.int64), np.asarray(lengths, np.int64)
        start = self.offsets[rows]
        end = start + lengths                                            # (S,) exclusive
        idx = end[:, None] - max_len + np.arange(max_len)[None]           # (S, max_len)
        keep = idx >= start[:, None]
        return np.where(keep, self.flat[np.clip(idx, 0, max(len(self.flat) - 1, 0))] if len(self.flat) else 0, 0)
