"""`anyo serve DIR`: an exported student over HTTP (FastAPI + uvicorn).

    POST /recommend        {"history": [RAW_ID, ...], "k": 10, "include_seen": false}
                           -> {"items": [{"item": RAW_ID, "title": ..., "score": ...}, ...]}
    POST /recommend/batch  {"histories": [[...], ...], "k": 10, "include_seen": false}
                           -> {"results": [{"items": [...]}, ...]}
    GET  /health           -> {"status": "ok", "model", "split_hash", "n_items"}
    GET  /docs, /openapi.json   FastAPI's OpenAPI documentation

Raw ids are JSON strings or integers (an integer is matched as its decimal string). Bad input
is answered with a 4xx and {"detail": "FIELD: what is wrong"}: 400 malformed JSON, 413 a
body over MAX_BODY_BYTES, 415 a content type other than JSON, 422 everything else (unknown ids,
all of them named; an empty or too long history; k outside 1..catalogue size; wrong types).
The ranking is `distill.recommender.Recommender`'s, the same as the evaluation harness's.
"""


import json
import os
from pathlib import Path
from typing import Union

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from distill.errors import AnyoError
from distill.exported import Exported, load_export

MAX_HISTORY = 10_000        # ids in one history
MAX_BATCH = 1_024           # histories in one batch request
MAX_BATCH_IDS = 200_000     # ids in one batch request, all histories together
MAX_BODY_BYTES = 4 << 20    # request body
ENV_DIR = "ANYO_SERVE_DIR"


def _field(loc) -> str:
    parts = [str(p) for p in loc if p != "body"]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


