"""Reading the raw data files: where they are, the RecBole atomic parser, Parquet / CSV / JSONL through pyarrow
(imported where a file is read, so that serving an export, which reads none, needs no pyarrow). Everything here
returns columns in file order; sorting, numbering and the split are distill.data's. A malformed file is one
DataError naming the file, line, row or column.

Nothing is inferred from the text: user and item ids are the exact strings of the file (a CSV `00026` stays
`00026`, a JSON number is its literal text, a Parquet integer its decimal text; floats, booleans, lists, nulls and
empty ids are refused), and timestamps are int64 whenever the values are integers (any unit; date-times in their
own unit), so they are ordered exactly. Every read is of the file's bytes now, never of a cache keyed by path and
modification time (the split hash is of the content, distill.data).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from distill.config import DataConfig
from distill.errors import DataError
from distill.item_text import render, text_columns


def embedded_ml100k() -> Path:
    """Folder of MovieLens-100K inside the `recbole==1.2.1` wheel, found without importing recbole."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("embedded data set ml-100k: the `recbole` wheel is not installed "
                        "(pip install --no-deps recbole==1.2.1)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k"
    if not (folder / "ml-100k.inter").is_file():
        raise DataError(f"{folder}/ml-100k.inter: not found in the installed recbole wheel")
    return folder


def data_files(cfg: DataConfig) -> tuple[Path, Path | None]:
    """The interactions file and the optional item file a data config points to."""
    if cfg.format != "recbole":
        inter = Path(cfg.path)
        if not inter.is_file():
            raise DataError(f"{inter}: file not found (data.path, format {cfg.format})")
        item = Path(cfg.items) if cfg.items else None
        if item is not None and not item.is_file():
            raise DataError(f"{item}: file not found (data.items)")
        return inter, item
    folder = Path(cfg.path) if cfg.path else embedded_ml100k()
    inter = folder / f"{cfg.name}.inter"
    if not inter.is_file():
        raise DataError(f"{inter}: file not found")
    item = folder / f"{cfg.name}.item"
    return inter, (item if item.is_file() else None)


# ---------------------------------------------------------------- parsing

