"""The data protocol's (user, position) views of a split, in one place.

A position t of user u means: the model reads seq_u[:t] and predicts seq_u[t].
Training positions are 1 <= t < len(train_u); validation and test are
t = len_u - 2 and len_u - 1. The student reads them as windows of max_len
consecutive predictions, the teacher as prefixes, the teacher cache as keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distill.data import Split

from distill.histories import Histories, within


def training_positions(split: Split) -> tuple[np.ndarray, np.ndarray]:
    """(users, t) of every training example: 1 <= t < len(train_u)."""
    pairs = np.maximum(split.history("train").lengths - 1, 0)
    return np.repeat(np.arange(split.n_users), pairs), within(pairs) + 1


def scored_positions(split: Split, last: int) -> tuple[np.ndarray, np.ndarray]:
    """(users, t) the teacher cache holds, grouped by user: the last `last` training positions,
    then validation, then test."""
    train_len = split.sequences.lengths - 2
    n_train = np.clip(train_len - 1, 0, last)                  # t in [max(1, L_tr - P), L_tr - 1]
    per_user = n_train + 2
    users = np.repeat(np.arange(split.n_users), per_user)
    t = np.repeat(train_len - n_train, per_user) + within(per_user)  # the last two: L-2 (valid), L-1 (test)
    return users, t


def prefixes(split: Split, users: np.ndarray, positions: np.ndarray) -> Histories:
    """Histories seq_u[:t] for each (u, t)."""
    seq = split.sequences
    positions = np.asarray(positions, np.int64)
    offsets = np.concatenate([[0], np.cumsum(positions)]).astype(np.int64)
    src = np.repeat(seq.offsets[np.asarray(users)], positions) + within(positions)
    return Histories(seq.flat[src], offsets)


def next_items(split: Split, users: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """seq_u[t] for each (u, t): the item each position predicts."""
    return split.sequences.flat[split.sequences.offsets[np.asarray(users)] + np.asarray(positions)]


@dataclass
class Windows:
    inputs: np.ndarray     # (W, T) left-padded input items
    targets: np.ndarray    # (W, T) next item at each slot, 0 = no prediction
    users: np.ndarray      # (W,) user row
    positions: np.ndarray  # (W, T) t of each slot's target in the user's whole sequence, -1 = none


def training_windows(train: Histories, max_len: int) -> Windows:
    """Every training position of the training histories, cut per user into windows of at most
    max_len consecutive predictions from the most recent end, so no interaction is wasted."""
    pairs = np.maximum(train.lengths - 1, 0)                 # m_u predictions per user
    chunks = -(-pairs // max_len)                            # ceil
    first_window = np.concatenate([[0], np.cumsum(chunks)])[:-1]
    user = np.repeat(np.arange(len(train)), pairs)           # one entry per pair
    i = within(pairs)
    from_end = pairs[user] - 1 - i
    window = first_window[user] + from_end // max_len
    slot = max_len - 1 - from_end % max_len
    src = train.offsets[user] + i
    W = int(chunks.sum())
    inputs = np.zeros((W, max_len), dtype=np.int64)
    targets = np.zeros((W, max_len), dtype=np.int64)
    positions = np.full((W, max_len), -1, dtype=np.int64)
    inputs[window, slot] = train.flat[src]
    targets[window, slot] = train.flat[src + 1]
    positions[window, slot] = i + 1
    users = np.repeat(np.arange(len(train)), chunks)
    return Windows(inputs, targets, users, positions)
