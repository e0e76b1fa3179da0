"""The LLaRA-style generative recommender (teacher/generative.py) on a tiny random causal Llama."""

from pathlib import Path

import numpy as np
import pytest
import torch

from distill.config import LlaraConfig, load_recipe
from distill.errors import ConfigError
from teacher.checkpoint import load_generative, save_generative
from teacher.generative import CANS_TOKEN, IGNORE, build_generative, candidate_sets, score_candidates
from teacher.titles import judge, match_candidates, normalise
from teacher.prompt import HISTORY_TOKEN

RECIPE = str(Path(__file__).parents[1] / "recipes" / "ml100k.yaml")


@pytest.fixture(scope="module")
def adapter_cfg(tiny_causal_llama):
    recipe = load_recipe(RECIPE, [f"teacher.model={tiny_causal_llama}", "teacher.num_layers=null",
                                  "teacher.lora_r=4", "teacher.num_experts=2", "teacher.lora_dropout=0.0"])
    return recipe.teacher


def make(split, cf, adapter_cfg, seed=0, **changes):
    cfg = LlaraConfig(**{"max_history": 5, "eval_batch_size": 8, **changes})
    torch.manual_seed(seed)
    model = build_generative(cfg, adapter_cfg, cf, split.titles).eval()
    for n, p in model.named_parameters():  # non-zero LoRA B so the adapter and the gate matter
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    return model


@pytest.fixture(scope="module")
def model(split, cf, adapter_cfg):
    return make(split, cf, adapter_cfg)


# ---------------------------------------------------------------- prompt and labels

def test_prompt_holds_20_shuffled_candidate_slots_and_labels_only_the_answer(model, split):
    prompts = model.prompts
    users = np.arange(8)
    cands, target_pos = candidate_sets(split, "test", users, model.cfg.shuffle_seed)
    targets = split.targets("test")[users]
    # the split's own candidates: the target plus its 19 stored negatives, in a seeded per-user order
    for r, u in enumerate(users):
        assert sorted(cands[r]) == sorted([targets[r], *split.negatives["test"][u]])
        assert cands[r, target_pos[r]] == targets[r]
    assert (target_pos != 0).any(), "the target is not always first: the order is shuffled"
    again, _ = candidate_sets(split, "test", users[::-1], model.cfg.shuffle_seed)
    np.testing.assert_array_equal(again[::-1], cands)             # independent of the batch it is in
    other, _ = candidate_sets(split, "test", users, model.cfg.shuffle_seed + 1)
    assert not np.array_equal(other, cands)                        # and set by the seed

    hist = split.history("test")
    histories = [hist.row(u) for u in users]
    batch = prompts(histories, cands, targets)
    for r in range(len(users)):
        ids, slots, labels = batch.input_ids[r], batch.slot_items[r], batch.labels[r]
        cans_at = (ids == prompts.cans_id).nonzero().flatten()
        assert len(cans_at) == 20
        assert slots[cans_at].tolist() == cands[r].tolist()
        hist_at = (ids == prompts.history_id).nonzero().flatten()
        assert slots[hist_at].tolist() == histories[r][-model.cfg.max_history:].tolist()
        assert (slots > 0).sum() == len(cans_at) + len(hist_at)
        # labels: exactly the answer (target title + EOS) at the end of the row, -100 elsewhere
        answer = prompts.title_tokens[targets[r]].tolist() + [prompts.eos_id]
        labelled = (labels != IGNORE).nonzero().flatten()
        assert labelled.tolist() == list(range(ids.shape[0] - len(answer), ids.shape[0]))
        assert labels[labelled].tolist() == answer == ids[labelled].tolist()
    tok = prompts.tokenizer
    assert tok.convert_ids_to_tokens([prompts.history_id, prompts.cans_id]) == [HISTORY_TOKEN, CANS_TOKEN]
    assert tok(f"love {CANS_TOKEN}", add_special_tokens=False)["input_ids"][-1] == prompts.cans_id
    # without targets the prompt ends at the answer prefix and nothing is labelled
    bare = prompts(histories, cands)
    assert (bare.labels == IGNORE).all()
    assert bare.input_ids[:, -len(prompts.answer_prefix):].tolist() == [prompts.answer_prefix.tolist()] * len(users)


