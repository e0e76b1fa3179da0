"""`anyo serve DIR`: an exported student over HTTP (FastAPI + uvicorn), micro-batched and bounded.

    POST /recommend        {"history": [RAW_ID, ...], "k": 10, "include_seen": false}
                           -> {"items": [{"item": RAW_ID, "title": ..., "score": ...}, ...]}
    POST /recommend/batch  {"histories": [[...], ...], "k": 10, "include_seen": false}
                           -> {"results": [{"items": [...]}, ...]}
    GET|HEAD /health       -> {"status": "ok", "model", "split_hash", "n_items", "manifest_sha256"}
    GET  /metrics          Prometheus text: requests by path and status, latency histogram, model-call sizes
    GET  /docs             the endpoints and their schemas, one HTML page with no external assets;
         /openapi.json     the OpenAPI schema

Inference runs off the event loop. /recommend in one thread (`Batcher`): concurrent requests wait up to
`--batch-wait-ms` for one another and are answered from one Recommender call of at most `--max-batch`
histories. /recommend/batch in a child process at the lowest CPU priority (`distill.batch_lane.BatchLane`):
the server reads its body and hands it over; the child parses and checks it, ranks it and writes its JSON, in
pieces of `--piece-histories` (fewer when k is large), so a /recommend never waits for a batch and the server's
interpreter lock holds none of its work; its answer streams as the pieces come (`Streamed`). More than
`--max-queue` histories waiting (`distill.api.Backlog`), or more than `--max-concurrency` requests in progress,
is answered 503 with Retry-After; a request not answered within `--request-timeout-s` too (for a batch: its
first piece; a later one that fails or is late closes the connection mid-answer).
Each process serves one private snapshot of the export, copied and checked against its manifest at start
(`snapshot_export`), so re-exporting the folder never mixes two models.

Raw ids are JSON strings or integers (an integer is matched as its decimal string). Bad input
is answered with a 4xx and {"detail": "FIELD: what is wrong"}: 400 an empty or malformed JSON body, 413 a body over
MAX_BODY_BYTES, 415 a content type other than JSON, 431 a request line and headers over `--max-header-bytes`
(400 from the HTTP layer when they never end), 422 everything else (unknown ids, all of them named; an
empty or too long history; k outside 1..catalogue size; histories x k over `--max-response-items`; wrong
types). 503 with Retry-After: the server is full (see above); try again.
The checks are `distill.api`'s, for both routes. The ranking is `distill.recommender.Recommender`'s, the same
as the evaluation harness's.
"""


import asyncio
import dataclasses
import gc
import hashlib
import html
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import h11
import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.supervisors import Multiprocess

from distill.answer_text import AnswerText
from distill.api import (RETRY_AFTER_S, Backlog, BatchRequest, Busy, Problem, RecommendRequest, checked_rows,
                         histories_at_most, parsed)
from distill.batch_lane import BatchLane
from distill.errors import AnyoError, ArtifactError
from distill.exported import Exported, load_export, verify_export
from distill.histories import Histories
from distill.serve_config import MAX_BATCH, MAX_BODY_BYTES, MAX_HISTORY, ServeConfig

ENV_DIR = "ANYO_SERVE_DIR"          # for --workers > 1: the snapshot each worker loads,
ENV_CONFIG = "ANYO_SERVE_CONFIG"    # the settings (JSON),
ENV_MASTER = "ANYO_SERVE_MASTER"    # and the pid of the process that started them
GIL_SWITCH_S = 0.001                 # the event loop waits at most this for the GIL the inference thread holds
WORKER_STARTUP_S = 120               # uvicorn kills a worker that does not answer its health ping within this


class BodyGuard:
    """Pure ASGI middleware: 415 for a POST whose content type is not JSON, 413 for a body over the limit."""

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        ctype = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        if ctype != "application/json" and not ctype.endswith("+json"):
            return await reply(send, 415, f"content-type: expected application/json, got {ctype or 'none'!r}")
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return await reply(send, 400, "content-length: not a number")
            if n > self.max_bytes:
                return await reply(send, 413, self._too_big(n))
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
                return await reply(send, 413, self._too_big(total))
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
    manifest_sha256: str


