"""Reading the raw data files: where they are, the RecBole atomic parser, Parquet / CSV / JSONL through
`datasets` (Arrow, memory-mapped; pyarrow and datasets are imported where a file is read, so that serving an
export, which reads none, needs neither). Everything here returns columns in file order; sorting, numbering and the
split are distill.data's. A malformed file is one DataError naming the file, line or column.
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
        users.append(fields[iu])
        items.append(fields[ii])
        if it is not None:
            try:
                t = float(fields[it])
            except ValueError:
                raise DataError(f"{path}:{n}: timestamp {fields[it]!r} is not a number") from None
            if not np.isfinite(t):
                raise DataError(f"{path}:{n}: timestamp {fields[it]!r} is not finite")
            times.append(t)
    if not users:
        raise DataError(f"{path}:2: no interactions after the header")
    ts = np.asarray(times, dtype=np.float64) if it is not None else np.arange(len(users), dtype=np.float64)
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


# ---------------------------------------------------------------- Parquet / CSV / JSONL through `datasets`

def _read_table(path: Path, fmt: str):
    """The file as a pyarrow Table, read by `datasets` (Arrow, memory-mapped from its cache)."""
    import datasets
    from datasets import Dataset

    reader = {"parquet": Dataset.from_parquet, "csv": Dataset.from_csv, "jsonl": Dataset.from_json}[fmt]
    datasets.disable_progress_bars()
    try:
        ds = reader(str(path))
    except Exception as e:  # noqa: BLE001 - datasets/pyarrow/pandas raise many types for a malformed file
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise DataError(f"{path}: cannot read as {fmt} (data.format): {reason}") from None
    return ds.data.table


def _column(table, path: Path, name: str, key: str):
    if name not in table.column_names:
        raise DataError(f"{path}: no column `{name}` ({key}); columns: {', '.join(table.column_names)}")
    col = table.column(name)
    if col.null_count:
        import pyarrow.compute as pc
        row = int(pc.index(pc.is_null(col), True).as_py())
        raise DataError(f"{path}: column `{name}` ({key}) has {col.null_count} empty values (first at row {row})")
    return col


def _tokens(col):
    """(codes, tokens): tokens = the column's distinct values as strings in sorted order, codes = each row's
    index into them. Hashing is done by Arrow on the raw values, sorting only on the distinct strings."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    enc = pc.dictionary_encode(col)
    idx = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    names = np.asarray(enc.dictionary.cast(pa.string()).to_numpy(zero_copy_only=False), dtype=str)
    order = np.argsort(names, kind="stable")
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    return rank[idx], names[order]


def _times(col, path: Path, name: str) -> np.ndarray:
    import pyarrow as pa

    if pa.types.is_timestamp(col.type) or pa.types.is_date(col.type):
        col = col.cast(pa.timestamp("us")).cast(pa.int64())
    elif not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
        raise DataError(f"{path}: column `{name}` (data.columns.time) holds {col.type}, expected numbers or dates")
    t = np.asarray(col.to_numpy(), dtype=np.float64)
    bad = ~np.isfinite(t)
    if bad.any():
        raise DataError(f"{path}: column `{name}` (data.columns.time) row {int(np.argmax(bad))}: "
                        f"timestamp {t[bad][0]!r} is not finite")
    return t


def _read_formatted(cfg: DataConfig, inter: Path, item: Path | None):
    c = cfg.columns
    table = _read_table(inter, cfg.format)
    if table.num_rows == 0:
        raise DataError(f"{inter}: no interactions")
    u_codes, u_tokens = _tokens(_column(table, inter, c.user, "data.columns.user"))
    i_codes, i_tokens = _tokens(_column(table, inter, c.item, "data.columns.item"))
    ts = _times(_column(table, inter, c.time, "data.columns.time"), inter, c.time)
    titles = None
    if item is not None:
        import pyarrow as pa
        it = _read_table(item, cfg.format)
        keys = np.asarray(_column(it, item, c.item, "data.columns.item").cast(pa.string())
                          .to_numpy(zero_copy_only=False), dtype=str)
        if c.title not in it.column_names:
            raise DataError(f"{item}: no column `{c.title}` (data.columns.title); columns: {', '.join(it.column_names)}")
        vals = it.column(c.title).cast(pa.string()).fill_null("")  # an empty title is allowed
        vals = np.asarray(vals.to_numpy(zero_copy_only=False), dtype=object)
        texts = _formatted_texts(it, item, vals, text_columns(it.column_names, (c.item, c.title), c.text, str(item)))
        last = len(keys) - 1 - np.unique(keys[::-1], return_index=True)[1]  # a repeated item: its last row
        titles = (keys[last], vals[last], texts[last])
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
    import pyarrow as pa  # with `datasets` (the train extra): serving an export never reads data files
    if cfg.format == "recbole":
        c = cfg.columns
        user_tok, item_tok, ts = read_interactions(inter, c.user, c.item, c.time)
        raw = read_titles(item, cfg.title_field, c.text)
        u_codes, u_tokens = _tokens(pa.array(user_tok, pa.string()))
        i_codes, i_tokens = _tokens(pa.array(item_tok, pa.string()))
        keys = np.asarray(sorted(raw), dtype=str)
        titles = (keys, *(np.asarray([raw[k][j] for k in keys.tolist()], dtype=object) for j in (0, 1))) \
            if raw else None
    else:
        return _read_formatted(cfg, inter, item)
    return u_codes, u_tokens, i_codes, i_tokens, ts, titles