def _read_lines(path: Path) -> list[str]:
    """The file's lines, split on \\n only (a title may hold U+2028, \\x85 or \\x0c, which
    `str.splitlines` would take for line breaks and so misnumber every later line)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{path}:1: starts with a UTF-16 byte-order mark; save the file as UTF-8")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte offset {e.start})") from None
    if text.startswith("\ufeff"):
        raise DataError(f"{path}:1: starts with a byte-order mark (BOM); save the file as UTF-8 without BOM")
    lines = text.split("\n")
    lines = [line.removesuffix("\r") for line in lines]
    if not lines or not lines[0].strip():
        raise DataError(f"{path}:1: empty file (expected a header line)")
    return lines


def _header(path: Path, line: str) -> dict[str, int]:
    """Column name (without the `:type` suffix) -> index."""
    cols: dict[str, int] = {}
    for i, c in enumerate(line.split("\t")):
        name = c.split(":", 1)[0].strip()
        if name and name in cols:
            raise DataError(f"{path}:1: header repeats column `{name}`")
        cols[name] = i
    return cols


def read_interactions(path: Path, user: str = "user_id", item: str = "item_id", time: str = "timestamp"):
    """Parse NAME.inter -> (user tokens, item tokens, timestamps) in file order."""
    lines = _read_lines(path)
    cols = _header(path, lines[0])
    for needed in (user, item):
        if needed not in cols:
            raise DataError(f"{path}:1: header has no `{needed}` column (got: {lines[0].strip()!r})")
    iu, ii, it = cols[user], cols[item], cols.get(time)
    width = len(cols)
    users, items, times = [], [], []
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != width:
            raise DataError(f"{path}:{n}: expected {width} tab-separated fields, got {len(fields)}")
        for name, i in ((user, iu), (item, ii)):
            if not fields[i]:
                raise DataError(f"{path}:{n}: empty {name}")
        users.append(fields[iu])
        items.append(fields[ii])
        if it is not None:
            try:
                t = float(fields[it])
            except ValueError:
                raise DataError(f"{path}:{n}: timestamp {fields[it]!r} is not a number") from None
            if not np.isfinite(t):
                raise DataError(f"{path}:{n}: timestamp {fields[it]!r} is not finite")
            times.append(fields[it])
    if not users:
        raise DataError(f"{path}:2: no interactions after the header")
    if it is None:
        return users, items, np.arange(len(users), dtype=np.int64)
    try:  # integers stay exact (a float64 clock would merge nanoseconds); any fraction makes the column float64
        ts = np.asarray([int(t) for t in times], dtype=np.int64)
    except (ValueError, OverflowError):
        ts = np.asarray([float(t) for t in times], dtype=np.float64)
    return users, items, ts


def read_titles(path: Path | None, title_field: str | None, text_fields: list[str] | None = None
                ) -> dict[str, tuple[str, str]]:
    """Parse NAME.item -> {raw item token: (title, text)}; the text is the title followed by the columns
    `text_fields` (unset: every column but item_id and the title), as distill.item_text writes it."""
    if path is None:
        return {}
    lines = _read_lines(path)
    header = lines[0].split("\t")
    cols = _header(path, lines[0])
    if "item_id" not in cols:
        raise DataError(f"{path}:1: header has no `item_id` column")
    if title_field is not None:
        if title_field not in cols:
            raise DataError(f"{path}:1: title column `{title_field}` not in header")
        tcol = cols[title_field]
    else:
        seq_cols = [i for i, c in enumerate(header) if c.endswith(":token_seq")]
        if not seq_cols:
            return {}
        tcol = seq_cols[0]
    names = list(cols)
    extra = [cols[c] for c in text_columns(names, ("item_id", names[tcol]), text_fields, f"{path}:1")]
    is_list = {i: header[i].endswith(":token_seq") for i in extra}
    titles = {}
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise DataError(f"{path}:{n}: expected {len(header)} tab-separated fields, got {len(fields)}")
        title = fields[tcol].strip()
        text = render(title, [fields[i] for i in extra if not is_list[i]],
                      [fields[i].split(" ") for i in extra if is_list[i]])
        titles[fields[cols["item_id"]]] = (title, text)
    return titles


# ---------------------------------------------------------------- Parquet / CSV / JSONL

def _read_table(path: Path, fmt: str, keys: dict[str, str]):
    """The file as a pyarrow Table in which nothing was inferred from the text: CSV cells and JSONL scalars are the
    file's strings (a JSON number its literal text); Parquet keeps its own types. `keys` (column -> recipe key)
    names the columns a JSONL line must hold."""
    if fmt == "jsonl":
        return _read_jsonl(path, keys)
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        if fmt == "parquet":
            return pq.read_table(path, memory_map=True)
        return _read_csv(path)
    except (pa.ArrowException, OSError, ValueError) as e:
        if "invalid UTF8" in str(e):
            _check_utf8(path)
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise DataError(f"{path}: cannot read as {fmt} (data.format): {reason}") from None


def _check_utf8(path: Path) -> None:
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte offset {e.start})") from None


def _read_csv(path: Path):
    """Every column as strings, exactly as written (quoted cells may hold commas, tabs, newlines; `NA`, `null` and
    `00026` are strings); a row with the wrong number of fields is one DataError naming its line."""
    import csv

    import pyarrow as pa
    import pyarrow.csv as pacsv
    with open(path, newline="", encoding="utf-8-sig") as f:
        try:
            header = next(csv.reader(f), None)
        except (UnicodeDecodeError, csv.Error):
            header = None
    if not header:
        _check_utf8(path)
        raise DataError(f"{path}:1: empty file or unreadable header (expected a header line)")
    ragged = []

    def invalid(row):
        ragged.append(row)
        return "skip"

    table = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(newlines_in_values=True, invalid_row_handler=invalid),
                           convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in header},
                                                                strings_can_be_null=False))
    if ragged:
        row = ragged[0]
        data = path.read_bytes()
        at = data.find(b"\n" + row.text.encode("utf-8", "replace"))
        line = data[:at].count(b"\n") + 2
        where = f"{path}:{line}" if at >= 0 else f"{path}: row {row.text[:80]!r}"
        raise DataError(f"{where}: expected {row.expected_columns} comma-separated fields, got {row.actual_columns}")
    return table


def _json_kind(value) -> str:
    """How a parsed JSON value is named in a message (numbers were parsed as their text)."""
    import json
    return {dict: "an object", list: "an array", type(None): "null"}.get(type(value)) or json.dumps(value)[:40]


def _read_jsonl(path: Path, keys: dict[str, str]):
    """One JSON object per line -> a Table of strings (numbers as their literal text, so `26` and `"26"` are the
    same id and a 19-digit timestamp stays exact); lists stay lists (text columns). Errors name the line."""
    import json

    import pyarrow as pa

    def refuse_constant(name):
        raise ValueError(f"{name} is not JSON")

    objs, lines = [], []
    decode = json.JSONDecoder(parse_int=str, parse_float=str, parse_constant=refuse_constant).decode
    for n, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            obj = decode(line)
        except ValueError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({' '.join(str(e).split())[:120]})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, got {_json_kind(obj)}")
        objs.append(obj)
        lines.append(n)
    if not objs:
        raise DataError(f"{path}:1: empty file")
    missing = object()
    for name, key in keys.items():
        values = [o.get(name, missing) for o in objs]
        bad = next((r for r, v in enumerate(values) if not isinstance(v, str)), None)
        if bad is not None:
            value, n = values[bad], lines[bad]
            if value is missing:
                raise DataError(f"{path}:{n}: no key `{name}` ({key})")
            expected = "a number or a date-time" if key == "data.columns.time" else "a string or a number"
            raise DataError(f"{path}:{n}: {name} ({key}) is {_json_kind(value)}, expected {expected}")
    columns = {name: [o.get(name) for o in objs] for name in dict.fromkeys(k for o in objs for k in o)}

    def text(v) -> str:
        return v if isinstance(v, str) else json.dumps(v)

    def column(values: list):
        if any(isinstance(v, list) for v in values):  # a text column of lists (genres): a list per row
            return pa.array([None if v is None else [text(x) for x in (v if isinstance(v, list) else [v])]
                             for v in values], pa.list_(pa.string()))
        return pa.array([None if v is None else text(v) for v in values], pa.string())
    return pa.table({name: column(values) for name, values in columns.items()})


def _column(table, path: Path, name: str, key: str):
    if name not in table.column_names:
        raise DataError(f"{path}: no column `{name}` ({key}); columns: {', '.join(table.column_names)}")
    return table.column(name).combine_chunks()


def _first(mask) -> int:
    """The 1-based row of the first True of a boolean Arrow array."""
    import pyarrow.compute as pc
    return int(pc.index(mask, True).as_py()) + 1


def _ids(col, path: Path, name: str, key: str):
    """An id column as exact strings: strings as they are, integers as their decimal text; every other type
    (floats, booleans, lists, ...), a null or an empty id is refused, naming the row."""
    import pyarrow as pa
    import pyarrow.compute as pc
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if pa.types.is_integer(col.type):
        return col  # no empty or NUL value; _tokens writes only the distinct values as decimal text
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)
              or pa.types.is_string_view(col.type)):
        raise DataError(f"{path}: column `{name}` ({key}) holds {col.type}; ids must be strings or integers")
    empty = pc.fill_null(pc.equal(pc.utf8_length(col), 0), True)
    if pc.any(empty).as_py():
        raise DataError(f"{path}: column `{name}` ({key}) row {_first(empty)}: empty value "
                        f"({pc.sum(empty).as_py()} in the column)")
    nul = pc.match_substring(col, "\x00")  # numpy's fixed-width strings (distill.data) would drop a trailing NUL
    if pc.any(nul).as_py():
        raise DataError(f"{path}: column `{name}` ({key}) row {_first(nul)}: holds a NUL character")
    return col


def _tokens(col):
    """(codes, tokens): tokens = the column's distinct values (an _ids column) as strings in sorted order, codes =
    each row's index into them. Hashing is done by Arrow on the raw values, sorting only on the distinct strings."""
    import pyarrow as pa
    import pyarrow.compute as pc

    enc = pc.dictionary_encode(col)
    idx = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    names = np.asarray(enc.dictionary.cast(pa.string()).to_numpy(zero_copy_only=False), dtype=str)
    order = np.argsort(names, kind="stable")
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    return rank[idx], names[order]


