"""The text item side end to end: a cold item found through its text, by the teacher and by the student
that inherits it (distill.cold_init, collaborative embedding distillation), served by `anyo recommend`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import RECIPE, WORDS, sets, tiny_recipe_overrides
from distill.cli import main
from distill.data import load_split
from student.cold_start import init_cold_rows, ridge_map
from student.embedding_distillation import CollaborativeEmbedding
from student.model import SASRec, SASRecConfig

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from text_decides import generate, write  # noqa: E402

# a prompt that is only the last item's title and " is": the tiny random Llama then learns fast
TEXT_TEACHER = ["data.name=td", "data.cold_items=0.3", "teacher.item_side=text", "teacher.use_titles=true",
                "teacher.max_history=1", "teacher.instruction=''", "teacher.query_text=' is'",
                "teacher.adapter=lora", "teacher.lr=0.01", "teacher.temperature=0.1", "teacher.cf_weights=[0.0, 1.0]",
                "teacher.text_query=true", "teacher.examples_per_epoch=800", "teacher.epochs=4", "teacher.patience=4"]


@pytest.fixture(scope="module")
def franchise_data(tmp_path_factory) -> Path:
    """60 two-item franchises named by the tiny tokenizer's words ("dark king", "dark king 2"); every user
    watches whole franchises, so a sequel always follows its first item."""
    folder = tmp_path_factory.mktemp("franchises")
    seqs, titles, years, genres, bayes = generate(users=500, franchises=60, max_sequels=1, standalone=0,
                                                  mean_length=5, follow=1.0, noise=0.0, seed=0, words=WORDS)
    write(folder, "td", seqs, titles, years, genres, bayes, {})
    return folder


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, franchise_data, tiny_llama):
    """`anyo run` of the tiny recipe on the franchise data: 30% cold items, a text teacher, a distilled student
    whose cold rows start from the teacher's text vectors."""
    run = tmp_path_factory.mktemp("text-run")
    overrides = tiny_recipe_overrides(franchise_data, tiny_llama) + TEXT_TEACHER + [
        "student.epochs=10", "student.patience=10", "distill.cold_init=true", "distill.cold_negatives=false",
        "distill.positions=5",
        "distill.k=10", "bench.measure_cost=false"]
    assert main(["run", RECIPE, "--out", str(run)] + sets(overrides)) == 0
    return run


def test_cold_item_text_vector_scores_it_above_a_random_item(text_run):
    """A cold sequel, never in training, is found through its text: for histories ending with its first item
    the teacher's LLM query scores it above a random item far more often than chance."""
    from student.model import load_student
    from teacher.checkpoint import load_teacher
    split = load_split(text_run / "split")
    teacher, _ = load_teacher(text_run / "teacher", text_run / "student_alone", split)
    pop, hist, target = split.item_popularity(), split.history("test"), split.targets("test")
    scores = teacher.encode(hist, blend=False) @ teacher.item_vectors().T                # (n, N+1) q_LLM
    cf, _ = load_student(text_run / "student_alone", split.hash, split.n_items)
    cf_scores = cf.encode(hist) @ cf.item_vectors().T
    rng = np.random.default_rng(0)
    wins, cf_wins = [], []
    for u in np.flatnonzero(pop[target] == 0):                                            # cold targets
        others = np.setdiff1d(np.arange(1, split.n_items + 1), np.r_[hist.row(u), target[u]])
        rand = rng.choice(others, size=20)
        wins.append((scores[u, target[u]] > scores[u, rand]).mean())
        cf_wins.append((cf_scores[u, target[u]] > cf_scores[u, rand]).mean())
    assert len(wins) >= 30
    assert np.mean(wins) > 0.65 > np.mean(cf_wins)                  # the CF model cannot: no interactions
    record = json.loads((text_run / "teacher" / "metrics.json").read_text())
    assert record["cold"]["users"] == len(wins) and "cold" in record["llm_alone"]


def test_exported_distilled_student_returns_a_cold_item_the_student_alone_never_returns(text_run, tmp_path, capsys):
    from distill.exported import load_export
    split = load_split(text_run / "split")
    cold = {split.items[i] for i in split.cold_items}
    hist = [[split.items[i] for i in row] for row in split.history("test")]
    returned = {}
    for name in ("student_alone", "student_distilled"):
        out = tmp_path / name
        assert main(["export", str(text_run), "--out", str(out), "--model", name]) == 0
        recs = load_export(out).recommend_many(hist, k=10)
        returned[name] = [[r["item"] for r in row if r["item"] in cold] for row in recs]
    never = {i for row in returned["student_alone"] for i in row}
    new = {i for row in returned["student_distilled"] for i in row} - never
    assert new                                   # a cold item only the distilled student recommends
    u, item = next((u, i) for u, row in enumerate(returned["student_distilled"]) for i in row if i in new)
    # `anyo recommend` serves it (the path `anyo serve` shares)
    capsys.readouterr()
    assert main(["recommend", str(tmp_path / "student_distilled"), "--history", ",".join(hist[u]), "-k", "10",
                 "--json"]) == 0
    assert item in [r["item"] for r in json.loads(capsys.readouterr().out)["items"]]
    record = json.loads((text_run / "student_distilled" / "metrics.json").read_text())
    assert record["teacher_item_part"] == "text" and record["cold_rows_initialised"] >= len(split.cold_items)


