"""The inference guard: a fast backend must give the reference's query vectors before it writes a cache.

The reference is the same teacher run by plain transformers (`hf`) in float32. Any other
setting (DeepSpeed, with or without kernel injection; a bfloat16/float16 backbone) is
checked on a fixed, seeded sample of the prompts the cache will hold: both ways are
scored and, if the largest relative difference of a query vector exceeds the tolerance
for the backbone's dtype, the cache is refused before a shard is written.

The relative difference of a prompt is max_j |q_j - r_j| / max_j |r_j| (q: the backend,
r: the reference); the guard records the largest over the sample, with the sample size
and the tolerance, in the cache manifest (`guard`).

The float32 reference of a bfloat16/float16 backbone is computed in place: the backbone's
tensors are cast to float32 and back (an exact round trip), so no second copy of the
model is held.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from distill.data import Split

from distill.histories import Histories
from distill.errors import AnyoError
from distill.positions import prefixes

SAMPLE = 64
SEED = 0
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 1e-2}
_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class GuardError(AnyoError):
    """A backend's query vectors differ from the reference's beyond the tolerance."""


def backbone_dtype(model) -> str:
    return _NAMES.get(next(model.backbone.parameters()).dtype, str(next(model.backbone.parameters()).dtype))


def needs_guard(backend: str, dtype: str) -> bool:
    """Everything but the reference (hf in float32) is checked."""
    return not (backend == "hf" and dtype == "float32")


def sample(split: Split, users: np.ndarray, positions: np.ndarray, n: int = SAMPLE, seed: int = SEED) -> Histories:
    """A fixed sample of `n` of the (user, position) prompts a cache holds (the same on every rank)."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(users), size=min(n, len(users)), replace=False))
    return prefixes(split, users[rows], positions[rows])


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


def reference(model, histories: Histories, batch_size: int) -> np.ndarray:
    """The reference query vectors: transformers in float32 (call before the backend wraps the model)."""
    with float32_backbone(model):
        return model.encode(histories, batch_size)


def compare(got: np.ndarray, ref: np.ndarray, backend: str, dtype: str, tolerance: float | None = None) -> dict:
    """The guard record; raises GuardError when the backend is off by more than the tolerance."""
    tol = TOLERANCE.get(dtype, 2e-2) if tolerance is None else tolerance
    abs_diff = np.abs(got.astype(np.float64) - ref.astype(np.float64)).max(axis=1)
    scale = np.maximum(np.abs(ref.astype(np.float64)).max(axis=1), 1e-12)
    rel = abs_diff / scale
    record = {"checked": True, "backend": backend, "dtype": dtype, "reference": "hf float32",
              "sample": int(len(ref)), "seed": SEED, "tolerance": tol,
              "max_abs_diff": float(abs_diff.max(initial=0.0)), "max_rel_diff": float(rel.max(initial=0.0))}
    if not np.isfinite(rel).all() or record["max_rel_diff"] > tol:
        raise GuardError(f"teacher cache refused: backend {backend} ({dtype}) gives query vectors "
                         f"{record['max_rel_diff']:.3g} (relative, max over {len(ref)} sampled prompts) away from "
                         f"the hf float32 reference, tolerance {tol:g}; nothing was written (use --backend hf, "
                         f"teacher.dtype float32, or raise distill.guard_tolerance)")
    return record


def unchecked(backend: str, dtype: str) -> dict:
    return {"checked": False, "backend": backend, "dtype": dtype, "reason": "the reference itself (hf, float32)"}
