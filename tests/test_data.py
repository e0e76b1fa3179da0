import re
from pathlib import Path

import numpy as np
import pytest

from distill.cli import main
from distill.config import ColumnsConfig, DataConfig, load_recipe
from distill.errors import ConfigError
from distill.data import build_split, prepare, to_hf_datasets
from distill.sources import data_files
from distill.errors import DataError

HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"


def write(folder, inter: str, item: str | None = None, name="hand"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.inter").write_text(inter)
    if item is not None:
        (folder / f"{name}.item").write_text(item)
    return DataConfig(name=name, path=str(folder))


def test_leave_one_out_on_hand_made_file(tmp_path):
    # user b has equal timestamps: the item token breaks the tie (x before z, whatever the file order);
    # user c has 2 interactions and is dropped
    rows = [("a", "x", 3), ("a", "y", 1), ("a", "z", 2), ("a", "w", 4),
            ("b", "z", 5), ("b", "x", 5), ("b", "v", 6),
            ("c", "x", 1), ("c", "y", 2)] + [("d", f"f{i}", i) for i in range(25)]  # d fills the catalogue
    inter = HEADER + "".join(f"{u}\t{i}\t5\t{t}\n" for u, i, t in rows)
    cfg = write(tmp_path, inter, "item_id:token\tmovie_title:token_seq\nx\tThe X\ny\tWhy\n")
    s = build_split(cfg)
    assert s.users == ["a", "b", "d"]
    assert s.manifest["dropped_users"] == 1
    # a sorted: y(1) z(2) x(3) w(4) -> ids y=1 z=2 x=3 w=4; b: x z v -> v=5
    assert s.items[:6] == ["[PAD]", "y", "z", "x", "w", "v"]
    assert s.titles[1] == "Why" and s.titles[3] == "The X" and s.titles[2] == ""
    assert s.sequences.row(0).tolist() == [1, 2, 3, 4]
    assert s.sequences.row(1).tolist() == [3, 2, 5]
    assert s.targets("test").tolist()[:2] == [4, 5]
    assert s.targets("valid").tolist()[:2] == [3, 2]
    assert s.history("train").row(0).tolist() == [1, 2]
    assert s.history("valid").row(1).tolist() == [3]
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


# ---------------------------------------------------------------- Parquet / CSV / JSONL

def recbole_frames(folder, name):
    """A RecBole .inter/.item pair as pandas frames (tokens as strings, columns renamed to the defaults
    without `:type`), like a user's own export."""
    import pandas as pd
    inter = pd.read_csv(folder / f"{name}.inter", sep="\t", dtype=str, keep_default_na=False)
    inter.columns = [c.split(":")[0] for c in inter.columns]
    inter["timestamp"] = inter["timestamp"].astype(float)
    item = pd.read_csv(folder / f"{name}.item", sep="\t", dtype=str, keep_default_na=False, quoting=3)
    item.columns = [c.split(":")[0] for c in item.columns]
    title = [c for c in item.columns if c.endswith("title")][0]
    extra = ["release_year"] if name == "toy" else []  # a text column (ML-100K's has empty years: CSV floats)
    item = item[["item_id", title] + extra].rename(columns={title: "title"})
    return inter, item


def write_format(frame, path, fmt):
    if fmt == "parquet":
        frame.to_parquet(path, index=False)
    elif fmt == "csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_json(path, orient="records", lines=True)
    return str(path)


def convert(tmp_path, folder, name, fmt, shuffle_seed=0, rename=None):
    inter, item = recbole_frames(folder, name)
    inter = inter.sample(frac=1.0, random_state=shuffle_seed).reset_index(drop=True)  # rows shuffled
    item = item.sample(frac=1.0, random_state=shuffle_seed + 1).reset_index(drop=True)
    if rename:
        inter = inter.rename(columns=rename)
    ext = {"parquet": "parquet", "csv": "csv", "jsonl": "jsonl"}[fmt]
    return (write_format(inter, tmp_path / f"{name}-inter.{ext}", fmt),
            write_format(item, tmp_path / f"{name}-items.{ext}", fmt))


def assert_same_split(a, b):
    assert a.hash == b.hash
    assert a.users == b.users and a.items == b.items and a.titles == b.titles and a.texts == b.texts
    assert np.array_equal(a.sequences.flat, b.sequences.flat)
    assert np.array_equal(a.sequences.offsets, b.sequences.offsets)
    for stage in ("valid", "test"):
        assert np.array_equal(a.negatives[stage], b.negatives[stage])
    assert a.manifest["dropped_users"] == b.manifest["dropped_users"]


def tied_toy(tmp_path):
    """The conftest toy data with many timestamps repeated (ties broken by the item token)."""
    from helpers import write_dataset
    folder = write_dataset(tmp_path / "toy", n_users=30, n_items=40, seed=3)
    lines = (folder / "toy.inter").read_text().splitlines()
    rows = [line.split("\t") for line in lines[1:]]
    for r in rows:
        r[3] = str(int(float(r[3])) // 30 * 30)  # coarse clock: several items share a timestamp
    (folder / "toy.inter").write_text("\n".join([lines[0]] + ["\t".join(r) for r in rows]) + "\n")
    return folder


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_formats_and_row_order_give_the_recbole_split(tmp_path, fmt):
    folder = tied_toy(tmp_path)
    ref = build_split(DataConfig(name="toy", path=str(folder)))
    inter = [line.split("\t") for line in (folder / "toy.inter").read_text().splitlines()[1:]]
    assert len({(r[0], r[3]) for r in inter}) < len(inter)  # the data really has ties
    for seed in (0, 1):
        path, items = convert(tmp_path, folder, "toy", fmt, shuffle_seed=seed)
        got = build_split(DataConfig(format=fmt, path=path, items=items))
        assert_same_split(got, ref)
    # a recbole file with its rows shuffled too
    lines = (folder / "toy.inter").read_text().splitlines()
    body = lines[1:]
    np.random.default_rng(5).shuffle(body)
    (tmp_path / "shuf").mkdir()
    (tmp_path / "shuf" / "toy.inter").write_text("\n".join([lines[0]] + body) + "\n")
    (tmp_path / "shuf" / "toy.item").write_text((folder / "toy.item").read_text())
    assert_same_split(build_split(DataConfig(name="toy", path=str(tmp_path / "shuf"))), ref)


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_ml100k_converted_and_shuffled_equals_recbole(tmp_path, fmt):
    from distill.sources import embedded_ml100k
    ref = build_split(DataConfig(columns=ColumnsConfig(text=[])))
    path, items = convert(tmp_path, embedded_ml100k(), "ml-100k", fmt, shuffle_seed=7)
    assert_same_split(build_split(DataConfig(format=fmt, path=path, items=items)), ref)


def test_column_mapping(tmp_path):
    folder = tied_toy(tmp_path)
    ref = build_split(DataConfig(name="toy", path=str(folder)))
    path, items = convert(tmp_path, folder, "toy", "csv",
                          rename={"user_id": "visitor", "item_id": "item_id", "timestamp": "ts"})
    cols = ColumnsConfig(user="visitor", time="ts")
    assert_same_split(build_split(DataConfig(format="csv", path=path, items=items, columns=cols)), ref)
    # a different title changes the hash
    import pandas as pd
    frame = pd.read_csv(items, dtype=str)
    frame.loc[0, "title"] = "something else"
    frame.to_csv(items, index=False)
    assert build_split(DataConfig(format="csv", path=path, items=items, columns=cols)).hash != ref.hash


@pytest.mark.parametrize("rename,cols,message", [
    ({"user_id": "uid"}, {}, "no column `user_id` (data.columns.user)"),
    ({}, {"item": "movie"}, "no column `movie` (data.columns.item)"),
    ({"timestamp": "when"}, {}, "no column `timestamp` (data.columns.time)"),
])
def test_missing_column_is_named(tmp_path, rename, cols, message, capsys):
    folder = tied_toy(tmp_path)
    path, items = convert(tmp_path, folder, "toy", "parquet", rename=rename)
    cfg = DataConfig(format="parquet", path=path, columns=ColumnsConfig(**cols))
    with pytest.raises(DataError, match=re.escape(message)) as e:
        build_split(cfg)
    assert path in str(e.value) and "\n" not in str(e.value)
    recipe = tmp_path / "r.yaml"
    extra = "".join(f"    {k}: {v}\n" for k, v in cols.items())
    recipe.write_text(f"data:\n  format: parquet\n  path: {path}\n" + (f"  columns:\n{extra}" if extra else ""))
    assert main(["prepare", str(recipe), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and path in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "split").exists()


def test_missing_title_column_names_the_item_file(tmp_path):
    folder = tied_toy(tmp_path)
    path, items = convert(tmp_path, folder, "toy", "jsonl")
    with pytest.raises(DataError, match=re.escape("no column `name` (data.columns.title)")) as e:
        build_split(DataConfig(format="jsonl", path=path, items=items, columns=ColumnsConfig(title="name")))
    assert items in str(e.value)


def test_bad_format_and_missing_path_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"data.format: must be recbole or parquet or csv or jsonl, got 'xlsx'"):
        load_recipe(None, ["data.format=xlsx"])
    with pytest.raises(ConfigError, match=r"data.path: required with data.format csv"):
        load_recipe(None, ["data.format=csv"])
    with pytest.raises(ConfigError, match=r"data.columns.usr: unknown key"):
        load_recipe(None, ["data.columns.usr=x"])


def test_negatives_for_dense_users_and_in_one_vectorised_draw():
    from distill.data import _sample_negatives
    from distill.histories import Histories
    n_items = 40
    sparse = [1, 2, 3]
    all_but_19 = list(range(1, 22))                  # 19 unseen items: exactly those are drawn
    all_but_5 = list(range(1, 36))                   # too few unseen: only the last two are excluded
    seqs = Histories.from_rows([sparse, all_but_19, all_but_5])
    neg = _sample_negatives(seqs, n_items, np.random.default_rng(0), Path("x"))
    assert not set(neg[0]) & set(sparse) and len(set(neg[0])) == 19
    assert set(neg[1]) == set(range(22, 41))
    assert len(set(neg[2])) == 19 and not set(neg[2]) & {34, 35}
    again = _sample_negatives(seqs, n_items, np.random.default_rng(0), Path("x"))
    assert np.array_equal(neg, again)
    counts = np.bincount(_sample_negatives(Histories.from_rows([sparse] * 2000), n_items,
                                           np.random.default_rng(1), Path("x")).ravel(), minlength=41)
    assert counts[:4].sum() == 0 and counts[4:].min() > 0.7 * counts[4:].mean()   # uniform over the unseen


@pytest.mark.parametrize("times,users,items", [("small ints", 50, 300), ("fractions", 50, 300),
                                               ("wide ints", 50, 300), ("huge and fractional", 50, 300),
                                               ("wide ints", 50, 2**62), ("wide ints", 2**62, 2**62),
                                               ("int64 ns", 50, 300), ("int64 full range", 50, 300)])
def test_packed_sort_order_equals_three_key_lexsort(times, users, items):
    # the packed key must order exactly as (user, time, item) in every regime: integral timestamps as
    # offsets, others (or too wide a span) as ranks, and nominal catalogues too large for one 63-bit key
    # (the two-key and the three-key lexsort fallbacks)
    from distill.data import _sort_order
    rng = np.random.default_rng(0)
    n, n_users, n_items = 5000, 50, 300
    u, i = rng.integers(0, n_users, n), rng.integers(0, n_items, n)
    t = {"small ints": rng.integers(0, 20, n).astype(float), "fractions": rng.integers(0, 20, n) / 7,
         "wide ints": rng.integers(0, 2**62, n).astype(float),
         "huge and fractional": np.where(rng.random(n) < 0.5, -2.0**53, rng.integers(0, 20, n) / 2),
         "int64 ns": 1_700_000_000_000_000_000 + rng.integers(0, 20, n),      # 1 ns apart: float64 would tie them
         "int64 full range": rng.integers(-2**63, 2**63 - 1, n)}[times]      # a span beyond int64: ranks
    order = _sort_order(u, t, i, users, items)   # nominal sizes pick the path
    expected = np.lexsort((i, t, u))
    for col in (u, t, i):
        assert np.array_equal(col[order], col[expected])


def test_cold_items_remove_exactly_their_training_interactions_and_change_the_hash(toy_data, tmp_path):
    base = build_split(DataConfig(name="toy", path=str(toy_data)))
    cold = build_split(DataConfig(name="toy", path=str(toy_data), cold_items=0.2))
    assert cold.hash != base.hash and cold.items == base.items          # the catalogue keeps the cold items
    chosen = cold.cold_items
    assert len(chosen) == round(0.2 * base.n_items) and cold.manifest["cold_items"]["items"] == len(chosen)
    assert not np.isin(cold.history("train").flat, chosen).any()       # no training interaction of theirs left
    kept = {u: r for u, r in zip(cold.users, cold.sequences)}
    removed = 0
    for u, row in zip(base.users, base.sequences):
        train, tail = row[:-2], row[-2:]
        expect = np.concatenate([train[~np.isin(train, chosen)], tail])
        removed += int(np.isin(train, chosen).sum())
        if len(expect) >= 3:
            assert kept[u].tolist() == expect.tolist()                   # everything else exactly as before
        else:
            assert u not in kept
    assert cold.manifest["cold_items"]["removed_training_interactions"] == removed > 0
    targets = np.concatenate([cold.targets("valid"), cold.targets("test")])
    assert np.isin(targets, chosen).any()                               # validation and test keep them as targets
    again = build_split(DataConfig(name="toy", path=str(toy_data), cold_items=0.2))
    assert again.hash == cold.hash and np.array_equal(again.cold_items, chosen)          # seeded
    assert not np.array_equal(build_split(DataConfig(name="toy", path=str(toy_data), cold_items=0.2, seed=3))
                              .cold_items, chosen)
    split, _ = prepare(DataConfig(name="toy", path=str(toy_data), cold_items=0.2), tmp_path / "split")
    assert np.array_equal(split.cold_items, chosen) and split.hash == cold.hash          # recorded in the split


def test_item_text_renders_every_column_of_the_item_file(tmp_path):
    inter = HEADER + "".join(f"u{u}\tf{i}\t5\t{i}\n" for u in range(2) for i in range(25))
    item = ("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
            "f1\tEmpire Strikes Back, The\t1980\tAction Sci-Fi\nf2\tHeat\t\tCrime\n")
    cfg = write(tmp_path, inter, item)
    s = build_split(cfg)
    i1, i2 = s.items.index("f1"), s.items.index("f2")
    assert s.titles[i1] == "Empire Strikes Back, The"                   # the prompts keep the title
    assert s.texts[i1] == "The Empire Strikes Back (1980): Action, Sci-Fi" and s.texts[i2] == "Heat: Crime"
    only = build_split(DataConfig(name="hand", path=str(tmp_path), columns=ColumnsConfig(text=["release_year"])))
    assert only.texts[i1] == "The Empire Strikes Back (1980)"
    with pytest.raises(DataError, match=r"hand.item:1: no column `genre` \(data.columns.text\)"):
        build_split(DataConfig(name="hand", path=str(tmp_path), columns=ColumnsConfig(text=["genre"])))
    titles_only = build_split(DataConfig(name="hand", path=str(tmp_path), columns=ColumnsConfig(text=[])))
    assert titles_only.texts[i1] == "The Empire Strikes Back" and titles_only.hash != s.hash


# ---------------------------------------------------------------- ids and timestamps kept exactly (issue 25)

ODD_ITEMS = ["00026", "26", "NA", "null", "a,b", "a\tb", "a b", " a b ", "x\ny", "-5", "1e3", "True", 'say "hi"',
             "back\\slash", "a\\tb", "tab\t", "\\n"]
ODD_USERS = ["007", "7", " 7", "u\t1", "NaN", "u,2"]


def odd_rows(n_items: int = 25):
    """(user, item, time) rows over ids that type inference, quoting or a careless TSV would change or merge."""
    items = ODD_ITEMS + [f"i{i}" for i in range(n_items - len(ODD_ITEMS))]
    rows = []
    for u, user in enumerate(ODD_USERS):
        for t in range(12):
            rows.append((user, items[(5 * u + 3 * t) % len(items)], 1000 + 10 * t + u))
    return rows


def write_rows(path, rows, fmt, columns=("user_id", "item_id", "timestamp"), types=None):
    """`rows` as a Parquet / CSV / JSONL file, each value written as the Python value it is (strings quoted
    where the format needs it); `types` (pyarrow types per column) for Parquet."""
    import csv
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    cols = list(zip(*rows))
    if fmt == "parquet":
        pq.write_table(pa.table({c: pa.array(v, type=(types or {}).get(c)) for c, v in zip(columns, cols)}), path)
    elif fmt == "csv":
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(columns)
            w.writerows(rows)
    else:
        with open(path, "w") as f:
            f.writelines(json.dumps(dict(zip(columns, r))) + "\n" for r in rows)
    return str(path)


def test_odd_ids_are_the_same_exact_strings_in_every_format_and_survive_the_split_files(tmp_path):
    rows = odd_rows()
    splits = {fmt: build_split(DataConfig(format=fmt, path=write_rows(tmp_path / f"d.{fmt}", rows, fmt)))
              for fmt in ("parquet", "csv", "jsonl")}
    ref = splits["parquet"]
    assert set(ref.users) == set(ODD_USERS) and set(ODD_ITEMS) <= set(ref.items)  # nothing parsed, stripped, merged
    for s in splits.values():
        assert_same_split(s, ref)
    split, _ = prepare(DataConfig(format="csv", path=str(tmp_path / "d.csv")), tmp_path / "split")
    from distill.data import load_split
    back = load_split(tmp_path / "split")       # users.tsv / items.tsv keep tabs, newlines, spaces, backslashes
    assert back.users == ref.users and back.items == ref.items
    assert prepare(DataConfig(format="csv", path=str(tmp_path / "d.csv")), tmp_path / "split")[1] is False


def test_csv_ids_are_strings_whatever_their_position_in_the_file(tmp_path):
    """Numbers for the first 12,000 rows, then a word: one type for the whole column, the file's text."""
    rows = [(f"{u:04d}", f"{(u + t) % 30:05d}", t) for u in range(1000) for t in range(12)] + [("0001", "x", 99)]
    csv_split = build_split(DataConfig(format="csv", path=write_rows(tmp_path / "d.csv", rows, "csv")))
    pq_split = build_split(DataConfig(format="parquet", path=write_rows(tmp_path / "d.parquet", rows, "parquet")))
    assert "00026" in csv_split.items and "x" in csv_split.items and "0001" in csv_split.users
    assert_same_split(csv_split, pq_split)


def test_jsonl_numbers_are_their_text_and_equal_string_ids(tmp_path):
    as_numbers = [(u, 100 + (u * 7 + t) % 30, 1000 + t) for u in range(8) for t in range(6)]
    as_strings = [(str(u), str(i), t) for u, i, t in as_numbers]
    a = build_split(DataConfig(format="jsonl", path=write_rows(tmp_path / "n.jsonl", as_numbers, "jsonl")))
    b = build_split(DataConfig(format="jsonl", path=write_rows(tmp_path / "s.jsonl", as_strings, "jsonl")))
    assert_same_split(a, b)
    assert "100" in a.items


NS = 1_700_000_000_000_000_000  # 2023-11-14 in nanoseconds: float64 spaces its neighbours 256 apart


def tight_times():
    """Per user, items whose timestamps differ by 1 ns in the reverse of their token order: a float64 clock
    makes them ties, broken by the token (a, b, c), instead of the file's order (c, b, a)."""
    rows = []
    for u in range(8):
        for t, item in enumerate(["c", "b", "a"] + [f"i{(3 * u + j) % 25:02d}" for j in range(5)]):
            rows.append((f"u{u}", item, NS + t))
    return rows


@pytest.mark.parametrize("fmt", ["recbole", "parquet", "csv", "jsonl", "parquet timestamp[ns]", "csv date-times"])
def test_timestamps_are_ordered_exactly(tmp_path, fmt):
    import pyarrow as pa
    rows = tight_times()
    if fmt == "recbole":
        cfg = write(tmp_path, HEADER + "".join(f"{u}\t{i}\t1\t{t}\n" for u, i, t in rows))
    elif fmt == "parquet timestamp[ns]":
        cfg = DataConfig(format="parquet", path=write_rows(tmp_path / "d.parquet", rows, "parquet",
                                                            types={"timestamp": pa.timestamp("ns")}))
    elif fmt == "csv date-times":
        import pandas as pd
        dated = [(u, i, str(pd.Timestamp(t, unit="ns"))) for u, i, t in rows]   # 2023-11-14 22:13:20.000000001
        cfg = DataConfig(format="csv", path=write_rows(tmp_path / "d.csv", dated, "csv"))
    else:
        cfg = DataConfig(format=fmt, path=write_rows(tmp_path / f"d.{fmt}", rows, fmt))
    s = build_split(cfg)
    first = s.sequences.flat[s.sequences.offsets[0]:][:3]
    assert [s.items[i] for i in first] == ["c", "b", "a"]


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_a_file_changed_on_disk_is_read_again_with_the_same_path_and_mtime(tmp_path, fmt):
    import os
    path = tmp_path / f"d.{fmt}"
    rows = [(f"u{u}", f"i{(4 * u + t) % 25:02d}", 1000 + t) for u in range(6) for t in range(8)]
    write_rows(path, rows, fmt)
    first, built = prepare(DataConfig(format=fmt, path=str(path)), tmp_path / "split")
    stat = path.stat()
    swapped = [(u, {"i01": "i02", "i02": "i01"}.get(i, i), t) for u, i, t in rows]  # same size, other content
    write_rows(path, swapped, fmt)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second, rebuilt = prepare(DataConfig(format=fmt, path=str(path)), tmp_path / "split")
    assert rebuilt and second.hash != first.hash


def test_odd_ids_come_back_exactly_from_an_export_and_can_be_passed_to_recommend(tmp_path, capsys):
    import json

    from helpers import RECIPE, sets
    path = write_rows(tmp_path / "d.csv", odd_rows(), "csv")
    run, out = tmp_path / "run", tmp_path / "export"
    tiny = sets([f"data.path={path}", "data.format=csv", "data.max_len=10", "student.hidden_size=16",
                 "student.num_heads=2", "student.epochs=1", "student.batch_size=16"])
    assert main(["student", "train", RECIPE, "--out", str(run)] + tiny) == 0
    assert main(["export", str(run), "--out", str(out), "--model", "student_alone"]) == 0
    n_items = build_split(DataConfig(format="csv", path=path)).n_items
    capsys.readouterr()
    history = ["a,b", " a b ", "x\ny", "-5"]
    assert main(["recommend", str(out), "--history-json", json.dumps(history), "-k", str(n_items),
                 "--include-seen", "--json"]) == 0
    served = [it["item"] for it in json.loads(capsys.readouterr().out)["items"]]
    assert set(ODD_ITEMS) <= set(served) and len(set(served)) == n_items        # every id once, exactly
    assert main(["recommend", str(out), "--history=-5,00026", "-k", "3"]) == 0  # a leading '-' after '='
    assert main(["recommend", str(out), "--history-json", '["a,b", 5]']) == 2   # not strings: one line
    assert "expected a non-empty JSON array of strings" in capsys.readouterr().err


def test_dates_of_any_type_and_unit_are_one_clock(tmp_path):
    """A Parquet `timestamp[s]`, `timestamp[us]` or `date32` column and the same instants as CSV text give one
    split (and hash): date-times are nanoseconds whatever their stored unit."""
    import datetime

    import pyarrow as pa
    days = [(f"u{u}", f"i{(3 * u + t) % 25:02d}", datetime.date(2026, 1, 1 + t)) for u in range(8) for t in range(6)]
    as_text = [(u, i, d.isoformat()) for u, i, d in days]
    ref = build_split(DataConfig(format="csv", path=write_rows(tmp_path / "d.csv", as_text, "csv")))
    for n, kind in enumerate([pa.date32(), pa.timestamp("s"), pa.timestamp("us"), pa.timestamp("ns", "UTC")]):
        values = days if kind == pa.date32() else [(u, i, datetime.datetime(d.year, d.month, d.day)) for u, i, d in days]
        path = write_rows(tmp_path / f"d{n}.parquet", values, "parquet", types={"timestamp": kind})
        assert_same_split(build_split(DataConfig(format="parquet", path=path)), ref)