async def _disconnected(receive) -> None:
    """Returns once the client has gone (its request's body already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class BatchAnswer:
    """A /recommend/batch's answer as the batch lane makes it (`distill.batch_lane.Answer`): its pieces, then its
    end, handed from the lane's thread to the request's event loop in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.cancelled = loop, False
        self._items: asyncio.Queue = asyncio.Queue()

    def wanted(self) -> bool:
        return not self.cancelled

    def cancel(self) -> None:
        """The request gave up: the lane makes no more of it."""
        self.cancelled = True

    def piece(self, text: bytearray) -> None:
        self._put(text)

    def end(self, error: Exception | None) -> None:
        self._put(error)

    def _put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self._items.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody waits for it
            pass

    async def next(self) -> bytearray | None:
        """The next piece, None once the answer is whole; the request's refusal (a Problem) or failure raised."""
        item = await self._items.get()
        if isinstance(item, BaseException):
            raise item
        return item


class Streamed(Response):
    """A batch answer sent piece by piece as the batch lane answers them, the first already in hand: a 120 MB
    answer's sending is spread over the seconds of its making, not one burst at the end that took both cores
    from every other request for 100-160 ms (measured, 2026-12-02), and a reader that keeps up never has the
    server hold all of it. The event loop runs other requests between pieces, even when they are all answered
    and the socket keeps up. The status is sent with the first piece: a later piece that fails, or is not
    answered by `deadline` (loop time), ends the answer unfinished and uvicorn closes the connection, never a
    shorter list (HTTP/1.1 clients report the incomplete chunked body; for HTTP/1.0 only the JSON is cut). A
    client that leaves mid-answer has the rest of its answer cancelled. Pieces are `AnswerText.piece` texts,
    each row after its comma: sent as they are, the first without its comma."""

    media_type = "application/json"

    def __init__(self, first: bytes, answer: BatchAnswer, deadline: float):
        super().__init__(b"", media_type=self.media_type)
        del self.headers["content-length"]
        self.first, self.answer, self.deadline = first, answer, deadline

    async def __call__(self, scope, receive, send) -> None:
        loop = asyncio.get_running_loop()
        ended, gone, coming = False, asyncio.ensure_future(_disconnected(receive)), None
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            await send({"type": "http.response.body", "body": b'{"results":[' + self.first[1:], "more_body": True})
            while True:   # waiting on a new task: the event loop runs others before each piece, even one in hand
                coming = asyncio.ensure_future(self.answer.next())
                await asyncio.wait([coming, gone], timeout=max(0.0, self.deadline - loop.time()),
                                   return_when=asyncio.FIRST_COMPLETED)
                if gone.done() or not coming.done() or coming.exception() is not None:
                    return          # the client left, too late, or failed: uvicorn closes an answer that did not end
                if (piece := coming.result()) is None:
                    break
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            await send({"type": "http.response.body", "body": b"]}", "more_body": False})
            ended = True
        finally:
            gone.cancel()
            if coming is not None:
                coming.cancel()
            if not ended:   # and a send that raised, the server stopping: the rest is not needed
                self.answer.cancel()


# ---------------------------------------------------------------- the micro-batcher

@dataclass(eq=False)
class Job:
    """The history (internal ids) of one /recommend, and where its answer, (ids, scores), goes."""

    rows: list[np.ndarray]
    k: int
    exclude_seen: bool
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    arrived: float = 0.0
    cancelled: bool = False   # its request gave up (timeout): the worker skips it


