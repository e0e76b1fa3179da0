"""What int8 quantisation changes, measured before `anyo export --quantize int8` writes model.int8.onnx.

The run's evaluated test users (all of them) are ranked by the harness (`distill.harness.evaluate`, the run's
ranking protocol and index) twice: with user vectors from model.onnx and from model.int8.onnx, each encoded by
the serving path (`Recommender.encode`, in chunks of `ENCODE_CHUNK` users), against the same fp32 item table
(only the encoder is quantised). The record holds test NDCG@10 and HR@10 of both, the change, and the share of
each user's top-10 the two lists have in common.

Dynamic quantisation scales each activation tensor by its own range, the whole batch's, so an int8 user vector
depends a little on the histories it is encoded with (`anyo serve` micro-batches concurrent requests): the
record also holds, for the first `ALONE_USERS` test users, the largest relative difference between each one's
int8 vector encoded alone and in its chunk, and the share of their top-10 that stays the same.
"""

from __future__ import annotations

import numpy as np

from distill.data import Split
from distill.harness import evaluate
from distill.recommender import ENCODE_CHUNK, Recommender

QUALITY_METRICS = ("NDCG@10", "HR@10")
ALONE_USERS = 128  # test users also encoded one at a time with the int8 encoder


def _user_vectors(rec: Recommender, split: Split) -> np.ndarray:
    hist = split.history("test")
    return np.concatenate([rec.encode(hist.take(np.arange(lo, min(lo + ENCODE_CHUNK, len(hist))))).numpy()
                           for lo in range(0, len(hist), ENCODE_CHUNK)])


def top10_overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over users of |top-10 of a ∩ top-10 of b| / 10 (ids <= 0, the padding of a short list, not counted)."""
    shared = ((a[:, :, None] == b[:, None, :]) & (a > 0)[:, :, None]).any(axis=2).sum(axis=1)
    return float((shared / a.shape[1]).mean())


def int8_quality(model, split: Split, fp32: bytes, int8: bytes, mask_history: bool, index: str) -> dict:
    """Test NDCG@10 / HR@10 with model.onnx (`fp32`) and with model.int8.onnx (`int8`), and their change."""
    items = model.item_vectors().astype(np.float32)
    out = {"users": int(split.n_users), "stage": "test", "mask_history": bool(mask_history)}
    ranked = {}  # name -> (its recommender, the test users' vectors, their top-10)
    for name, runtime, onnx in (("fp32", "onnxruntime", fp32), ("int8", "onnxruntime-int8", int8)):
        rec = Recommender(model, item_vectors=items, runtime=runtime, onnx=onnx)
        users = _user_vectors(rec, split)
        result = evaluate(split, users, items, "test", ks=(10,), mask_history=mask_history, index=index)
        out[name] = {k: result.metrics[k] for k in QUALITY_METRICS}
        ranked[name] = (rec, users, result.topk[:, :10])
    out["change"] = {k: out["int8"][k] - out["fp32"][k] for k in QUALITY_METRICS}
    out["top10_overlap"] = top10_overlap(ranked["fp32"][2], ranked["int8"][2])
    out["alone"] = _alone_against_batched(*ranked["int8"], split, mask_history, index)
    return out


def _alone_against_batched(rec: Recommender, batched: np.ndarray, batched_top: np.ndarray, split: Split,
                           mask_history: bool, index: str) -> dict:
    """The first ALONE_USERS test users' int8 vectors encoded one at a time against `batched` (their chunk's)."""
    hist = split.history("test")
    n = min(ALONE_USERS, len(hist))
    alone = np.concatenate([rec.encode(hist.take(np.arange(u, u + 1))).numpy() for u in range(n)])
    # rank them as the harness does: every user's vector, these n replaced
    users = batched.copy()
    users[:n] = alone
    top = evaluate(split, users, rec.items.numpy(), "test", ks=(10,), mask_history=mask_history,
                   index=index).topk[:n, :10]
    scale = max(float(np.abs(batched[:n]).max()), 1e-12)
    return {"users": n, "relative_diff": float(np.abs(alone - batched[:n]).max()) / scale,
            "top10_overlap": top10_overlap(top, batched_top[:n])}
