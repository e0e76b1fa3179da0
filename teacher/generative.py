"""A LLaRA-style generative recommender next to the dense teacher (issue 14).

    prompt tokens ──embed──┐
    CF item emb ─in_proj───┴─> [HistoryEmb] / [CansEmb] slots ─> causal LM (+ LoRA / MoE-LoRA) ─> title + EOS

It shares with the dense teacher (teacher/model.py) the backbone loader (the same GGUF or HF folder and
layer cut, loaded with its LM head: `load_backbone(with_head=True)`; SmolLM2 ties the head to the input
embeddings) and, through `SlotModel` (teacher/slots.py), the frozen CF model (the student-alone SASRec), the
in-projector of CF item embeddings, the peft adapter (`attach_adapter`, the `teacher` section's adapter
settings) and the MoE-LoRA gate (`ExpertGate`, driven by the CF model's `encode_users`). Titles and the
matching of answers are in teacher/titles.py, saving and loading in teacher/checkpoint.py.

Prompt (LLaRA's, with the items written as `title [Slot]`):

    <bos> {instruction} title [HistoryEmb] ... {candidates_text} title [CansEmb] x 20 {answer_prefix} title <eos>

The 20 candidates are the split's own (the target + its 19 seeded negatives, `Split.negatives[stage]`), in an
order shuffled per user by `numpy.random.default_rng([llara.shuffle_seed, stage, user])`, so every run and every
batch composition shows a user the same order. Training examples (history prefix -> next item) draw 19 fresh
distinct uniform negatives outside the user's whole sequence (distill.data.sample_unseen, the sampler of the
split's own negatives) and a fresh target position from the epoch's generator.

Loss: cross-entropy of the LM on the answer tokens only (the title + EOS); every other position is -100. The
head is applied only at those positions (the LM head over the vocabulary is the costliest layer per token).

Inference: greedy `generate()` on inputs_embeds with left padding, `max_new_tokens` = the batch's longest
candidate title in tokens + 1 (EOS) + `llara.max_new_tokens_margin`. An answer is judged by teacher/titles.py's
rule (exactly one candidate title named: valid; that one the target: correct).
HR@1 = correct / all users; ValidRatio = valid / all users; HR@1_valid = correct / valid (the figure LLaRA's code
reports as HR@1).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from distill.config import LlaraConfig, TeacherConfig
from distill.data import Split, sample_unseen
from distill.histories import Histories
from distill.errors import ConfigError
from student.model import SASRec
from teacher.backbone import load_backbone
from teacher.prompt import HISTORY_TOKEN, pad_token_id
from teacher.slots import SlotModel, attach_adapter, moe_gate
from teacher.titles import judge, normalise, unique_titles

CANS_TOKEN = "[CansEmb]"
IGNORE = -100
STAGE_CODE = {"train": 0, "valid": 1, "test": 2}


# ---------------------------------------------------------------- candidates

def candidate_sets(split: Split, stage: str, users: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 20) the split's candidates of `users` in prompt order and (n,) the target's position in them."""
    users = np.asarray(users)
    cands = np.concatenate([split.targets(stage)[users, None], split.negatives[stage][users]], axis=1)
    order = np.stack([np.random.default_rng([seed, STAGE_CODE[stage], int(u)]).permutation(cands.shape[1])
                      for u in users]) if len(users) else np.empty((0, cands.shape[1]), dtype=np.int64)
    shuffled = np.take_along_axis(cands, order, axis=1)
    return shuffled, np.argmax(order == 0, axis=1)