class Batcher:
    """One inference thread for /recommend: jobs are gathered for up to `wait_s` after the first of them, at most
    `max_batch` histories, and answered by one `Recommender.top_k` call per include_seen setting (with the
    largest k asked, each cut to its own: the order is total, so a prefix is the top-k). A job's histories are in
    `backlog` from its submission to its answer."""

    def __init__(self, recommender, max_batch: int, wait_s: float, backlog: Backlog, on_call):
        self.recommender, self.max_batch, self.wait_s, self.backlog = recommender, max_batch, wait_s, backlog
        self.on_call = on_call      # told the number of histories of every model call (metrics)
        self._small: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="anyo-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue `job`, once the backlog admits it (else Busy), from the event loop."""
        with self._cond:
            if self._closed:
                raise Busy("server: shutting down")
            self.backlog.admit(len(job.rows))
            job.arrived = time.monotonic()
            self._small.append(job)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=10)

    def _take(self) -> list[Job] | None:
        """The /recommend jobs to answer together next; None once closed."""
        with self._cond:
            while not (self._small or self._closed):
                self._cond.wait()
            if self._closed:
                for j in self._small:
                    self.backlog.done(len(j.rows))
                    _settle(j, None, Busy("server: shutting down"))
                self._small.clear()
                return None
            deadline = self._small[0].arrived + self.wait_s
            while len(self._small) < self.max_batch and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            jobs, n = [], 0
            while self._small and n + len(self._small[0].rows) <= self.max_batch or not jobs:
                jobs.append(self._small.popleft())
                n += len(jobs[-1].rows)
            return jobs

    def _run(self) -> None:
        while (jobs := self._take()) is not None:
            self.backlog.done(sum(len(j.rows) for j in jobs if j.cancelled))
            jobs = [j for j in jobs if not j.cancelled]
            for exclude in (True, False):
                group = [j for j in jobs if j.exclude_seen is exclude]
                if group:
                    self._answer(group, exclude)

    def _answer(self, group: list[Job], exclude: bool) -> None:
        try:
            ids, scores = self.recommender.top_k(Histories.from_rows([r for j in group for r in j.rows]),
                                                 max(j.k for j in group), exclude_seen=exclude)
            self.on_call(sum(len(j.rows) for j in group))
            answers, error = (ids, scores), None
        except Exception as e:  # noqa: BLE001 - handed to each request, which answers 500 and the server goes on
            answers, error = None, e
        self.backlog.done(sum(len(j.rows) for j in group))   # before the answers: a request may follow at once
        start = 0
        for j in group:
            end = start + len(j.rows)
            _settle(j, None if error else (answers[0][start:end, :j.k], answers[1][start:end, :j.k]), error)
            start = end


def _settle(job: Job, result, error) -> None:
    """Hand a job's answer to its request's event loop (from any thread)."""
    def done():
        if not job.future.done():
            job.future.set_exception(error) if error is not None else job.future.set_result(result)
    try:
        job.loop.call_soon_threadsafe(done)
    except RuntimeError:  # the loop is closed: nobody waits for it
        pass


# ---------------------------------------------------------------- metrics and the gate

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
ROUTES = ("/recommend", "/recommend/batch", "/health", "/metrics", "/docs", "/openapi.json")


class Histogram:
    def __init__(self, bounds):
        self.bounds, self.counts, self.sum, self.n = bounds, [0] * len(bounds), 0.0, 0

    def observe(self, x: float) -> None:
        for i, b in enumerate(self.bounds):
            if x <= b:
                self.counts[i] += 1
                break
        self.sum += x
        self.n += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out, total = [], 0
        for b, c in zip(self.bounds, self.counts):
            total += c
            out.append(f'{name}_bucket{{{labels}{sep}le="{b:g}"}} {total}')
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.n}')
        tail = f"{{{labels}}}" if labels else ""
        return out + [f"{name}_sum{tail} {self.sum:.6f}", f"{name}_count{tail} {self.n}"]


