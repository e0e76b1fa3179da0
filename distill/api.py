"""What `anyo serve`'s HTTP API accepts and what it refuses: the request schemas, the checks the schemas cannot
say, and the problems (a 4xx, or 503 with Retry-After) they raise. Both routes read their body raw and parse it
with `parsed`: the server a /recommend, the batch lane's process (`distill.batch_lane`) a /recommend/batch, so
both answer bad input alike.
`Backlog` bounds the histories waiting for the model, both kinds of request together."""

from __future__ import annotations

import json
import threading
from typing import Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from distill.errors import AnyoError
from distill.serve_config import MAX_BATCH, MAX_BATCH_IDS, MAX_HISTORY

RETRY_AFTER_S = 1

ItemId = Union[StrictStr, StrictInt]


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    history: list[ItemId] = Field(min_length=1, max_length=MAX_HISTORY,
                                  description="raw item ids as in the user's data (strings or integers), oldest first")
    k: StrictInt = Field(10, description="how many items, 1..catalogue size")
    include_seen: StrictBool | None = Field(None, description="also return items of the history (default: the "
                                                               "protocol the model was evaluated with)")


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    histories: list[list[ItemId]] = Field(min_length=1, max_length=MAX_BATCH,
                                          description=f"at most {MAX_BATCH} histories, {MAX_BATCH_IDS} ids in all")
    k: StrictInt = Field(10, description="how many items per history, 1..catalogue size")
    include_seen: StrictBool | None = None


class Problem(Exception):
    """A request the API refuses: (HTTP status, detail)."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"{status} {detail}")
        self.status, self.detail = status, detail


class Busy(Problem):
    """The server cannot take the request now: 503 with Retry-After."""

    def __init__(self, detail: str):
        super().__init__(503, detail)


def _field(loc) -> str:
    parts = [str(p) for p in loc]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


def _validation_problem(errors: list[dict]) -> Problem:
    """pydantic's validation errors as one 422 naming each field, at most five."""
    lines, done = [], set()
    for e in errors:
        loc, msg = tuple(e.get("loc", ())), e.get("msg", "invalid")
        if loc and loc[-1] in ("str", "int"):  # one item id failed both halves of str | int
            loc, msg = loc[:-1], "expected an item id (a JSON string or integer)"
        if loc in done:
            continue
        done.add(loc)
        if e.get("type") == "too_long":
            ctx = e.get("ctx") or {}
            got = f"{ctx['actual_length']:,} items, " if isinstance(ctx.get("actual_length"), int) else ""
            most = ctx.get("max_length")
            msg = f"too long ({got}at most {most:,})" if isinstance(most, int) else f"too long ({got.rstrip(', ')})"
        elif e.get("type") == "too_short":
            msg = "must not be empty"
        lines.append(f"{_field(loc)}: {msg}")
    more = f" (and {len(lines) - 5} more errors)" if len(lines) > 5 else ""
    return Problem(422, "; ".join(lines[:5]) + more)


def parsed(model: type[BaseModel], body: bytes) -> BaseModel:
    """A request body as FastAPI would read it for `model` (json.loads, then validation), or the Problem naming
    what is wrong: 400 for an empty or malformed body, else 422."""
    if not body:
        raise Problem(400, "body: empty (expected a JSON object)")
    try:
        data = json.loads(body)
    except json.JSONDecodeError as e:
        raise Problem(400, f"body: malformed JSON ({e.msg})") from None
    except ValueError:   # bytes that are not UTF-8, -16 or -32
        raise Problem(400, "body: malformed JSON (not UTF-8 text)") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _validation_problem(e.errors()) from None


def checked_rows(exported, histories: list[list], k: int, max_items: int, field: str) -> list[np.ndarray]:
    """The histories as internal ids (`exported.internal_rows`), once what the schema cannot say holds: k within
    the catalogue, each history's length, the batch's total, the answer's size, every id known (all the unknown
    ones named)."""
    n_items = exported.n_items
    if not 1 <= k <= n_items:
        raise Problem(422, f"k: {k} is not in 1..{n_items} (the catalogue size)")
    if len(histories) * k > max_items:
        raise Problem(422, f"k: {len(histories):,} histories x k = {k:,} is {len(histories) * k:,} items, "
                           f"more than the server's limit of {max_items:,} (--max-response-items)")
    for n, h in enumerate(histories):
        if not h:
            raise Problem(422, f"histories[{n}]: must not be empty")
        if len(h) > MAX_HISTORY:
            raise Problem(422, f"histories[{n}]: too long ({len(h):,} items, at most {MAX_HISTORY:,})")
    total = sum(len(h) for h in histories)
    if total > MAX_BATCH_IDS:
        raise Problem(422, f"histories: {total:,} ids in all, at most {MAX_BATCH_IDS:,}")
    try:
        return exported.internal_rows(histories, field)
    except AnyoError as e:  # unknown item ids, named
        raise Problem(422, str(e)) from None


def histories_at_most(body: bytes) -> int:
    """An upper bound on the histories of a /recommend/batch body, read without parsing it (a 1,024-history body
    takes the server 0.1 ms to count, where parsing it took tens): each history opens a JSON list, so a valid body
    has more `[` than histories (an id with a `[` in it only adds to the count)."""
    return min(MAX_BATCH, body.count(b"["))


def batch_of(body: bytes, exported, max_items: int) -> tuple[list[np.ndarray], int, bool]:
    """A /recommend/batch body as (rows of internal ids, k, exclude_seen), or the Problem the server answers."""
    req = parsed(BatchRequest, body)
    rows = checked_rows(exported, req.histories, req.k, max_items, "histories")
    return rows, req.k, exported.excludes_seen(req.include_seen)


class Backlog:
    """Histories admitted and not yet answered, all of a serving process's requests together, at most `limit`:
    a request's histories are admitted all at once or refused (Busy) on the event loop, and leave from any
    thread as they are answered."""

    def __init__(self, limit: int):
        self.limit, self.n = limit, 0
        self._lock = threading.Lock()

    def admit(self, n: int) -> None:
        with self._lock:
            if self.n + n > self.limit:
                raise Busy(f"server busy: {self.n:,} histories are waiting and this request brings {n:,}, "
                           f"more than --max-queue {self.limit:,}; retry after {RETRY_AFTER_S} s")
            self.n += n

    def done(self, n: int) -> None:
        with self._lock:
            self.n -= n
