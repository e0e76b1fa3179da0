"""The teacher: a headless LLM read as a dense retriever over the item catalogue.

    prompt tokens ──embed──┐
    CF item emb ─in_proj───┴─> [HistoryEmb] slots ─> decoder (+ LoRA / MoE-LoRA) ─> h_last
    h_last ─out_proj─> q_LLM (D)            (+ text_query(s_last item) with teacher.text_query)
    query q = (1 - w) q_LLM + w q_CF        score(item) = q . item_table[item] / temperature

With teacher.item_side text/both the item vectors are [item_table ; text_head(s)] (N+1, 2D), s the cached
text states (teacher/item_text.py); q_CF is 0 on the text part, q_LLM is 0 on the CF part with `text`.

The CF model is the student-alone SASRec (frozen): its item embeddings feed the
[HistoryEmb] slots and initialise the item table, its sequence representation
drives the MoE-LoRA gate and is the CF query q_CF. The LLM retriever trains alone
(w = 0); the blend weight w is chosen on validation afterwards (teacher.train).
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
from distill.histories import Histories
from distill.search import ItemIndex, ranking_exclusions
from student.model import SASRec
from teacher.backbone import load_backbone
from teacher.item_text import item_parts, item_states
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


class TeacherRetriever(SlotModel):
    def __init__(self, backbone: nn.Module, tokenizer, cf: SASRec, titles: list[str], cfg: TeacherConfig,
                 text_states: torch.Tensor | None = None):
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
            self.text_head = nn.Linear(H, d_cf, bias=False)
            nn.init.zeros_(self.text_head.weight)      # scores start at 0 (uniform), `both` starts as the CF side
        self.text_query = nn.Linear(H, self.out_projector.out_features, bias=False) if cfg.text_query else None
        self.gate = moe_gate(backbone, d_cf, cfg)
        self._index: ItemIndex | None = None

    # ------------------------------------------------------------ forward
    def input_embeddings(self, batch: PromptBatch) -> torch.Tensor:
        """(B, T, H): token embeddings, with CF-projected items at [HistoryEmb] slots."""
        decoder = getattr(self.backbone, "module", self.backbone)  # unwrap a DeepSpeed InferenceEngine
        return self.slot_embeddings(decoder.get_input_embeddings(), batch.input_ids, batch.history_items,
                                    self.prompts.pad_id)

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

    def forward(self, batch: PromptBatch, cf_histories: torch.Tensor, blend: bool = True) -> torch.Tensor:
        """Prompts + (B, max_len) CF histories -> (B, D) query vectors (q_LLM alone with blend=False)."""
        batch = PromptBatch(*(t.to(self.device) for t in (batch.input_ids, batch.attention_mask,
                                                          batch.history_items, batch.last_index)))
        cf_histories = cf_histories.to(self.device)
        x = self.input_embeddings(batch)
        position_ids = (batch.attention_mask.cumsum(1) - 1).clamp(min=0)   # padding-side independent
        with torch.no_grad():
            cf_repr = self.cf.encode_users(cf_histories)                         # (B, D)
        with self.gated(cf_repr):
            h = self.backbone(inputs_embeds=x, attention_mask=batch.attention_mask,
                              position_ids=position_ids).last_hidden_state          # (B, T, H)
        pooled = h[torch.arange(len(h)), batch.last_index]                       # (B, H)
        q = self.out_projector(pooled.float())                                    # (B, D) or (B, 2D)
        if self.text_query is not None:                                           # + the last item's text
            q = q + self.text_query(self.text_states[last_items(batch.history_items)])
        if self.cfg.item_side == "text":
            q = F.pad(q, (q.shape[-1], 0))                                        # (B, 2D): 0 on the CF part
        return blend_queries(q, cf_repr, self.cf_weight) if blend else q

    def query(self, histories: Histories, padding_side: str = "left", blend: bool = True) -> torch.Tensor:
        """Histories (item ids, oldest first) -> (B, D) query vectors, differentiable."""
        cf_hist = torch.from_numpy(histories.padded(self.cf.cfg.max_len))
        return self(self.prompts(histories, padding_side), cf_hist, blend)

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
        heads = 2 * sum(p.numel() for m in (self.out_projector, self.text_query) if m is not None
                        for p in m.parameters())
        return decoder + self.cf.flops_per_user(histories) + heads

    # ------------------------------------------------------------ retrieval
    def invalidate_index(self) -> None:
        self._index = None

    @torch.inference_mode()
    def get_teacher_outputs(self, histories: Histories, k: int, mask_history: bool = True,
                            index: str = "Flat") -> TeacherOutputs:
        """Query vectors and the top-k items over the whole catalogue (via the harness index)."""
        if self._index is None or self._index.kind != index:
            self._index = ItemIndex(self.item_vectors(), index)
        q = self.query(histories).float().cpu()
        exclude = ranking_exclusions(histories, len(self.item_table), mask_history)
        ids, scores = self._index.search(q.numpy(), k, exclude)
        return TeacherOutputs(q, torch.from_numpy(ids), torch.from_numpy(scores) / self.cfg.temperature)

    def trained_parameter_count(self) -> int:
        """Parameters training changed: the heads and the LoRA weights (the backbone is frozen)."""
        return sum(v.numel() for v in self.heads_state().values()) + sum(
            p.numel() for n, p in self.named_parameters() if "lora_" in n)

    # heads_state() (SlotModel): everything trained outside peft: projectors, gate, item table, CF weight


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
    backbone = attach_adapter(backbone, cfg, adapter_dir, trainable).to(device)  # text states are computed there
    states = item_states(cfg, backbone, tokenizer, source, texts) if cfg.item_side != "cf" and texts else None
    return TeacherRetriever(backbone, tokenizer, cf, titles, cfg, states).to(device)
