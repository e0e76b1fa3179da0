"""The teacher: a headless LLM read as a dense retriever over the item catalogue.

    prompt tokens ──embed──┐
    CF item emb ─in_proj───┴─> [HistoryEmb] slots ─> decoder (+ LoRA / MoE-LoRA) ─> h_last
    h_last ─out_proj─> q_LLM (D)            (+ text_head(s_last item) with teacher.text_query)
    query q = (1 - w) q_LLM + w q_CF        score(item) = q . item_table[item] / temperature

With teacher.item_side text/both the item vectors are [item_table ; text_head(s)] (N+1, 2D), s the cached
text states (teacher/item_text.py); q_CF is 0 on the text part, q_LLM is 0 on the CF part with `text`.

The CF model is the student-alone SASRec (frozen): its item embeddings feed the
[HistoryEmb] slots and initialise the item table, its sequence representation
drives the MoE-LoRA gate and is the CF query q_CF.

With teacher.inject_layer k > 0 the CF items enter at layer k instead of the input: layers [0, k) read the
prompt's text alone (a pad token at each slot), frozen and without LoRA, and the projected items replace the
slot states entering layer k (teacher/decoder.py); per_slot training caches those lower states per window
(`LowerStates`), so a step runs L - k layers.

With teacher.examples per_slot the prompt has no query text and h_last is the state at the last
[HistoryEmb] slot; the gate is set per token, from the CF model's user vector of the history up to the
latest slot at or before that token (zero before the first slot), so one causal pass over a window
(`slot_queries`, training) gives at every slot exactly the query `query` gives for the window cut there.

The LLM retriever trains alone (w = 0); the blend weight w is chosen on validation afterwards (teacher.train).
Training the LLM as a correction on top of q_CF instead fails: on its own training
positions the CF model is already fitted, so the correction learns noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from distill.config import TeacherConfig
from distill.errors import ConfigError
from distill.histories import Histories, within
from distill.resources import require_memory
from distill.search import ItemIndex, ranking_exclusions
from student.model import SASRec
from teacher.backbone import load_backbone
from teacher.decoder import check_splittable, run_layers
from teacher.item_text import TextHead, item_parts, item_states
from teacher.prompt import PromptBatch, PromptBuilder
from teacher.slots import SlotModel, attach_adapter, moe_gate


def blend_queries(q_llm, q_cf, w):
    """(1 - w) q_LLM + w q_CF: a convex blend keeps the scores on the scale both were trained at. With a text
    item side, q_LLM is wider than q_CF (it also scores the items' text part): q_CF is 0 there, so at
    w = 1 the blend is the CF retriever exactly."""
    extra = q_llm.shape[-1] - q_cf.shape[-1]
    if extra:
        q_cf = F.pad(q_cf, (0, extra)) if torch.is_tensor(q_cf) else np.pad(q_cf, ((0, 0), (0, extra)))
    return (1 - w) * q_llm + w * q_cf


@dataclass
class TeacherOutputs:
    query: torch.Tensor        # (B, D) query vectors
    topk_ids: torch.Tensor     # (B, K) int, best first, history masked
    topk_scores: torch.Tensor  # (B, K) float, inner product / temperature (the teacher's logits)


def search_outputs(index: ItemIndex, q: torch.Tensor, histories: Histories, k: int, mask_history: bool,
                   temperature: float) -> TeacherOutputs:
    """A teacher's outputs from its query vectors: the harness's top-k over the item index, the histories'
    items masked, scores the inner products / temperature (every teacher's top-K: LLM, CF-only, imported)."""
    exclude = ranking_exclusions(histories, index.n_rows, mask_history)
    ids, scores = index.search(q.numpy(), k, exclude)
    return TeacherOutputs(q, torch.from_numpy(ids), torch.from_numpy(scores) / temperature)


class TeacherRetriever(SlotModel):
    def __init__(self, backbone: nn.Module, tokenizer, cf: SASRec, titles: list[str], cfg: TeacherConfig,
                 text_states: torch.Tensor | None = None, fresh_heads: bool = True):
        H, d_cf = backbone.config.hidden_size, cf.cfg.hidden_size
        super().__init__(backbone, cf, H)                   # backbone, frozen cf, in_projector (d_cf -> H)
        self.cfg = cfg
        self.prompts = PromptBuilder(tokenizer, titles, cfg)
        self.out_projector = nn.Linear(H, 2 * d_cf if cfg.item_side == "both" else d_cf)  # q_LLM: (D) or (2D)
        self.register_buffer("cf_weight", torch.tensor(0.0))  # w, saved with the heads
        self.item_table = nn.Parameter(cf.item_table.detach().clone(),           # (N+1, D)
                                       requires_grad=cfg.train_item_table)
        self.text_head = None
        if cfg.item_side != "cf":
            if text_states is None or not text_states[1:].any():
                raise ConfigError(f"teacher.item_side: {cfg.item_side} needs item texts, and the data has none "
                                  "(data.items / data.columns.title / data.columns.text)")
            self.register_buffer("text_states", text_states, persistent=False)  # (N+1, H), cached by content
            self.text_head = TextHead(text_states, d_cf, init=fresh_heads)   # not fresh: read from a checkpoint
        self.gate = moe_gate(backbone, d_cf, cfg)
        self._index: ItemIndex | None = None
        if cfg.inject_layer:
            check_splittable(backbone, cfg.inject_layer)

    # ------------------------------------------------------------ forward
    def input_embeddings(self, batch: PromptBatch) -> torch.Tensor:
        """(B, T, H): token embeddings, with CF-projected items at [HistoryEmb] slots."""
        decoder = getattr(self.backbone, "module", self.backbone)  # unwrap a DeepSpeed InferenceEngine
        return self.slot_embeddings(decoder.get_input_embeddings(), batch.input_ids, batch.history_items,
                                    self.prompts.pad_id)

    @torch.no_grad()
    def lower_states(self, batch: PromptBatch) -> torch.Tensor:
        """teacher.inject_layer k: (B, T, H) the stream entering layer k from the prompt's text alone (the layers
        below k are frozen and carry no LoRA, so these depend on the tokens only and can be cached)."""
        decoder = getattr(self.backbone, "module", self.backbone)  # unwrap a DeepSpeed InferenceEngine
        x = self.text_embeddings(decoder.get_input_embeddings(), batch.input_ids, batch.history_items,
                                 self.prompts.pad_id)
        return run_layers(self.backbone, x, batch.attention_mask, positions(batch), 0, self.cfg.inject_layer)

    @property
    def device(self) -> torch.device:
        return self.item_table.device

    def items(self) -> torch.Tensor:
        """(N+1, D) item vectors: the item table, or with a text side (N+1, 2D): the item table next to the
        projected text states (kept apart so that the CF query, 0 on the text part, scores as before)."""
        if self.text_head is None:
            return self.item_table
        return torch.cat([self.item_table, self.text_head(self.text_states)], dim=1)

    def item_parts(self) -> dict[str, list[int]]:
        return item_parts(self.cfg.item_side, self.item_table.shape[1])

    def decode(self, batch: PromptBatch, gate_repr: torch.Tensor, lower: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, H) last hidden states of the prompts, the MoE-LoRA gate set from `gate_repr`: (B, D) CF
        representations, one per prompt, or (B, T, D), one per token (teacher.examples: per_slot). With
        teacher.inject_layer, `lower` is the batch's `lower_states` when cached (computed here otherwise)."""
        k = self.cfg.inject_layer
        if k:
            x = self.with_items(self.lower_states(batch) if lower is None else lower, batch.history_items)
            with self.gated(gate_repr):
                return run_layers(self.backbone, x, batch.attention_mask, positions(batch), k)
        x = self.input_embeddings(batch)
        with self.gated(gate_repr):
            return self.backbone(inputs_embeds=x, attention_mask=batch.attention_mask,
                                 position_ids=positions(batch)).last_hidden_state

    def head(self, pooled: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """(S, H) pooled states and (S,) the item of each one's last slot -> (S, D) q_LLM (or (S, 2D))."""
        q = self.out_projector(pooled.float())
        if self.cfg.text_query:                              # + the last item's text vector, on the text part
            last = self.text_head(self.text_states[items])                        # (S, D)
            q = q + F.pad(last, (q.shape[-1] - last.shape[-1], 0))
        if self.cfg.item_side == "text":
            q = F.pad(q, (q.shape[-1], 0))                                        # (S, 2D): 0 on the CF part
        return q

    def cf_slot_states(self, histories: Histories, rows: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
        """(S, D) the frozen CF model's user vector of each prefix histories.row(rows[s])[:lengths[s]]."""
        cf_in = histories.padded_prefixes(rows, lengths, self.cf.cfg.max_len)
        with torch.no_grad():
            return self.cf.encode_users(torch.from_numpy(cf_in).to(self.device))

    @staticmethod
    def token_states(history_items: torch.Tensor, slot_states: torch.Tensor) -> torch.Tensor:
        """(B, T, D) the per-token gate input: at every token the CF state of the latest [HistoryEmb] slot at or
        before it (`slot_states` (S, D): the batch's slots in row-major order); zeros before a row's first slot,
        so no token's gate reads an item that comes after it."""
        is_slot = history_items > 0
        latest = is_slot.cumsum(1) - 1                                            # (B, T) slot index in the row
        first = is_slot.sum(1).cumsum(0) - is_slot.sum(1)                        # (B,) the row's first slot
        table = torch.cat([slot_states.new_zeros(1, slot_states.shape[1]), slot_states])
        return table[torch.where(latest >= 0, first[:, None] + latest + 1, 0)]

    def slot_queries(self, windows: Histories, slot_states: torch.Tensor, lower: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """teacher.examples per_slot: one causal pass over each window's prompt (instruction, then one
        [HistoryEmb] slot per item) -> (S, D) q_LLM at every slot, row-major; `slot_states` (S, D) are the CF
        model's states at those slots (`cf_slot_states`), `lower` the windows' cached `LowerStates`. The query at
        a slot is what `query` gives for the window cut after that slot."""
        batch = self.prompts(windows, "right").to(self.device)
        h = self.decode(batch, self.token_states(batch.history_items, slot_states), lower)
        is_slot = batch.history_items > 0
        return self.head(h[is_slot], batch.history_items[is_slot])

    def query(self, histories: Histories, padding_side: str = "left", blend: bool = True) -> torch.Tensor:
        """Histories (item ids, oldest first) -> (B, D) query vectors, differentiable (q_LLM alone with
        blend=False). Pooled at the last query_text token with one gate per prompt, or (per_slot) at the last
        slot with the gate per token, from the CF states of every prefix the prompt's slots end."""
        batch = self.prompts(histories, padding_side).to(self.device)
        with torch.no_grad():
            cf_repr = self.cf.encode_users(torch.from_numpy(histories.padded(self.cf.cfg.max_len)).to(self.device))
        gate_repr = cf_repr
        if self.cfg.examples == "per_slot":
            lengths = histories.lengths
            n = np.minimum(lengths, self.cfg.max_history)                         # slots in each prompt
            rows = np.repeat(np.arange(len(histories)), n)
            gate_repr = self.token_states(batch.history_items,
                                          self.cf_slot_states(histories, rows, np.repeat(lengths - n, n) + within(n) + 1))
        h = self.decode(batch, gate_repr)
        last = torch.arange(len(h), device=h.device)
        q = self.head(h[last, batch.last_index], last_items(batch.history_items))
        return blend_queries(q, cf_repr, self.cf_weight) if blend else q

    # ------------------------------------------------ the retriever protocol (distill.runs)
    @torch.inference_mode()
    def encode(self, histories: Histories, batch_size: int | None = None, desc: str | None = None,
               blend: bool = True) -> np.ndarray:
        """(n, D) float32 query vectors, batched by prompt length so padding stays small."""
        from tqdm.auto import tqdm
        batch_size = batch_size or self.cfg.eval_batch_size
        order = np.argsort(self.prompts.lengths(histories), kind="stable")
        out = np.empty((len(histories), self.query_dim), dtype=np.float32)
        for lo in tqdm(range(0, len(order), batch_size), desc=desc, disable=desc is None, leave=False):
            rows = order[lo:lo + batch_size]
            out[rows] = self.query(histories.take(rows), blend=blend).float().cpu().numpy()
        return out

    @property
    def query_dim(self) -> int:
        """Width of the query (and item) vectors: D, or 2D with a text item side."""
        return self.item_table.shape[1] * (1 if self.text_head is None else 2)

    def item_vectors(self) -> np.ndarray:
        """(N+1, D) float32 item table; row 0 is padding."""
        return self.items().detach().float().cpu().numpy()

    def flops_per_user(self, histories: Histories) -> np.ndarray:
        """(n,) 2 x the decoder weights each prompt token passes through plus attention over the prompt,
        the CF encoder (the gate and q_CF) and the catalogue scoring."""
        c = self.backbone.config
        layers = [p for n, p in self.backbone.named_parameters() if ".layers." in n and "lora_" not in n]
        tokens = self.prompts.lengths(histories).astype(np.float64)
        decoder = tokens * (2 * sum(p.numel() for p in layers) + 4 * tokens * c.hidden_size * c.num_hidden_layers)
        per_query = [self.out_projector] + ([self.text_head] if self.cfg.text_query else [])
        heads = 2 * sum(p.numel() for m in per_query for p in m.parameters())
        cf = self.cf.flops_per_user(histories)
        if self.cfg.examples == "per_slot":                # + the CF state of every slot's prefix (the gate)
            cf = cf * (1 + np.minimum(histories.lengths, self.cfg.max_history))
        return decoder + cf + heads

    # ------------------------------------------------------------ retrieval
    def invalidate_index(self) -> None:
        self._index = None

    @torch.inference_mode()
    def get_teacher_outputs(self, histories: Histories, k: int, mask_history: bool = True,
                            index: str = "Flat") -> TeacherOutputs:
        """Query vectors and the top-k items over the whole catalogue (via the harness index)."""
        if self._index is None or self._index.kind != index:
            self._index = ItemIndex(self.item_vectors(), index)
        return search_outputs(self._index, self.query(histories).float().cpu(), histories, k, mask_history,
                              self.cfg.temperature)

    def trained_parameter_count(self) -> int:
        """Parameters training changed: the heads and the LoRA weights (the backbone is frozen)."""
        return sum(v.numel() for v in self.heads_state().values()) + sum(
            p.numel() for n, p in self.named_parameters() if "lora_" in n)

    # heads_state() (SlotModel): everything trained outside peft: projectors, gate, item table, CF weight


def positions(batch: PromptBatch) -> torch.Tensor:
    """(B, T) position ids counted over the real tokens, so a prompt's states do not depend on its padding side."""
    return (batch.attention_mask.cumsum(1) - 1).clamp(min=0)


class LowerStates:
    """teacher.inject_layer k, per_slot training: the stream entering layer k of every training window's prompt
    (right-padded, as `slot_queries` builds it), computed once, so a training step runs only layers [k, L)."""

    def __init__(self, model: TeacherRetriever, windows: Histories, batch_size: int):
        lengths = model.prompts.lengths(windows)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.lengths = lengths
        dtype, H = next(model.backbone.parameters()).dtype, model.backbone.config.hidden_size
        require_memory(int(lengths.sum()) * H * dtype.itemsize, f"caching the states entering layer "
                       f"{model.cfg.inject_layer} of {len(windows)} training windows", "teacher.inject_layer",
                       fix="set it to 0 or lower teacher.max_title_tokens")
        self.flat = torch.empty(int(lengths.sum()), H, dtype=dtype)             # (tokens, H), window after window
        for lo in range(0, len(windows), batch_size):
            rows = np.arange(lo, min(lo + batch_size, len(windows)))
            h = model.lower_states(model.prompts(windows.take(rows), "right").to(model.device)).cpu()
            mask = torch.arange(h.shape[1])[None] < torch.from_numpy(lengths[rows])[:, None]
            self.flat[self.offsets[lo]:self.offsets[rows[-1] + 1]] = h[mask]

    def take(self, rows: np.ndarray, device) -> torch.Tensor:
        """(B, T, H) the states of windows `rows`, right-padded to the longest (zeros under the padding)."""
        n = self.lengths[rows]
        t = np.arange(n.max())
        index = torch.from_numpy(self.offsets[rows][:, None] + np.minimum(t, n[:, None] - 1))      # (B, T)
        pad = torch.from_numpy(t[None] < n[:, None]).unsqueeze(-1)
        return (self.flat[index] * pad).to(device)


def last_items(history_items: torch.Tensor) -> torch.Tensor:
    """(B,) the last [HistoryEmb] item of each prompt (0, the padding row, for an empty history)."""
    slot = torch.arange(history_items.shape[1], device=history_items.device).expand_as(history_items)
    last = torch.where(history_items > 0, slot, -1).max(1).values                 # (B,)
    return history_items.gather(1, last.clamp(min=0)[:, None])[:, 0] * (last >= 0)


def build_teacher(cfg: TeacherConfig, cf: SASRec, titles: list[str], adapter_dir: Path | None = None,
                  trainable: bool = True, texts: list[str] | None = None) -> TeacherRetriever:
    """A fresh teacher (new LoRA) or one whose peft adapter is read from `adapter_dir`; `texts` (the split's item
    texts) feed a text item side."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone, tokenizer, source = load_backbone(cfg.model, cfg.num_layers, cfg.dtype)
    above = list(range(cfg.inject_layer, backbone.config.num_hidden_layers)) if cfg.inject_layer else None
    backbone = attach_adapter(backbone, cfg, adapter_dir, trainable, layers=above).to(device)  # text states: there
    states = item_states(cfg, backbone, tokenizer, source, texts) if cfg.item_side != "cf" and texts else None
    return TeacherRetriever(backbone, tokenizer, cf, titles, cfg, states, fresh_heads=adapter_dir is None).to(device)
