"""The one data protocol: RecBole atomic files -> leave-one-out split.

Protocol (DESIGN.md section 2):
  * each user's interactions ordered by timestamp, stable on ties (file order second);
  * optional k-core filter on users and items;
  * users with fewer than 3 interactions dropped (and counted);
  * items mapped to ids 1..N in order of first appearance after sorting, 0 is padding;
  * last item = test target, second last = validation target, the rest = training;
  * 19 negatives per user for the LLaRA-compatible candidate protocol, drawn once, seeded.

A user's whole sequence is stored once (flat array + offsets, CSR style); the
training, validation and test views are slices of it.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from distill.artifacts import atomic_dir, read_record, sha256_file
from distill.config import DataConfig
from distill.errors import ArtifactError, CorruptError, DataError

SPLIT_FORMAT = 1
NUM_NEGATIVES = 19
STAGES = ("valid", "test")


def embedded_ml100k() -> Path:
    """Folder of MovieLens-100K inside the `recbole==1.2.1` wheel, found without importing recbole."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("embedded data set ml-100k: the `recbole` wheel is not installed "
                        "(pip install --no-deps recbole==1.2.1)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k"
    if not (folder / "ml-100k.inter").is_file():
        raise DataError(f"{folder}/ml-100k.inter: not found in the installed recbole wheel")
    return folder


def data_files(cfg: DataConfig) -> tuple[Path, Path | None]:
    """The .inter file and the optional .item file a data config points to."""
    folder = Path(cfg.path) if cfg.path else embedded_ml100k()
    inter = folder / f"{cfg.name}.inter"
    if not inter.is_file():
        raise DataError(f"{inter}: file not found")
    item = folder / f"{cfg.name}.item"
    return inter, (item if item.is_file() else None)


# ---------------------------------------------------------------- parsing

def _read_lines(path: Path) -> list[str]:
    """The file's lines, split on \\n only (a title may hold U+2028, \\x85 or \\x0c, which
    `str.splitlines` would take for line breaks and so misnumber every later line)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{path}:1: starts with a UTF-16 byte-order mark; save the file as UTF-8")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte offset {e.start})") from None
    if text.startswith("\ufeff"):
        raise DataError(f"{path}:1: starts with a byte-order mark (BOM); save the file as UTF-8 without BOM")
    lines = text.split("\n")
    lines = [line.removesuffix("\r") for line in lines]
    if not lines or not lines[0].strip():
        raise DataError(f"{path}:1: empty file (expected a header line)")
    return lines


def _header(path: Path, line: str) -> dict[str, int]:
    """Column name (without the `:type` suffix) -> index."""
    cols: dict[str, int] = {}
    for i, c in enumerate(line.split("\t")):
        name = c.split(":", 1)[0].strip()
        if name and name in cols:
            raise DataError(f"{path}:1: header repeats column `{name}`")
        cols[name] = i
    return cols


def read_interactions(path: Path):
    """Parse NAME.inter -> (user tokens, item tokens, timestamps) in file order."""
    lines = _read_lines(path)
    cols = _header(path, lines[0])
    for needed in ("user_id", "item_id"):
        if needed not in cols:
            raise DataError(f"{path}:1: header has no `{needed}` column (got: {lines[0].strip()!r})")
    iu, ii, it = cols["user_id"], cols["item_id"], cols.get("timestamp")
    width = len(cols)
    users, items, times = [], [], []
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != width:
            raise DataError(f"{path}:{n}: expected {width} tab-separated fields, got {len(fields)}")
        users.append(fields[iu])
        items.append(fields[ii])
        if it is not None:
            try:
                t = float(fields[it])
            except ValueError:
                raise DataError(f"{path}:{n}: timestamp {fields[it]!r} is not a number") from None
            if not np.isfinite(t):
                raise DataError(f"{path}:{n}: timestamp {fields[it]!r} is not finite")
            times.append(t)
    if not users:
        raise DataError(f"{path}:2: no interactions after the header")
    ts = np.asarray(times, dtype=np.float64) if it is not None else np.arange(len(users), dtype=np.float64)
    return users, items, ts


def read_titles(path: Path | None, title_field: str | None) -> dict[str, str]:
    """Parse NAME.item -> {raw item token: title}."""
    if path is None:
        return {}
    lines = _read_lines(path)
    header = lines[0].split("\t")
    cols = _header(path, lines[0])
    if "item_id" not in cols:
        raise DataError(f"{path}:1: header has no `item_id` column")
    if title_field is not None:
        if title_field not in cols:
            raise DataError(f"{path}:1: title column `{title_field}` not in header")
        tcol = cols[title_field]
    else:
        seq_cols = [i for i, c in enumerate(header) if c.endswith(":token_seq")]
        if not seq_cols:
            return {}
        tcol = seq_cols[0]
    titles = {}
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise DataError(f"{path}:{n}: expected {len(header)} tab-separated fields, got {len(fields)}")
        titles[fields[cols["item_id"]]] = fields[tcol].strip()
    return titles


# ---------------------------------------------------------------- the split

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


@dataclass
class Split:
    """A prepared leave-one-out split; the row order of `users` is every per-user array's order."""

    users: list[str]            # raw user tokens, row order
    items: list[str]            # raw item tokens, index = item id (items[0] = padding)
    titles: list[str]           # titles by item id ("" when unknown)
    sequences: Histories        # each user's whole sorted sequence (ids 1..N)
    negatives: dict[str, np.ndarray]  # stage -> (n_users, 19) candidate negatives
    manifest: dict

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


