"""The one data protocol: interactions (RecBole atomic files, Parquet, CSV, JSONL) -> leave-one-out split.

Protocol:
  * users in the order of their tokens (as strings), each user's interactions ordered by
    timestamp, ties broken by the item token: nothing depends on the order of the rows;
  * optional k-core filter on users and items;
  * users with fewer than 3 interactions dropped (and counted);
  * items mapped to ids 1..N in order of first appearance after sorting, 0 is padding;
  * last item = test target, second last = validation target, the rest = training;
  * 19 negatives per user for the LLaRA-compatible candidate protocol, drawn once, seeded.

A user's whole sequence is stored once (flat array + offsets, CSR style); the
training, validation and test views are slices of it.

Every format feeds the same vectorised builder (`_assemble`: tokens -> sorted codes with
numpy, no per-row Python); the files are read by distill.sources.
The split hash is computed from the content (the sorted sequences with their tokens and
timestamps, the titles, the options), so the same data gives the same hash in every format
and row order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from distill.artifacts import atomic_dir, check_sealed_folder, escape_field, folder_files, read_record, read_tsv, write_record
from distill.config import DataConfig
from distill.errors import ArtifactError, CorruptError, DataError, StaleError
from distill.histories import Histories
from distill.sources import data_files, read_columns

SPLIT_FORMAT = 3
NUM_NEGATIVES = 19
STAGES = ("valid", "test")


# ---------------------------------------------------------------- the split

@dataclass
class Split:
    """A prepared leave-one-out split; the row order of `users` is every per-user array's order."""

    users: list[str]            # raw user tokens, row order
    items: list[str]            # raw item tokens, index = item id (items[0] = padding)
    titles: list[str]           # titles by item id ("" when unknown)
    sequences: Histories        # each user's whole sorted sequence (ids 1..N)
    negatives: dict[str, np.ndarray]  # stage -> (n_users, 19) candidate negatives
    manifest: dict
    texts: list[str] | None = None    # item texts by item id (distill.item_text); None = the titles
    cold_items: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # (C,) ids made cold

    def __post_init__(self):
        if self.texts is None:
            self.texts = list(self.titles)

    @property
    def hash(self) -> str:
        return self.manifest["hash"]

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        """N, the number of real items; item tables have N+1 rows."""
        return len(self.items) - 1

    def _cut(self, stage: str) -> int:
        return {"train": 2, "valid": 2, "test": 1}[stage]

    def history(self, stage: str) -> Histories:
        """Items before the stage's target (for `train`: the training sequence itself)."""
        return self.sequences.truncate_left(np.full(self.n_users, self._cut(stage)))

    def targets(self, stage: str) -> np.ndarray:
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        return self.sequences.flat[self.sequences.offsets[1:] - self._cut(stage)]

    def item_popularity(self) -> np.ndarray:
        """(N+1,) training interaction counts per item."""
        return np.bincount(self.history("train").flat, minlength=self.n_items + 1)


