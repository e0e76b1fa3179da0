"""A teacher anyo did not train: its outputs imported into a teacher cache, and any cache exported again.

The public layout (what `anyo teacher import` reads and `anyo teacher export-cache` writes), one table per
file in Parquet, CSV or JSONL (read through `datasets`; rows are counted from 0 as it reads them):

    top-K file (--topk)     user      the user's token, as in the interaction file
                            position  the prefix length t: the teacher read the user's first t items and
                                      ranks the item at t (1 <= t <= len - 1: training, validation
                                      (len - 2) or test (len - 1) positions); or instead
                            timestamp the time of the last item the teacher read (as in the interaction
                                      file): the prefix of the user's items up to that time
                            items     the teacher's item tokens, best first (the same K on every row)
                            scores    optional: the teacher's logits, best first; absent: -ln(rank)
                                      (softmax(scores) is then proportional to 1 / rank)
                            query     optional: the teacher's query vector
    queries (--queries)     user, position, query: query vectors; the top-K is then the harness's search
                            over the item vectors, history masked (eval.mask_history, eval.index)
    item vectors (--items)  item, vector (a row `[PAD]` is row 0, else zeros); or .npy / .safetensors
                            (tensor `item_vectors`) with N + 1 rows in RUN/split/items.tsv order, row 0 padding

In CSV a list is its values separated by spaces. The mapping is strict: an unknown user or item, a position
that is not one of the user's, a repeated (user, position), a list of the wrong length, a repeated item in a
list, scores not best first, NaN or inf are one DataError naming the file, row and column, before anything
is written. The positions a file leaves out train on the student's own loss alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distill.artifacts import atomic_file, json_digest, load_array, sha256_file
from distill.cache import TeacherCache, cache_key, complete_cache, shard_name, staging_dir, write_shard
from distill.config import Recipe
from distill.data import Split, sequence_times
from distill.errors import DataError
from distill.positions import prefixes, scored_positions, training_positions
from distill.search import ItemIndex, check_vectors
from distill.sources import _column, _read_table, _times, _tokens
from teacher.model import search_outputs

FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}
PAD = "[PAD]"


def imported_cache_key(recipe: Recipe, split: Split, teacher_hash: str, k: int) -> dict:
    """What an imported cache is built from: the teacher cache's key with the imported files in the teacher's
    place and the files' K (distill.positions does not apply: the files say which positions they hold)."""
    return {**cache_key(recipe, split, teacher_hash), "k": k, "positions": None}


def rank_scores(n: int, k: int) -> np.ndarray:
    """(n, k) the scores of top-K lists given without any: -ln(rank), rank 1 first."""
    return np.broadcast_to(-np.log(np.arange(1, k + 1, dtype=np.float32)), (n, k)).copy()


# ---------------------------------------------------------------- reading the public layout

def read_file(path: Path, key: str):
    """The file as a pyarrow Table read by distill.sources (ids as the file's exact strings); `key` is the
    column every row must hold as a string or number (a JSONL line without it is named)."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.suffix.lower() not in FORMATS:
        raise DataError(f"{path}: expected a .parquet, .csv or .jsonl file")
    return _read_table(path, FORMATS[path.suffix.lower()], {key: key})


def _lists(table, path: Path, name: str, what: str, numeric: bool):
    """(flat values, per-row lengths) of a list column (in CSV: values separated by spaces)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = _column(table, path, name, what)
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)) and \
            (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
        col = col.cast(pa.string())        # a CSV cell of one value is read as a number
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        col = pc.utf8_split_whitespace(col)
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
        raise DataError(f"{path}: column `{name}` holds {col.type}, expected a list")
    lengths = np.asarray(pc.list_value_length(col).to_numpy(zero_copy_only=False), np.int64)
    flat = pc.list_flatten(col)
    if flat.null_count:
        row = int(np.repeat(np.arange(len(lengths)), lengths)[np.flatnonzero(
            flat.is_null().to_numpy(zero_copy_only=False))[0]])
        raise DataError(f"{path}: row {row}, column `{name}`: an empty value in the list")
    if not numeric:
        return flat, lengths
    try:
        values = np.asarray(pc.cast(flat, pa.float32()).to_numpy(zero_copy_only=False), np.float32)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise DataError(f"{path}: column `{name}`: not numbers ({' '.join(str(e).split())[:120]})") from None
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.repeat(np.arange(len(lengths)), lengths)[np.argmax(bad)])
        raise DataError(f"{path}: row {row}, column `{name}`: {values[bad][0]} is not a finite number")
    return values, lengths


