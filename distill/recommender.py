"""The one serving path: batch-encode histories with the SASRec, score, mask, top-K.

Used by `anyo recommend`, `anyo serve`, `anyo bench` (each student's serving cost) and the serving
benchmarks. It returns what the evaluation harness (`distill/harness.py`) returns for the same user vectors:

* the exclusions are `distill.search.ranking_exclusions`, the harness's own: padding (item 0) and, by
  default, every item of the history are never returned;
* items ordered by score, ties broken by the lower item id;
* when fewer than k items remain the tail is id -1, score -inf.

The encoder runs on ONNX Runtime (`model.onnx`, written by `anyo export`), on ONNX Runtime with int8 weights
(`model.int8.onnx`, `anyo export --quantize int8`: the same graph through `quantize_dynamic`, so its vectors and
ranks differ from the evaluated ones by what the export measured) or on torch (`RUNTIMES`); fp32 ONNX Runtime is
the default when it is installed (the `onnx` extra): it was the faster at every batch size measured
(`benchmarks/serving.md`). All use `torch.get_num_threads()` threads, so `anyo serve --threads` sets any.

Catalogues up to `TORCH_MAX_ITEMS` rows are scored exactly in torch: one matmul U @ items.T, the exclusions
written as one flat scatter of -inf (their keys are row * (N+1) + item, the flat index itself),
`torch.topk(k + 1)`; a row whose (k+1)-th score equals its k-th (a tie across the cut) is re-ranked with a
stable sort, so the tie-break is the harness's, not topk's arbitrary one. Larger catalogues go through the
harness's own `ItemIndex.search` (FAISS).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from distill.errors import AnyoError
from distill.histories import Histories
from distill.serve_config import RUNTIMES
from distill.search import ItemIndex, ranking_exclusions

TORCH_MAX_ITEMS = 200_000  # item-table rows up to which scores are a dense matmul in torch
ENCODE_CHUNK = 256         # users per torch encoder pass: a large batch is encoded in chunks whose activations
                           # stay in cache (on the 2-core sandbox 1,024 at once was about 1.7x slower)
ONNX_OPSET = 17            # the ONNX opset model.onnx is written with (recorded in the export's manifest)
ONNX_RUNTIMES = ("onnxruntime", "onnxruntime-int8")
# onnxruntime.quantization.quantize_dynamic's settings for model.int8.onnx (recorded in the export's manifest):
# int8 weights per tensor, 7-bit range so that CPUs without VNNI (AVX2's u8 x s8 multiply saturates) give the
# accuracy VNNI ones do (on the 2-core sandbox, AVX2, a 1-epoch ML-100K student's user vectors came within 4.6e-3
# of fp32's, relative, against 2.0e-2 without it)
INT8_OPTIONS = {"weight_type": "QInt8", "per_channel": False, "reduce_range": True}


def default_runtime() -> str:
    """ONNX Runtime when the `onnx` extra is installed (the faster, benchmarks/serving.md), else torch."""
    return "onnxruntime" if importlib.util.find_spec("onnxruntime") is not None else "torch"


class _UserEncoder(torch.nn.Module):
    """What model.onnx computes: left-padded int64 histories (B, T) -> (B, d) float32 user vectors."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        return self.model.encode_users(history)


def onnx_encoder(model) -> bytes:
    """The SASRec's encoder as an ONNX model (opset ONNX_OPSET), batch and history length dynamic."""
    example = torch.ones(2, min(3, int(model.cfg.max_len)), dtype=torch.int64)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(_UserEncoder(model).eval(), (example,), buf, input_names=["history"],
                          output_names=["user"], opset_version=ONNX_OPSET, dynamo=False,
                          dynamic_axes={"history": {0: "batch", 1: "length"}, "user": {0: "batch"}})
    return buf.getvalue()


def int8_encoder(onnx: bytes) -> bytes:
    """model.onnx's bytes with dynamic int8 quantisation (`INT8_OPTIONS`): the bytes of model.int8.onnx."""
    try:
        import onnx as onnx_lib  # the `onnx` extra, as for model.onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise AnyoError("int8 quantisation (--quantize int8, --runtime onnxruntime-int8): install the onnx extra "
                        "(pip install 'anyo-distill[onnx]': onnx and onnxruntime)") from None
    with tempfile.TemporaryDirectory(prefix="anyo-int8-") as tmp:
        out = Path(tmp) / "model.int8.onnx"
        options = dict(INT8_OPTIONS, weight_type=QuantType[INT8_OPTIONS["weight_type"]])
        with _root_logger_silenced():  # its advice to run shape pre-processing (6 s here, for no gain measured)
            quantize_dynamic(onnx_lib.load_from_string(onnx), out, **options)
        return out.read_bytes()


@contextlib.contextmanager
def _root_logger_silenced():
    """quantize_dynamic warns through `logging.warning`, which would also give the root logger a stderr handler
    for the rest of the process: a null handler keeps it from doing so, `disabled` drops the record."""
    root, null = logging.getLogger(), logging.NullHandler()
    root.addHandler(null)
    was, root.disabled = root.disabled, True
    try:
        yield
    finally:
        root.disabled = was
        root.removeHandler(null)


