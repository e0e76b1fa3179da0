"""The inference guard: a fast backend must give the reference's queries and rankings before it writes a cache.

The reference is the same teacher run by plain transformers (`hf`) in float32. Any other
setting (DeepSpeed; a bfloat16/float16 backbone) is checked on a fixed, seeded sample of the
prompts the cache will hold, scored both ways in the same batches; the cache is refused before a
shard is written unless all three criteria hold:

- components: the largest relative difference of the LLM part of a query, q_LLM before the blend
  with q_CF (max_j |q_j - r_j| / max_j |r_j|), is within the tolerance for the backbone's dtype
  (comparing blended queries would loosen it by 1 / (1 - w));
- ordered top-10: identical to the reference's for at least `distill.guard_top10_identical` of the
  sampled prompts (the cache's ranking: blended query, history masked, the cache's index);
- top-50 overlap: |backend & reference| / 50 at least `distill.guard_top50_overlap` on average.

The sample is stratified by prompt length (equal draws from groups of distinct lengths, so short
prompts are not left out), and each guard batch takes prompts from every stratum, so most sampled
prompts are padded in their batch (`padded` in the record): a backend that mishandles padding fails.
The record says whether DeepSpeed kernel injection was exercised (`kernel_injection`); it is not with
the MoE-LoRA gate nor on CPU, where init_inference runs the same transformers modules.

The float32 reference of a bfloat16/float16 backbone is computed in place: the backbone's
tensors are cast to float32 and back (an exact round trip), so no second copy of the model is held.

`check_validation` is the end-to-end check of any finished cache (the LLM teacher's and the CF-only
one): its validation rows, re-scored by the harness, must give the NDCG@10 its teacher recorded on
validation within VALID_NDCG_TOLERANCE.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from distill.cache import memmap_tensors, shard_name
from distill.data import Split
from distill.harness import evaluate
from distill.histories import Histories
from distill.errors import AnyoError
from distill.positions import prefixes

SAMPLE = 64
SEED = 0
STRATA = 8
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 1e-2}
TOP_K = (10, 50)
VALID_NDCG_TOLERANCE = 0.002   # absolute; one of 943 users moving from rank 1 to 2 changes NDCG@10 by 0.0004
_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class GuardError(AnyoError):
    """A backend's queries or rankings differ from the reference's beyond the criteria."""


def backbone_dtype(model) -> str:
    return _NAMES.get(next(model.backbone.parameters()).dtype, str(next(model.backbone.parameters()).dtype))


def needs_guard(backend: str, dtype: str) -> bool:
    """Everything but the reference (hf in float32) is checked."""
    return not (backend == "hf" and dtype == "float32")


def sample(split: Split, users: np.ndarray, positions: np.ndarray, lengths_of, n: int = SAMPLE, seed: int = SEED,
           strata: int = STRATA) -> Histories:
    """A fixed sample of `n` of the (user, position) prompts a cache holds (the same on every rank),
    stratified by prompt length (`lengths_of(histories)`): the distinct lengths are cut into `strata`
    groups and each group gets an equal share (a group too small for its share gives it to the others)."""
    lengths = lengths_of(prefixes(split, users, positions))
    distinct = np.unique(lengths)
    groups = sorted((np.flatnonzero(np.isin(lengths, g)) for g in np.array_split(distinct, min(strata, len(distinct)))),
                    key=len)
    rng = np.random.default_rng(seed)
    rows, left = [], min(n, len(lengths))
    for i, g in enumerate(groups):
        take = min(len(g), left // (len(groups) - i))
        rows.append(rng.choice(g, size=take, replace=False))
        left -= take
    rows = np.sort(np.concatenate(rows))
    return prefixes(split, users[rows], positions[rows])


def mixed_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Batches that each span the range of lengths (row i of the length order goes to batch i mod B)."""
    order = np.argsort(lengths, kind="stable")
    n_batches = max(1, -(-len(order) // batch_size))
    return [order[j::n_batches] for j in range(n_batches)]


@torch.inference_mode()
def outputs(model, histories: Histories, batch_size: int, k: int, mask_history: bool, index: str) -> dict:
    """q_LLM (n, D) and the cache's top-k ids (n, k) of `histories`, in mixed-length batches."""
    lengths = model.prompts.lengths(histories)
    q_llm, ids, padded = None, np.empty((len(histories), k), np.int64), 0
    for rows in mixed_batches(lengths, batch_size):
        batch = histories.take(rows)
        q = model.query(batch, blend=False).float().cpu().numpy()
        q_llm = np.empty((len(histories), q.shape[1]), np.float32) if q_llm is None else q_llm
        q_llm[rows] = q
        ids[rows] = model.get_teacher_outputs(batch, k, mask_history, index).topk_ids.numpy()
        padded += int((lengths[rows] < lengths[rows].max()).sum())
    return {"query_llm": q_llm, "topk_ids": ids, "padded": padded,
            "lengths": [int(lengths.min()), int(lengths.max())] if len(lengths) else [0, 0]}


@contextmanager
def float32_backbone(model):
    """The backbone in float32 for the duration of the block; every tensor gets its dtype back after."""
    saved = []
    for module in model.backbone.modules():
        for table in (module._parameters, module._buffers):
            for t in table.values():
                if t is not None and t.is_floating_point() and t.dtype != torch.float32:
                    saved.append((t, t.dtype))
                    t.data = t.data.float()
    try:
        yield model
    finally:
        for t, dtype in saved:
            t.data = t.data.to(dtype)


def reference(model, histories: Histories, batch_size: int, k: int, mask_history: bool, index: str) -> dict:
    """The reference outputs: transformers in float32 (call before the backend wraps the model)."""
    with float32_backbone(model):
        model.invalidate_index()
        try:
            return outputs(model, histories, batch_size, k, mask_history, index)
        finally:
            model.invalidate_index()


def agreement(got: np.ndarray, ref: np.ndarray) -> dict:
    """Ordered top-10 identity (fraction of prompts) and mean top-50 set overlap of two (n, K) rankings."""
    k10, k50 = min(TOP_K[0], ref.shape[1]), min(TOP_K[1], ref.shape[1])
    identical = float(np.mean(np.all(got[:, :k10] == ref[:, :k10], axis=1))) if len(ref) else 1.0
    overlap = float(np.mean([len(np.intersect1d(g[:k50], r[:k50])) / k50 for g, r in zip(got, ref)])) \
        if len(ref) else 1.0
    return {"top10_identical": identical, "top50_overlap": overlap}


def compare(got: dict, ref: dict, backend: str, dtype: str, distill, injection: dict | None = None) -> dict:
    """The guard record; raises GuardError when a criterion fails. `distill`: the recipe's distill section
    (guard_tolerance, guard_top10_identical, guard_top50_overlap)."""
    tol = TOLERANCE.get(dtype, 2e-2) if distill.guard_tolerance is None else distill.guard_tolerance
    q, r = got["query_llm"].astype(np.float64), ref["query_llm"].astype(np.float64)
    abs_diff = np.abs(q - r).max(axis=1)
    rel = abs_diff / np.maximum(np.abs(r).max(axis=1), 1e-12)
    record = {"checked": True, "backend": backend, "dtype": dtype, "reference": "hf float32",
              "compared": "q_LLM (before the blend) and the cache's top-K", "sample": int(len(r)), "seed": SEED,
              "strata": STRATA, "padded": ref["padded"], "prompt_lengths": ref["lengths"], "tolerance": tol,
              "max_abs_diff": float(abs_diff.max(initial=0.0)), "max_rel_diff": float(rel.max(initial=0.0)),
              **agreement(got["topk_ids"], ref["topk_ids"]),
              "min_top10_identical": distill.guard_top10_identical, "min_top50_overlap": distill.guard_top50_overlap,
              "kernel_injection": injection or {"used": False, "why": "not recorded"}}
    failed = []
    if not np.isfinite(rel).all() or record["max_rel_diff"] > tol:
        failed.append(f"q_LLM {record['max_rel_diff']:.3g} (relative) away from the hf float32 reference, "
                      f"tolerance {tol:g}")
    if record["top10_identical"] < distill.guard_top10_identical:
        failed.append(f"ordered top-10 identical for {record['top10_identical']:.1%} of the prompts, "
                      f"at least {distill.guard_top10_identical:.0%} required")
    if record["top50_overlap"] < distill.guard_top50_overlap:
        failed.append(f"top-50 overlap {record['top50_overlap']:.4f}, at least {distill.guard_top50_overlap:g} "
                      "required")
    if failed:
        raise GuardError(f"teacher cache refused: backend {backend} ({dtype}) gives " + "; ".join(failed)
                         + f" (over {len(r)} sampled prompts); nothing was written (use --backend hf, "
                         "teacher.dtype float32, or relax distill.guard_tolerance / guard_top10_identical / "
                         "guard_top50_overlap)")
    return record


def unchecked(backend: str, dtype: str) -> dict:
    return {"checked": False, "backend": backend, "dtype": dtype, "reason": "the reference itself (hf, float32)"}


def validation_queries(staging: Path, n_shards: int, split: Split, dim: int) -> np.ndarray:
    """(n_users, D) the cache's query at each user's validation position (t = len - 2), from its shards."""
    want = split.sequences.lengths - 2
    q = np.full((split.n_users, dim), np.nan, np.float32)
    for i in range(n_shards):
        t = memmap_tensors(staging / shard_name(i))
        users = np.asarray(t["user"])
        sel = np.asarray(t["position"]) == want[users]
        q[users[sel]] = t["query"][sel]
    return q


def check_validation(staging: Path, n_shards: int, split: Split, items: np.ndarray, recipe,
                     recorded: float | None, source: str) -> dict:
    """Re-score the cache's validation rows with the harness; refuse the cache (removing its shards) when
    their NDCG@10 is more than VALID_NDCG_TOLERANCE from `recorded`, what `source` recorded on validation."""
    if recorded is None:
        return {"checked": False, "reason": "no recorded validation NDCG@10 to compare with"}
    ev = recipe.eval
    q = validation_queries(staging, n_shards, split, items.shape[1])
    ndcg = evaluate(split, q, items, "valid", ev.ks, ev.mask_history, index=ev.index).metrics["NDCG@10"]
    record = {"checked": True, "valid_NDCG@10": ndcg, "recorded": recorded, "source": source,
              "tolerance": VALID_NDCG_TOLERANCE}
    if not abs(ndcg - recorded) <= VALID_NDCG_TOLERANCE:
        shutil.rmtree(staging, ignore_errors=True)
        raise GuardError(f"teacher cache refused: its validation rows give NDCG@10 {ndcg:.4f}, {source} recorded "
                         f"{recorded:.4f} (tolerance {VALID_NDCG_TOLERANCE:g}); nothing was written")
    return record