def _same_length(lengths: np.ndarray, path: Path, name: str, want: int | None = None) -> int:
    """Every row's list has the same length (`want`, or the first row's); returns it."""
    want = int(lengths[0]) if want is None else want
    bad = np.flatnonzero(lengths != want)
    if len(bad):
        raise DataError(f"{path}: row {bad[0]}, column `{name}`: {lengths[bad[0]]} values, expected {want}")
    if want == 0:
        raise DataError(f"{path}: row 0, column `{name}`: an empty list")
    return want


def _map_tokens(col, path: Path, name: str, known: dict[str, int], what: str, rows: np.ndarray | None = None):
    """Each value's id in `known` (a token -> id map); an unknown token is refused with its row."""
    codes, names = _tokens(col)
    ids = np.array([known.get(s, -1) for s in names.tolist()], np.int64)
    mapped = ids[codes] if len(codes) else np.empty(0, np.int64)
    bad = np.flatnonzero(mapped < 0)
    if len(bad):
        row = bad[0] if rows is None else rows[bad[0]]
        raise DataError(f"{path}: row {row}, column `{name}`: unknown {what} {names[codes[bad[0]]]!r} "
                        f"(not in the prepared split)")
    return mapped


def positions_at(users: np.ndarray, at: np.ndarray, split: Split, times: np.ndarray, path: Path) -> np.ndarray:
    """The prefix length whose last item has timestamp `at` for each row: the user's items up to and including
    that time (items of one timestamp stay together); a time the user has no interaction at is refused."""
    values, ranks = np.unique(np.concatenate([times, at]), return_inverse=True)
    seq_rank, at_rank = ranks[:len(times)], ranks[len(times):]
    span = len(values) + 1
    seq_key = np.repeat(np.arange(split.n_users), split.sequences.lengths) * span + seq_rank
    key = users * span + at_rank
    end = np.searchsorted(seq_key, key, side="right")
    bad = np.flatnonzero((end == 0) | (seq_key[np.maximum(end - 1, 0)] != key))
    if len(bad):
        r = bad[0]
        raise DataError(f"{path}: row {r}, column `timestamp`: user {split.users[users[r]]!r} has no interaction at "
                        f"{at[r]:g}")
    return end - split.sequences.offsets[users]


