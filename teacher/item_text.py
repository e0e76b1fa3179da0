"""The teacher's text item side (`teacher.item_side: text | both`): each item's vector from its text alone.

    item text ──tokenize──> frozen backbone (adapters off; depth: the query side's cut or the whole model)
              ──mean over the text's tokens──> state (H) ──standardise over the catalogue──> s_i (H)
    v_i = TextHead(s_i) = g * normalise(W s_i)                   (D)    trained with the teacher

W starts at the catalogue states' top-D principal directions, so before any training v_i . v_j is g^2 times
the cosine of two texts in that subspace: texts that share words ("Vorlan Drift", "Vorlan Drift 2") already
score high. With teacher.text_query the query adds the last history item's own v (the same head, tied, as an
HLLM item tower feeds its user tower), so the first-order "an item like the last one" needs no training.

The states are computed once per (backbone, depth, texts, token budget) and kept under
$ANYO_CACHE/item_states/HASH.safetensors, HASH being of exactly those inputs, so every stage of a run
(training, loading for inference, the report) and every later run reads the same tensor. An item that
never occurs in training gets a vector as good as its text: v_i depends on nothing else.

The item vector the retriever searches is [CF row ; v_i] (N+1, 2D). The CF query scores the first part
only and the LLM query the second (`text`) or both (`both`), so the blend at w = 1 stays the CF retriever
exactly. `item_parts` names the column ranges, recorded in the teacher cache so distillation can read the
text part (student/embedding_distillation.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from distill.artifacts import atomic_file
from teacher.backbone import cache_root, load_backbone

STATES_FORMAT = 1


def item_parts(item_side: str, d_cf: int) -> dict[str, list[int]]:
    """Column ranges [start, stop) of the teacher's item vectors: {"cf": ...} and, with text, {"text": ...}."""
    return {"cf": [0, d_cf]} if item_side == "cf" else {"cf": [0, d_cf], "text": [d_cf, 2 * d_cf]}


@torch.no_grad()
def mean_states(backbone: nn.Module, tokenizer, texts: list[str], max_tokens: int, batch_size: int = 256
                ) -> torch.Tensor:
    """(N+1, H) float32: each text's mean last hidden state in `backbone` with its adapters off (0 for an item
    without text and for padding row 0)."""
    ids = [t[:max_tokens] for t in tokenizer([" " + t if t else "" for t in texts],
                                             add_special_tokens=False)["input_ids"]]
    out = torch.zeros(len(texts), backbone.config.hidden_size)
    order = [i for i in np.argsort([len(t) for t in ids], kind="stable").tolist() if i > 0 and ids[i]]
    off = backbone.disable_adapter() if hasattr(backbone, "disable_adapter") else contextlib.nullcontext()
    device = next(backbone.parameters()).device
    with off:
        for lo in range(0, len(order), batch_size):
            rows = order[lo:lo + batch_size]
            lens = np.asarray([len(ids[i]) for i in rows])
            mask = np.arange(lens.max()) < lens[:, None]                            # (B, T), right-padded
            x = np.zeros(mask.shape, dtype=np.int64)
            x[mask] = np.concatenate([ids[i] for i in rows])
            mask = torch.from_numpy(mask).long()
            h = backbone(input_ids=torch.from_numpy(x).to(device),
                         attention_mask=mask.to(device)).last_hidden_state.float().cpu()   # (B, T, H)
            out[rows] = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)         # (B, H)
    return out


def standardise(states: torch.Tensor) -> torch.Tensor:
    """(N+1, H) states with every dimension at mean 0, std 1 over the items that have text (rows of 0 stay 0):
    the mean state, shared by every text, would otherwise dominate every inner product."""
    has = states.abs().sum(1) > 0                                                    # (N+1,)
    if has.sum() < 2:
        return states
    mu, sd = states[has].mean(0), states[has].std(0).clamp(min=1e-6)                 # (H,)
    return torch.where(has[:, None], (states - mu) / sd, torch.zeros_like(states))


class TextHead(nn.Module):
    """(..., H) standardised text states -> (..., D) item vectors g * normalise(W s); a state of 0 (no text,
    padding) gives 0. `init=False` (a head about to be loaded from a checkpoint) skips the SVD of the states,
    O(N H^2): seconds for 10,000 items at H = 1,024."""

    def __init__(self, states: torch.Tensor, dim: int, gain: float = 3.0, init: bool = True):
        super().__init__()
        self.proj = nn.Linear(states.shape[1], dim, bias=False)                 # W (D, H)
        # the scores g^2 cos start within a softmax's working range (9 for identical texts): a random W made
        # the first scores huge, a W of 0 makes a tied query's gradient 0
        self.gain = nn.Parameter(torch.tensor(gain))
        if not init:
            return
        with torch.no_grad():
            has = states.abs().sum(1) > 0
            _, _, vt = torch.linalg.svd(states[has].double(), full_matrices=False)   # (r, H), r <= items
            self.proj.weight.zero_()
            r = min(dim, vt.shape[0])
            self.proj.weight[:r] = vt[:r].to(self.proj.weight.dtype)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.gain * F.normalize(self.proj(states.to(self.proj.weight.dtype)), dim=-1)


def states_key(source: Path, num_layers: int | None, dtype: str, texts: list[str], max_tokens: int) -> str:
    """The content hash of the states: the backbone's files (names, sizes; the dequantized GGUF folder is named
    by the GGUF's sha256), the depth, the dtype, the token budget and every text."""
    files = sorted((p.name, p.stat().st_size) for p in Path(source).iterdir() if p.is_file())
    head = json.dumps({"format": STATES_FORMAT, "source": str(Path(source).resolve()), "files": files,
                       "layers": num_layers, "dtype": dtype, "max_tokens": max_tokens}, sort_keys=True)
    h = hashlib.sha256(head.encode())
    h.update("\x1f".join(texts).encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:16]


def item_states(cfg, backbone: nn.Module, tokenizer, source: Path, texts: list[str]) -> torch.Tensor:
    """(N+1, H) standardised text states at the depth `teacher.item_depth` asks for, from the cache when there.

    `query`: the query side's backbone (its cut, adapters off); `full`: every layer of teacher.model, loaded
    for this once."""
    layers = cfg.num_layers if cfg.item_depth == "query" else None
    path = cache_root() / "item_states" / f"{states_key(source, layers, cfg.dtype, texts, cfg.max_text_tokens)}.safetensors"
    if path.is_file():
        return load_file(str(path))["states"]
    if cfg.item_depth == "query":
        raw = mean_states(backbone, tokenizer, texts, cfg.max_text_tokens)
    else:
        full, tok, _ = load_backbone(cfg.model, None, cfg.dtype)
        raw = mean_states(full.to(next(backbone.parameters()).device), tok, texts, cfg.max_text_tokens)
        del full
    states = standardise(raw).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        save_file({"states": states}, str(tmp))
    return states
