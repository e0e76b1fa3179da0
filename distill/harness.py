"""The evaluation harness shared by every model: FAISS search, history masking, metrics.

A model plugs in by providing query vectors (one per user, `encode_users`) and
an item table (`item_vectors()`, N+1 rows, row 0 padding). Search is exact
maximum inner product (`faiss.IndexFlatIP`) by default; any `index_factory`
string gives an approximate index, with its search parameters after a `?`
(`IVF1024,Flat?nprobe=32`, `HNSW32?efSearch=128`, as faiss.ParameterSpace reads them);
`brute` is a numpy path kept for tests.
Within a returned list, ties are broken by the lower item id in every path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import faiss
import numpy as np

from distill.config import faiss_reason, split_index_string
from distill.data import Histories, Split
from distill.errors import AnyoError

DEFAULT_KS = (1, 5, 10, 20)


def check_vectors(name: str, x: np.ndarray, rows: int, dim: int | None = None) -> np.ndarray:
    """Validate a (rows, dim) float matrix; the message names `name` (a file or argument)."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise AnyoError(f"{name}: expected a 2-D array, got shape {x.shape}")
    if x.shape[0] != rows:
        raise AnyoError(f"{name}: {x.shape[0]} rows, expected {rows}")
    if dim is not None and x.shape[1] != dim:
        raise AnyoError(f"{name}: dimension {x.shape[1]}, expected {dim}")
    if not np.issubdtype(x.dtype, np.floating):
        raise AnyoError(f"{name}: dtype {x.dtype} is not floating point")
    if not np.isfinite(x).all():
        bad = int(np.argwhere(~np.isfinite(x))[0][0])
        raise AnyoError(f"{name}: row {bad} contains NaN or inf")
    if x.dtype.itemsize > 4:  # float64 values beyond float32's range would become inf (and all-zero metrics)
        over = np.abs(x) > np.finfo(np.float32).max
        if over.any():
            bad = int(np.argwhere(over)[0][0])
            raise AnyoError(f"{name}: row {bad} holds a value beyond the float32 range (|x| > 3.4e38)")
    return np.ascontiguousarray(x, dtype=np.float32)


EXCLUSION_CHUNK = 256  # queries per search when exclusions set the depth