class Metrics:
    """Request counts by path and status, latency by path, model-call sizes; Prometheus text format."""

    def __init__(self):
        self._lock = threading.Lock()
        self.in_progress = 0        # requests being answered (kept by Gate)
        self.requests: dict[tuple[str, int], int] = {}
        self.latency = {r: Histogram(LATENCY_BUCKETS_S) for r in ROUTES[:2]}
        self.calls = Histogram(BATCH_BUCKETS)

    def request(self, path: str, status: int, seconds: float) -> None:
        path = path if path in ROUTES else "other"
        with self._lock:
            self.requests[path, status] = self.requests.get((path, status), 0) + 1
            if path in self.latency and status == 200:
                self.latency[path].observe(seconds)

    def call(self, n: int) -> None:
        with self._lock:
            self.calls.observe(n)

    def text(self, waiting: int) -> str:
        with self._lock:
            lines = ["# HELP anyo_requests_total HTTP requests answered, by path and status.",
                     "# TYPE anyo_requests_total counter"]
            lines += [f'anyo_requests_total{{path="{p}",status="{s}"}} {n}' for (p, s), n in sorted(self.requests.items())]
            lines += ["# HELP anyo_request_seconds Time to answer a successful request.",
                      "# TYPE anyo_request_seconds histogram"]
            for path, h in self.latency.items():
                lines += h.lines("anyo_request_seconds", f'path="{path}"')
            lines += ["# HELP anyo_model_call_histories Histories per Recommender call (micro-batch size).",
                      "# TYPE anyo_model_call_histories histogram", *self.calls.lines("anyo_model_call_histories"),
                      "# HELP anyo_queue_histories Histories admitted and not yet answered, both routes (a batch the lane has "
                      "not read yet at its bound).", "# TYPE anyo_queue_histories gauge",
                      f"anyo_queue_histories {waiting}",
                      "# HELP anyo_requests_in_progress Requests being answered.",
                      "# TYPE anyo_requests_in_progress gauge", f"anyo_requests_in_progress {self.in_progress}"]
        return "\n".join(lines) + "\n"


UNLIMITED = ("/health", "/metrics")


