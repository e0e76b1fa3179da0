"""teacher.examples per_slot: one causal pass gives the query of every prefix, with a per-token gate."""

import dataclasses

import numpy as np
import pytest
import torch

from distill.histories import Histories
from teacher.model import build_teacher


def per_slot_teacher(tiny_recipe, split, cf, **changes):
    cfg = dataclasses.replace(tiny_recipe.teacher, **{"lora_dropout": 0.0, "cf_weights": [0.0],
                                                      "examples": "per_slot", "adapter": "moe_lora",
                                                      "num_experts": 2, **changes})
    torch.manual_seed(0)
    t = build_teacher(cfg, cf, split.titles, texts=split.texts).eval()
    with torch.no_grad():  # LoRA B starts at 0: give the adapter (and so the gate) a visible effect
        for n, p in t.named_parameters():
            if "lora_" in n or n.startswith("gate."):
                torch.nn.init.normal_(p, std=0.3)
    return t


def windows(split, n_users=5):
    """The first max_history items of some users' sequences: windows that start at the user's first item."""
    seq = split.sequences
    return Histories.from_rows([seq.row(u)[:5] for u in range(n_users)])


def slot_queries(t, w: Histories) -> torch.Tensor:
    """What per-slot training computes for the windows `w`: every slot's q_LLM, row-major."""
    rows = w.row_ids()
    lengths = np.concatenate([np.arange(1, n + 1) for n in w.lengths])
    return t.slot_queries(w, t.cf_slot_states(w, rows, lengths))


@pytest.mark.parametrize("use_titles", [False, True])
def test_the_query_at_each_slot_is_the_query_of_the_prompt_cut_there(tiny_recipe, split, cf, use_titles):
    t = per_slot_teacher(tiny_recipe, split, cf, use_titles=use_titles, max_history=5)
    w = windows(split)
    with torch.no_grad():
        per_slot = slot_queries(t, w)                                    # one pass per window
        cut = Histories.from_rows([r[:k + 1] for r in w for k in range(len(r))])
        pooled = t.query(cut, blend=False)                               # one prompt per prefix, left-padded
    assert per_slot.shape == pooled.shape == (int(w.lengths.sum()), t.query_dim)
    assert torch.allclose(per_slot, pooled, atol=1e-5)


def test_the_gate_at_a_slot_does_not_read_later_items(tiny_recipe, split, cf):
    t = per_slot_teacher(tiny_recipe, split, cf, max_history=5)
    w = windows(split, 3)
    changed = w.flat.copy()
    last = w.offsets[1:] - 1
    changed[last] = np.where(w.flat[last] == 1, 2, 1)                   # another last item in every window
    w2 = Histories(changed, w.offsets)
    with torch.no_grad():
        a, b = slot_queries(t, w), slot_queries(t, w2)
        earlier = np.setdiff1d(np.arange(len(w.flat)), last)
        assert torch.allclose(a[earlier], b[earlier], atol=1e-6)        # earlier slots never see the last item
        assert not torch.allclose(a[last], b[last], atol=1e-3)          # (the last slot does)
        # the gate matters: the same pass with the gates of the whole window at every token (a per-sequence
        # gate) gives other queries at the earlier slots
        batch = t.prompts(w, "right")
        rows, lengths = w.row_ids(), np.concatenate([np.arange(1, n + 1) for n in w.lengths])
        states = t.cf_slot_states(w, rows, lengths)
        whole = states[last][:, None].expand(-1, batch.input_ids.shape[1], -1)
        h = t.decode(batch, whole)
        seq_gate = t.head(h[batch.history_items > 0], batch.history_items[batch.history_items > 0])
        assert not torch.allclose(seq_gate[earlier], a[earlier], atol=1e-3)


def test_per_token_gates_vary_along_the_prompt(tiny_recipe, split, cf):
    t = per_slot_teacher(tiny_recipe, split, cf, max_history=5)
    w = windows(split, 2)
    batch = t.prompts(w, "right")
    rows, lengths = w.row_ids(), np.concatenate([np.arange(1, n + 1) for n in w.lengths])
    states = t.cf_slot_states(w, rows, lengths)
    tok = t.token_states(batch.history_items, states)
    is_slot = batch.history_items > 0
    assert torch.equal(tok[is_slot], states)                                  # each slot reads its own state
    first = is_slot.int().argmax(1)
    for b in range(len(w)):
        assert not tok[b, :first[b]].any()                                    # the instruction reads no item


@pytest.mark.parametrize("inject_layer", [0, 1])
def test_per_slot_training_reads_every_training_position_and_its_cache_reproduces_validation(
        tmp_path, toy_data, tiny_llama, split, inject_layer):
    """`anyo teacher train` with teacher.examples=per_slot through the one trainer, then `anyo teacher infer`:
    every epoch reads each training position once, the epoch kept is the LLM alone's best (teacher.select llm),
    and the cache (which must reproduce the teacher's recorded
    validation NDCG@10 to be completed) scores what training validated."""
    import json

    from distill.cli import main
    from distill.positions import training_positions
    from helpers import RECIPE, sets, tiny_recipe_overrides

    run = tmp_path / "run"
    args = ["--out", str(run)] + sets(tiny_recipe_overrides(toy_data, tiny_llama) + [
        "teacher.examples=per_slot", "teacher.use_titles=true", "teacher.max_title_tokens=2", "teacher.epochs=3",
        "teacher.patience=3", "teacher.select=llm", f"teacher.inject_layer={inject_layer}"])
    assert main(["student", "train", RECIPE] + args) == 0
    assert main(["teacher", "train", RECIPE] + args) == 0
    record = json.loads((run / "teacher" / "metrics.json").read_text())
    positions = len(training_positions(split)[0])
    assert [e["examples"] for e in record["curve"]] == [positions * (i + 1) for i in range(3)]
    llm = [e["valid_NDCG@10_llm"] for e in record["curve"]]
    assert record["best_epoch"] == int(np.argmax(llm)) + 1                     # teacher.select llm keeps it
    assert main(["teacher", "infer", RECIPE, "--backend", "hf"] + args) == 0
    assert (run / "teacher_cache" / "manifest.json").is_file()
