import numpy as np
import pytest

from distill.cli import main
from distill.config import DataConfig
from distill.data import build_split, prepare, to_hf_datasets, data_files
from distill.errors import DataError

HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"


def write(folder, inter: str, item: str | None = None, name="hand"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.inter").write_text(inter)
    if item is not None:
        (folder / f"{name}.item").write_text(item)
    return DataConfig(name=name, path=str(folder))


def test_leave_one_out_on_hand_made_file(tmp_path):
    # user b has equal timestamps: file order breaks the tie; user c has 2 interactions and is dropped
    rows = [("a", "x", 3), ("a", "y", 1), ("a", "z", 2), ("a", "w", 4),
            ("b", "z", 5), ("b", "x", 5), ("b", "v", 6),
            ("c", "x", 1), ("c", "y", 2)] + [("d", f"f{i}", i) for i in range(25)]  # d fills the catalogue
    inter = HEADER + "".join(f"{u}\t{i}\t5\t{t}\n" for u, i, t in rows)
    cfg = write(tmp_path, inter, "item_id:token\tmovie_title:token_seq\nx\tThe X\ny\tWhy\n")
    s = build_split(cfg)
    assert s.users == ["a", "b", "d"]
    assert s.manifest["dropped_users"] == 1
    # a sorted: y(1) z(2) x(3) w(4) -> ids y=1 z=2 x=3 w=4; b: z x v -> v=5
    assert s.items[:6] == ["[PAD]", "y", "z", "x", "w", "v"]
    assert s.titles[1] == "Why" and s.titles[3] == "The X" and s.titles[2] == ""
    assert s.sequences.row(0).tolist() == [1, 2, 3, 4]
    assert s.sequences.row(1).tolist() == [2, 3, 5]
    assert s.targets("test").tolist()[:2] == [4, 5]
    assert s.targets("valid").tolist()[:2] == [3, 3]
    assert s.history("train").row(0).tolist() == [1, 2]
    assert s.history("valid").row(1).tolist() == [2]
    assert s.history("test").row(0).tolist() == [1, 2, 3]


def test_split_hash_is_deterministic_and_option_sensitive(toy_data):
    cfg = DataConfig(name="toy", path=str(toy_data))
    a, b = build_split(cfg), build_split(cfg)
    assert a.hash == b.hash
    assert np.array_equal(a.negatives["test"], b.negatives["test"])
    assert build_split(DataConfig(name="toy", path=str(toy_data), seed=7)).hash != a.hash
    assert build_split(DataConfig(name="toy", path=str(toy_data), min_interactions=2)).hash != a.hash


def test_candidates_are_unseen_distinct_and_seeded(toy_data):
    s = build_split(DataConfig(name="toy", path=str(toy_data)))
    for stage in ("valid", "test"):
        neg = s.negatives[stage]
        assert neg.shape == (s.n_users, 19)
        for u in range(s.n_users):
            assert len(set(neg[u])) == 19
            assert not set(neg[u]) & set(s.sequences.row(u).tolist())


def test_save_load_round_trip_and_prepare_reuses(tmp_path, toy_data):
    cfg = DataConfig(name="toy", path=str(toy_data))
    s, built = prepare(cfg, tmp_path / "split")
    assert built
    again, built2 = prepare(cfg, tmp_path / "split")
    assert not built2 and again.hash == s.hash
    assert np.array_equal(again.sequences.flat, s.sequences.flat) and again.titles == s.titles


def test_hf_datasets(toy_data):
    s = build_split(DataConfig(name="toy", path=str(toy_data)))
    dd = to_hf_datasets(s)
    assert set(dd) == {"train", "valid", "test"}
    assert dd["test"][0]["target"] == int(s.targets("test")[0])
    assert dd["valid"][0]["history"] == s.history("valid").row(0).tolist()


def test_embedded_ml100k_counts():
    s = build_split(DataConfig())
    assert (s.n_users, s.n_items, s.manifest["n_interactions"]) == (943, 1682, 100000)


@pytest.mark.parametrize("inter,message", [
    ("", "hand.inter:1: empty file"),
    ("item_id:token\ttimestamp:float\n1\t2\n", "hand.inter:1: header has no `user_id`"),
    ("user_id:token\trating:float\n1\t2\n", "hand.inter:1: header has no `item_id`"),
    (HEADER + "1\t2\t3\t4\n1\t2\t3\n", "hand.inter:3: expected 4 tab-separated fields, got 3"),
    (HEADER + "1\t2\t3\tyesterday\n", "hand.inter:2: timestamp 'yesterday' is not a number"),
])
def test_bad_inter_files(tmp_path, inter, message, capsys):
    cfg = write(tmp_path / "d", inter)
    with pytest.raises(DataError, match=message.replace("`", ".")):
        build_split(cfg)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data:\n  name: hand\n  path: {tmp_path / 'd'}\n")
    assert main(["prepare", str(recipe), "--out", str(tmp_path / "run")]) == 2
    assert "hand.inter" in capsys.readouterr().err
    assert not (tmp_path / "run" / "split").exists()


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.inter: file not found"):
        data_files(DataConfig(name="nope", path=str(tmp_path)))