def _time_strings(col, path: Path, name: str):
    """Strings (CSV, JSONL) -> int64 when every value is an integer, else float64, else date-times (ISO 8601,
    to the nanosecond, with or without a zone); the column's kind is its first value's, and the first value
    that is not of it is named."""
    import pyarrow as pa
    kinds = [pa.int64(), pa.float64()] + [pa.timestamp(u, tz) for tz in (None, "UTC") for u in ("ns", "us")]
    for kind in kinds:
        try:
            return col.cast(kind)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass

    def fits(value, kind) -> bool:
        try:
            pa.array([value]).cast(kind)
            return True
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return False
    values = col.to_pylist()
    own = [k for k in kinds if fits(values[0], k)]
    row = next((r for r, v in enumerate(values, start=1) if not any(fits(v, k) for k in own)), None)
    if row is None:
        raise DataError(f"{path}: column `{name}` (data.columns.time): no one kind (integer, number, date-time "
                        "of one resolution and zone) fits every value")
    raise DataError(f"{path}: column `{name}` (data.columns.time) row {row}: {values[row - 1]!r} "
                    "is not a number or a date-time")


def _instants(col) -> np.ndarray:
    """Dates and date-times of any unit as int64 nanoseconds (microseconds where a date lies outside 1677-2262),
    so a Parquet `timestamp[us]` or `date32` column and the same instants written as text in a CSV are one clock
    (and one split hash)."""
    import pyarrow as pa
    tz = getattr(col.type, "tz", None)
    for unit in ("ns", "us"):
        try:
            return col.cast(pa.timestamp(unit, tz)).cast(pa.int64()).to_numpy(zero_copy_only=False)
        except pa.ArrowInvalid:
            pass
    return col.cast(pa.int64()).to_numpy(zero_copy_only=False)


