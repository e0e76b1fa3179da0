"""The hybrid prompt: instruction, `title [HistoryEmb]` per history item, query text (none with
teacher.examples per_slot, which pools at the last [HistoryEmb] slot).

Each piece is tokenized once (per item for titles), so building a batch is only
concatenation. The [HistoryEmb] positions carry the item id; the model replaces
their input embeddings by `in_projector(cf_item_embedding[item])`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from distill.config import TeacherConfig
from distill.errors import ConfigError

HISTORY_TOKEN = "[HistoryEmb]"


def pad_token_id(tokenizer) -> int:
    """The id prompts are padded with, one rule for the dense teacher and the generative baseline: the
    tokenizer's pad token, else its EOS (what transformers' generate() pads finished rows with), else 0.
    Padding sits only at attention-masked positions (and under the slots, whose embeddings are replaced),
    so the choice does not change a dense query; generate() is told the same id."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    eos = getattr(tokenizer, "eos_token_id", None)
    return eos if eos is not None else 0


@dataclass
class PromptBatch:
    input_ids: torch.Tensor       # (B, T)
    attention_mask: torch.Tensor  # (B, T) 1 = real token
    history_items: torch.Tensor   # (B, T) item id at [HistoryEmb] positions, 0 elsewhere
    last_index: torch.Tensor      # (B,) position of the pooled (final query) token

    def to(self, device) -> "PromptBatch":
        return PromptBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.history_items,
                                                    self.last_index)))


class PromptBuilder:
    def __init__(self, tokenizer, titles: list[str], cfg: TeacherConfig):
        tokenizer.add_special_tokens({"additional_special_tokens": [HISTORY_TOKEN]})
        self.history_id = tokenizer.convert_tokens_to_ids(HISTORY_TOKEN)
        self.pad_id = pad_token_id(tokenizer)
        encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.prefix = np.asarray(bos + encode(cfg.instruction), dtype=np.int64)
        # per_slot pools at the slots themselves, so that one causal pass gives the query of every prefix
        per_slot = cfg.examples == "per_slot"
        self.suffix = np.asarray([] if per_slot else encode(cfg.query_text), dtype=np.int64)
        if len(self.suffix) == 0 and not per_slot:
            raise ConfigError(f"teacher.query_text: {cfg.query_text!r} gives no tokens with this tokenizer "
                              "(its last token is pooled)")
        titles = [(" " + t) if (cfg.use_titles and t) else "" for t in titles]
        title_ids = tokenizer(titles, add_special_tokens=False)["input_ids"] if any(titles) else [[] for _ in titles]
        # per item: its title tokens then the [HistoryEmb] token
        self.item_tokens = [np.asarray(ids[: cfg.max_title_tokens] + [self.history_id], dtype=np.int64)
                            for ids in title_ids]
        self.max_history = cfg.max_history

    def __call__(self, histories: list[np.ndarray], padding_side: str = "left") -> PromptBatch:
        """One prompt per history (item ids, oldest first); only the last `max_history` items are used."""
        rows, items = [], []
        for h in histories:
            h = np.asarray(h)[-self.max_history:]
            pieces = [self.item_tokens[i] for i in h]
            ids = np.concatenate([self.prefix, *pieces, self.suffix])
            it = np.zeros(len(ids), dtype=np.int64)
            ends = len(self.prefix) + np.cumsum([len(p) for p in pieces]) - 1 if len(pieces) else np.empty(0, int)
            it[ends] = h
            rows.append(ids)
            items.append(it)
        T = max(len(r) for r in rows)
        B = len(rows)
        input_ids = np.full((B, T), self.pad_id, dtype=np.int64)
        mask = np.zeros((B, T), dtype=np.int64)
        hist = np.zeros((B, T), dtype=np.int64)
        last = np.empty(B, dtype=np.int64)
        for b, (r, it) in enumerate(zip(rows, items)):
            s = slice(T - len(r), T) if padding_side == "left" else slice(0, len(r))
            input_ids[b, s], mask[b, s], hist[b, s] = r, 1, it
            last[b] = T - 1 if padding_side == "left" else len(r) - 1
        return PromptBatch(*(torch.from_numpy(a) for a in (input_ids, mask, hist, last)))

    def lengths(self, histories: list[np.ndarray]) -> np.ndarray:
        """Prompt length in tokens of each history (for length-bucketed batching)."""
        sizes = np.asarray([len(t) for t in self.item_tokens])
        return np.asarray([len(self.prefix) + len(self.suffix) + sizes[np.asarray(h)[-self.max_history:]].sum()
                           for h in histories])

    def longest(self) -> int:
        """An upper bound on any prompt's length: the max_history longest items."""
        sizes = np.sort([len(t) for t in self.item_tokens])
        return len(self.prefix) + len(self.suffix) + int(sizes[-self.max_history:].sum())
