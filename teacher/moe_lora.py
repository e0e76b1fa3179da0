"""iLoRA's instance-wise mixture of LoRA experts, built on stock peft.

One peft LoRA adapter of rank r is split into E experts of rank r/E (rank
slices of A and B). A forward hook on every `lora_A` scales its output's rank
slices by the current sequence's gate, so each adapted layer computes

    delta(x) = scaling * sum_e g_e * B_e A_e x

with one gate vector g (softmax over E) per sequence, shared by all adapted
layers in that forward pass, or one per token (the teacher's per-slot training,
where a sequence-wide gate would let early slots see later items). With E = 1
the gate is 1 and this is plain LoRA.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from distill.errors import ConfigError


class ExpertGate(nn.Module):
    """Gate network (CF sequence representation -> softmax over experts) plus the lora_A hooks."""

    def __init__(self, peft_model: nn.Module, cf_dim: int, num_experts: int, rank: int, adapter: str = "default"):
        super().__init__()
        from peft.tuners.lora import LoraLayer

        if num_experts < 1 or rank % num_experts:
            raise ConfigError(f"teacher.num_experts: num_experts {num_experts} must divide lora_r {rank}")
        self.num_experts, self.slice = num_experts, rank // num_experts
        self.net = nn.Linear(cf_dim, num_experts)
        self._current: torch.Tensor | None = None
        self._handles = [m.lora_A[adapter].register_forward_hook(self._scale)
                         for m in peft_model.modules() if isinstance(m, LoraLayer) and adapter in m.lora_A]
        if not self._handles:
            raise ConfigError("teacher.target_modules: no LoRA layer found to gate (moe_lora needs at least one "
                              "adapted module)")

    def gates(self, cf_repr: torch.Tensor) -> torch.Tensor:
        """(B, cf_dim) -> (B, E) expert weights; (B, T, cf_dim) -> (B, T, E), one gate per token."""
        return torch.softmax(self.net(cf_repr), dim=-1)

    def set(self, gates: torch.Tensor | None) -> None:
        """Gate vector of each sequence (B, E) or of each token (B, T, E) of the next forward pass (None = hooks
        inactive)."""
        self._current = gates

    def _scale(self, module, inputs, output):
        g = self._current
        if g is None:
            return output
        scale = g.repeat_interleave(self.slice, dim=-1).to(output.dtype)   # (B, r) or (B, T, r)
        if scale.dim() == 3:                                                # per token: output is (B, T, r)
            return output * scale
        return output * scale.view(scale.shape[0], *([1] * (output.dim() - 2)), scale.shape[1])