def read_keys(table, path: Path, split: Split, times) -> tuple[np.ndarray, np.ndarray]:
    """(user rows, positions) of a keyed file: known users, positions 1 <= t <= len - 1 (given, or the prefix
    ending at `timestamp`; `times()` gives the split's interaction times), no repeats."""
    import pyarrow as pa

    if table.num_rows == 0:
        raise DataError(f"{path}: no rows")
    users = _map_tokens(_column(table, path, "user", "user"), path, "user", {u: i for i, u in enumerate(split.users)},
                        "user")
    lengths = split.sequences.lengths[users]
    name = "position"
    if "position" not in table.column_names and "timestamp" in table.column_names:
        name = "timestamp"
        t = positions_at(users, _times(table.column("timestamp"), path, "timestamp"), split, times(), path)
    else:
        col = _column(table, path, "position", "position (or timestamp)")
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):   # CSV and JSONL cells are text
            text = np.asarray(col.to_numpy(zero_copy_only=False), dtype=object)
            ok = np.array([v is not None and v.strip().lstrip("-").isdigit() for v in text], bool)
            if not ok.all():
                r = int(np.argmin(ok))
                raise DataError(f"{path}: row {r}, column `position`: {text[r]!r} is not the prefix length "
                                f"(an integer)")
            t = np.array([int(v) for v in text], np.int64)
        elif pa.types.is_integer(col.type):
            t = np.asarray(col.to_numpy(), np.int64)
        else:
            raise DataError(f"{path}: column `position` holds {col.type}, expected the prefix length (an integer)")
    bad = np.flatnonzero((t < 1) | (t > lengths - 1))
    if len(bad):
        r = bad[0]
        raise DataError(f"{path}: row {r}, column `{name}`: gives position {t[r]}, not a position of user "
                        f"{split.users[users[r]]!r} (1 to {lengths[r] - 1}: the prefix length before a training, "
                        f"validation or test item)")
    key = users * (int(split.sequences.lengths.max()) + 1) + t
    order = np.argsort(key, kind="stable")
    dup = np.flatnonzero(key[order][1:] == key[order][:-1])
    if len(dup):
        first, again = sorted((int(order[dup[0]]), int(order[dup[0] + 1])))
        raise DataError(f"{path}: row {again}, column `{name}`: user {split.users[users[again]]!r} at position "
                        f"{t[again]} repeats row {first}")
    return users, t


@dataclass
class Outputs:
    """A teacher's outputs for (user, position) rows, checked against the split."""

    users: np.ndarray               # (n,) user rows
    positions: np.ndarray           # (n,) prefix lengths
    topk_ids: np.ndarray | None     # (n, K) item ids, best first (None: computed from the vectors)
    topk_scores: np.ndarray | None  # (n, K)
    query: np.ndarray | None        # (n, D)


def _check_ids(ids: np.ndarray, scores: np.ndarray | None, path, rows: np.ndarray | None = None) -> None:
    """No item twice in a row's list; scores best first."""
    rows = np.arange(len(ids)) if rows is None else rows
    s = np.sort(ids, axis=1)
    dup = np.flatnonzero((s[:, 1:] == s[:, :-1]).any(axis=1))
    if len(dup):
        raise DataError(f"{path}: row {rows[dup[0]]}, column `items`: an item appears twice in the list")
    if scores is not None:
        up = np.flatnonzero((scores[:, 1:] > scores[:, :-1]).any(axis=1))
        if len(up):
            raise DataError(f"{path}: row {rows[up[0]]}, column `scores`: not best first (a score is higher "
                            f"than the one before it)")


def read_topk(path: Path, split: Split, times) -> Outputs:
    """The top-K file: keys, item lists, optional scores and query vectors."""
    table = read_file(path, "user")
    users, t = read_keys(table, path, split, times)
    flat, lengths = _lists(table, path, "items", "items", numeric=False)
    k = _same_length(lengths, path, "items")
    if k > split.n_items:
        raise DataError(f"{path}: row 0, column `items`: {k} items, the catalogue has {split.n_items}")
    known = {s: i for i, s in enumerate(split.items) if i > 0}
    ids = _map_tokens(flat, path, "items", known, "item", np.repeat(np.arange(len(lengths)), lengths)).reshape(-1, k)
    scores = query = None
    if "scores" in table.column_names:
        values, lengths = _lists(table, path, "scores", "scores", numeric=True)
        scores = values.reshape(-1, _same_length(lengths, path, "scores", k))
    _check_ids(ids, scores, path)
    if "query" in table.column_names:
        values, lengths = _lists(table, path, "query", "query", numeric=True)
        query = values.reshape(-1, _same_length(lengths, path, "query"))
    return Outputs(users, t, ids.astype(np.int32), scores, query)


def read_queries(path: Path, split: Split, times) -> Outputs:
    table = read_file(path, "user")
    users, t = read_keys(table, path, split, times)
    values, lengths = _lists(table, path, "query", "query", numeric=True)
    return Outputs(users, t, None, None, values.reshape(-1, _same_length(lengths, path, "query")))