def training_candidates(split: Split, users: np.ndarray, targets: np.ndarray, rng: np.random.Generator,
                        size: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, size) target + size-1 distinct uniform negatives outside each user's whole sequence, the target at a
    uniform position; and that position. A user whose sequence leaves fewer than size-1 unseen items draws
    from every item except the target. Drawn for all rows at once (a user may fill several rows)."""
    n, stride = len(users), split.n_items + 1
    pos = rng.integers(0, size, size=n)
    if n == 0:
        return np.empty((0, size), dtype=np.int64), pos
    seqs = split.sequences.take(users)
    seen = np.unique(seqs.row_ids().astype(np.int64) * stride + seqs.flat)   # sorted distinct (row, item) keys
    dense = split.n_items - np.bincount(seen // stride, minlength=n) < size - 1
    if dense.any():
        rows = np.flatnonzero(dense)
        seen = np.union1d(seen[~dense[seen // stride]], rows * stride + np.asarray(targets)[rows])
    negatives = sample_unseen(seen, n, split.n_items, size - 1, rng)        # (n, size-1)
    out = np.empty((n, size), dtype=np.int64)
    at_target = np.arange(size) == pos[:, None]                              # (n, size), one True per row
    out[at_target] = targets
    out[~at_target] = negatives.ravel()                                      # the negatives keep their order
    return out, pos


# ---------------------------------------------------------------- prompts

@dataclass
class GenBatch:
    input_ids: torch.Tensor       # (B, T)
    attention_mask: torch.Tensor  # (B, T) 1 = real token (left padded)
    slot_items: torch.Tensor      # (B, T) item id at [HistoryEmb] / [CansEmb] positions, 0 elsewhere
    labels: torch.Tensor          # (B, T) the answer's token ids (title + EOS), -100 elsewhere

    def to(self, device) -> "GenBatch":
        return GenBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.slot_items, self.labels)))


class LlaraPrompts:
    """Builds LLaRA prompts from pieces tokenized once (instruction, texts, one piece per item)."""

    def __init__(self, tokenizer, titles: list[str], cfg: LlaraConfig):
        tokenizer.add_special_tokens({"additional_special_tokens": [HISTORY_TOKEN, CANS_TOKEN]})
        self.tokenizer = tokenizer
        self.history_id = tokenizer.convert_tokens_to_ids(HISTORY_TOKEN)
        self.cans_id = tokenizer.convert_tokens_to_ids(CANS_TOKEN)
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ConfigError("teacher.model: its tokenizer has no EOS token, which ends the generated answer")
        self.pad_id = pad_token_id(tokenizer)
        encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.prefix = np.asarray(bos + encode(cfg.instruction), dtype=np.int64)
        self.middle = np.asarray(encode(cfg.candidates_text), dtype=np.int64)
        self.answer_prefix = np.asarray(encode(cfg.answer_prefix), dtype=np.int64)
        title_ids, self.titles = unique_titles(tokenizer, titles, cfg.max_title_tokens)
        self.title_tokens = [np.asarray(x, dtype=np.int64) for x in title_ids]
        self.title_lengths = np.asarray([len(x) for x in title_ids])
        self.max_history = cfg.max_history
        self.num_candidates = cfg.num_candidates

    def _row(self, history: np.ndarray, cands: np.ndarray, target: int | None):
        history = np.asarray(history)[-self.max_history:]
        pieces, slots = [self.prefix], [np.zeros(len(self.prefix), np.int64)]
        for items, slot_id, text in ((history, self.history_id, self.middle), (cands, self.cans_id, self.answer_prefix)):
            for i in items.tolist():
                pieces.append(np.append(self.title_tokens[i], slot_id))
                slots.append(np.append(np.zeros(len(self.title_tokens[i]), np.int64), i))
            pieces.append(text)
            slots.append(np.zeros(len(text), np.int64))
        ids, slot = np.concatenate(pieces), np.concatenate(slots)
        labels = np.full(len(ids), IGNORE, dtype=np.int64)
        if target is not None:
            answer = np.append(self.title_tokens[target], self.eos_id)
            ids = np.concatenate([ids, answer])
            slot = np.concatenate([slot, np.zeros(len(answer), np.int64)])
            labels = np.concatenate([labels, answer])
        return ids, slot, labels

    def __call__(self, histories: list[np.ndarray], candidates: np.ndarray,
                 targets: np.ndarray | None = None) -> GenBatch:
        """Left-padded prompts; with `targets` (item ids) the answer `title <eos>` is appended and labelled."""
        rows = [self._row(h, np.asarray(c), None if targets is None else int(targets[b]))
                for b, (h, c) in enumerate(zip(histories, candidates))]
        T, B = max(len(r[0]) for r in rows), len(rows)
        ids = np.full((B, T), self.pad_id, dtype=np.int64)
        mask, slot = np.zeros((B, T), dtype=np.int64), np.zeros((B, T), dtype=np.int64)
        labels = np.full((B, T), IGNORE, dtype=np.int64)
        for b, (r, s, lab) in enumerate(rows):
            ids[b, T - len(r):], mask[b, T - len(r):], slot[b, T - len(r):], labels[b, T - len(r):] = r, 1, s, lab
        return GenBatch(*(torch.from_numpy(a) for a in (ids, mask, slot, labels)))

    def lengths(self, histories: list[np.ndarray], candidates: np.ndarray) -> np.ndarray:
        """Prompt length in tokens (without the answer) of each row."""
        fixed = len(self.prefix) + len(self.middle) + len(self.answer_prefix)
        return np.asarray([fixed + (self.title_lengths[np.asarray(h, dtype=np.int64)[-self.max_history:]] + 1).sum()
                           + (self.title_lengths[np.asarray(c)] + 1).sum() for h, c in zip(histories, candidates)])

    def longest(self, margin: int) -> int:
        """An upper bound on a sequence's length: the longest items in every slot, the answer and the margin."""
        sizes = np.sort(self.title_lengths[1:] + 1)
        return int(len(self.prefix) + len(self.middle) + len(self.answer_prefix)
                   + sizes[-self.max_history:].sum() + sizes[-self.num_candidates:].sum() + sizes[-1] + margin)


