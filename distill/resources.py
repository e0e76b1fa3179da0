"""Early memory checks: refuse a recipe that cannot fit before spending time on it.

The estimates are deliberately simple upper-bound-ish sums (weights, optimizer
moments, saved activations of the widest batch); they exist to turn an OOM kill
an hour into a run into an error at second one that names the setting to lower.
"""

from __future__ import annotations

import psutil
import torch

from distill.errors import ConfigError

FLOAT = 4  # bytes; activations are estimated in float32


def available_memory(device: torch.device | str = "cpu") -> int:
    """Bytes the process can still allocate on `device`."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return psutil.virtual_memory().available


def require_memory(need: int, what: str, setting: str, device: torch.device | str = "cpu",
                   fix: str | None = None) -> None:
    """ConfigError naming `setting` unless `need` bytes fit in 90% of what `device` has; `fix` says what to
    change (default: lower `setting`)."""
    have = available_memory(device)
    if need > 0.9 * have:
        raise ConfigError(f"{setting}: {what} needs about {need / 2**30:.1f} GiB but only {have / 2**30:.1f} GiB "
                          f"is available on {torch.device(device).type}; {fix or f'lower {setting}'}")


def student_step_bytes(batch: int, max_len: int, scored_items: int, hidden: int, layers: int) -> int:
    """One training step: the logits over the items each position scores (the whole catalogue for the full
    softmax, the negatives + 1 for the sampled one; + softmax, grads) and the transformer's saved activations."""
    tokens = batch * max_len
    return FLOAT * (4 * tokens * scored_items + layers * tokens * (16 * hidden + 2 * max_len))


def decoder_step_bytes(batch: int, seq_len: int, config, training: bool) -> int:
    """One decoder forward (and backward when training) over (batch, seq_len) tokens."""
    H, layers = config.hidden_size, config.num_hidden_layers
    inter = getattr(config, "intermediate_size", 4 * H)
    heads = config.num_attention_heads
    per_layer = 8 * H + 4 * inter + 2 * heads * seq_len        # floats per token kept for backward
    if not training:                                           # only one layer is alive at a time
        return FLOAT * batch * seq_len * per_layer * 2
    return FLOAT * batch * seq_len * per_layer * layers * 2    # activations + their gradients


def optimizer_bytes(model: torch.nn.Module) -> int:
    """Gradients and the two AdamW moments of the trainable parameters (the weights are already loaded)."""
    return sum(3 * p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