def read_item_vectors(path: Path, split: Split) -> np.ndarray:
    """(N+1, D) item vectors: .npy / .safetensors in items.tsv order, or a keyed table (item, vector)."""
    suffix = path.suffix.lower()
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if suffix == ".npy":
        return check_vectors(str(path), np.asarray(load_array(path)), split.n_items + 1)
    if suffix == ".safetensors":
        try:
            from safetensors.numpy import load_file
            x = load_file(str(path))["item_vectors"]
        except KeyError:
            raise DataError(f"{path}: no tensor `item_vectors`") from None
        except Exception as e:  # noqa: BLE001 - numpy and safetensors raise several types for a bad file
            raise DataError(f"{path}: not a readable {suffix[1:]} array ({' '.join(str(e).split())[:120]})") from None
        return check_vectors(str(path), x, split.n_items + 1)
    table = read_file(path, "item")
    known = {s: i for i, s in enumerate(split.items)}
    ids = _map_tokens(_column(table, path, "item", "item"), path, "item", known, "item")
    values, lengths = _lists(table, path, "vector", "vector", numeric=True)
    dim = _same_length(lengths, path, "vector")
    order = np.argsort(ids, kind="stable")
    dup = np.flatnonzero(ids[order][1:] == ids[order][:-1])
    if len(dup):
        raise DataError(f"{path}: row {order[dup[0] + 1]}, column `item`: {split.items[ids[order[dup[0]]]]!r} "
                        f"repeats row {order[dup[0]]}")
    missing = np.setdiff1d(np.arange(1, split.n_items + 1), ids)
    if len(missing):
        raise DataError(f"{path}: column `item`: no vector for item {split.items[missing[0]]!r} "
                        f"({len(missing)} items missing)")
    table_out = np.zeros((split.n_items + 1, dim), np.float32)
    table_out[ids] = values.reshape(-1, dim)
    return table_out


# ---------------------------------------------------------------- into a cache

def vector_topk(outputs: Outputs, split: Split, items: np.ndarray, k: int, mask_history: bool, index: str,
                path: Path) -> Outputs:
    """The top-K of imported query vectors: the harness's search over the item vectors with the history masked,
    exactly as anyo's own teachers (teacher.model.search_outputs), scores the raw inner products."""
    if outputs.query.shape[1] != items.shape[1]:
        raise DataError(f"{path}: row 0, column `query`: {outputs.query.shape[1]} values, the item vectors have "
                        f"{items.shape[1]}")
    if k > split.n_items:
        raise DataError(f"distill.k: {k} is larger than the catalogue ({split.n_items} items)")
    o = search_outputs(ItemIndex(items, index), torch.from_numpy(np.array(outputs.query)),
                       prefixes(split, outputs.users, outputs.positions), k, mask_history, 1.0)
    return Outputs(outputs.users, outputs.positions, o.topk_ids.numpy().astype(np.int32),
                   o.topk_scores.numpy(), outputs.query)


def coverage(split: Split, outputs: Outputs) -> dict:
    """How many of the split's positions the import holds (the others train on the own loss alone)."""
    lengths = split.sequences.lengths[outputs.users]
    train = outputs.positions < lengths - 2
    return {"rows": int(len(outputs.users)), "users": int(len(np.unique(outputs.users))),
            "training_positions": int(train.sum()), "of_training_positions": int(len(training_positions(split)[0])),
            "validation": int((outputs.positions == lengths - 2).sum()),
            "test": int((outputs.positions == lengths - 1).sum()), "of_users": split.n_users}


