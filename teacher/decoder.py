"""Running a Llama-style decoder a range of layers at a time (`teacher.inject_layer`).

    inputs_embeds (B, T, H) ─> layers[start:stop] ─> (B, T, H)          (+ the final norm when stop = L)

The dense teacher with inject_layer k runs layers [0, k) over the prompt's text alone (frozen, no LoRA, so
training caches their states), puts the CF items into the slots of those states and runs [k, L). Both
halves use the model's own layers, rotary embeddings, causal mask and final norm, so a split at any k with
nothing injected is the model's forward exactly (tests/test_inject_layer.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from distill.errors import ConfigError

PARTS = ("layers", "rotary_emb", "norm")


def base_decoder(backbone: nn.Module) -> nn.Module:
    """The headless transformers model inside a DeepSpeed InferenceEngine and/or a peft wrapper."""
    model = getattr(backbone, "module", backbone)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def check_splittable(backbone: nn.Module, k: int) -> None:
    """ConfigError unless layer k of `backbone` is a place the decoder can be cut (0 < k < L, Llama-style)."""
    decoder = base_decoder(backbone)
    missing = [p for p in PARTS if not hasattr(decoder, p)]
    if missing:
        raise ConfigError(f"teacher.inject_layer: {k} needs a Llama-style decoder (layers, rotary_emb, norm); "
                          f"{type(decoder).__name__} has no {', '.join(missing)}")
    L = len(decoder.layers)
    if not 0 < k < L:
        raise ConfigError(f"teacher.inject_layer: {k} must be between 1 and {L - 1} for a {L}-layer decoder "
                          "(teacher.num_layers), or 0 for the CF items at the input")


def run_layers(backbone: nn.Module, x: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
               start: int, stop: int | None = None) -> torch.Tensor:
    """(B, T, H) the residual stream after layers [start, stop) of `backbone` from `x`, the stream entering
    layer `start`; normed when the range ends at the last layer (what `last_hidden_state` is)."""
    from transformers.masking_utils import create_causal_mask

    decoder = base_decoder(backbone)
    layers = decoder.layers[start:stop]
    mask = create_causal_mask(config=decoder.config, inputs_embeds=x, attention_mask=attention_mask,
                              past_key_values=None, position_ids=position_ids)
    rotary = decoder.rotary_emb(x, position_ids=position_ids)
    for layer in layers:
        x = layer(x, attention_mask=mask, position_embeddings=rotary, position_ids=position_ids)
    return decoder.norm(x) if stop is None or stop >= len(decoder.layers) else x
