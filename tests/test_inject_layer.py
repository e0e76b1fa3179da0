"""teacher.inject_layer: the CF items enter at layer k; the layers below read text only and are cached."""

import dataclasses

import numpy as np
import pytest
import torch

from distill.errors import ConfigError
from distill.histories import Histories
from teacher.decoder import run_layers
from teacher.model import LowerStates, build_teacher

from test_per_slot import per_slot_teacher, slot_queries, windows


def test_the_decoder_run_in_two_ranges_is_its_forward(tiny_recipe, split, cf):
    t = per_slot_teacher(tiny_recipe, split, cf)
    batch = t.prompts(windows(split), "right")
    x = t.input_embeddings(batch)
    pos = (batch.attention_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        whole = t.backbone(inputs_embeds=x, attention_mask=batch.attention_mask, position_ids=pos).last_hidden_state
        halves = run_layers(t.backbone, run_layers(t.backbone, x, batch.attention_mask, pos, 0, 1),
                            batch.attention_mask, pos, 1)
    real = batch.attention_mask.bool()
    assert torch.allclose(halves[real], whole[real], atol=1e-5)


def test_only_the_layers_above_k_carry_lora_and_the_items_enter_there(tiny_recipe, split, cf):
    t = per_slot_teacher(tiny_recipe, split, cf, inject_layer=1, use_titles=False, max_history=5)
    lora = [n for n, _ in t.named_parameters() if "lora_" in n]
    assert lora and all(".layers.1." in n for n in lora)
    w = windows(split, 3)
    batch = t.prompts(w, "right")
    other = Histories(np.where(w.flat == 1, 2, 1), w.offsets)                # every slot another item
    assert torch.equal(t.lower_states(batch), t.lower_states(t.prompts(other, "right")))  # no item below k
    with torch.no_grad():
        assert not torch.allclose(slot_queries(t, w), slot_queries(t, other), atol=1e-3)  # the items count above


@pytest.mark.parametrize("use_titles", [False, True])
def test_cached_lower_states_give_the_queries_computed_on_the_fly(tiny_recipe, split, cf, use_titles):
    t = per_slot_teacher(tiny_recipe, split, cf, inject_layer=1, use_titles=use_titles, max_history=5)
    w = windows(split, 5)
    cache = LowerStates(t, w, batch_size=2)                                  # batches of other lengths than below
    rows = np.array([3, 0, 4])
    sub = w.take(rows)
    states = t.cf_slot_states(sub, sub.row_ids(), np.concatenate([np.arange(1, n + 1) for n in sub.lengths]))
    with torch.no_grad():
        cached = t.slot_queries(sub, states, cache.take(rows, t.device))
        fresh = t.slot_queries(sub, states)
    assert torch.allclose(cached, fresh, atol=1e-5)


def test_the_query_at_each_slot_is_the_query_of_the_prompt_cut_there_with_injection(tiny_recipe, split, cf):
    t = per_slot_teacher(tiny_recipe, split, cf, inject_layer=1, use_titles=True, max_history=5)
    w = windows(split)
    with torch.no_grad():
        cut = Histories.from_rows([r[:k + 1] for r in w for k in range(len(r))])
        assert torch.allclose(slot_queries(t, w), t.query(cut, blend=False), atol=1e-5)


def test_training_steps_reach_the_in_projector_and_only_the_upper_lora(tiny_recipe, split, cf):
    t = per_slot_teacher(tiny_recipe, split, cf, inject_layer=1, max_history=5).train()
    w = windows(split, 3)
    slot_queries(t, w).square().sum().backward()
    assert t.in_projector[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in t.backbone.named_parameters() if ".layers.0." in n)


@pytest.mark.parametrize("k", [2, 5])
def test_an_injection_layer_the_decoder_does_not_have_is_refused_at_construction(tiny_recipe, split, cf, k):
    cfg = dataclasses.replace(tiny_recipe.teacher, inject_layer=k)        # the tiny Llama has 2 layers
    with pytest.raises(ConfigError, match="teacher.inject_layer"):
        build_teacher(cfg, cf, split.titles, texts=split.texts)


def test_deepspeed_inference_of_a_teacher_with_injection_passes_the_guard(tmp_path, tiny_recipe, split, cf):
    from teacher.infer import run_inference
    t = per_slot_teacher(tiny_recipe, split, cf, inject_layer=1, use_titles=True)
    g = run_inference(tiny_recipe, split, t, "t", tmp_path / "teacher_cache", "deepspeed")["guard"]
    assert g["checked"] is True and g["top10_identical"] == 1.0 and g["max_rel_diff"] <= 1e-4
    assert g["kernel_injection"]["used"] is False


def test_a_lower_state_cache_larger_than_memory_is_refused_before_it_is_built(tiny_recipe, split, cf, monkeypatch):
    import distill.resources
    t = per_slot_teacher(tiny_recipe, split, cf, inject_layer=1)
    monkeypatch.setattr(distill.resources, "available_memory", lambda device: 1000)
    with pytest.raises(ConfigError, match=r"teacher.inject_layer: caching the states entering layer 1 of 5 training"):
        LowerStates(t, windows(split), batch_size=2)