def onnx_session(onnx: bytes, threads: int):
    """An ONNX Runtime session over model bytes, `threads` intra-op threads, on the CPU."""
    try:
        import onnxruntime as ort  # the `onnx` extra: a serve-only install runs on torch
    except ImportError:
        raise AnyoError("--runtime onnxruntime: onnxruntime is not installed "
                        "(pip install 'anyo-distill[onnx]', or --runtime torch)") from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(onnx, opts, providers=["CPUExecutionProvider"])


class Recommender:
    """Top-K next items for histories of internal item ids (1..N) with one SASRec.

    runtime: `onnxruntime` / `onnxruntime-int8` (the encoder from `onnx`, the bytes of model.onnx /
    model.int8.onnx; built from the model when not given) or `torch`."""

    def __init__(self, model, item_vectors: np.ndarray | None = None, torch_max_items: int = TORCH_MAX_ITEMS,
                 index: ItemIndex | None = None, runtime: str | None = None, onnx: bytes | None = None):
        self.model = model.eval()
        self.max_len = int(model.cfg.max_len)
        self.runtime = default_runtime() if runtime is None else runtime
        if self.runtime not in RUNTIMES:
            raise AnyoError(f"--runtime {self.runtime!r}: expected one of {', '.join(RUNTIMES)}")
        self.session = None
        if self.runtime in ONNX_RUNTIMES:
            if onnx is None:
                onnx = onnx_encoder(model)
                onnx = int8_encoder(onnx) if self.runtime == "onnxruntime-int8" else onnx
            self.session = onnx_session(onnx, torch.get_num_threads())
        table = model.item_vectors() if item_vectors is None else item_vectors
        self.items = torch.from_numpy(np.ascontiguousarray(table, dtype=np.float32))   # (N+1, d)
        self.items_t = self.items.t().contiguous()           # (d, N+1): the matmul reads rows contiguously
        self.n_rows = self.items.shape[0]
        self.use_torch = self.n_rows <= torch_max_items
        self._index = index
        if not self.use_torch and self._index is None:
            self._index = ItemIndex(self.items.numpy())

    @property
    def n_items(self) -> int:
        return self.n_rows - 1

    # ------------------------------------------------------------ encoding

    def encode(self, histories: Histories) -> torch.Tensor:
        """(B, d) user vectors; each history left-padded to the batch's longest (at most max_len).

        Positions count back from the most recent item, so trimming common left padding
        does not change a user's vector."""
        width = max(1, min(self.max_len, int(histories.lengths.max()) if len(histories) else 1))
        padded = histories.padded(width)
        if self.session is not None:
            return torch.from_numpy(self.session.run(None, {"history": padded})[0])
        padded = torch.from_numpy(padded)
        with torch.inference_mode():
            if len(padded) <= ENCODE_CHUNK:
                return self.model.encode_users(padded)
            return torch.cat([self.model.encode_users(padded[i:i + ENCODE_CHUNK])
                              for i in range(0, len(padded), ENCODE_CHUNK)])

    # ------------------------------------------------------------ search

    def top_k(self, histories: Histories, k: int, exclude_seen: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(B, k) item ids and scores for a batch of histories (ids 1..N, oldest first); `exclude_seen` is
        the ranking protocol's mask_history (`distill.search.ranking_exclusions`)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if len(histories.flat) and (histories.flat.min() < 1 or histories.flat.max() >= self.n_rows):
            raise ValueError(f"item ids must be in 1..{self.n_items}")
        users = self.encode(histories)
        exclude = ranking_exclusions(histories, self.n_rows, exclude_seen)
        if not self.use_torch:
            return self._index.search(users.numpy(), k, exclude)
        with torch.inference_mode():
            return self._torch_top_k(users, exclude, k)

    def _torch_top_k(self, users: torch.Tensor, exclude, k: int):
        scores = users @ self.items_t                                       # (B, N+1)
        neg = float("-inf")
        scores[:, 0] = neg
        if exclude is not None and len(exclude.keys):
            # the keys are row * (N+1) + item: flat indices into scores (every history item, not only the
            # last max_len the encoder reads)
            scores.view(-1).index_fill_(0, torch.from_numpy(exclude.keys), neg)
        depth = min(k + 1, self.n_rows)
        vals, ids = torch.topk(scores, depth, dim=1, largest=True, sorted=True)
        if depth > k:
            # a tie across the cut: topk may have kept a higher id than an equal-scoring item left out
            cut = torch.nonzero(vals[:, k] == vals[:, k - 1]).flatten()
            vals, ids = vals[:, :k], ids[:, :k]
            if len(cut):
                vals, ids = vals.clone(), ids.clone()
                v, i = torch.sort(scores[cut], dim=1, descending=True, stable=True)
                vals[cut], ids[cut] = v[:, :k], i[:, :k]
        if bool((vals[:, 1:] == vals[:, :-1]).any()):
            # ties within the list: higher score first, then lower id (topk leaves the order of ties open)
            order = torch.argsort(ids, dim=1)
            ids, vals = ids.gather(1, order), vals.gather(1, order)
            order = torch.argsort(vals, dim=1, descending=True, stable=True)
            ids, vals = ids.gather(1, order), vals.gather(1, order)
        ids = ids.masked_fill(torch.isneginf(vals), -1)
        ids, vals = ids.numpy(), vals.numpy()
        if ids.shape[1] < k:  # catalogue smaller than k
            pad = k - ids.shape[1]
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
            vals = np.pad(vals, ((0, 0), (0, pad)), constant_values=-np.inf)
        return ids, vals
