"""Each item's text: its title followed by the item file's other columns, written as a reader expects a
catalogue line (what the teacher's text item side reads, teacher/item_text.py).

    title (scalar, scalar): list item, list item; list item

Scalar columns (RecBole `token`/`float`, or a plain value) go in parentheses after the title, list columns
(RecBole `token_seq`, or an Arrow list) after a colon, their values joined by commas. MovieLens-100K's
`movie_title`, `release_year` and `class` give "Toy Story (1995): Animation, Children's, Comedy".
A title with its article moved to the end ("Empire Strikes Back, The") is written with it in front.
`data.columns.text` chooses the columns and their order; unset = every column but the item and the title.
"""

from __future__ import annotations

import re

from distill.errors import DataError

ARTICLE = re.compile(r"^(?P<rest>.+), (?P<article>The|A|An|Les|La|Le|Il|Das|Der|Die|El)$")


def reader_title(title: str) -> str:
    """A catalogue's "Empire Strikes Back, The" as it is said: "The Empire Strikes Back"."""
    m = ARTICLE.match(title.strip())
    return f"{m['article']} {m['rest']}" if m else title.strip()


def render(title: str, scalars: list[str], lists: list[list[str]]) -> str:
    """One item's text from its title, its scalar values and its list values (empty ones skipped)."""
    scalars = [v.strip() for v in scalars if v.strip()]
    lists = [[v.strip() for v in vs if v.strip()] for vs in lists]
    text = reader_title(title)
    if scalars:
        text = f"{text} ({', '.join(scalars)})".strip()
    parts = "; ".join(", ".join(vs) for vs in lists if vs)
    if parts:
        text = f"{text}: {parts}" if text else parts
    return text


def text_columns(available: list[str], skip: tuple[str, ...], chosen: list[str] | None, where: str) -> list[str]:
    """The columns that follow the title: `chosen` (each must exist) or every column not in `skip`."""
    if chosen is None:
        return [c for c in available if c not in skip]
    for c in chosen:
        if c not in available:
            raise_missing(where, c, available)
    return list(chosen)


def raise_missing(where: str, column: str, available: list[str]) -> None:
    raise DataError(f"{where}: no column `{column}` (data.columns.text); columns: {', '.join(available)}")
