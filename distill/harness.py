"""The evaluation harness shared by every model: history masking, metrics, the per-user ranks.

A model plugs in by providing query vectors (one per user, `encode_users`) and an item table
(`item_vectors()`, N+1 rows, row 0 padding); the search is distill.search's `ItemIndex`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from distill.data import Split
from distill.errors import AnyoError
from distill.search import ItemIndex, check_scores_fit, check_vectors, ranking_exclusions

DEFAULT_KS = (1, 5, 10, 20)


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


def repeated_targets(histories, targets: np.ndarray) -> np.ndarray:
    """(n,) whether each user's target repeats an item of their history (repeat consumption)."""
    rows = histories.row_ids()
    return np.bincount(rows[histories.flat == targets[rows]], minlength=len(targets)) > 0


def evaluate(split: Split, user_vectors: np.ndarray, item_vectors: np.ndarray, stage: str = "valid",
             ks=DEFAULT_KS, mask_history: bool = True, protocol: str = "full", index: str = "Flat",
             names: tuple[str, str] = ("user vectors", "item vectors")) -> EvalResult:
    """Score one model's vectors on the split's `stage` targets."""
    items = check_vectors(names[1], item_vectors, split.n_items + 1)
    users = check_vectors(names[0], user_vectors, split.n_users, items.shape[1])
    check_scores_fit(names[0], users, names[1], items)
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
    hist = split.history(stage)
    options["repeated_targets"] = int(repeated_targets(hist, targets).sum())
    exclude = ranking_exclusions(hist, split.n_items + 1, mask_history)
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
           "mask_history": results["test"].options["mask_history"], "index": results["test"].options["index"],
           "repeated_targets": results["test"].options["repeated_targets"]}
    rec.update(extra)
    return rec