# ---------------------------------------------------------------- the model

class GenerativeRecommender(SlotModel):
    def __init__(self, lm: nn.Module, tokenizer, cf: SASRec, titles: list[str], cfg: LlaraConfig,
                 adapter_cfg: TeacherConfig):
        base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
        super().__init__(lm, cf, base.config.hidden_size)   # backbone: the peft-wrapped causal LM; frozen cf
        self.cfg, self.adapter_cfg = cfg, adapter_cfg
        self.prompts = LlaraPrompts(tokenizer, titles, cfg)
        self.gate = moe_gate(lm, cf.cfg.hidden_size, adapter_cfg)
        longest = self.prompts.longest(cfg.max_new_tokens_margin + 1)
        context = getattr(base.config, "max_position_embeddings", None)
        if context is not None and longest > context:
            raise ConfigError(f"llara.max_history: the longest prompt with its answer takes {longest} tokens, more than "
                              f"the backbone's context of {context}; lower llara.max_history or llara.max_title_tokens")

    @property
    def lm(self) -> nn.Module:
        """The causal LM itself (LoRA layers injected in place)."""
        return self.backbone.get_base_model() if hasattr(self.backbone, "get_base_model") else self.backbone

    def input_embeddings(self, batch: GenBatch) -> torch.Tensor:
        """(B, T, H): token embeddings, CF-projected items at [HistoryEmb] and [CansEmb] slots."""
        return self.slot_embeddings(self.lm.get_input_embeddings(), batch.input_ids, batch.slot_items,
                                    self.prompts.pad_id)

    def gate_input(self, cf_histories: torch.Tensor | None) -> torch.Tensor | None:
        """(B, D) CF representations of (B, max_len) histories for the gate; None without a gate (not computed)."""
        if self.gate is None or cf_histories is None:
            return None
        with torch.no_grad():
            return self.cf.encode_users(cf_histories.to(self.device))

    def _set_gate(self, cf_histories: torch.Tensor | None) -> None:
        self.set_gate(self.gate_input(cf_histories))

    def cf_histories(self, histories: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(Histories.from_rows(histories).padded(self.cf.cfg.max_len))

    def loss(self, batch: GenBatch, cf_histories: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Mean cross-entropy over the answer tokens of the batch, and how many there were."""
        batch = batch.to(self.device)
        x = self.input_embeddings(batch)
        position_ids = (batch.attention_mask.cumsum(1) - 1).clamp(min=0)
        with self.gated(self.gate_input(cf_histories)):
            h = self.lm.get_decoder()(inputs_embeds=x, attention_mask=batch.attention_mask,
                                      position_ids=position_ids).last_hidden_state          # (B, T, H)
        target = batch.labels[:, 1:]
        keep = target != IGNORE                                       # position t predicts token t + 1
        logits = self.lm.get_output_embeddings()(h[:, :-1][keep]).float()
        return F.cross_entropy(logits, target[keep]), int(keep.sum())

    @torch.inference_mode()
    def generate_ids(self, batch: GenBatch, cf_histories: torch.Tensor, max_new_tokens: int,
                     logits_processor=None) -> list[list[int]]:
        """Greedy answers (token ids, EOS and what follows removed) of left-padded prompts."""
        from transformers import LogitsProcessorList
        batch = batch.to(self.device)
        x = self.input_embeddings(batch)
        with self.gated(self.gate_input(cf_histories)):
            out = self.lm.generate(inputs_embeds=x, attention_mask=batch.attention_mask, do_sample=False,
                                   num_beams=1, max_new_tokens=max_new_tokens, pad_token_id=self.prompts.pad_id,
                                   eos_token_id=self.prompts.eos_id,
                                   logits_processor=LogitsProcessorList(logits_processor or []))
        answers = []
        for row in out.tolist():
            cut = row.index(self.prompts.eos_id) if self.prompts.eos_id in row else len(row)
            answers.append(row[:cut])
        return answers

    def recommend(self, histories: list[np.ndarray], candidates: np.ndarray,
                  logits_processor=None) -> list[str]:
        """Generated answers (decoded text) for histories and their (B, 20) candidates in prompt order."""
        batch = self.prompts(histories, candidates)
        longest = int(self.prompts.title_lengths[np.asarray(candidates)].max())
        ids = self.generate_ids(batch, self.cf_histories(histories),
                                longest + 1 + self.cfg.max_new_tokens_margin, logits_processor)
        return self.prompts.tokenizer.batch_decode(ids, skip_special_tokens=True)

    # heads_state() (SlotModel): everything trained outside peft: the in-projector and the gate


@dataclass
class GenerativeScores:
    metrics: dict            # HR@1, ValidRatio, HR@1_valid, users
    outputs: list[str]       # decoded answer of each scored user
    named: np.ndarray        # (n,) the candidate item each output names, -1 when invalid
    users: np.ndarray        # (n,) user rows scored


@torch.inference_mode()
def score_candidates(model: GenerativeRecommender, split: Split, stage: str, batch_size: int,
                     users: np.ndarray | None = None, logits_processor_for=None, desc: str | None = None
                     ) -> GenerativeScores:
    """Generate an answer for each user's 20 candidates and judge it; batches grouped by prompt length.

    logits_processor_for(users, candidates, target_positions) -> processors (tests force outputs with it)."""
    from tqdm.auto import tqdm
    model.eval()
    users = np.arange(split.n_users) if users is None else np.asarray(users)
    hist = split.history(stage)
    histories = [hist.row(int(u)) for u in users]
    cands, target_pos = candidate_sets(split, stage, users, model.cfg.shuffle_seed)
    order = np.argsort(model.prompts.lengths(histories, cands), kind="stable")
    outputs: list[str] = [""] * len(users)
    for lo in tqdm(range(0, len(order), batch_size), desc=desc, disable=desc is None, leave=False):
        rows = order[lo:lo + batch_size]
        procs = logits_processor_for(users[rows], cands[rows], target_pos[rows]) if logits_processor_for else None
        for r, text in zip(rows, model.recommend([histories[i] for i in rows], cands[rows], procs)):
            outputs[r] = text
    titles = model.prompts.titles
    valid = correct = 0
    named = np.full(len(users), -1, dtype=np.int64)
    for r, text in enumerate(outputs):
        ok, hit, which = judge(normalise(text), [titles[i] for i in cands[r]], int(target_pos[r]))
        valid += ok
        correct += hit
        if ok:
            named[r] = cands[r, which]
    n = max(len(users), 1)
    metrics = {"HR@1": correct / n, "ValidRatio": valid / n, "HR@1_valid": correct / valid if valid else 0.0,
               "users": int(len(users))}
    return GenerativeScores(metrics, outputs, named, users)


# ---------------------------------------------------------------- build

def build_generative(cfg: LlaraConfig, adapter_cfg: TeacherConfig, cf: SASRec, titles: list[str],
                     adapter_dir: Path | None = None, trainable: bool = True) -> GenerativeRecommender:
    """A fresh generative recommender (new LoRA) or one whose peft adapter is read from `adapter_dir`."""
    lm, tokenizer, _ = load_backbone(adapter_cfg.model, adapter_cfg.num_layers, adapter_cfg.dtype, with_head=True)
    lm = attach_adapter(lm, adapter_cfg, adapter_dir, trainable)
    model = GenerativeRecommender(lm, tokenizer, cf, titles, cfg, adapter_cfg)
    return model.to("cuda") if torch.cuda.is_available() else model
