"""Top-k inner-product search over an item table, with per-query exclusions (FAISS or numpy).

Exact maximum inner product (`faiss.IndexFlatIP`) by default; any `index_factory` string gives an
approximate index, with its search parameters after a `?` (`IVF1024,Flat?nprobe=32`, `HNSW32?efSearch=128`,
as faiss.ParameterSpace reads them); `brute` is a numpy path kept for tests. Within a returned list, ties
are broken by the lower item id in every path. The harness (distill.harness), the teacher, the recommender
and the serving benchmark all search through `ItemIndex`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import faiss
import numpy as np

from distill.errors import AnyoError, ConfigError
from distill.histories import Histories


def check_vectors(name: str, x: np.ndarray, rows: int, dim: int | None = None) -> np.ndarray:
    """Validate a (rows, dim) float matrix; the message names `name` (a file or argument)."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise AnyoError(f"{name}: expected a 2-D array, got shape {x.shape}")
    if x.shape[0] != rows:
        raise AnyoError(f"{name}: {x.shape[0]} rows, expected {rows}")
    if dim is not None and x.shape[1] != dim:
        raise AnyoError(f"{name}: dimension {x.shape[1]}, expected {dim}")
    if x.shape[1] == 0:
        raise AnyoError(f"{name}: dimension 0 (no columns)")
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


def check_scores_fit(user_name: str, users: np.ndarray, item_name: str, items: np.ndarray) -> None:
    """Refuse query and item tables whose inner products could overflow float32 (then inf, and a ranking decided
    by ties): by Cauchy-Schwarz every score and every partial sum is at most the largest norms' product."""
    def norms(x: np.ndarray) -> np.ndarray:
        return np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    nu, nv = norms(users), norms(items)
    u, v = int(np.argmax(nu)), int(np.argmax(nv))
    if nu[u] * nv[v] > np.finfo(np.float32).max:
        raise AnyoError(f"{user_name} row {u} (norm {nu[u]:.3g}) x {item_name} row {v} (norm {nv[v]:.3g}): "
                        "inner products overflow float32 (> 3.4e38); rescale the vectors")


EXCLUSION_CHUNK = 256  # queries per search when exclusions set the depth
DENSE_EXCLUSIONS = 1 << 24  # cells (queries x catalogue rows) up to which exclusions are built from a bitmap


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
    def from_histories(cls, histories: Histories, n_rows: int) -> "Exclusions":
        """Exclude every item of each row's history. The keys come sorted and unique from a (rows, N+1) bitmap
        when it is at most DENSE_EXCLUSIONS cells (a serving batch: no sort of the whole batch's histories),
        else from np.unique."""
        rows = histories.row_ids()
        if len(histories) * n_rows <= DENSE_EXCLUSIONS:
            seen = np.zeros((len(histories), n_rows), dtype=bool)
            seen[rows, histories.flat] = True
            return cls(np.flatnonzero(seen), n_rows, np.count_nonzero(seen, axis=1))
        keys = np.unique(rows.astype(np.int64) * n_rows + histories.flat)
        return cls(keys, n_rows, np.bincount(keys // n_rows, minlength=len(histories)))

    def contains(self, rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
        q = rows.astype(np.int64) * self.stride + ids
        if len(self.keys) == 0:
            return np.zeros(q.shape, dtype=bool)
        pos = np.searchsorted(self.keys, q).clip(max=len(self.keys) - 1)
        return self.keys[pos] == q


# ---------------------------------------------------------------- the ranking protocol

RANKING_PROTOCOL = 2  # the version of ranking_exclusions in every evaluated stage's inputs: 2 (2026-12-01) = no
                      # exemption for a target that repeats a history item (1 kept it rankable)


def ranking_exclusions(histories: Histories, n_rows: int, mask_history: bool) -> Exclusions | None:
    """The ranking protocol, the one definition the harness, the teacher, the model card, `anyo recommend` and
    `anyo serve` use: padding (row 0) is never ranked; with `mask_history` every item of the history is
    excluded too, so a target that repeats an earlier item is not rankable (a miss), exactly as a served list
    that leaves out what the user has seen; without it seen items stay rankable (data with repeat consumption).
    Nothing depends on the target, so what is evaluated is what is served."""
    return Exclusions.from_histories(histories, n_rows) if mask_history else None


def describe_protocol(mask_history: bool) -> str:
    """The protocol in words (the model card, `anyo recommend --help`)."""
    return ("padding and every item of the user's history excluded (a target that repeats a history item "
            "counts as a miss)" if mask_history else
            "padding excluded; the history's items stay rankable (repeat consumption)")


# ---------------------------------------------------------------- index strings

def check_index_string(index: str, dim: int) -> None:
    """Refuse at load time a FAISS index_factory string that cannot build `dim`-dimensional vectors
    (whether it can be trained on the catalogue is checked when the harness builds it)."""
    if index in ("Flat", "brute"):
        return
    import faiss
    factory, params = split_index_string(index)
    try:
        built = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        if params:
            faiss.ParameterSpace().set_index_parameters(built, params)
    except RuntimeError as e:
        raise ConfigError(f"eval.index: cannot build {index!r} for {dim}-dimensional vectors "
                          f"(student.hidden_size): {faiss_reason(e)}") from None


def split_index_string(index: str) -> tuple[str, str]:
    """`FACTORY?PARAMS` -> (factory string, search parameters such as `nprobe=32` or `efSearch=128`)."""
    factory, _, params = index.partition("?")
    return factory.strip(), params.strip()


def faiss_reason(e: Exception) -> str:
    """The readable part of a FAISS C++ error ("Error in ... at file.cpp:66: Error: 'x' failed: REASON")."""
    line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    line = re.sub(r"^Error in .*? at \S+:\d+: ", "", line)
    return re.sub(r"^Error: '.*?' failed: ", "", line)