def test_titles_are_unique_and_duplicates_carry_their_id(model, split):
    titles = model.prompts.titles[1:]
    assert len(set(titles)) == len(titles)
    raw = [normalise(t) for t in split.titles[1:]]
    duplicated = [i + 1 for i, t in enumerate(raw) if raw.count(t) > 1]
    assert duplicated, "the toy data has repeated titles (like MovieLens-100K)"
    for i in duplicated:
        assert model.prompts.titles[i].endswith(f"(# {i} )")  # the word-level tokenizer spaces its tokens
    unique = next(i + 1 for i, t in enumerate(raw) if raw.count(t) == 1)
    assert model.prompts.titles[unique] == raw[unique - 1]


def test_loss_is_the_lm_cross_entropy_on_the_answer(model, split):
    users = np.arange(6)
    cands, _ = candidate_sets(split, "valid", users, 0)
    hist = split.history("valid")
    histories = [hist.row(u) for u in users]
    batch = model.prompts(histories, cands, split.targets("valid")[users])
    cf_hist = model.cf_histories(histories)
    model.train()
    loss, n = model.loss(batch, cf_hist)
    assert n == int((batch.labels != IGNORE).sum()) - 0 and torch.isfinite(loss)
    with torch.no_grad():  # the same number from the whole LM with labels (which shifts them itself)
        model.eval()
        x = model.input_embeddings(batch)
        model._set_gate(cf_hist)
        ref = model.lm(inputs_embeds=x, attention_mask=batch.attention_mask,
                       position_ids=(batch.attention_mask.cumsum(1) - 1).clamp(min=0), labels=batch.labels).loss
        model._set_gate(None)
        again, _ = model.loss(batch, cf_hist)
    assert again.item() == pytest.approx(ref.item(), rel=1e-5)
    model.train()
    model.zero_grad()
    model.loss(batch, cf_hist)[0].backward()
    for name in ("in_projector.0.weight", "gate.net.weight"):
        assert dict(model.named_parameters())[name].grad.abs().sum() > 0, name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_A" in n)
    model.zero_grad()
    model.eval()


# ---------------------------------------------------------------- matching

@pytest.mark.parametrize("text,named", [
    ("heat", [0]),                          # one title: valid
    ("heat wave", [1]),                     # a title containing another names only the longer one
    ("i recommend heat wave.", [1]),
    ("heat wave or heat", [0, 1]),          # both named: invalid
    ("toy story and heat", [0, 2]),         # two titles: invalid
    ("nothing here", []),                   # none: invalid
    ("", []),
])
def test_matching_rule(text, named):
    titles = ["heat", "heat wave", "toy story", "story of heat waves"]
    assert match_candidates(text, titles) == named
    valid, correct, which = judge(text, titles, target=1)
    assert valid == (len(named) == 1)
    assert correct == (named == [1])
    assert which == (named[0] if valid else -1)


def test_normalise_takes_the_first_line_case_and_spaces():
    assert normalise("  Heat   Wave (1995)\nToy Story") == "heat wave (1995)"
    assert normalise("\n\n") == ""


# ---------------------------------------------------------------- generation

class ForceTokens:
    """A logits processor that makes greedy decoding emit `forced[b]` (then EOS) in row b."""

    def __init__(self, forced: list[list[int]]):
        self.forced = forced

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1]                       # generate() from inputs_embeds starts with no ids
        out = torch.full_like(scores, float("-inf"))
        for b, seq in enumerate(self.forced):
            out[b, seq[min(step, len(seq) - 1)]] = 0.0
        return out