def _kcore(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    keep = np.ones(len(users), dtype=bool)
    while True:
        uc = np.bincount(users[keep], minlength=users.max() + 1)
        ic = np.bincount(items[keep], minlength=items.max() + 1)
        new = keep & (uc[users] >= k) & (ic[items] >= k)
        if new.sum() == keep.sum():
            return keep
        keep = new


def _usable(cand: np.ndarray, rows: np.ndarray, seen: np.ndarray, stride: int) -> np.ndarray:
    """(r, M) bool: True where a candidate is not in its user's `seen` keys and is the first copy of its
    value in the row. Looked up in sorted order (row by row, values ascending), which keeps the binary
    searches into `seen` cache-friendly."""
    order = np.argsort(cand, axis=1, kind="stable")
    ranked = np.take_along_axis(cand, order, axis=1)
    keys = rows[:, None] * stride + ranked                               # ascending over the whole array
    ok = seen[np.searchsorted(seen, keys).clip(max=len(seen) - 1)] != keys
    ok[:, 1:] &= ranked[:, 1:] != ranked[:, :-1]                         # later copies, in sorted order
    out = np.empty_like(ok)
    np.put_along_axis(out, order, ok, axis=1)
    return out


def _sample_negatives(seqs: Histories, n_items: int, rng: np.random.Generator, source: Path) -> np.ndarray:
    """(n, 19) distinct items outside each user's whole sequence, uniform, drawn for all users at once
    (sample_unseen). A user who has seen almost the whole catalogue draws from every item except its
    validation and test targets instead.
    """
    if n_items < NUM_NEGATIVES + 2:
        raise DataError(f"{source}: {n_items} items; the candidate protocol needs at least {NUM_NEGATIVES + 2}")
    n, stride = len(seqs), n_items + 1
    seen = np.sort(seqs.row_ids().astype(np.int64) * stride + seqs.flat)
    seen = seen[np.r_[True, seen[1:] != seen[:-1]]]                       # sorted distinct (user, item) keys
    dense = n_items - np.bincount(seen // stride, minlength=n) < NUM_NEGATIVES
    if dense.any():
        last_two = np.concatenate([seqs.offsets[1:] - 2, seqs.offsets[1:] - 1])
        users = np.concatenate([np.arange(n)] * 2)
        keep = ~dense[seen // stride]
        seen = np.union1d(seen[keep], (users * stride + seqs.flat[last_two])[dense[users]])
    return sample_unseen(seen, n, n_items, NUM_NEGATIVES, rng)


def sample_unseen(seen: np.ndarray, n: int, n_items: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """(n, count) distinct items of 1..n_items per row, uniform, none of them among the row's `seen` keys
    (sorted distinct `row * (n_items + 1) + item`, a non-empty array); every row must have `count` items left.

    Each round draws M candidates for every row still pending and keeps the first `count` distinct unseen
    ones; rows with fewer go to the next round with 4M (M starts at 4 count). Shared by the split's
    negatives (_sample_negatives) and the generative baseline's training candidates (teacher/generative.py).
    """
    stride = n_items + 1
    out = np.empty((n, count), dtype=np.int64)
    pending, m = np.arange(n), 4 * count
    while len(pending):
        cand = rng.integers(1, n_items + 1, size=(len(pending), m))
        ok = _usable(cand, pending, seen, stride)
        first = ok & (np.cumsum(ok, axis=1) <= count)                      # the first `count` usable, in order
        done = first.sum(axis=1) == count
        out[pending[done]] = cand[done][first[done]].reshape(-1, count)
        pending, m = pending[~done], 4 * m
    return out


# ---------------------------------------------------------------- the vectorised builder

@dataclass
class _Data:
    """Sorted, filtered interactions with their content hash (everything but the negatives)."""

    users: list[str]
    items: list[str]
    titles: list[str]
    texts: list[str]
    sequences: Histories
    cold_items: np.ndarray     # (C,) item ids made cold by data.cold_items
    cold_removed: int          # training interactions of those items removed
    times: np.ndarray          # (n_interactions,) each interaction's timestamp, in `sequences.flat` order
    users_before: int
    hash: str
    inter: Path
    item: Path | None


def _lookup_titles(items: np.ndarray, titles) -> tuple[list[str], list[str]]:
    """(titles, texts) of `items` (tokens) from (sorted keys, titles, texts); "" when unknown."""
    if titles is None:
        return [""] * len(items), [""] * len(items)
    keys, vals, texts = titles
    pos = np.searchsorted(keys, items).clip(max=max(len(keys) - 1, 0))
    hit = (keys[pos] == items) if len(keys) else np.zeros(len(items), bool)
    pairs = [(str(vals[p]).strip(), str(texts[p]).strip()) if h else ("", "") for p, h in zip(pos.tolist(), hit.tolist())]
    return [t for t, _ in pairs], [x for _, x in pairs]


def _content_hash(cfg: DataConfig, users, items, titles, texts, seqs: Histories, times: np.ndarray) -> str:
    """Of the content; the texts count only where they say more than the titles, and cold_items only when set,
    so a split without either keeps the hash it had before they existed."""
    import hashlib
    options = {"format": SPLIT_FORMAT, "min_interactions": cfg.min_interactions, "seed": cfg.seed}
    if cfg.cold_items:
        options["cold_items"] = cfg.cold_items
    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for part in (users, items, titles) + ((texts,) if texts != titles else ()):
        h.update(str(len(part)).encode() + b"\0" + "\x1f".join(part).encode("utf-8", "surrogatepass") + b"\0")
    for arr in (seqs.offsets.astype("<i8"), seqs.flat.astype("<i8"), _hashed_times(times)):
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:16]


def _hashed_times(times: np.ndarray) -> np.ndarray:
    """The timestamps as hashed: float64 wherever that is exact (what every split hashed before integer clocks
    were kept as int64, so their hashes stay), int64 otherwise (integers beyond 2^53 would collide in float64)."""
    if times.dtype.kind == "f" or not len(times) or max(int(times.max()), -int(times.min())) <= 2**53:
        return times.astype("<f8")
    return np.concatenate([np.frombuffer(b"int64-ts", "<i8"), times.astype("<i8")])


COLD_STREAM = 7  # the cold items' random stream, apart from the negatives' (both seeded by data.seed)


def _cold_rows(su: np.ndarray, sid: np.ndarray, n_items: int, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """(cold item ids (C,) sorted, (rows,) bool keep): round(cold_items x N) items drawn uniformly with
    data.seed, and every sorted row that is a training interaction (not a user's last two) of one of them
    dropped. Rows are sorted by user, so a row's distance from its user's end is its leave-one-out role."""
    rng = np.random.default_rng([cfg.seed, COLD_STREAM])
    cold = np.sort(rng.choice(np.arange(1, n_items + 1), size=int(round(cfg.cold_items * n_items)), replace=False))
    ends = np.flatnonzero(np.r_[su[1:] != su[:-1], True])                  # last row of each user
    from_end = np.repeat(ends, np.diff(np.r_[-1, ends])) - np.arange(len(su))  # 0 = test, 1 = valid
    return cold, ~((from_end >= 2) & np.isin(sid, cold))


def _sort_order(u_codes, ts, i_codes, n_users: int, n_items: int) -> np.ndarray:
    """Row order by user token, then time, then item token.

    One stable int64 argsort of a packed (user, time, item) key when it fits in 63 bits (timestamps
    as integer offsets, else as ranks), several times faster than a three-key lexsort; when even the
    ranks do not fit, (user, time rank) packed and the item as a second lexsort key. Rows with equal
    keys are identical interactions, so the order among them does not matter.
    """
    if ts.dtype.kind in "iu":   # int64 clocks (any unit): offsets from the minimum, when the span fits int64
        t = (ts - ts.min()).astype(np.int64) if int(ts.max()) - int(ts.min()) < 2**63 else None
    else:
        exact = bool(np.all(np.abs(ts) <= 2**53)) and np.array_equal(ts, np.floor(ts))
        t = ts.astype(np.int64) - np.int64(ts.min()) if exact else None      # integer offsets, no rounding
    if t is None or n_users * (int(t.max()) + 1) * n_items >= 2**63:
        t = np.unique(ts, return_inverse=True)[1].astype(np.int64)
    span = int(t.max()) + 1
    if n_users * span * n_items < 2**63:
        return np.argsort((u_codes * span + t) * n_items + i_codes, kind="stable")
    if n_users * span < 2**63:
        return np.lexsort((i_codes, u_codes * span + t))
    return np.lexsort((i_codes, t, u_codes))


def _assemble(cfg: DataConfig, u_codes, u_tokens, i_codes, i_tokens, ts, titles, inter, item) -> _Data:
    """Codes (indices into sorted token arrays) -> sorted, filtered sequences; vectorised."""
    keep = _kcore(u_codes, i_codes, cfg.min_interactions) if cfg.min_interactions > 0 else np.ones(len(u_codes), bool)
    counts = np.bincount(u_codes[keep], minlength=len(u_tokens))
    keep &= counts[u_codes] >= 3
    users_before = int(len(u_tokens))

    order = _sort_order(u_codes, ts, i_codes, len(u_tokens), len(i_tokens))
    order = order[keep[order]]
    if not len(order):
        raise DataError(f"{inter}: no user has 3 or more interactions after filtering")
    su, si, st = u_codes[order], i_codes[order], ts[order]

    # items 1..N in order of first appearance after sorting
    first_pos = np.full(len(i_tokens), len(si))
    np.minimum.at(first_pos, si, np.arange(len(si)))
    kept_items = np.flatnonzero(first_pos < len(si))
    item_order = kept_items[np.argsort(first_pos[kept_items])]
    item_id = np.zeros(len(i_tokens), dtype=np.int64)
    item_id[item_order] = np.arange(1, len(item_order) + 1)

    sid = item_id[si]
    cold, removed = np.empty(0, np.int64), 0
    if cfg.cold_items:  # the catalogue (ids) stays; the cold items' training rows go, then users left with < 3
        cold, keep_rows = _cold_rows(su, sid, len(item_order), cfg)
        removed = int((~keep_rows).sum())
        su, sid, st = su[keep_rows], sid[keep_rows], st[keep_rows]
        enough = np.bincount(su, minlength=len(u_tokens))[su] >= 3
        su, sid, st = su[enough], sid[enough], st[enough]
    starts = np.flatnonzero(np.r_[True, su[1:] != su[:-1]])
    offsets = np.append(starts, len(su)).astype(np.int64)
    seqs = Histories(sid, offsets)
    item_tokens = i_tokens[item_order]
    items = ["[PAD]"] + item_tokens.tolist()
    title_list, text_list = _lookup_titles(item_tokens, titles)
    title_list, text_list = [""] + title_list, [""] + text_list
    users = u_tokens[su[starts]].tolist()
    digest = _content_hash(cfg, users, items, title_list, text_list, seqs, st)
    return _Data(users, items, title_list, text_list, seqs, cold, removed, st, users_before, digest, inter, item)


def _read_data(cfg: DataConfig) -> _Data:
    inter, item = data_files(cfg)
    return _assemble(cfg, *read_columns(cfg, inter, item), inter, item)


def split_hash(cfg: DataConfig) -> str:
    """The hash of the split `cfg` gives: of its content, not of the files' bytes or format."""
    return _read_data(cfg).hash


def sequence_times(cfg: DataConfig, split: Split) -> np.ndarray:
    """Each interaction's timestamp in `split.sequences.flat` order (the split keeps only the order), read again
    from the data files `cfg` names; refused when they no longer give the split."""
    d = _read_data(cfg)
    if d.hash != split.hash:
        raise StaleError(f"{d.inter}: gives split {d.hash}, the run's split is {split.hash}: the data changed")
    return d.times


def _finish(d: _Data, cfg: DataConfig) -> Split:
    rng = np.random.default_rng(cfg.seed)
    negatives = {s: _sample_negatives(d.sequences, len(d.items) - 1, rng, d.inter) for s in STAGES}
    lens = d.sequences.lengths
    manifest = {
        "format": SPLIT_FORMAT,
        "hash": d.hash,
        "inputs": {"inter": str(d.inter), "item": str(d.item) if d.item else None, "format": cfg.format},
        "options": {"min_interactions": cfg.min_interactions, "seed": cfg.seed, "title_field": cfg.title_field,
                    "text_columns": cfg.columns.text, "cold_items": cfg.cold_items},
        "n_users": len(d.users),
        "n_items": len(d.items) - 1,
        "n_interactions": int(d.sequences.offsets[-1]),
        "dropped_users": d.users_before - len(d.users),
        "max_sequence_length": int(lens.max()),
    }
    if cfg.cold_items:
        manifest["cold_items"] = {"fraction": cfg.cold_items, "items": int(len(d.cold_items)),
                                  "removed_training_interactions": d.cold_removed}
    return Split(d.users, d.items, d.titles, d.sequences, negatives, manifest, d.texts, d.cold_items)


def build_split(cfg: DataConfig) -> Split:
    return _finish(_read_data(cfg), cfg)


# ---------------------------------------------------------------- on disk

def save_split(split: Split, folder: str | Path) -> None:
    with atomic_dir(folder) as tmp:
        cold = {"cold_items": split.cold_items.astype(np.int64)} if len(split.cold_items) else {}
        save_file({"sequence_items": split.sequences.flat, "sequence_offsets": split.sequences.offsets,
                   "valid_negatives": split.negatives["valid"], "test_negatives": split.negatives["test"], **cold},
                  str(tmp / "split.safetensors"))
        (tmp / "users.tsv").write_text("row\tuser_id\n" + "".join(
            f"{r}\t{escape_field(u)}\n" for r, u in enumerate(split.users)))
        (tmp / "items.tsv").write_text("item_id\titem_token\ttitle\ttext\n" + "".join(
            f"{i}\t{escape_field(t)}\t{escape_field(split.titles[i])}\t{escape_field(split.texts[i])}\n"
            for i, t in enumerate(split.items) if i > 0))
        write_record(tmp / "manifest.json", split.manifest, files=folder_files(tmp))


def _split_tensors(path: Path, n_users: int, n_items: int) -> dict[str, np.ndarray]:
    """split.safetensors, every tensor present with the shape and range the manifest implies (a file that matches
    its sha256 can still be a hand-made one), else CorruptError naming it."""
    try:
        t = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a malformed file
        raise CorruptError(f"{path}: not a readable safetensors file ({' '.join(str(e).split())[:120]})") from None
    shapes = {"sequence_offsets": (n_users + 1,), "valid_negatives": (n_users, NUM_NEGATIVES),
              "test_negatives": (n_users, NUM_NEGATIVES)}
    for name, shape in {"sequence_items": None, **shapes}.items():
        if name not in t:
            raise CorruptError(f"{path}: no tensor {name}")
        if t[name].dtype.kind not in "iu" or (shape is not None and t[name].shape != shape):
            raise CorruptError(f"{path}: tensor {name} is {t[name].dtype} {t[name].shape}, "
                               f"expected integers of shape {shape or '(n,)'}")
    offsets, flat = t["sequence_offsets"], t["sequence_items"]
    if offsets[0] != 0 or offsets[-1] != len(flat) or (np.diff(offsets) < 0).any():
        raise CorruptError(f"{path}: sequence_offsets do not partition the {len(flat)} sequence items")
    for name in ("sequence_items", "valid_negatives", "test_negatives", "cold_items"):
        if name in t and t[name].size and (t[name].min() < 1 or t[name].max() > n_items):
            raise CorruptError(f"{path}: tensor {name} holds ids outside 1..{n_items}")
    return t


def _field(row: list[str], col: int) -> str:
    return row[col] if len(row) > col else ""


def load_split(folder: str | Path) -> Split:
    folder = Path(folder)
    read_record(folder / "manifest.json", "hash", "n_users", "n_items", "files")
    manifest = check_sealed_folder(folder / "manifest.json")  # it seals split.safetensors, users.tsv, items.tsv
    tensors_path = folder / "split.safetensors"
    n, n_items = manifest["n_users"], manifest["n_items"]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (n, n_items)):
        raise CorruptError(f"{folder / 'manifest.json'}: n_users {n!r} / n_items {n_items!r} are not counts")
    t = _split_tensors(tensors_path, n, n_items)
    seqs = Histories(t["sequence_items"], t["sequence_offsets"])
    users = [_field(f, 1) for f in read_tsv(folder / "users.tsv", n)]
    rows = read_tsv(folder / "items.tsv", n_items)
    items, titles, texts = ([pad] + [_field(f, col) for f in rows] for pad, col in (("[PAD]", 1), ("", 2), ("", 3)))
    return Split(users, items, titles, seqs, {s: t[f"{s}_negatives"] for s in STAGES}, manifest,
                 texts if any(texts) else None, t.get("cold_items", np.empty(0, np.int64)))


def prepare(cfg: DataConfig, folder: str | Path) -> tuple[Split, bool]:
    """Load `folder` if it holds the split these options produce, else build and save it.

    Returns the split and whether it was (re)built.
    """
    folder = Path(folder)
    data = _read_data(cfg)
    if (folder / "manifest.json").is_file():
        try:
            split = load_split(folder)
            if split.hash == data.hash:
                return split, False
        except ArtifactError:
            pass
    split = _finish(data, cfg)
    save_split(split, folder)
    return load_split(folder), True


def to_hf_datasets(split: Split):
    """The split as a `datasets.DatasetDict` (train/valid/test), one row per user."""
    from datasets import Dataset, DatasetDict

    def rows(h: Histories) -> list[list[int]]:
        return np.split(h.flat, h.offsets[1:-1])

    train = split.history("train")
    parts = {"train": Dataset.from_dict({"user": split.users, "items": [r.tolist() for r in rows(train)]})}
    for stage in STAGES:
        parts[stage] = Dataset.from_dict({
            "user": split.users,
            "history": [r.tolist() for r in rows(split.history(stage))],
            "target": split.targets(stage).tolist(),
        })
    return DatasetDict(parts)