def _sample_negatives(seqs: Histories, n_items: int, rng: np.random.Generator, source: Path) -> np.ndarray:
    """(n, 19) distinct items outside each user's whole sequence, uniform.

    A user who has seen almost the whole catalogue draws from every item except
    its validation and test targets instead.
    """
    if n_items < NUM_NEGATIVES + 2:
        raise DataError(f"{source}: {n_items} items; the candidate protocol needs at least {NUM_NEGATIVES + 2}")
    n = len(seqs)
    out = np.empty((n, NUM_NEGATIVES), dtype=np.int64)
    for u in range(n):  # once per split, not a hot path; rejection is cheap for sparse users
        row = seqs.row(u).tolist()
        seen = set(row)
        if n_items - len(seen) < NUM_NEGATIVES:
            seen = set(row[-2:])
        picked: list[int] = []
        while len(picked) < NUM_NEGATIVES:
            for c in rng.integers(1, n_items + 1, size=2 * NUM_NEGATIVES).tolist():
                if c not in seen:
                    seen.add(c)
                    picked.append(c)
                    if len(picked) == NUM_NEGATIVES:
                        break
        out[u] = picked
    return out


def split_hash(inter: Path, item: Path | None, cfg: DataConfig) -> str:
    import hashlib
    options = {"format": SPLIT_FORMAT, "min_interactions": cfg.min_interactions, "seed": cfg.seed,
               "title_field": cfg.title_field}
    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    h.update(sha256_file(inter).encode())
    h.update(sha256_file(item).encode() if item else b"-")
    return h.hexdigest()[:16]


def build_split(cfg: DataConfig) -> Split:
    inter, item = data_files(cfg)
    user_tok, item_tok, ts = read_interactions(inter)
    titles_raw = read_titles(item, cfg.title_field)

    u_names, u_idx = np.unique(np.asarray(user_tok, dtype=object), return_inverse=True)
    i_names, i_idx = np.unique(np.asarray(item_tok, dtype=object), return_inverse=True)
    # users in order of first appearance in the file
    first_u = np.full(len(u_names), len(u_idx))
    np.minimum.at(first_u, u_idx, np.arange(len(u_idx)))
    u_rank = np.empty(len(u_names), dtype=np.int64)
    u_rank[np.argsort(first_u, kind="stable")] = np.arange(len(u_names))
    u_idx = u_rank[u_idx]
    u_names = u_names[np.argsort(first_u, kind="stable")]

    keep = _kcore(u_idx, i_idx, cfg.min_interactions) if cfg.min_interactions > 0 else np.ones(len(u_idx), bool)
    counts = np.bincount(u_idx[keep], minlength=len(u_names))
    keep &= counts[u_idx] >= 3
    users_before = int(np.unique(u_idx).size)

    order = np.lexsort((np.arange(len(ts)), ts, u_idx))  # by user, then time, then file order
    order = order[keep[order]]
    su, si = u_idx[order], i_idx[order]

    # items 1..N in order of first appearance after sorting
    _, first_pos = np.unique(si, return_index=True)
    kept_items = np.unique(si)
    item_order = kept_items[np.argsort(first_pos, kind="stable")]
    item_id = np.zeros(len(i_names), dtype=np.int64)
    item_id[item_order] = np.arange(1, len(item_order) + 1)

    kept_users, lens = np.unique(su, return_counts=True)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    seqs = Histories(item_id[si], offsets)
    items = ["[PAD]"] + [str(t) for t in i_names[item_order]]
    titles = [""] + [titles_raw.get(t, "") for t in items[1:]]
    users = [str(t) for t in u_names[kept_users]]
    if not users:
        raise DataError(f"{inter}: no user has 3 or more interactions after filtering")

    rng = np.random.default_rng(cfg.seed)
    negatives = {s: _sample_negatives(seqs, len(items) - 1, rng, inter) for s in STAGES}
    manifest = {
        "format": SPLIT_FORMAT,
        "hash": split_hash(inter, item, cfg),
        "inputs": {"inter": str(inter), "item": str(item) if item else None},
        "options": {"min_interactions": cfg.min_interactions, "seed": cfg.seed, "title_field": cfg.title_field},
        "n_users": len(users),
        "n_items": len(items) - 1,
        "n_interactions": int(offsets[-1]),
        "dropped_users": users_before - len(users),
        "max_sequence_length": int(lens.max()),
    }
    return Split(users, items, titles, seqs, negatives, manifest)