def _times(col, path: Path, name: str) -> np.ndarray:
    """(rows,) int64 (integers; dates and date-times as nanoseconds, _instants) or float64 (fractions): ordered
    exactly as the file's values, never rounded through float64."""
    import pyarrow as pa
    import pyarrow.compute as pc
    if col.null_count:
        raise DataError(f"{path}: column `{name}` (data.columns.time) row {_first(pc.is_null(col))}: empty value")
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        col = _time_strings(col, path, name)
    if pa.types.is_timestamp(col.type) or pa.types.is_date(col.type):
        return _instants(col)
    if pa.types.is_integer(col.type):
        try:
            return col.cast(pa.int64()).to_numpy(zero_copy_only=False)
        except pa.ArrowInvalid:
            raise DataError(f"{path}: column `{name}` (data.columns.time) holds integers beyond int64") from None
    if not pa.types.is_floating(col.type):
        raise DataError(f"{path}: column `{name}` (data.columns.time) holds {col.type}, expected numbers or dates")
    t = np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)
    bad = ~np.isfinite(t)
    if bad.any():
        raise DataError(f"{path}: column `{name}` (data.columns.time) row {int(np.argmax(bad)) + 1}: "
                        f"timestamp {float(t[bad][0])!r} is not finite")
    return t


def _read_formatted(cfg: DataConfig, inter: Path, item: Path | None):
    c = cfg.columns
    keys = {c.user: "data.columns.user", c.item: "data.columns.item", c.time: "data.columns.time"}
    table = _read_table(inter, cfg.format, keys)
    if table.num_rows == 0:
        raise DataError(f"{inter}: no interactions")
    u_codes, u_tokens = _tokens(_ids(_column(table, inter, c.user, keys[c.user]), inter, c.user, keys[c.user]))
    i_codes, i_tokens = _tokens(_ids(_column(table, inter, c.item, keys[c.item]), inter, c.item, keys[c.item]))
    ts = _times(_column(table, inter, c.time, keys[c.time]), inter, c.time)
    titles = None
    if item is not None:
        import pyarrow as pa
        it = _read_table(item, cfg.format, {c.item: "data.columns.item"})
        item_col = _ids(_column(it, item, c.item, "data.columns.item"), item, c.item, "data.columns.item")
        keys_ = np.asarray(item_col.cast(pa.string()).to_numpy(zero_copy_only=False), dtype=str)
        if c.title not in it.column_names:
            raise DataError(f"{item}: no column `{c.title}` (data.columns.title); columns: {', '.join(it.column_names)}")
        title_col = it.column(c.title)
        if pa.types.is_nested(title_col.type) or pa.types.is_binary(title_col.type):
            raise DataError(f"{item}: column `{c.title}` (data.columns.title) holds {title_col.type}; "
                            "titles must be strings")
        vals = title_col.cast(pa.string()).fill_null("")  # an empty title is allowed
        vals = np.asarray(vals.to_numpy(zero_copy_only=False), dtype=object)
        texts = _formatted_texts(it, item, vals, text_columns(it.column_names, (c.item, c.title), c.text, str(item)))
        last = len(keys_) - 1 - np.unique(keys_[::-1], return_index=True)[1]  # a repeated item: its last row
        titles = (keys_[last], vals[last], texts[last])
    return u_codes, u_tokens, i_codes, i_tokens, ts, titles


