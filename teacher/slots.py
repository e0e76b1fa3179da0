"""What the two slot models share: the dense teacher (teacher/model.py) and the generative baseline
(teacher/generative.py) both feed CF item embeddings into an LLM at slot tokens.

    prompt tokens ──embed──┐
    CF item emb ─in_proj───┴─> slots ─> decoder (+ LoRA / MoE-LoRA, gated by the CF model's encode_users)

`SlotModel` holds the frozen CF model (kept in eval by train()), the in-projector, the input embeddings with
CF items at slot positions, the MoE-LoRA gate set around a forward and the heads trained outside peft. Each
model builds its gate last (`moe_gate`), after its own heads, so parameters are created (and drawn from
torch's generator) in the same order as before the cut.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from distill.config import TeacherConfig
from distill.errors import ConfigError
from student.model import SASRec
from teacher.moe_lora import ExpertGate


def make_in_projector(d_cf: int, hidden: int) -> nn.Module:
    """CF item embedding (d_cf) -> LLM input embedding (hidden), for [HistoryEmb]-style slots."""
    return nn.Sequential(nn.Linear(d_cf, hidden), nn.GELU(), nn.Linear(hidden, hidden))


def moe_gate(peft_model: nn.Module, d_cf: int, cfg: TeacherConfig) -> ExpertGate | None:
    """The MoE-LoRA gate over `peft_model`'s LoRA layers (the `teacher` section's adapter settings), or None
    for plain LoRA."""
    return ExpertGate(peft_model, d_cf, cfg.num_experts, cfg.lora_r) if cfg.adapter == "moe_lora" else None


def attach_adapter(backbone: nn.Module, cfg: TeacherConfig, adapter_dir: Path | None = None,
                   trainable: bool = True, layers: list[int] | None = None) -> nn.Module:
    """Wrap `backbone` in peft: a fresh LoRA from cfg's lora_* settings on `layers` (None: every layer), or the
    adapter read from `adapter_dir`. Shared by the dense teacher and the generative baseline (teacher/generative.py)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter_dir is None:
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=list(cfg.target_modules), bias="none", layers_to_transform=layers,
                          layers_pattern="layers" if layers is not None else None)
        try:
            backbone = get_peft_model(backbone, lora)
        except ValueError as e:
            raise ConfigError(f"teacher.target_modules: {' '.join(str(e).split())}") from None
    else:
        backbone = PeftModel.from_pretrained(backbone, str(adapter_dir), is_trainable=trainable)
    return backbone


class SlotModel(nn.Module):
    """An LLM (`backbone`, peft-wrapped) reading CF items at slot tokens; the CF model is frozen."""

    gate: ExpertGate | None

    def __init__(self, backbone: nn.Module, cf: SASRec, hidden: int):
        super().__init__()
        self.backbone = backbone
        self.cf = cf.eval().requires_grad_(False)
        self.in_projector = make_in_projector(cf.cfg.hidden_size, hidden)

    def train(self, mode: bool = True) -> "SlotModel":
        super().train(mode)
        self.cf.eval()  # frozen: the gate (and q_CF) must see the same CF representations as at inference
        return self

    @property
    def device(self) -> torch.device:
        return self.in_projector[0].weight.device

    def slot_embeddings(self, embed: nn.Module, input_ids: torch.Tensor, slot_items: torch.Tensor,
                        pad_id: int) -> torch.Tensor:
        """(B, T, H): `embed`'s token embeddings, with CF-projected items where `slot_items` (B, T) is > 0."""
        return self.with_items(self.text_embeddings(embed, input_ids, slot_items, pad_id), slot_items)

    @staticmethod
    def text_embeddings(embed: nn.Module, input_ids: torch.Tensor, slot_items: torch.Tensor,
                        pad_id: int) -> torch.Tensor:
        """(B, T, H): `embed`'s token embeddings, the pad token's where `slot_items` (B, T) is > 0."""
        return embed(input_ids.masked_fill(slot_items > 0, pad_id))

    def with_items(self, x: torch.Tensor, slot_items: torch.Tensor) -> torch.Tensor:
        """(B, T, H) `x` (token embeddings, or the stream entering layer teacher.inject_layer) with CF-projected
        items where `slot_items` (B, T) is > 0."""
        items = self.in_projector(self.cf.item_emb(slot_items))
        return torch.where((slot_items > 0).unsqueeze(-1), items.to(x.dtype), x)

    def set_gate(self, cf_repr: torch.Tensor | None) -> None:
        """The gate of the next forward from (B, D) CF representations; None turns it off."""
        if self.gate is not None:
            self.gate.set(None if cf_repr is None else self.gate.gates(cf_repr))

    @contextmanager
    def gated(self, cf_repr: torch.Tensor | None):
        """The gate set from `cf_repr` for the forward inside, and cleared after it (also on an error)."""
        self.set_gate(cf_repr)
        try:
            yield
        finally:
            self.set_gate(None)

    def heads_state(self) -> dict[str, torch.Tensor]:
        """Everything trained outside peft (not the backbone, not the frozen CF model)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(("backbone.", "cf."))}
