"""SASRec with pre-LN causal self-attention, in one file.

Items are ids 1..N (0 = padding). Sequences are left-padded. Positions are
counted from the most recent item backwards (the last item has position 0), so
the encoded vector does not depend on how much padding precedes a history.
The output item table is the input item embedding (tied).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from distill.artifacts import atomic_dir, check_finite, read_record
from distill.histories import Histories
from distill.errors import CorruptError, StaleError


@dataclass
class SASRecConfig:
    n_items: int          # N; the item table has N+1 rows
    max_len: int          # longest history read
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    dropout: float = 0.2


class SelfAttention(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.n_head = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """(B, T, d) -> (B, T, d), or (B, 1, d) for the last position only (keys still span all T)."""
        B, T, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        if last_only:
            q, mask = q[:, -1:], mask[..., -1:, :]
        q, k, v = (t.view(B, -1, self.n_head, d // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, h, T, d/h)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, -1, d))


class Block(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        d = cfg.hidden_size
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = SelfAttention(cfg)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(cfg.dropout))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        y = self.drop(self.attn(self.ln1(x), mask, last_only))
        x = (x[:, -1:] if last_only else x) + y
        return x + self.mlp(self.ln2(x))


class SASRec(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.item_emb = nn.Embedding(cfg.n_items + 1, d, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(d)
        self.item_prior: nn.Module | None = None  # item_emb (N+1, d) -> item table while distilling, then folded
        nn.init.normal_(self.item_emb.weight, std=d ** -0.5)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, seq: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """seq (B, T) left-padded item ids, T <= max_len -> hidden states (B, T, d).

        last_only: (B, 1, d), the last position alone; the final block then computes nothing
        for earlier positions (serving needs only the user vector)."""
        B, T = seq.shape
        valid = seq > 0                                                   # (B, T)
        pos = (valid.long().flip(1).cumsum(1).flip(1) - 1).clamp(min=0)   # 0 = most recent item
        x = F.embedding(seq, self.item_table, padding_idx=0) * self.cfg.hidden_size ** 0.5 + self.pos_emb(pos)
        x = self.drop(x) * valid.unsqueeze(-1)
        idx = torch.arange(T, device=seq.device)
        causal, eye = idx[None, :] <= idx[:, None], idx[None, :] == idx[:, None]   # (T, T); exportable to ONNX
        # a query sees earlier real items; itself always, so all-padding rows stay finite
        mask = (causal & valid[:, None, :]) | eye                         # (B, T, T)
        mask = mask.unsqueeze(1)                                          # (B, 1, T, T)
        for i, block in enumerate(self.blocks):
            if last_only and i == len(self.blocks) - 1:
                x = block(x, mask, last_only=True) * valid[:, -1:, None]    # (B, 1, d)
            else:
                x = block(x, mask) * valid.unsqueeze(-1)
        return self.ln_f(x)

    def encode_users(self, histories: torch.Tensor) -> torch.Tensor:
        """(B, T) left-padded histories -> (B, d) user vectors (the last position)."""
        return self.forward(histories[:, -self.cfg.max_len:], last_only=True)[:, -1]

    @property
    def item_table(self) -> torch.Tensor:
        """(N+1, d) input and output item table (trainable); row 0 is padding."""
        w = self.item_emb.weight
        return w if self.item_prior is None else self.item_prior(w)

    @torch.no_grad()
    def fold_item_prior(self) -> None:
        """Write item_prior(item_emb) into item_emb and drop the prior: the same model, plain SASRec."""
        if self.item_prior is not None:
            self.item_emb.weight.copy_(self.item_table)
            self.item_prior = None

    # ------------------------------------------------ the retriever protocol (distill.runs)
    @torch.inference_mode()
    def encode(self, histories: Histories, batch_size: int = 1024) -> np.ndarray:
        """(n, d) float32 user vectors from the last max_len items of each history."""
        padded = torch.from_numpy(histories.padded(self.cfg.max_len))
        return torch.cat([self.encode_users(padded[i:i + batch_size])
                          for i in range(0, len(padded), batch_size)]).numpy()

    def item_vectors(self) -> np.ndarray:
        """(N+1, d) float32 item table; row 0 is padding."""
        return self.item_table.detach().numpy()

    def encoder_flops(self, width) -> np.ndarray:
        """Multiply-adds x 2 to encode a history `width` long (array-like). Every block but the last runs
        all positions; the last computes q, k, v for all positions (keys and values span the history) but
        attention, projection and MLP for the last one only (forward(last_only=True)). LayerNorm, GELU
        and softmax are not counted."""
        d, L, t = self.cfg.hidden_size, self.cfg.num_layers, np.asarray(width, np.float64)
        full = 24 * d * d * t + 4 * t * t * d          # qkv 6d^2 + proj 2d^2 + MLP 16d^2 per position; QK^T, AV
        last = 6 * d * d * t + 4 * t * d + 18 * d * d  # qkv for all positions; one query's attention, proj, MLP
        return (L - 1) * full + last

    def flops_per_user(self, histories: Histories) -> np.ndarray:
        """(n,) FLOPs to encode each history and score it against the whole catalogue."""
        width = np.minimum(histories.lengths, self.cfg.max_len)
        return self.encoder_flops(width) + 2 * self.cfg.hidden_size * (self.cfg.n_items + 1)


def save_student(model: SASRec, folder: Path, meta: dict) -> None:
    """Checkpoint = model.safetensors + config.json (+ metadata such as the split hash)."""
    with atomic_dir(folder) as tmp:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps({"model": asdict(model.cfg), **meta}, indent=2, sort_keys=True))


def load_student(folder: Path, split_hash: str | None = None, n_items: int | None = None) -> tuple[SASRec, dict]:
    folder = Path(folder)
    meta = read_record(folder / "config.json", "model")
    if split_hash is not None and meta.get("split_hash") != split_hash:
        raise StaleError(f"{folder / 'config.json'}: checkpoint built from split {meta.get('split_hash')}, "
                            f"this run's split is {split_hash}")
    try:
        cfg = SASRecConfig(**meta["model"])
    except TypeError as e:
        raise CorruptError(f"{folder / 'config.json'}: not a student model record ({e})") from None
    if n_items is not None and cfg.n_items != n_items:
        raise StaleError(f"{folder / 'config.json'}: checkpoint has {cfg.n_items} items, the split has {n_items}")
    model = SASRec(cfg)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise CorruptError(f"{weights}: not found")
    try:
        tensors = load_file(str(weights))
        model.load_state_dict(tensors)
    except Exception as e:  # safetensors raises several types for truncated or foreign files
        raise CorruptError(f"{weights}: cannot load ({str(e).splitlines()[0]})") from None
    check_finite(weights, tensors)
    model.eval()
    return model, meta
