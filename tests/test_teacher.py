import dataclasses
import json

import numpy as np
import pytest
import torch

from distill.errors import ConfigError
from student.model import SASRec, SASRecConfig
from teacher.backbone import load_backbone
from teacher.item_text import mean_states, standardise
from teacher.checkpoint import load_teacher, save_teacher
from teacher.model import build_teacher


def make(tiny_recipe, split, cf, seed=0, **changes):
    cfg = dataclasses.replace(tiny_recipe.teacher, **{"lora_dropout": 0.0, "cf_weights": [0.0], **changes})
    torch.manual_seed(seed)
    return build_teacher(cfg, cf, split.titles, texts=split.texts).eval()


def histories(split, n=6):
    return split.history("test").take(np.arange(n))


@pytest.fixture
def cf_dir(tmp_path, split, cf):
    from student.model import save_student
    save_student(cf, tmp_path / "student_alone", {"split_hash": split.hash})
    return tmp_path / "student_alone"


def saved(t, folder, split, cf_dir):
    from distill.artifacts import sha256_file
    save_teacher(t, folder, {"split_hash": split.hash,
                             "inputs": {"cf_sha256": sha256_file(cf_dir / "model.safetensors")}})
    return folder


def test_lm_head_is_absent(tiny_recipe, split, cf):
    t = make(tiny_recipe, split, cf)
    names = [n for n, _ in t.named_modules()]
    assert not any("lm_head" in n for n in names)
    assert type(t.backbone.get_base_model()).__name__ == "LlamaModel"


def test_only_history_slots_change_with_cf_embeddings(tiny_recipe, split, cf):
    t = make(tiny_recipe, split, cf)
    batch = t.prompts(histories(split))
    before = t.input_embeddings(batch).detach().clone()
    with torch.no_grad():
        t.cf.item_emb.weight.add_(1.0)
    after = t.input_embeddings(batch).detach()
    with torch.no_grad():
        t.cf.item_emb.weight.sub_(1.0)
    changed = (before != after).any(-1)
    assert torch.equal(changed, batch.history_items > 0)


def test_left_and_right_padding_pool_the_same_vector(tiny_recipe, split, cf):
    t = make(tiny_recipe, split, cf)
    h = histories(split)
    with torch.no_grad():
        left, right = t.query(h, "left"), t.query(h, "right")
    assert torch.allclose(left, right, atol=1e-5)


def test_single_expert_moe_equals_plain_lora(tiny_recipe, split, cf):
    lora = make(tiny_recipe, split, cf, adapter="lora", num_experts=1)
    for p in lora.parameters():  # give LoRA B non-zero weights so the adapter matters
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    moe = make(tiny_recipe, split, cf, adapter="moe_lora", num_experts=1)
    moe.load_state_dict(lora.state_dict(), strict=False)
    h = histories(split)
    with torch.no_grad():
        assert torch.allclose(lora.query(h), moe.query(h), atol=1e-5)


def test_gate_differs_per_history_and_receives_gradient(tiny_recipe, split, cf):
    t = make(tiny_recipe, split, cf, adapter="moe_lora", num_experts=2).train()
    for n, p in t.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    h = histories(split)
    g = t.gate.gates(t.cf.encode_users(torch.from_numpy(h.padded(10))))
    assert not torch.allclose(g[0], g[1])
    t.query(h).pow(2).sum().backward()
    assert t.gate.net.weight.grad is not None and t.gate.net.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("expert", [0, 1])
def test_one_hot_gate_equals_lora_with_the_other_experts_slice_zeroed(tiny_recipe, split, cf, expert):
    lora = make(tiny_recipe, split, cf, adapter="lora", lora_r=4, num_experts=1)
    for n, p in lora.named_parameters():
        if "lora_" in n:
            torch.nn.init.normal_(p, std=0.3)
    moe = make(tiny_recipe, split, cf, adapter="moe_lora", lora_r=4, num_experts=2)
    moe.load_state_dict(lora.state_dict(), strict=False)
    moe.gate.gates = lambda cf_repr: torch.eye(2)[[expert] * len(cf_repr)]   # one-hot on `expert`
    other = slice(2, 4) if expert == 0 else slice(0, 2)                        # the other expert's rank slice
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_A" in n:
                p[other] = 0.0
    h = histories(split)
    with torch.no_grad():
        assert torch.allclose(moe.query(h), lora.query(h), atol=1e-5)


def test_frozen_cf_encoder_stays_in_eval_mode_while_training(tiny_recipe, split, cf):
    t = make(tiny_recipe, split, cf).train()
    assert t.training and not t.cf.training and not any(m.training for m in t.cf.modules())