def _formatted_texts(table, path: Path, titles: np.ndarray, columns: list[str]) -> np.ndarray:
    """(rows,) each item's text (distill.item_text): the title, then `columns` (lists after a colon)."""
    import pyarrow as pa
    scalars, lists = [], []
    for name in columns:
        col = table.column(name)
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            lists.append([[str(v) for v in (row or [])] for row in col.to_pylist()])
        else:
            scalars.append(["" if v is None else str(v) for v in col.to_pylist()])
    return np.asarray([render(str(t), [c[r] for c in scalars], [c[r] for c in lists])
                       for r, t in enumerate(titles.tolist())], dtype=object)


def read_columns(cfg: DataConfig, inter: Path, item: Path | None):
    """(user codes, user tokens, item codes, item tokens, timestamps, titles) of the data files, in file order:
    what the split's vectorised builder sorts and numbers (distill.data)."""
    import pyarrow as pa  # the train extra: serving an export never reads data files
    if cfg.format == "recbole":
        c = cfg.columns
        user_tok, item_tok, ts = read_interactions(inter, c.user, c.item, c.time)
        raw = read_titles(item, cfg.title_field, c.text)
        u_codes, u_tokens = _tokens(_ids(pa.array(user_tok, pa.string()), inter, c.user, "data.columns.user"))
        i_codes, i_tokens = _tokens(_ids(pa.array(item_tok, pa.string()), inter, c.item, "data.columns.item"))
        keys = np.asarray(sorted(raw), dtype=str)
        titles = (keys, *(np.asarray([raw[k][j] for k in keys.tolist()], dtype=object) for j in (0, 1))) \
            if raw else None
    else:
        return _read_formatted(cfg, inter, item)
    return u_codes, u_tokens, i_codes, i_tokens, ts, titles