@pytest.mark.parametrize("which,hr", [("target", 1.0), ("negative", 0.0)])
def test_generate_and_match_scores_forced_answers(model, split, which, hr):
    prompts = model.prompts

    def force(users, cands, target_pos):
        pick = target_pos if which == "target" else (target_pos + 1) % cands.shape[1]
        return [ForceTokens([prompts.title_tokens[cands[r, pick[r]]].tolist() + [prompts.eos_id]
                             for r in range(len(users))])]

    users = np.arange(12)
    scores = score_candidates(model, split, "test", batch_size=5, users=users, logits_processor_for=force)
    assert scores.metrics["HR@1"] == hr
    assert scores.metrics["ValidRatio"] == 1.0
    assert scores.metrics["users"] == 12
    cands, target_pos = candidate_sets(split, "test", users, model.cfg.shuffle_seed)
    want = cands[np.arange(12), target_pos if which == "target" else (target_pos + 1) % 20]
    np.testing.assert_array_equal(scores.named, want)


def test_unforced_generation_is_judged_and_left_padding_does_not_change_it(model, split):
    users = np.arange(6)
    cands, _ = candidate_sets(split, "test", users, 0)
    hist = split.history("test")
    histories = [hist.row(u) for u in users]
    cf_hist = model.cf_histories(histories)
    together = model.generate_ids(model.prompts(histories, cands), cf_hist, max_new_tokens=6)
    alone = [model.generate_ids(model.prompts([histories[r]], cands[r:r + 1]), cf_hist[r:r + 1], 6)[0]
             for r in range(len(users))]
    assert together == alone and any(together)
    scores = score_candidates(model, split, "test", batch_size=4, users=users)
    assert 0.0 <= scores.metrics["HR@1"] <= scores.metrics["ValidRatio"] <= 1.0
    assert len(scores.outputs) == 6


# ---------------------------------------------------------------- backbone, save/load, config