class BodyGuard:
    """Pure ASGI middleware: 415 for a POST whose content type is not JSON, 413 for a body over the limit."""

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES):
        self.app, self.max_bytes = app, max_bytes

    async def _reply(self, send, status: int, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        ctype = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        if ctype != "application/json" and not ctype.endswith("+json"):
            return await self._reply(send, 415, f"content-type: expected application/json, got {ctype or 'none'!r}")
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return await self._reply(send, 400, "content-length: not a number")
            if n > self.max_bytes:
                return await self._reply(send, 413, self._too_big(n))
            return await self.app(scope, receive, send)
        # no length (chunked): read it all, up to the limit, then replay it
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            total += len(chunks[-1])
            if total > self.max_bytes:
                return await self._reply(send, 413, self._too_big(total))
            if not message.get("more_body", False):
                break
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()
        return await self.app(scope, replay, send)

    def _too_big(self, n: int) -> str:
        return (f"body: {n:,} bytes, more than the limit of {self.max_bytes:,} "
                f"(history: at most {MAX_HISTORY:,} ids; histories: at most {MAX_BATCH:,} lists)")


ItemId = Union[StrictStr, StrictInt]


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    history: list[ItemId] = Field(min_length=1, max_length=MAX_HISTORY,
                                  description="raw item ids as in the user's data (strings or integers), oldest first")
    k: StrictInt = Field(10, description="how many items, 1..catalogue size")
    include_seen: StrictBool = Field(False, description="also return items of the history")


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    histories: list[list[ItemId]] = Field(min_length=1, max_length=MAX_BATCH,
                                          description=f"at most {MAX_BATCH} histories, {MAX_BATCH_IDS} ids in all")
    k: StrictInt = Field(10, description="how many items per history, 1..catalogue size")
    include_seen: StrictBool = False


class Item(BaseModel):
    item: str
    title: str
    score: float


class Items(BaseModel):
    items: list[Item]


class Results(BaseModel):
    results: list[Items]


class Health(BaseModel):
    status: str
    model: str
    split_hash: str
    n_items: int


class Problem(Exception):
    """A request FastAPI's validation accepted but the model cannot answer: (status, detail)."""

    def __init__(self, status: int, detail: str):
        self.status, self.detail = status, detail


def validation_problem(errors: list[dict]) -> Problem:
    """FastAPI's validation errors as one 400 (malformed JSON) or 422 naming each field, at most five."""
    bad_json = next((e for e in errors if e.get("type") == "json_invalid"), None)
    if bad_json is not None:
        ctx = (bad_json.get("ctx") or {}).get("error", "")
        return Problem(400, f"body: malformed JSON{f' ({ctx})' if ctx else ''}")
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


def check_request(k: int, n_items: int, histories: list[list]) -> None:
    """What the schema cannot say: k within the catalogue, each history's length, the batch's total."""
    if not 1 <= k <= n_items:
        raise Problem(422, f"k: {k} is not in 1..{n_items} (the catalogue size)")
    for n, h in enumerate(histories):
        if not h:
            raise Problem(422, f"histories[{n}]: must not be empty")
        if len(h) > MAX_HISTORY:
            raise Problem(422, f"histories[{n}]: too long ({len(h):,} items, at most {MAX_HISTORY:,})")
    total = sum(len(h) for h in histories)
    if total > MAX_BATCH_IDS:
        raise Problem(422, f"histories: {total:,} ids in all, at most {MAX_BATCH_IDS:,}")


def answer(obj) -> Response:
    return Response(json.dumps(obj, separators=(",", ":")), media_type="application/json")


def create_app(exported: Exported) -> FastAPI:
    """The FastAPI app for a loaded export (`distill.exported.load_export`)."""
    manifest, n_items = exported.manifest, exported.n_items
    app = FastAPI(title="anyo recommender", version=str(manifest.get("format")),
                  description=f"{manifest['model']} exported by `anyo export` (split {manifest['split_hash']}, "
                              f"{n_items:,} items). Ranking = the evaluation harness's.")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return await problem(request, validation_problem(exc.errors()))

    @app.exception_handler(Problem)
    async def problem(request: Request, exc: Problem):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.get("/health", response_model=Health)
    async def health():
        return answer({"status": "ok", "model": manifest["model"], "split_hash": manifest["split_hash"],
                       "n_items": n_items})

    def answered(call, histories: list[list], k: int):
        check_request(k, n_items, histories)
        try:
            return call()
        except AnyoError as e:  # unknown item ids, named
            raise Problem(422, str(e)) from None

    @app.post("/recommend", response_model=Items, responses={400: {}, 413: {}, 415: {}, 422: {}})
    async def recommend(req: RecommendRequest):
        """Top-k next items for one history; history items are excluded unless include_seen."""
        items = answered(lambda: exported.recommend(req.history, req.k, include_seen=req.include_seen),
                         [req.history], req.k)
        return answer({"items": items})

    @app.post("/recommend/batch", response_model=Results, responses={400: {}, 413: {}, 415: {}, 422: {}})
    async def recommend_batch(req: BatchRequest):
        """Top-k next items for each of several histories, in one encoder pass."""
        lists = answered(lambda: exported.recommend_many(req.histories, req.k, include_seen=req.include_seen),
                         req.histories, req.k)
        return answer({"results": [{"items": items} for items in lists]})

    app.add_middleware(BodyGuard)
    return app


def app_from_env():
    """uvicorn factory for --workers > 1: each worker loads (and verifies) the export itself."""
    torch.set_num_threads(int(os.environ.get("ANYO_SERVE_THREADS", "1")))
    return create_app(load_export(os.environ[ENV_DIR]))


def cmd_serve(args) -> int:
    if args.workers < 1:
        raise AnyoError(f"--workers {args.workers}: expected 1 or more")
    if not 0 <= args.port <= 65535:
        raise AnyoError(f"--port {args.port}: expected 0..65535")
    threads = getattr(args, "threads", 1)
    if threads < 1:
        raise AnyoError(f"--threads {threads}: expected 1 or more")
    torch.set_num_threads(threads)
    exported = load_export(args.dir)  # refuses a tampered export before anything listens
    print(f"serving {exported.manifest['model']} ({exported.n_items:,} items, split {exported.manifest['split_hash']}) "
          f"on http://{args.host}:{args.port} (docs at /docs), {args.workers} worker(s) x {threads} torch thread(s)",
          flush=True)
    common = dict(host=args.host, port=args.port, log_level="warning", access_log=False)
    if args.workers == 1:
        uvicorn.run(create_app(exported), **common)
    else:
        os.environ[ENV_DIR] = str(Path(args.dir).resolve())
        os.environ["ANYO_SERVE_THREADS"] = str(threads)
        uvicorn.run("distill.server:app_from_env", factory=True, workers=args.workers, **common)
    return 0
