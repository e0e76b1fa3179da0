"""Property tests: whatever the bytes, the parser returns a correct split or raises DataError."""

from pathlib import Path
import tempfile

from hypothesis import HealthCheck, given, settings, strategies as st

from distill.config import DataConfig
from distill.data import build_split, prepare
from distill.errors import DataError

HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
# tokens are text a file can hold: no line or field separators, no lone surrogates (not encodable as UTF-8)
token = st.text(alphabet=st.characters(exclude_categories=("Cs",),
                                       exclude_characters="\t\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"),
                min_size=1, max_size=6)


def check(inter: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "p.inter").write_bytes(inter)
        cfg = DataConfig(name="p", path=d)
        try:
            split, _ = prepare(cfg, Path(d) / "run" / "split")
        except DataError as e:
            assert "p.inter" in str(e)
            assert not (Path(d) / "run" / "split").exists()
            return
        # a returned split obeys the protocol
        lengths = split.sequences.lengths
        assert (lengths >= 3).all()
        assert split.sequences.flat.min() >= 1 and split.sequences.flat.max() == split.n_items
        assert len(set(split.items)) == len(split.items)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_arbitrary_bytes(data):
    check(data)
    check(HEADER.encode() + data)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 5), token, st.one_of(st.integers(0, 3), st.just("x"), st.just("nan"))),
                max_size=60))
def test_structured_rows(rows):
    users = [f"u{u}" for u, _, _ in rows]
    text = HEADER + "".join(f"{u}\t{i}\t1\t{t}\n" for u, (_, i, t) in zip(users, rows))
    check(text.encode("utf-8"))


def test_equal_timestamps_are_ordered_by_item_token_in_any_file_order_and_duplicates_are_kept(tmp_path):
    items = [f"i{k}" for k in range(25)]
    lines = [f"a\t{i}\t1\t5\n" for i in items] + ["a\ti0\t1\t5\n"]
    sequences = []
    for name, order in (("p", lines), ("q", lines[::-1])):
        (tmp_path / f"{name}.inter").write_text(HEADER + "".join(order))
        s = build_split(DataConfig(name=name, path=str(tmp_path)))
        sequences.append([s.items[i] for i in s.sequences.row(0)])
    assert sequences[0] == sequences[1] == sorted(items + ["i0"])