def test_backbone_loads_with_its_tied_head_from_a_headless_folder(tmp_path, tiny_causal_llama):
    """The GGUF cache stores a headless model's weights (no `model.` prefix, no lm_head)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from teacher.backbone import load_backbone
    base = AutoModel.from_pretrained(tiny_causal_llama)
    folder = tmp_path / "headless"
    AutoConfig.from_pretrained(tiny_causal_llama).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_causal_llama).save_pretrained(folder)
    save_file({k: v.detach().clone().contiguous() for k, v in base.state_dict().items()}, str(folder / "model.safetensors"))
    lm, _, _ = load_backbone(str(folder), num_layers=1, with_head=True)
    assert type(lm).__name__ == "LlamaForCausalLM" and len(lm.model.layers) == 1
    assert torch.equal(lm.lm_head.weight, base.embed_tokens.weight)
    assert torch.equal(lm.model.layers[0].self_attn.q_proj.weight, base.layers[0].self_attn.q_proj.weight)
    headless, _, _ = load_backbone(str(folder), num_layers=1)
    assert type(headless).__name__ == "LlamaModel"


def test_save_load_round_trip(tmp_path, model, split, cf):
    save_generative(model, tmp_path / "llara", {"split_hash": split.hash})
    assert (tmp_path / "llara" / "adapter" / "adapter_model.safetensors").is_file()
    loaded, meta = load_generative(tmp_path / "llara", cf, split.titles, split.hash)
    users = np.arange(4)
    cands, _ = candidate_sets(split, "test", users, 0)
    hist = split.history("test")
    histories = [hist.row(u) for u in users]
    batch = model.prompts(histories, cands, split.targets("test")[users])
    with torch.no_grad():
        assert model.loss(batch, model.cf_histories(histories))[0].item() == \
            loaded.loss(batch, loaded.cf_histories(histories))[0].item()
    assert loaded.recommend(histories, cands) == model.recommend(histories, cands)


@pytest.mark.parametrize("override,key", [
    ("llara.num_candidates=0", "llara.num_candidates: must be 20"),
    ("llara.num_candidates=10", "llara.num_candidates"),
    ("llara.batch_size=0", "llara.batch_size: must be >= 1"),
    ("llara.examples_per_epoch=-1", "llara.examples_per_epoch"),
    ("llara.lr=0", "llara.lr"),
    ("llara.warmup_ratio=1.5", "llara.warmup_ratio"),
    ("llara.valid_users=0", "llara.valid_users"),
    ("llara.answer_prefix=' '", "llara.answer_prefix"),
    ("llara.enabled=3", "llara.enabled: expected bool"),
    ("llara.candidates=20", "llara.candidates: unknown key"),
])
def test_bad_llara_settings_fail_at_recipe_load(override, key):
    with pytest.raises(ConfigError, match=key):
        load_recipe(RECIPE, [override])


def test_prompt_longer_than_the_context_names_the_key(split, cf, adapter_cfg):
    with pytest.raises(ConfigError, match=r"llara.max_history: the longest prompt .* context of 256"):
        make(split, cf, adapter_cfg, max_history=50)


# ---------------------------------------------------------------- the training task

def test_task_batches_are_seeded_and_hold_the_target_and_19_unseen_negatives(model, split):
    from teacher.generative_train import GenerativeTask
    task = GenerativeTask(model, split)
    first = task.batches(np.random.default_rng(3), torch.Generator().manual_seed(3))
    again = task.batches(np.random.default_rng(3), torch.Generator().manual_seed(3))
    assert len(first) == task.num_batches()
    for a, b in zip(first, again):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    seq = split.sequences
    positions = []
    for users, pos, targets, cands in first:
        for u, t, target, row in zip(users, pos, targets, cands):
            assert target == seq.row(u)[t]
            assert len(set(row.tolist())) == 20 and (row == target).sum() == 1
            assert not (set(row.tolist()) - {target}) & set(seq.row(u).tolist())
            positions.append(int(np.flatnonzero(row == target)[0]))
    assert len(set(positions)) > 1  # the target's place is shuffled


def check_training_candidates(seqs, n_items, users, targets, cands, pos, dense=()):
    assert cands.shape == (len(users), 20) and cands.dtype == np.int64
    for r, (u, target) in enumerate(zip(users.tolist(), targets.tolist())):
        row = cands[r].tolist()
        assert row[pos[r]] == target and row.count(target) == 1
        negatives = row[:pos[r]] + row[pos[r] + 1:]
        assert len(set(negatives)) == 19, f"row {r}: a negative is repeated"
        assert all(1 <= i <= n_items for i in negatives)
        if u not in dense:
            assert not set(negatives) & set(seqs.row(u).tolist()), f"row {r}: a negative is in user {u}'s sequence"


def test_training_candidates_hold_distinct_negatives_outside_the_sequence_and_the_target_anywhere(split):
    from types import SimpleNamespace
    from distill.histories import Histories
    from teacher.generative import training_candidates
    users = np.array([0, 1, 2, 0, 0, 3] * 30)                     # a user may fill several rows
    targets = np.array([split.sequences.row(u)[-1] for u in users])
    cands, pos = training_candidates(split, users, targets, np.random.default_rng(0), 20)
    check_training_candidates(split.sequences, split.n_items, users, targets, cands, pos)
    assert len(set(pos.tolist())) > 1                               # the target's place is drawn
    again, again_pos = training_candidates(split, users, targets, np.random.default_rng(0), 20)
    np.testing.assert_array_equal(again, cands)                    # seeded
    np.testing.assert_array_equal(again_pos, pos)
    assert not np.array_equal(training_candidates(split, users, targets, np.random.default_rng(1), 20)[0], cands)
    # a catalogue too small for a user's sequence (fewer than 19 unseen items): only the target is left out
    seqs = Histories.from_rows([np.arange(1, 4), np.arange(1, 23), np.arange(2, 26)])    # 25 items
    small = SimpleNamespace(sequences=seqs, n_items=25)
    users = np.array([0, 1, 2, 1, 0] * 20)
    targets = np.array([seqs.row(u)[-1] for u in users])
    cands, pos = training_candidates(small, users, targets, np.random.default_rng(2), 20)
    check_training_candidates(seqs, 25, users, targets, cands, pos, dense={1, 2})
    assert cands[users == 1].min() <= 22                           # a dense user does draw seen items
    empty, _ = training_candidates(small, np.array([], dtype=np.int64), np.array([], dtype=np.int64),
                                   np.random.default_rng(0), 20)
    assert empty.shape == (0, 20)


def test_trainer_fits_the_task_and_keeps_the_best_epoch(split, cf, adapter_cfg):
    from distill.trainer import Trainer, TrainerConfig
    from teacher.generative_train import GenerativeTask
    model = make(split, cf, adapter_cfg, examples_per_epoch=16, batch_size=8, valid_users=6, eval_batch_size=6)
    task = GenerativeTask(model, split)
    fit = Trainer(task, TrainerConfig(epochs=2, patience=2, lr=1e-2, schedule="cosine"), 0, "llara").fit()
    assert [c["epoch"] for c in fit.curve] == [1, 2] and fit.examples == 32 and fit.tokens > 0
    assert all(0.0 <= c["valid_HR@1"] <= c["valid_ValidRatio"] <= 1.0 for c in fit.curve)
    assert set(fit.best_state) == set(task.trainable) and any("lora_A" in k for k in fit.best_state)
    before = {k: v.clone() for k, v in task.snapshot().items()}
    task.restore(fit.best_state)
    assert all(torch.equal(task.trainable[k], fit.best_state[k]) for k in before)


# ---------------------------------------------------------------- the stage

def test_baseline_llara_stage_writes_its_folder_and_is_skipped_when_up_to_date(tmp_path, toy_data, tiny_llama,
                                                                                tiny_causal_llama, capsys):
    import json
    from helpers import sets, tiny_recipe_overrides
    from distill.cli import main
    run = tmp_path / "run"
    overrides = tiny_recipe_overrides(toy_data, tiny_llama) + [
        f"teacher.model={tiny_causal_llama}", "llara.examples_per_epoch=16", "llara.batch_size=8",
        "llara.epochs=2", "llara.patience=2", "llara.valid_users=8", "llara.eval_batch_size=20", "llara.max_history=5"]
    assert main(["baseline", "llara", RECIPE, "--out", str(run)] + sets(overrides)) == 2   # no CF model yet
    assert "student_alone: not found" in capsys.readouterr().err
    assert main(["student", "train", RECIPE, "--out", str(run)] + sets(overrides)) == 0
    assert main(["baseline", "llara", RECIPE, "--out", str(run)] + sets(overrides)) == 0
    out = run / "llara"
    for name in ("adapter/adapter_model.safetensors", "heads.safetensors", "llara.json", "metrics.json",
                 "test_outputs.json"):
        assert (out / name).is_file(), name
    assert not (run / "llara.resume").exists()
    record = json.loads((out / "metrics.json").read_text())
    m = record["candidates"]
    assert set(m) >= {"HR@1", "ValidRatio", "HR@1_valid"} and m["users"] == 40
    assert record["valid_ratio"] == m["ValidRatio"] and 0 <= m["HR@1"] <= m["ValidRatio"] <= 1
    assert [c["epoch"] for c in record["curve"]] == [1, 2]
    assert record["examples_per_second"] > 0 and record["train_seconds"] > 0
    assert len(json.loads((out / "test_outputs.json").read_text())) == 40
    capsys.readouterr()
    assert main(["baseline", "llara", RECIPE, "--out", str(run)] + sets(overrides)) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["bench", str(run), "--no-cost"]) == 0                      # the report shows it as a row
    row = json.loads((run / "report" / "report.json").read_text())["models"]["llara"]
    assert row["metrics"] == {"HR@1(candidates)": m["HR@1"], "ValidRatio": m["ValidRatio"]}
    assert "| generative (LLaRA-style) | 1 | n/a | n/a | n/a |" in (run / "report" / "report.md").read_text()
    capsys.readouterr()
    main(["verify", str(run)])                      # (the --no-cost report is stale against the recipe's bench)
    states = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()}
    assert states["llara"] == "ok" and states["student_alone"] == "ok"


@pytest.mark.slow
def test_real_smollm2_loads_with_its_tied_head_from_the_gguf_cache():
    """The dequantized GGUF cache is keyed for AutoModel; AutoModelForCausalLM reads it and ties the head."""
    from teacher.backbone import dequantized_folder, embedded_gguf, load_backbone
    lm, tokenizer, folder = load_backbone("smollm2-135m", num_layers=2, with_head=True)
    assert folder == dequantized_folder(embedded_gguf())
    assert type(lm).__name__ == "LlamaForCausalLM" and len(lm.model.layers) == 2
    assert lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()
    assert tokenizer.eos_token_id is not None