def test_adapter_save_load_round_trip(tmp_path, tiny_recipe, split, cf, cf_dir):
    t = make(tiny_recipe, split, cf)
    for p in t.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    folder = saved(t, tmp_path / "teacher", split, cf_dir)
    assert (folder / "adapter" / "adapter_model.safetensors").is_file()
    loaded, _ = load_teacher(folder, cf_dir, split)
    h = histories(split)
    with torch.no_grad():
        assert torch.equal(t.query(h), loaded.query(h))


def test_teacher_on_a_retrained_cf_model_is_stale(tmp_path, tiny_recipe, split, cf, cf_dir):
    from distill.errors import StaleError
    from student.model import save_student
    folder = saved(make(tiny_recipe, split, cf), tmp_path / "teacher", split, cf_dir)
    torch.manual_seed(1)
    retrained = SASRec(SASRecConfig(split.n_items, 10, hidden_size=16, num_layers=1, num_heads=2, dropout=0.0))
    save_student(retrained, cf_dir, {"split_hash": split.hash})
    with pytest.raises(StaleError, match="another CF model"):
        load_teacher(folder, cf_dir, split)


def test_teacher_outputs_match_brute_force(tiny_recipe, split, cf):
    t = make(tiny_recipe, split, cf)
    h = histories(split)
    out = t.get_teacher_outputs(h, k=5)
    scores = (out.query @ t.item_table.detach().T).numpy()
    scores[:, 0] = -np.inf
    for b, row in enumerate(h):
        scores[b, row] = -np.inf
        want = np.argsort(-scores[b], kind="stable")[:5]
        assert out.topk_ids[b].tolist() == want.tolist()
        assert np.allclose(out.topk_scores[b].numpy(), scores[b, want] / t.cfg.temperature, rtol=1e-5)