class Gate:
    """Pure ASGI middleware: 431 for a request line and headers over `max_header_bytes` (uvicorn's h11 bounds
    only what it buffers before the headers are whole); at most `limit` requests in progress (/health and
    /metrics aside), else 503 with Retry-After; every answer counted in `metrics`."""

    def __init__(self, app, limit: int, max_header_bytes: int, metrics: Metrics):
        self.app, self.limit, self.max_header_bytes, self.metrics = app, limit, max_header_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, t0, status = scope["path"], time.perf_counter(), [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        counted = int(path not in UNLIMITED)
        m = self.metrics
        size = len(scope.get("raw_path") or b"") + len(scope["query_string"]) + sum(
            len(k) + len(v) + 4 for k, v in scope["headers"])
        try:
            if size > self.max_header_bytes:
                await reply(sending, 431, f"headers: {size:,} bytes with the request line, more than the server's "
                                          f"limit of {self.max_header_bytes:,} (--max-header-bytes)")
                return
            if counted and m.in_progress >= self.limit:
                await reply(sending, 503, f"server busy: {m.in_progress} requests in progress, "
                                          f"--max-concurrency {self.limit}; retry after {RETRY_AFTER_S} s")
                return
            m.in_progress += counted
            try:
                await self.app(scope, receive, sending)
            finally:
                m.in_progress -= counted
        finally:
            self.metrics.request(path, status[0], time.perf_counter() - t0)


async def reply(send, status: int, detail: str) -> None:
    """A JSON {"detail"} answer written straight to ASGI (the middlewares' refusals); 503 says when to retry."""
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 503:
        headers.append((b"retry-after", str(RETRY_AFTER_S).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol (whose `h11_max_incomplete_event_size` bounds the request line and headers) with a
    read timeout: a request must arrive whole, headers and body, within `read_timeout_s` of the connection or of
    the previous answer on it, or the connection is closed (a silent or trickling client holds nothing for long).
    `read_timeout_s` is set by each serving process before it listens."""

    read_timeout_s = ServeConfig.read_timeout_s

    def connection_made(self, transport) -> None:
        self._read_timer = None
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._read_timer = self.loop.call_later(self.read_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _too_slow(self) -> None:
        self._read_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def _request_in(self) -> bool:
        return self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._request_in():
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self._request_in():
            self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)


# ---------------------------------------------------------------- the app

def docs_page(schema: dict) -> str:
    """The OpenAPI schema as one self-contained HTML page (FastAPI's /docs loads Swagger UI from a CDN)."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(schema['info']['title'])}"
             "</title></head><body>", f"<h1>{html.escape(schema['info']['title'])}</h1>",
             f"<p>{html.escape(schema['info'].get('description', ''))}</p>"]
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            parts.append(f"<h2><code>{method.upper()} {html.escape(path)}</code></h2>"
                         f"<p>{html.escape(op.get('description') or op.get('summary', ''))}</p>")
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if body:
                ref = body.get("$ref", "").rsplit("/", 1)[-1]
                shown = schema.get("components", {}).get("schemas", {}).get(ref, body)
                parts.append(f"<pre>{html.escape(json.dumps(shown, indent=2))}</pre>")
    parts.append("<p>The machine-readable schema: <a href='/openapi.json'>/openapi.json</a>.</p></body></html>")
    return "\n".join(parts)


def request_body(model) -> dict:
    """A route's OpenAPI request body, `model`'s schema: the routes read their bodies raw (`distill.api.parsed`),
    so FastAPI cannot infer it."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def manifest_sha256(folder: Path) -> str:
    return hashlib.sha256((Path(folder) / "manifest.json").read_bytes()).hexdigest()


def create_app(exported: Exported, settings: ServeConfig) -> FastAPI:
    """The FastAPI app for a loaded export (`distill.exported.load_export`; served from a snapshot, whose
    manifest does not change under it). Its folder must stay while the app serves: the batch lane's process
    loads it too, and refuses it if its manifest is not `exported.manifest`."""
    manifest, n_items = exported.manifest, exported.n_items
    metrics = Metrics()
    text = AnswerText.of(exported.raw_ids, exported.titles)
    backlog = Backlog(settings.max_queue)
    batcher = Batcher(exported.recommender, settings.max_batch, settings.batch_wait_ms / 1000, backlog,
                      on_call=metrics.call)
    lane = BatchLane(exported.folder, manifest, exported.recommender.runtime, settings.threads,
                     settings.piece_histories, settings.max_response_items, backlog, on_call=metrics.call)

    @asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close()
        lane.close()

    app = FastAPI(title="anyo recommender", version=str(manifest.get("format")), lifespan=lifespan,
                  docs_url=None, redoc_url=None,
                  description=f"{manifest['model']} exported by `anyo export` (split {manifest['split_hash']}, "
                              f"{n_items:,} items). Ranking = the evaluation harness's.")
    app.state.batcher, app.state.lane, app.state.backlog, app.state.metrics = batcher, lane, backlog, metrics
    health_body = json.dumps({"status": "ok", "model": manifest["model"], "split_hash": manifest["split_hash"],
                              "n_items": n_items, "manifest_sha256": manifest_sha256(exported.folder)}, separators=(",", ":"))

    @app.exception_handler(Problem)
    async def problem(request: Request, exc: Problem):
        headers = {"Retry-After": str(RETRY_AFTER_S)} if exc.status == 503 else None
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=headers)

    @app.api_route("/health", methods=["GET", "HEAD"], response_model=Health)
    async def health():
        """Liveness and what is served; touches no model."""
        return Response(health_body, media_type="application/json")

    @app.get("/metrics", include_in_schema=False)
    async def prometheus():
        text = metrics.text(backlog.n)
        return Response(text, media_type="text/plain; version=0.0.4")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return HTMLResponse(docs_page(app.openapi()))

    async def in_time(answer, give_up):
        """`answer` awaited within the request timeout (503 when late); `give_up()` when it fails or is late."""
        try:
            return await asyncio.wait_for(answer, settings.request_timeout_s)
        except BaseException as e:   # a timeout, a refusal, the server stopping: the rest is not needed
            give_up()
            if isinstance(e, asyncio.TimeoutError):
                raise Busy(f"server busy: no answer within --request-timeout-s {settings.request_timeout_s:g} s; "
                           f"retry after {RETRY_AFTER_S} s") from None
            raise

    @app.post("/recommend", response_model=Items, responses={400: {}, 413: {}, 415: {}, 422: {}, 503: {}},
              openapi_extra=request_body(RecommendRequest))
    async def recommend(request: Request):
        """Top-k next items for one history; history items are excluded unless include_seen."""
        req = parsed(RecommendRequest, await request.body())
        rows = checked_rows(exported, [req.history], req.k, settings.max_response_items, "history")
        loop = asyncio.get_running_loop()
        one = Job(rows, req.k, exported.excludes_seen(req.include_seen), loop, loop.create_future())
        batcher.submit(one)
        ids, scores = await in_time(one.future, lambda: setattr(one, "cancelled", True))
        return Response(text.rows(ids, scores)[0], media_type="application/json")

    @app.post("/recommend/batch", response_model=Results, responses={400: {}, 413: {}, 415: {}, 422: {}, 503: {}},
              openapi_extra=request_body(BatchRequest))
    async def recommend_batch(request: Request):
        """Top-k next items for each of several histories, answered by the batch lane, a process of its own, in
        pieces (of --piece-histories, fewer for a large k)."""
        # the body goes to the lane as it came: its JSON is parsed and checked there (BatchRequest), which took
        # the event loop tens of milliseconds here; admitted now for as many histories as it may hold
        body = await request.body()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.request_timeout_s
        reserved = histories_at_most(body)
        backlog.admit(reserved)
        answer = BatchAnswer(loop)
        lane.submit(body, reserved, answer)
        # the first piece as any answer (its refusal, 503 when late); the others as they come, until the same deadline
        first = await in_time(answer.next(), answer.cancel)
        return Streamed(first, answer, deadline)

    app.add_middleware(BodyGuard)
    app.add_middleware(Gate, limit=settings.max_concurrency, max_header_bytes=settings.max_header_bytes,
                       metrics=metrics)  # the outer one
    return app


# ---------------------------------------------------------------- serving

SNAPSHOT_TRIES = 5


def snapshot_export(folder: Path, into: Path) -> str:
    """Copy the export in `folder` into `into` so that every file matches the copied manifest: one export,
    whole, even while `anyo export` replaces the folder (then it is read again). The manifest's sha256."""
    for _ in range(SNAPSHOT_TRIES):
        names = verify_export(folder)["files"]  # a corrupt or edited export is named as such
        bad = [n for n in names if Path(n).name != n]
        if bad:
            raise ArtifactError(f"{folder / 'manifest.json'}: lists {bad[0]!r}, not a file of the folder")
        shutil.rmtree(into, ignore_errors=True)
        into.mkdir(parents=True)
        try:
            manifest = (folder / "manifest.json").read_bytes()
            (into / "manifest.json").write_bytes(manifest)
            for name in json.loads(manifest)["files"]:
                shutil.copyfile(folder / name, into / name)
            verify_export(into)
            return manifest_sha256(into)
        except (OSError, ValueError, KeyError, TypeError, ArtifactError):
            pass  # a file was replaced between the manifest and the copy: read it all again
        time.sleep(0.2)
    raise ArtifactError(f"{folder}: changed while being read, {SNAPSHOT_TRIES} times (being re-exported?); "
                        "serve it once `anyo export` has finished")


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that the real port is known (and printed) for --port 0."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        reason = os.strerror(e.errno).lower() if e.errno else str(e)
        raise AnyoError(f"--host {host} --port {port}: {reason}") from None
    sock.listen(2048)   # from now on a connection waits for uvicorn in the backlog instead of being refused
    sock.set_inheritable(True)
    return sock


def _prepare_process(settings: ServeConfig) -> None:
    torch.set_num_threads(settings.threads)
    sys.setswitchinterval(GIL_SWITCH_S)
    GuardedH11.read_timeout_s = settings.read_timeout_s


def serving_app(exported: Exported, settings: ServeConfig) -> FastAPI:
    """The app of a serving process, ready: its batch lane started (it loads the export too, and no batch
    request waits for that), and what start-up made (torch, the model, the app: some 270,000 objects) out of
    the collector's sight (`gc.freeze`), as it lives as long as the process, so that a full collection while
    serving scans only what serving made. Unfrozen, one took 180 ms, every request waiting (2026-12-02)."""
    app = create_app(exported, settings)
    app.state.lane.start()
    gc.collect()
    gc.freeze()
    return app


def _exit_with_master(master: int) -> None:
    """A worker whose master is gone (killed with SIGKILL, say) shuts down, so no orphan keeps the port."""
    def watch():
        while os.getppid() == master:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful shutdown
        time.sleep(10)
        os._exit(1)
    threading.Thread(target=watch, name="anyo-master-watch", daemon=True).start()


def app_from_env():
    """uvicorn factory for --workers > 1: each worker loads the master's snapshot of the export."""
    settings = ServeConfig(**json.loads(os.environ[ENV_CONFIG]))
    _prepare_process(settings)
    _exit_with_master(int(os.environ[ENV_MASTER]))
    return serving_app(load_export(os.environ[ENV_DIR], runtime=settings.runtime), settings)


def _exit_on_sigterm(sig, frame) -> None:
    raise SystemExit(128 + sig)


def cmd_serve(args) -> int:
    settings = ServeConfig.from_args(args)
    _prepare_process(settings)
    # uvicorn shuts down gracefully on SIGTERM, then raises it again for the handler it found: this one ends the
    # process through `finally`, which removes the snapshot (the batch lane loads it, so it stays until then)
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    snapshot = Path(tempfile.mkdtemp(prefix="anyo-serve-"))
    try:
        sha = snapshot_export(Path(args.dir), snapshot / "export")
        exported = load_export(snapshot / "export", runtime=settings.runtime)  # refuses a tampered export before anything listens
        sock = listen(settings.host, settings.port)
        port = sock.getsockname()[1]
        app = None
        if settings.workers == 1:
            app = serving_app(exported, settings)
        print(f"serving {exported.manifest['model']} ({exported.n_items:,} items, split "
              f"{exported.manifest['split_hash']}, manifest {sha[:16]}) on http://{settings.host}:{port} "
              f"(docs at /docs), {settings.workers} worker(s) x {settings.threads} thread(s), runtime "
              f"{exported.recommender.runtime}", flush=True)
        common = dict(log_level="warning", access_log=False, http=GuardedH11, timeout_keep_alive=settings.keep_alive_s,
                      h11_max_incomplete_event_size=settings.max_header_bytes)
        if app is not None:
            uvicorn.Server(uvicorn.Config(app, **common)).run(sockets=[sock])
        else:
            os.environ.update({ENV_DIR: str(snapshot / "export"), ENV_MASTER: str(os.getpid()),
                               ENV_CONFIG: json.dumps(dataclasses.asdict(settings))})
            # a worker answers the master's health pings only once it has imported torch: give it time
            config = uvicorn.Config("distill.server:app_from_env", factory=True, workers=settings.workers,
                                    timeout_worker_healthcheck=WORKER_STARTUP_S, **common)
            Multiprocess(config, sockets=[sock]).run()
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # a second one does not stop the removal half-way
        shutil.rmtree(snapshot, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)
    return 0