# ---------------------------------------------------------------- on disk

def _clean(text: str) -> str:
    return text.replace("\t", " ").replace("\n", " ").replace("\r", " ")


def save_split(split: Split, folder: str | Path) -> None:
    with atomic_dir(folder) as tmp:
        save_file({"sequence_items": split.sequences.flat, "sequence_offsets": split.sequences.offsets,
                   "valid_negatives": split.negatives["valid"], "test_negatives": split.negatives["test"]},
                  str(tmp / "split.safetensors"))
        (tmp / "users.tsv").write_text("row\tuser_id\n" + "".join(
            f"{r}\t{_clean(u)}\n" for r, u in enumerate(split.users)))
        (tmp / "items.tsv").write_text("item_id\titem_token\ttitle\n" + "".join(
            f"{i}\t{_clean(t)}\t{_clean(split.titles[i])}\n" for i, t in enumerate(split.items) if i > 0))
        manifest = dict(split.manifest, split_sha256=sha256_file(tmp / "split.safetensors"))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _read_tsv_column(path: Path, col: int, expected_rows: int) -> list[str]:
    if not path.is_file():
        raise ArtifactError(f"{path}: not found")
    rows = path.read_text(encoding="utf-8").split("\n")[1:]
    rows = [r for r in rows if r]
    if len(rows) != expected_rows:
        raise CorruptError(f"{path}: {len(rows)} rows, manifest says {expected_rows}")
    return [r.split("\t")[col] if len(r.split("\t")) > col else "" for r in rows]


def load_split(folder: str | Path) -> Split:
    folder = Path(folder)
    manifest = read_record(folder / "manifest.json", "hash", "split_sha256", "n_users", "n_items")
    tensors_path = folder / "split.safetensors"
    if not tensors_path.is_file():
        raise ArtifactError(f"{tensors_path}: not found")
    if sha256_file(tensors_path) != manifest.get("split_sha256"):
        raise CorruptError(f"{tensors_path}: content does not match manifest.json (corrupt or edited)")
    t = load_file(str(tensors_path))
    seqs = Histories(t["sequence_items"], t["sequence_offsets"])
    n, n_items = manifest["n_users"], manifest["n_items"]
    users = _read_tsv_column(folder / "users.tsv", 1, n)
    items = ["[PAD]"] + _read_tsv_column(folder / "items.tsv", 1, n_items)
    titles = [""] + _read_tsv_column(folder / "items.tsv", 2, n_items)
    return Split(users, items, titles, seqs, {s: t[f"{s}_negatives"] for s in STAGES}, manifest)


def prepare(cfg: DataConfig, folder: str | Path) -> tuple[Split, bool]:
    """Load `folder` if it holds the split these options produce, else build and save it.

    Returns the split and whether it was (re)built.
    """
    folder = Path(folder)
    inter, item = data_files(cfg)
    wanted = split_hash(inter, item, cfg)
    if (folder / "manifest.json").is_file():
        try:
            split = load_split(folder)
            if split.hash == wanted:
                return split, False
        except ArtifactError:
            pass
    split = build_split(cfg)
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
