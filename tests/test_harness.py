import json

import numpy as np
import pytest

from distill.cli import main
from distill.config import DataConfig
from distill.data import build_split, save_split
from distill.histories import Histories
from distill.harness import evaluate, rank_metrics, repeated_targets
from distill.search import Exclusions, ItemIndex, ranking_exclusions


@pytest.fixture(scope="module")
def split(toy_data):
    return build_split(DataConfig(name="toy", path=str(toy_data)))


def random_vectors(split, d=8, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((split.n_users, d)).astype(np.float32),
            rng.standard_normal((split.n_items + 1, d)).astype(np.float32))


@pytest.mark.parametrize("mask", [True, False])
def test_faiss_and_brute_force_agree(split, mask):
    users, items = random_vectors(split)
    a = evaluate(split, users, items, "test", mask_history=mask, index="Flat")
    b = evaluate(split, users, items, "test", mask_history=mask, index="brute")
    assert np.array_equal(a.topk, b.topk)
    assert a.metrics == b.metrics


def test_chunked_masked_search_equals_one_pass(split, monkeypatch):
    """Queries searched in chunks by exclusion count, each chunk at its own depth, give the
    same top-K as one pass at the deepest depth, in the callers' query order."""
    import distill.search as search
    users, items = random_vectors(split)
    ex = Exclusions.from_histories(split.history("test"), len(items))
    whole = ItemIndex(items).search(users, 10, ex)
    monkeypatch.setattr(search, "EXCLUSION_CHUNK", 3)
    chunked = ItemIndex(items).search(users, 10, ex)
    brute = ItemIndex(items, "brute").search(users, 10, ex)
    assert len(np.unique(ex.lengths)) > 3  # the chunks really search at different depths
    assert np.array_equal(whole[0], chunked[0]) and np.array_equal(chunked[0], brute[0])
    assert np.array_equal(whole[1], chunked[1])


def test_search_breaks_ties_by_lower_id():
    items = np.zeros((6, 2), np.float32)
    items[[2, 4, 5]] = [1.0, 0.0]  # three equal best items
    for kind in ("Flat", "brute"):
        ids, _ = ItemIndex(items, kind).search(np.array([[1.0, 0.0]], np.float32), 3)
        assert ids[0].tolist() == [2, 4, 5]


def test_hand_computed_metrics():
    ranks = np.array([0, 1, 4, -1])
    m = rank_metrics(ranks, [1, 5])
    assert m["HR@1"] == pytest.approx(0.25)
    assert m["HR@5"] == pytest.approx(0.75)
    assert m["NDCG@5"] == pytest.approx((1 + 1 / np.log2(3) + 1 / np.log2(6)) / 4)
    assert m["MRR@5"] == pytest.approx((1 + 0.5 + 0.2) / 4)
    assert m["Recall@5"] == m["HR@5"]


def test_popularity_buckets_split_users_by_their_targets_training_count():
    from distill.harness import metrics_by_popularity, popularity_buckets
    pop = np.array([0, 50, 40, 30, 20, 10, 9, 8, 7, 6, 5, 0])   # 10 seen items, item 11 never seen in training
    b = popularity_buckets(pop)
    assert list(b[1:3]) == ["head", "head"] and list(b[3:6]) == ["torso"] * 3 and list(b[6:11]) == ["tail"] * 5
    assert b[11] == "unseen"
    targets = np.array([1, 2, 4, 9, 11])
    ranks = np.array([0, 3, -1, 1, 0])
    m = metrics_by_popularity(ranks, targets, pop, [1, 5])
    assert {k: v["users"] for k, v in m.items()} == {"head": 2, "torso": 1, "tail": 1, "unseen": 1}
    assert m["head"]["HR@1"] == 0.5 and m["head"]["HR@5"] == 1.0 and m["torso"]["HR@5"] == 0.0
    assert m["unseen"]["NDCG@1"] == 1.0


def test_ranking_protocol_is_what_serving_can_reproduce():
    """mask_history excludes every history item, a repeated target too (it does not depend on the target, so a
    server can apply it); without it only padding is excluded and the repeated target is found."""
    hist = Histories.from_rows([[1, 2, 3], [4]])                 # user 0's target 2 repeats a history item
    items = np.eye(6, dtype=np.float32)[:, :6]
    q = np.array([[0, 1, 1.5, 0.5, 0.1, 0], [0, 0, 0, 0, 2, 1]], np.float32)  # user 0 likes 2 most
    ids, _ = ItemIndex(items).search(q, 3, ranking_exclusions(hist, 6, mask_history=True))
    assert ids[0].tolist()[:1] == [4] and not {1, 2, 3} & set(ids[0].tolist())
    assert ids[1][0] == 5 and 4 not in ids[1]
    assert ranking_exclusions(hist, 6, mask_history=False) is None
    ids, _ = ItemIndex(items).search(q, 3, None)
    assert ids[0].tolist() == [2, 1, 3]
    assert repeated_targets(hist, np.array([2, 5])).tolist() == [True, False]