def test_bad_backbones(tmp_path, tiny_llama):
    with pytest.raises(ConfigError, match="does not exist"):
        load_backbone(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="num_layers: 5 > the model's 2 layers"):
        load_backbone(str(tiny_llama), num_layers=5)
    from transformers import BertConfig
    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(tmp_path / "bert")
    with pytest.raises(ConfigError, match="not a decoder-only LM"):
        load_backbone(str(tmp_path / "bert"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 20)
    with pytest.raises(ConfigError, match="cannot read GGUF file"):
        load_backbone(str(bad))


@pytest.mark.parametrize("w", [0.0, 0.3, 1.0])
def test_query_blends_llm_and_cf_retrievers(tiny_recipe, split, cf, w):
    t = make(tiny_recipe, split, cf, train_item_table=False)
    h = split.history("valid")
    with torch.no_grad():
        llm = t.encode(h, blend=False)
        t.cf_weight.fill_(w)
        q = t.encode(h)
    np.testing.assert_allclose(q, (1 - w) * llm + w * cf.encode(h), rtol=1e-5, atol=1e-6)
    assert not t.item_table.requires_grad
    np.testing.assert_array_equal(t.item_vectors(), cf.item_vectors())


def test_cf_weight_round_trips(tmp_path, tiny_recipe, split, cf, cf_dir):
    t = make(tiny_recipe, split, cf)
    with torch.no_grad():
        t.cf_weight.fill_(0.7)
    loaded, _ = load_teacher(saved(t, tmp_path / "teacher", split, cf_dir), cf_dir, split)
    assert loaded.cf_weight.item() == pytest.approx(0.7)


def test_text_item_side_reads_the_cached_text_states_and_keeps_w1_the_cf_retriever(tmp_path, tiny_recipe, split, cf,
                                                                                   cf_dir, monkeypatch):
    monkeypatch.setenv("ANYO_CACHE", str(tmp_path / "cache"))
    t = make(tiny_recipe, split, cf, item_side="both")
    D = t.item_table.shape[1]
    assert torch.equal(t.items()[:, :D], t.item_table)                     # [CF row ; the text head of its text]
    assert torch.allclose(t.items()[:, D:], t.text_head(t.text_states)) and t.items()[1:, D:].any()
    # one text by hand: the mean of the backbone's last hidden states over its tokens, then standardised
    tokenizer = load_backbone(t.cfg.model, t.cfg.num_layers, t.cfg.dtype)[1]
    raw = mean_states(t.backbone, tokenizer, split.texts, t.cfg.max_text_tokens)
    ids = tokenizer(" " + split.texts[3], add_special_tokens=False)["input_ids"][:t.cfg.max_text_tokens]
    with torch.no_grad():
        h = t.backbone.get_base_model()(input_ids=torch.tensor([ids])).last_hidden_state[0].mean(0)
    assert torch.allclose(raw[3], h, atol=1e-5)
    assert torch.allclose(t.text_states, standardise(raw), atol=1e-5) and not t.text_states[0].any()
    assert len(list((tmp_path / "cache" / "item_states").glob("*.safetensors"))) == 1   # computed once, cached
    # trained adapters do not change them (the frozen backbone's, adapters off)
    with torch.no_grad():
        for m in t.backbone.modules():
            if hasattr(m, "lora_B"):
                torch.nn.init.normal_(m.lora_B["default"].weight)
    assert torch.allclose(mean_states(t.backbone, tokenizer, split.texts, t.cfg.max_text_tokens), raw, atol=1e-5)
    # a training step moves the items through their texts, and a save/load round trip keeps them
    h = histories(split)
    loss = -(t.query(h, blend=False) @ t.items().T).logsumexp(1).sum()
    loss.backward()
    assert t.text_head.proj.weight.grad.abs().sum() > 0
    with torch.no_grad():
        t.text_head.proj.weight.normal_()
    assert t.item_vectors()[1:, D:].any()
    loaded, _ = load_teacher(saved(t, tmp_path / "teacher", split, cf_dir), cf_dir, split)
    assert np.allclose(loaded.item_vectors(), t.item_vectors(), atol=1e-6)
    # `text`: the LLM's query scores only the text part; at w = 1 both sides are the CF retriever exactly
    for side, text_query in (("text", False), ("both", False), ("text", True)):
        t = make(tiny_recipe, split, cf, item_side=side, text_query=text_query)
        with torch.no_grad():
            t.text_head.proj.weight.normal_()
            q_llm = t.query(h, blend=False)
            if side == "text":
                assert not q_llm[:, :D].any() and q_llm[:, D:].any()
            if text_query:   # the last history item's own text vector (the tied head) is part of the LLM's query
                last = torch.from_numpy(np.asarray([r[-1] for r in h]))
                t.cfg.text_query = False
                without = t.query(h, blend=False)
                t.cfg.text_query = True
                added = t.query(h, blend=False) - without
                assert torch.allclose(added[:, D:], t.items()[last, D:], atol=1e-5)
            t.cf_weight.fill_(1.0)
            q_cf = t.cf.encode_users(torch.from_numpy(h.padded(t.cf.cfg.max_len)))
            assert torch.allclose(t.query(h) @ t.items().T, q_cf @ t.item_table.T, atol=1e-5)


def test_last_items_reads_the_last_history_slot():
    from teacher.model import last_items
    slots = torch.tensor([[0, 0, 5, 0, 7, 0], [3, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    assert last_items(slots).tolist() == [7, 3, 0]


def test_text_item_side_without_texts_is_refused(tiny_recipe, split, cf):
    cfg = dataclasses.replace(tiny_recipe.teacher, item_side="text")
    with pytest.raises(ConfigError, match="teacher.item_side: text needs item texts"):
        build_teacher(cfg, cf, split.titles, texts=[""] * len(split.titles))


def test_prompts_pad_with_the_pad_token_else_eos_else_0():
    """One rule for the dense teacher's PromptBuilder and the generative baseline's LlaraPrompts."""
    from types import SimpleNamespace
    from teacher.prompt import pad_token_id
    assert pad_token_id(SimpleNamespace(pad_token_id=3, eos_token_id=2)) == 3
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0


def test_the_text_head_starts_as_the_cosine_of_the_texts_states():
    """Before training, v_i . v_j = g^2 cos(s_i, s_j) where the head keeps every principal direction, so texts
    that share words score high at once; a row of 0 (no text, padding) stays 0."""
    from teacher.item_text import TextHead
    torch.manual_seed(0)
    states = torch.cat([torch.zeros(1, 16), torch.randn(6, 16)])             # 6 items: rank 6 <= D = 8
    v = TextHead(states, dim=8)(states).detach()
    s = torch.nn.functional.normalize(states, dim=1)
    assert not v[0].any()
    assert torch.allclose(v[1:] @ v[1:].T, 9.0 * s[1:] @ s[1:].T, atol=1e-4)


def test_a_text_head_saved_before_the_tied_head_is_refused_as_stale(tmp_path, tiny_recipe, split, cf, cf_dir,
                                                                     monkeypatch):
    """heads.safetensors of an older anyo (text_head.weight, no text_head.proj/gain), its record intact: one line
    that says to retrain, not a 'corrupt' verdict or a key error."""
    from safetensors.torch import load_file, save_file
    from distill.errors import StaleError
    from teacher.checkpoint import checkpoint_hash
    monkeypatch.setenv("ANYO_CACHE", str(tmp_path / "cache"))
    folder = saved(make(tiny_recipe, split, cf, item_side="text"), tmp_path / "teacher", split, cf_dir)
    heads = load_file(str(folder / "heads.safetensors"))
    heads["text_head.weight"] = heads.pop("text_head.proj.weight")
    del heads["text_head.gain"]
    save_file(heads, str(folder / "heads.safetensors"))
    record = json.loads((folder / "teacher.json").read_text())
    (folder / "teacher.json").write_text(json.dumps({**record, "checkpoint_hash": checkpoint_hash(folder)}))
    with pytest.raises(StaleError, match="older anyo.*retrain"):
        load_teacher(folder, cf_dir, split)