class ItemIndex:
    """Top-k inner-product search over an item table, with per-query exclusions."""

    def __init__(self, item_vectors: np.ndarray, index: str = "Flat", batch_size: int = 4096):
        self.items = np.ascontiguousarray(item_vectors, dtype=np.float32)
        self.n_rows, self.dim = self.items.shape
        self.kind = index
        self.batch_size = batch_size
        if index == "brute":
            self.index = None
            return
        where = f"index {index!r} (eval.index / --index)"
        factory, params = split_index_string(index)
        try:
            base = faiss.index_factory(self.dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise AnyoError(f"{where}: cannot build it for {self.dim}-dimensional vectors: {faiss_reason(e)}") from None
        try:
            if not base.is_trained:
                base.train(self.items)
            base.add(self.items)
        except RuntimeError as e:
            raise AnyoError(f"{where}: cannot be trained on the catalogue's {self.n_rows} item vectors: "
                            f"{faiss_reason(e)}") from None
        if params:
            try:
                faiss.ParameterSpace().set_index_parameters(base, params)
            except RuntimeError as e:
                raise AnyoError(f"{where}: cannot set {params!r}: {faiss_reason(e)}") from None
        if faiss.get_num_gpus() > 0:
            base = faiss.index_cpu_to_all_gpus(base)
        self.index = base

    def _raw(self, q: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        if self.index is None:
            s = q @ self.items.T
            ids = np.argsort(-s, axis=1, kind="stable")[:, :depth]
            return np.take_along_axis(s, ids, axis=1), ids
        return self.index.search(q, depth)

    def search(self, queries: np.ndarray, k: int, exclude: "Exclusions | None" = None):
        """(n, k) item ids and scores; padding row 0 and excluded items never returned.

        When fewer than k items remain the tail is id -1, score -inf. With exclusions the
        queries are searched in order of how many items they exclude, in chunks, each only as
        deep as its own longest exclusion list needs (one long history no longer makes every
        query search, mask and sort hundreds of candidates).
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        n = len(queries)
        ids_out = np.empty((n, k), dtype=np.int64)
        scores_out = np.empty((n, k), dtype=np.float32)
        if exclude is None:
            order, chunk = np.arange(n), self.batch_size
        else:
            order, chunk = np.argsort(exclude.lengths, kind="stable"), min(self.batch_size, EXCLUSION_CHUNK)
        for lo in range(0, n, chunk):
            rows = order[lo:lo + chunk]
            extra = int(exclude.lengths[rows].max()) if exclude is not None else 0
            scores, ids = self._raw(queries[rows], min(self.n_rows, k + 1 + extra))
            drop = ids <= 0
            if exclude is not None:
                drop |= exclude.contains(rows[:, None], ids)
            # unmasked first, then higher score, then lower id
            best = np.lexsort((ids, -scores, drop), axis=-1)[:, :k]
            ids_b = np.take_along_axis(ids, best, axis=1)
            sc_b = np.take_along_axis(scores, best, axis=1)
            dropped = np.take_along_axis(drop, best, axis=1)
            ids_b[dropped], sc_b[dropped] = -1, -np.inf
            if ids_b.shape[1] < k:  # catalogue smaller than k
                pad = k - ids_b.shape[1]
                ids_b = np.pad(ids_b, ((0, 0), (0, pad)), constant_values=-1)
                sc_b = np.pad(sc_b, ((0, 0), (0, pad)), constant_values=-np.inf)
            ids_out[rows], scores_out[rows] = ids_b, sc_b
        return ids_out, scores_out


@dataclass
class Exclusions:
    """Per-query item sets to exclude, as sorted keys row * stride + item."""

    keys: np.ndarray
    stride: int
    lengths: np.ndarray  # (n_queries,) how many items each query excludes

    @classmethod
    def from_histories(cls, histories: Histories, n_rows: int, keep: np.ndarray | None = None) -> "Exclusions":
        """Exclude each row's history items, except `keep[row]` (the target is never masked)."""
        rows = histories.row_ids()
        flat = histories.flat
        if keep is not None:
            mask = flat != keep[rows]
            rows, flat = rows[mask], flat[mask]
        keys = np.unique(rows.astype(np.int64) * n_rows + flat)
        return cls(keys, n_rows, np.bincount(keys // n_rows, minlength=len(histories)))

    def contains(self, rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
        q = rows.astype(np.int64) * self.stride + ids
        if len(self.keys) == 0:
            return np.zeros(q.shape, dtype=bool)
        pos = np.searchsorted(self.keys, q).clip(max=len(self.keys) - 1)
        return self.keys[pos] == q


# ---------------------------------------------------------------- metrics

def rank_metrics(ranks: np.ndarray, ks) -> dict[str, float]:
    """HR, NDCG, MRR, Recall at each K from 0-based target ranks (-1 = not retrieved).

    With one held-out item per user Recall@K equals HR@K; both are reported.
    """
    r = np.where(ranks < 0, np.iinfo(np.int64).max, ranks).astype(np.float64)
    out = {}
    for k in ks:
        hit = r < k
        out[f"HR@{k}"] = float(hit.mean())
        out[f"Recall@{k}"] = out[f"HR@{k}"]
        out[f"NDCG@{k}"] = float(np.where(hit, 1.0 / np.log2(np.where(hit, r, 0) + 2.0), 0.0).mean())
        out[f"MRR@{k}"] = float(np.where(hit, 1.0 / (np.where(hit, r, 0) + 1.0), 0.0).mean())
    return out


def list_metrics(topk: np.ndarray, ks, n_items: int, popularity: np.ndarray) -> dict[str, float]:
    """Item coverage@K (share of the catalogue ever returned) and ARP@K (mean training
    popularity of returned items, the usual popularity-bias measure)."""
    out = {}
    for k in ks:
        top = topk[:, :k]
        valid = top > 0
        out[f"Coverage@{k}"] = float(np.unique(top[valid]).size / n_items)
        out[f"ARP@{k}"] = float(popularity[top[valid]].mean()) if valid.any() else 0.0
    return out


POPULARITY_BUCKETS = (("head", 0.2), ("torso", 0.5), ("tail", 1.0))  # cumulative share of the seen items
BUCKET_NAMES = tuple(name for name, _ in POPULARITY_BUCKETS) + ("unseen",)


def popularity_buckets(popularity: np.ndarray) -> np.ndarray:
    """(N+1,) bucket name of each item by its training count: the most popular 20% of the items seen in
    training are `head`, the next 30% `torso`, the rest `tail`; items never seen in training `unseen`."""
    out = np.full(len(popularity), "unseen", dtype=object)
    seen = np.flatnonzero(popularity > 0)
    order = seen[np.argsort(-popularity[seen], kind="stable")]
    start = 0
    for name, share in POPULARITY_BUCKETS:
        stop = int(round(share * len(order)))
        out[order[start:stop]] = name
        start = stop
    return out


def metrics_by_popularity(ranks: np.ndarray, targets: np.ndarray, popularity: np.ndarray, ks) -> dict:
    """Rank metrics of the users whose target falls in each popularity bucket (and how many users)."""
    bucket = popularity_buckets(popularity)[targets]
    out = {}
    for name in BUCKET_NAMES:
        sel = bucket == name
        if sel.any():
            out[name] = {"users": int(sel.sum()), **rank_metrics(ranks[sel], ks)}
    return out


@dataclass
class EvalResult:
    metrics: dict[str, float]
    ranks: np.ndarray                 # (n,) 0-based rank of the target, -1 if beyond max K
    topk: np.ndarray | None = None    # (n, max K) returned ids (full protocol)
    options: dict = field(default_factory=dict)
    by_popularity: dict = field(default_factory=dict)  # bucket of the target's training popularity -> metrics

    @property
    def cold(self) -> dict:
        """The metrics of the users whose target was never seen in training (cold: made so by
        data.cold_items or cold in the data), {"users": 0} when there are none."""
        return self.by_popularity.get("unseen", {"users": 0})


def evaluate(split: Split, user_vectors: np.ndarray, item_vectors: np.ndarray, stage: str = "valid",
             ks=DEFAULT_KS, mask_history: bool = True, protocol: str = "full", index: str = "Flat",
             names: tuple[str, str] = ("user vectors", "item vectors")) -> EvalResult:
    """Score one model's vectors on the split's `stage` targets."""
    items = check_vectors(names[1], item_vectors, split.n_items + 1)
    users = check_vectors(names[0], user_vectors, split.n_users, items.shape[1])
    targets = split.targets(stage)
    ks = sorted(set(int(k) for k in ks))
    options = {"stage": stage, "protocol": protocol, "mask_history": mask_history, "index": index,
               "split_hash": split.hash, "n_users": split.n_users}
    if protocol == "candidates":
        cands = np.concatenate([targets[:, None], split.negatives[stage]], axis=1)  # (n, 20)
        scores = np.einsum("nd,ncd->nc", users, items[cands])
        # rank = items scoring higher, or equal with a lower id
        t = scores[:, :1]
        ranks = ((scores > t) | ((scores == t) & (cands < cands[:, :1]))).sum(axis=1)
        return EvalResult(rank_metrics(ranks, [k for k in ks if k <= cands.shape[1]]), ranks, None, options)
    if protocol != "full":
        raise AnyoError(f"--protocol {protocol!r}: expected full or candidates")
    exclude = None
    if mask_history:
        exclude = Exclusions.from_histories(split.history(stage), split.n_items + 1, keep=targets)
    ids, _ = ItemIndex(items, index).search(users, max(ks), exclude)
    hit = ids == targets[:, None]
    ranks = np.where(hit.any(axis=1), hit.argmax(axis=1), -1)
    metrics = rank_metrics(ranks, ks)
    popularity = split.item_popularity()
    metrics.update(list_metrics(ids, ks, split.n_items, popularity))
    return EvalResult(metrics, ranks, ids, options, metrics_by_popularity(ranks, targets, popularity, ks))


def evaluate_model(split: Split, user_vectors_for, item_vectors: np.ndarray, ev) -> dict:
    """Validation and test metrics (full ranking) plus the 20-candidate protocol on test.

    `user_vectors_for(stage)` returns the (n_users, d) query vectors for that stage.
    """
    out = {}
    for stage in ("valid", "test"):
        users = user_vectors_for(stage)
        full = evaluate(split, users, item_vectors, stage, ev.ks, ev.mask_history, "full", ev.index)
        out[stage] = full
        if stage == "test":
            out["candidates"] = evaluate(split, users, item_vectors, stage, ev.ks, protocol="candidates")
    return out


def metrics_record(results: dict, split: Split, **extra) -> dict:
    rec = {"metrics": results["test"].metrics, "stage": "test", "valid_metrics": results["valid"].metrics,
           "by_popularity": results["test"].by_popularity, "cold": results["test"].cold,
           "candidates": results["candidates"].metrics, "split_hash": split.hash,
           "mask_history": results["test"].options["mask_history"], "index": results["test"].options["index"]}
    rec.update(extra)
    return rec