def test_candidate_protocol_counts_target_against_its_19_negatives(split):
    users, items = random_vectors(split)
    res = evaluate(split, users, items, "test", protocol="candidates")
    cands = np.concatenate([split.targets("test")[:, None], split.negatives["test"]], 1)
    scores = np.einsum("nd,ncd->nc", users, items[cands])
    expected = (scores.argmax(1) == 0).mean()
    assert res.metrics["HR@1"] == pytest.approx(expected)


def independent_ndcg10(inter_path, users_tsv, items_tsv, U, I, mask=True):
    """NDCG@10 recomputed from the raw .inter file and the split's id tables only."""
    rows = [l.split("\t") for l in open(inter_path).read().splitlines()[1:] if l]
    by_user = {}
    for n, (u, i, _, t) in enumerate(rows):
        by_user.setdefault(u, []).append((float(t), n, i))
    user_ids = [l.split("\t")[1] for l in open(users_tsv).read().splitlines()[1:]]
    item_id = {l.split("\t")[1]: int(l.split("\t")[0]) for l in open(items_tsv).read().splitlines()[1:]}
    total = 0.0
    for r, u in enumerate(user_ids):
        seq = [item_id[i] for _, _, i in sorted(by_user[u])]
        target, history = seq[-1], seq[:-1]
        s = I @ U[r]
        s[0] = -np.inf
        if mask:
            s[history] = -np.inf
        order = sorted(range(len(s)), key=lambda j: (-s[j], j))
        rank = order.index(target)
        total += 1 / np.log2(rank + 2) if rank < 10 else 0.0
    return total / len(user_ids)


def test_evaluate_cli_matches_independent_computation(tmp_path, toy_data, split):
    save_split(split, tmp_path / "split")
    U, I = random_vectors(split, seed=3)
    np.save(tmp_path / "U.npy", U)
    np.save(tmp_path / "I.npy", I)
    assert main(["evaluate", "--split", str(tmp_path / "split"), "--user-vectors", str(tmp_path / "U.npy"),
                 "--item-vectors", str(tmp_path / "I.npy"), "--out", str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["stage"] == "test" and m["protocol"] == "full" and m["mask_history"] and m["n_users"] == split.n_users
    want = independent_ndcg10(toy_data / "toy.inter", tmp_path / "split/users.tsv", tmp_path / "split/items.tsv", U, I)
    assert abs(m["metrics"]["NDCG@10"] - want) < 1e-6


@pytest.mark.parametrize("bad,msg", [
    ("rows", "rows, expected"), ("dim", "dimension"), ("nan", "NaN or inf"), ("inf", "NaN or inf")])
def test_evaluate_cli_rejects_bad_vectors(tmp_path, split, bad, msg, capsys):
    save_split(split, tmp_path / "split")
    U, I = random_vectors(split)
    if bad == "rows":
        U = U[:-1]
    elif bad == "dim":
        U = U[:, :-1]
    elif bad == "nan":
        I[3, 1] = np.nan
    else:
        U[2, 0] = np.inf
    np.save(tmp_path / "U.npy", U)
    np.save(tmp_path / "I.npy", I)
    rc = main(["evaluate", "--split", str(tmp_path / "split"), "--user-vectors", str(tmp_path / "U.npy"),
               "--item-vectors", str(tmp_path / "I.npy"), "--out", str(tmp_path / "m.json")])
    assert rc == 2
    err = capsys.readouterr().err
    assert msg in err and ".npy" in err
    assert not (tmp_path / "m.json").exists()


def test_index_search_parameters_after_a_question_mark():
    from distill.search import check_index_string
    from distill.errors import AnyoError
    from distill.search import ItemIndex
    x = np.random.default_rng(0).normal(size=(2000, 8)).astype(np.float32)
    assert ItemIndex(x, "IVF8,Flat?nprobe=8").index.nprobe == 8
    assert ItemIndex(x, "HNSW8?efSearch=40").index.hnsw.efSearch == 40
    exact = ItemIndex(x, "Flat").search(x[:20], 5)[0]
    assert np.array_equal(ItemIndex(x, "IVF8,Flat?nprobe=8").search(x[:20], 5)[0], exact)  # every list probed
    check_index_string("IVF8,Flat?nprobe=4", 8)
    with pytest.raises(AnyoError, match="could not set parameter bogus"):
        check_index_string("IVF8,Flat?bogus=4", 8)


def test_exclusions_from_the_bitmap_equal_those_from_a_sort(monkeypatch):
    """Serving batches build their exclusions from a bitmap, larger ones with np.unique: the same keys."""
    import distill.search as search
    rng = np.random.default_rng(0)
    hist = Histories.from_rows([rng.integers(1, 50, size=int(rng.integers(0, 80))) for _ in range(64)])
    dense = Exclusions.from_histories(hist, 50)
    monkeypatch.setattr(search, "DENSE_EXCLUSIONS", 0)
    sort = Exclusions.from_histories(hist, 50)
    assert np.array_equal(dense.keys, sort.keys) and np.array_equal(dense.lengths, sort.lengths)
    assert dense.keys.dtype == sort.keys.dtype == np.int64 and (dense.lengths == [len(set(r)) for r in hist]).all()