def write_cache(recipe: Recipe, split: Split, outputs: Outputs, items: np.ndarray | None, sources: list[dict],
                how: dict, out: Path) -> dict:
    """Write checked outputs as a teacher cache at `out` (through OUT.partial/), shards of distill.shard_users
    users each, rows by (user, position) as anyo's own caches; the manifest records `sources` (files and
    their sha256) in the teacher's place."""
    order = np.lexsort((outputs.positions, outputs.users))
    n, k = outputs.topk_ids.shape
    query = outputs.query if outputs.query is not None else np.zeros((n, 0), np.float32)
    scores = outputs.topk_scores if outputs.topk_scores is not None else rank_scores(n, k)
    item_table = items if items is not None else np.zeros((split.n_items + 1, 0), np.float32)
    meta = {**imported_cache_key(recipe, split, "external:" + json_digest(sources), k), "dim": int(query.shape[1])}
    shard_users = recipe.distill.shard_users
    n_shards = -(-split.n_users // shard_users)
    users = outputs.users[order]
    bounds = np.searchsorted(users, np.arange(n_shards + 1) * shard_users)
    staging = staging_dir(out)
    staging.mkdir(parents=True, exist_ok=True)
    for i in range(n_shards):
        rows = order[bounds[i]:bounds[i + 1]]
        write_shard(staging / shard_name(i), {"user": outputs.users[rows], "position": outputs.positions[rows],
                                             "query": query[rows], "topk_ids": outputs.topk_ids[rows],
                                             "topk_scores": scores[rows]}, meta)
    return complete_cache(staging, out, n_shards, meta, item_table, {
        "teacher": {"kind": "external", "sources": sources, **how}, "coverage": coverage(split, outputs),
        "guard": {"checked": False, "reason": "imported outputs: no backend to compare"},
        "valid_check": {"checked": False, "reason": "imported outputs: no recorded validation score"}})


def source(path: Path, role: str) -> dict:
    return {"role": role, "file": str(path), "sha256": sha256_file(path)}


def import_files(recipe: Recipe, split: Split, out: Path, topk: Path | None = None, queries: Path | None = None,
                 items: Path | None = None) -> dict:
    """`anyo teacher import`: read and check every file, then write the cache (nothing before all checks pass)."""
    item_table = read_item_vectors(items, split) if items is not None else None
    times = lambda: sequence_times(recipe.data, split)  # noqa: E731 - read only for a `timestamp` column
    if topk is not None:
        outputs = read_topk(topk, split, times)
        how = {"topk": "given", "scores": "given" if outputs.topk_scores is not None else "-ln(rank)"}
        if outputs.query is not None and item_table is not None and outputs.query.shape[1] != item_table.shape[1]:
            raise DataError(f"{topk}: row 0, column `query`: {outputs.query.shape[1]} values, the item vectors "
                            f"have {item_table.shape[1]}")
    else:
        ev = recipe.eval
        outputs = vector_topk(read_queries(queries, split, times), split, item_table, recipe.distill.k, ev.mask_history,
                              ev.index, queries)
        how = {"topk": f"harness search over the imported vectors (index {ev.index}, "
                       f"mask_history {ev.mask_history})", "scores": "inner product"}
    sources = [source(p, role) for p, role in ((topk, "topk"), (queries, "queries"), (items, "items")) if p]
    return write_cache(recipe, split, outputs, item_table, sources, how, out)


def import_teacher(recipe: Recipe, split: Split, teacher, out: Path) -> dict:
    """Fill a cache from any object with `get_teacher_outputs(histories, k)` (an object with `query` (B, D),
    `topk_ids` (B, K) item ids best first and `topk_scores` (B, K); tensors or arrays) and optionally
    `item_vectors()` (N+1, D), asked for the positions anyo's own teacher scores (distill.positions, validation,
    test), with the same checks as a file; the manifest records the object's class."""
    users, positions = scored_positions(split, recipe.distill.positions)
    name = type(teacher).__qualname__
    k, n = recipe.distill.k, len(users)
    if k > split.n_items:
        raise DataError(f"distill.k: {k} is larger than the catalogue ({split.n_items} items)")
    parts = {"query": [], "topk_ids": [], "topk_scores": []}
    bs = recipe.teacher.eval_batch_size
    for lo in range(0, n, bs):
        o = teacher.get_teacher_outputs(prefixes(split, users[lo:lo + bs], positions[lo:lo + bs]), k)
        for f in parts:
            parts[f].append(np.asarray(getattr(o, f)))
    where = f"{name}.get_teacher_outputs"
    q, ids, scores = (np.concatenate(parts[f]) for f in ("query", "topk_ids", "topk_scores"))
    if ids.shape != (n, k) or scores.shape != (n, k) or q.ndim != 2 or len(q) != n:
        raise DataError(f"{where}: shapes query {q.shape}, topk_ids {ids.shape}, topk_scores {scores.shape}; "
                        f"expected ({n}, D), ({n}, {k}), ({n}, {k})")
    bad = np.flatnonzero(((ids < 1) | (ids > split.n_items)).any(axis=1))
    if len(bad):
        raise DataError(f"{where}: row {bad[0]}, topk_ids: an id outside 1..{split.n_items}")
    for f, x in (("topk_scores", scores), ("query", q)):
        if not np.isfinite(x).all():
            raise DataError(f"{where}: row {np.flatnonzero(~np.isfinite(x).all(axis=1))[0]}, {f}: NaN or inf")
    ids = ids.astype(np.int32)
    _check_ids(ids, scores, where)
    items = check_vectors(f"{name}.item_vectors()", np.asarray(teacher.item_vectors()), split.n_items + 1) \
        if hasattr(teacher, "item_vectors") else None
    outputs = Outputs(users, positions, ids, scores.astype(np.float32), q.astype(np.float32))
    return write_cache(recipe, split, outputs, items, [{"role": "python", "object": name}],
                       {"topk": "given", "scores": "given"}, out)


# ---------------------------------------------------------------- out of anyo

def items_file(out: Path) -> Path:
    """Where export-cache writes the item vectors beside the top-K file: FILE.items.parquet."""
    return out.with_name(out.name[:-len(".parquet")] + ".items.parquet")


def export_cache(cache: TeacherCache, split: Split, out: Path) -> tuple[int, Path | None]:
    """Write `cache` in the public layout: FILE.parquet (user, position, items, scores, query) and, when the
    cache has item vectors, FILE.items.parquet (item, vector; `[PAD]` is row 0). Returns (rows, items file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    users, pos, ids, scores, query = [], [], [], [], []
    for t in cache.shards:
        users.append(np.asarray(t["user"]))
        pos.append(np.asarray(t["position"]))
        ids.append(np.asarray(t["topk_ids"]))
        scores.append(np.asarray(t["topk_scores"]))
        query.append(np.asarray(t["query"]))
    u, p, i, s, q = (np.concatenate(x) for x in (users, pos, ids, scores, query))
    if (i < 1).any():   # the search pads a list with -1 when fewer than K items were rankable
        r = int(np.flatnonzero((i < 1).any(axis=1))[0])
        raise DataError(f"{cache.folder}: row {r} lists fewer than K = {i.shape[1]} items (padded with -1); "
                        f"the public layout has K items on every row: rebuild the cache with a smaller distill.k")
    tokens = np.asarray(split.items, dtype=object)

    def lists(x: np.ndarray, values) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(values, x.shape[1]).cast(pa.list_(values.type))

    columns = {"user": pa.array(np.asarray(split.users, dtype=object)[u], pa.string()), "position": pa.array(p),
               "items": lists(i, pa.array(tokens[i.ravel()], pa.string())),
               "scores": lists(s, pa.array(s.ravel(), pa.float32()))}
    if q.shape[1]:
        columns["query"] = lists(q, pa.array(q.ravel(), pa.float32()))
    with atomic_file(out) as tmp:
        pq.write_table(pa.table(columns), tmp)
    table = np.asarray(cache.item_table)
    if table.shape[1] == 0:
        return len(u), None
    with atomic_file(items_file(out)) as tmp:
        pq.write_table(pa.table({"item": pa.array(tokens, pa.string()),
                                 "vector": lists(table, pa.array(table.ravel(), pa.float32()))}), tmp)
    return len(u), items_file(out)