def test_ced_folding_keeps_cold_rows():
    """The folded table holds e + gamma W e_T for every item, cold ones included: their text reaches the
    plain SASRec that is saved and served."""
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(12, 5, hidden_size=8, num_layers=1, num_heads=2, dropout=0.0))
    text = np.random.default_rng(0).normal(size=(13, 6)).astype(np.float32)            # (N+1, D_T)
    model.item_prior = CollaborativeEmbedding(text, 8, gamma=0.5)
    with torch.no_grad():
        model.item_prior.proj.weight.normal_()
        cold = torch.tensor([3, 7])
        model.item_emb.weight[cold] = 0                                              # no interactions of their own
        expected = model.item_table.clone()
    model.fold_item_prior()
    assert model.item_prior is None
    assert torch.allclose(model.item_emb.weight, expected)
    assert model.item_emb.weight[cold].abs().sum(1).min() > 0 and not model.item_emb.weight[0].any()


def test_cold_init_maps_text_vectors_with_the_map_of_the_seen_items():
    rng = np.random.default_rng(0)
    text = rng.normal(size=(21, 6)).astype(np.float32)
    text[0] = 0
    A = rng.normal(size=(6, 4))
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(20, 5, hidden_size=4, num_layers=1, num_heads=2, dropout=0.0))
    with torch.no_grad():
        model.item_emb.weight[1:] = torch.from_numpy(text[1:] @ A).float()         # rows exactly linear in text
        before = model.item_emb.weight.clone()
        model.item_emb.weight[[4, 9]] = 5.0                                        # what a cold row looks like
    pop = np.ones(21, np.int64)
    pop[[0, 4, 9]] = 0
    assert init_cold_rows(model, text, pop) == 2
    w = model.item_emb.weight.detach()
    assert torch.allclose(w[[4, 9]], before[[4, 9]], rtol=0.05, atol=0.1)                    # recovered from the text
    assert torch.equal(w[pop > 0], before[pop > 0]) and not w[0].any()                # seen rows untouched
    assert ridge_map(text, before.numpy(), np.flatnonzero(pop)).shape == (21, 4)


@pytest.mark.parametrize("rows", ["unseen", "all"])
def test_text_tower_cold_row_is_its_text_alone_and_the_fold_keeps_the_scores(rows):
    """distill.ced_text_rows: a tower item's row is gamma W e_T of its text whatever its ID row holds, no gradient
    reaches that ID row, and the folded plain SASRec scores every item as the model with the tower did."""
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(12, 5, hidden_size=8, num_layers=1, num_heads=2, dropout=0.0))
    text = np.random.default_rng(0).normal(size=(13, 6)).astype(np.float32)
    cold = torch.tensor([3, 7]) if rows == "unseen" else torch.arange(1, 13)
    model.item_prior = CollaborativeEmbedding(text, 8, gamma=2.0, text_rows=cold.numpy())
    with torch.no_grad():
        model.item_prior.proj.weight.normal_()
        model.item_emb.weight[cold] = 9.0                                            # a pushed-away ID row
    table = model.item_table
    text_term = 2.0 * model.item_prior.proj(model.item_prior.teacher_items)
    assert torch.equal(table[cold], text_term[cold])
    seq = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    (model.encode_users(seq) @ table.T).logsumexp(1).sum().backward()
    assert not model.item_emb.weight.grad[cold].any()
    if rows == "unseen":                                                             # a seen row keeps its ID part
        assert not torch.equal(table[5], text_term[5]) and model.item_emb.weight.grad[5].any()
    assert model.item_prior.proj.weight.grad.any()
    model.eval()
    with torch.no_grad():
        before = model.encode_users(seq) @ model.item_table.T
        model.fold_item_prior()
        after = model.encode_users(seq) @ model.item_table.T
    assert model.item_prior is None and torch.allclose(before, after, atol=1e-5)
    assert torch.allclose(model.item_emb.weight[cold], text_term[cold].detach())


def test_text_tower_rows_are_the_unseen_items_or_every_item():
    from types import SimpleNamespace
    from distill.stages.distill import text_tower_rows
    split = SimpleNamespace(n_items=5, item_popularity=lambda: np.array([0, 2, 0, 1, 0, 3]))   # row 0: padding
    assert text_tower_rows(split, "none") is None
    assert text_tower_rows(split, "unseen").tolist() == [2, 4]
    assert text_tower_rows(split, "all").tolist() == [1, 2, 3, 4, 5]
