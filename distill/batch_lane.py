"""/recommend/batch answered outside the server process: `BatchLane` hands each batch request's body to one child
process (`python -m distill.batch_lane`) at the lowest CPU priority, which parses and checks it, ranks it and
writes its JSON, in pieces.

A batch of 1,024 histories x every item is seconds of CPU (about 1.3 ms a history to rank every item and 2.7 ms
to write its JSON on the 2-core sandbox, 2026-12-02), and even at k = 10 its megabyte of JSON took tens of
milliseconds to parse, validate and map to internal ids; all of it holds an interpreter lock. In the server
process a /recommend then waited for it. In the child, nothing of the server waits for it, and the kernel's
scheduler gives it only the CPU the server leaves (SCHED_IDLE). The server keeps the admission (`Backlog`: an
upper bound on a request's histories read off its bytes, until the child has counted them), the timeouts and the
streaming of the pieces.

The child loads the export from the folder the server loaded it from (a private snapshot under `anyo serve`) and
refuses one whose manifest differs from the server's, so both answer from one model. They speak over its stdin
and stdout, no pickle:

    parent -> child   once: u64 length + JSON {"folder", "manifest_sha256", "runtime", "threads",
                      "piece_histories", "max_response_items"}
    child -> parent   once: a reply (empty: ready)
    parent -> child   per request: u64 length, the body as the client sent it
    child -> parent   a reply: u64 histories, u64 histories per piece; or REFUSED, "STATUS detail" (its 4xx);
                      or FAILED
    parent -> child   per piece, in order: u64 NEXT (answer it) or STOP (the request ends here)
    child -> parent   per NEXT: a reply, each of the piece's rows after a comma (UTF-8, `AnswerText.piece`)
    a reply           u64 status (OK, FAILED: the text is the error, the request ends; REFUSED), u64 length, text

The child exits when its stdin closes, so it never outlives the server process that started it.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Protocol

import torch

from distill.answer_text import AnswerText
from distill.api import Backlog, Busy, Problem, batch_of
from distill.errors import AnyoError, ArtifactError
from distill.exported import MANIFEST_DIGEST, load_export
from distill.histories import Histories

U64 = struct.Struct("<Q")
SIZE = struct.Struct("<QQ")          # a request's histories, histories per piece
OK, FAILED, REFUSED = 0, 1, 2
NEXT, STOP = 1, 0
MAX_REPLY_BYTES = 1 << 32   # more than any piece's answer: a length beyond it is a broken stream, not a reply
PIECE_ITEMS = 16_384        # histories x k in one piece (at most piece_histories): bounds the child's memory per
                            # model call, and how soon a cancelled batch stops


class LaneError(RuntimeError):
    """The child could not answer a request, or start: its message."""


class Answer(Protocol):
    """Where the lane puts one request's answer, called from the lane's thread."""

    def wanted(self) -> bool:
        """False once the request has given up (timed out, its client gone): the lane stops making it."""

    def piece(self, text: bytearray) -> None:
        """The next piece's rows, each after a comma."""

    def end(self, error: Exception | None) -> None:
        """The request is over: answered whole (None), refused (a Problem) or failed (LaneError). Not called for a
        request skipped or stopped because it was no longer wanted."""


def _read(stream, n: int) -> bytearray:
    """Exactly n bytes (EOFError when the stream ends first), in the buffer they were read into (a piece's
    megabyte is not copied again); readinto waits outside the interpreter lock."""
    out = bytearray(n)
    view, got = memoryview(out), 0
    while got < n:
        m = stream.readinto(view[got:])
        if not m:
            raise EOFError("batch lane: stream closed")
        got += m
    return out


def _read_u64(stream) -> int:
    return U64.unpack(_read(stream, U64.size))[0]


def _write(stream, *chunks) -> None:
    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        while view:
            view = view[stream.write(view):]


def _reply(stream, status: int, text: bytes) -> None:
    _write(stream, U64.pack(status), U64.pack(len(text)), text)


def _reply_of(stream) -> bytearray:
    """A reply's text; a FAILED reply raised as a LaneError with its message, a REFUSED one as its Problem."""
    status, n = _read_u64(stream), _read_u64(stream)
    if status not in (OK, FAILED, REFUSED) or n > MAX_REPLY_BYTES:
        raise EOFError(f"batch lane: a broken reply (status {status}, {n:,} bytes)")
    text = _read(stream, n)
    if status == REFUSED:
        code, _, detail = text.decode().partition(" ")
        raise Problem(int(code), detail)
    if status == FAILED:
        raise LaneError(f"batch lane: {text.decode(errors='replace')}")
    return text


class BatchLane:
    """Batch requests, answered one after another in submission order by the child process; a thread of this
    process feeds it each request's body and hands the pieces of its answer to the request's `Answer`. A request
    comes with the histories its submitter admitted to `backlog` for it (`reserved`, at least as many as it
    has): the child's count replaces them once it has read the request, and they leave as their pieces are
    answered. `pending` counts the requests not yet over. A request no longer `wanted()` is skipped, or stopped
    before its next piece. A child that dies fails the request in flight and is started again for the next;
    after `close`, a request is failed at once. The child starts with the first request, or with `start()`."""

    def __init__(self, folder: Path, manifest: dict, runtime: str | None, threads: int, piece_histories: int,
                 max_response_items: int, backlog: Backlog, on_call: Callable[[int], None] = lambda n: None):
        self._spec = json.dumps({"folder": str(folder), "manifest_sha256": manifest.get(MANIFEST_DIGEST),
                                 "runtime": runtime, "threads": threads, "piece_histories": piece_histories,
                                 "max_response_items": max_response_items}).encode()
        self.backlog = backlog
        self.on_call = on_call      # told the number of histories of every piece answered (metrics)
        self.pending = 0
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._child: subprocess.Popen | None = None
        self._child_lock = threading.Lock()   # `start()` from another thread than the feeding one
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="anyo-batch-lane", daemon=True)
        self._thread.start()

    @property
    def pid(self) -> int | None:
        return None if self._child is None else self._child.pid

    def submit(self, body: bytes, reserved: int, answer: Answer) -> None:
        with self._lock:
            if not self._closed:
                self.pending += 1
                self._jobs.put((body, reserved, answer))
                return
        self.backlog.done(reserved)
        answer.end(Busy("server: shutting down"))

    def start(self) -> None:
        """Start the child now (it loads the export), not with the first request; AnyoError if it cannot."""
        try:
            with self._child_lock:
                self._ensure_child()
        except (LaneError, OSError, EOFError) as e:
            raise AnyoError(str(e)) from None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._jobs.put(None)
        self._thread.join(timeout=10)
        if self._thread.is_alive():   # a request in flight on a child that does not answer: end it, and the thread
            child = self._child
            if child is not None:
                child.kill()
            self._thread.join(timeout=10)

    def _launch(self) -> subprocess.Popen:
        # the server's session: with autogroup scheduling (Linux's default) a new session is a new group that gets
        # an equal share of the CPU whatever its nice value; the child ignores the group's SIGINT and SIGTERM
        # instead (`serve`) and ends when the server closes its stdin or dies
        return subprocess.Popen([sys.executable, "-m", "distill.batch_lane"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, bufsize=0)

    def _ensure_child(self) -> None:
        if self._child is not None and self._child.poll() is not None:   # died between requests: a new one
            self._child = None
        if self._child is None and self._closed:   # killed by `close`: the requests left are not answered
            raise Busy("server: shutting down")
        if self._child is None:
            child = self._launch()
            try:
                _write(child.stdin, U64.pack(len(self._spec)), self._spec)
                _reply_of(child.stdout)
            except BaseException:
                child.kill()
                child.wait()
                raise
            self._child = child

    def _answer(self, body: bytes, reserved: int, answer: Answer) -> None:
        """One request through the child while it is wanted: read, then its pieces; its histories leave the
        backlog as they are answered, all of them however it ends."""
        left = reserved
        try:
            if not answer.wanted():
                return
            with self._child_lock:
                self._ensure_child()
                into, out = self._child.stdin, self._child.stdout
                _write(into, U64.pack(len(body)), body)
                n, size = SIZE.unpack(_reply_of(out))
                if n > left or not size:
                    raise EOFError(f"batch lane: a request of {n:,} histories in pieces of {size}, for a body "
                                   f"that may hold {left:,}")
                self.backlog.done(left - n)
                left = n
                for lo in range(0, n, size):
                    if not answer.wanted():
                        return _write(into, U64.pack(STOP))
                    _write(into, U64.pack(NEXT))
                    text = _reply_of(out)
                    m = min(size, n - lo)
                    self.on_call(m)
                    self.backlog.done(m)     # before the piece: its request may be followed at once
                    left -= m
                    answer.piece(text)
        finally:
            self.backlog.done(left)
        answer.end(None)

    def _drop_child(self) -> None:
        with self._child_lock:
            if self._child is not None:
                self._child.kill()
                self._child.wait()
                self._child = None

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            body, reserved, answer = job
            error = None
            try:
                self._answer(body, reserved, answer)
            except (Problem, LaneError) as e:    # the request's own refusal or error: the child goes on
                error = e
            except Exception as e:  # noqa: BLE001 - the child died or broke the protocol: replaced, the thread goes on
                self._drop_child()
                error = LaneError(f"batch lane: {e}")
            with self._lock:
                self.pending -= 1
            if error is not None:
                answer.end(error)
        with self._child_lock:
            if self._child is not None:
                self._child.stdin.close()
                try:
                    self._child.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._child.kill()
                    self._child.wait()
                self._child = None


def lowest_priority() -> None:
    """This process runs only on CPU nothing else wants: SCHED_IDLE, which any waking task of another policy
    preempts at once (nice 19 alone still lets the running task finish its slice), at nice 19."""
    os.nice(19)
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):   # not Linux, or refused: nice 19 alone
        pass


def _pieces(stdin, stdout, exported, text: AnswerText, body: bytes, spec: dict) -> None:
    """One request: its size (or its refusal), then each piece the server asks for."""
    try:
        rows, k, exclude_seen = batch_of(body, exported, spec["max_response_items"])
    except Problem as p:
        return _reply(stdout, REFUSED, f"{p.status} {p.detail}".encode())
    except Exception as e:  # noqa: BLE001 - this request fails, the next is answered
        return _reply(stdout, FAILED, f"{type(e).__name__}: {e}".encode())
    size = max(1, min(spec["piece_histories"], PIECE_ITEMS // k))
    _reply(stdout, OK, SIZE.pack(len(rows), size))
    for lo in range(0, len(rows), size):
        if _read_u64(stdin) != NEXT:
            return
        try:
            ids, scores = exported.recommender.top_k(Histories.from_rows(rows[lo:lo + size]), k,
                                                     exclude_seen=exclude_seen)
            out = text.piece(ids, scores)
        except Exception as e:  # noqa: BLE001 - this request fails, the next is answered
            return _reply(stdout, FAILED, f"{type(e).__name__}: {e}".encode())
        _reply(stdout, OK, out)


def serve(stdin, stdout) -> None:
    """The child: load the export (at the server's priority: start-up waits for it), then answer requests at the
    lowest until stdin closes."""
    for sig in (signal.SIGINT, signal.SIGTERM):   # the server's to handle: its requests in flight still get answers
        signal.signal(sig, signal.SIG_IGN)
    spec = json.loads(_read(stdin, _read_u64(stdin)))
    try:
        torch.set_num_threads(spec["threads"])
        exported = load_export(spec["folder"], runtime=spec["runtime"])
        if exported.manifest.get(MANIFEST_DIGEST) != spec["manifest_sha256"]:
            raise ArtifactError(f"{spec['folder']}: not the export the server loaded (re-exported under it?)")
    except Exception as e:  # noqa: BLE001 - told to the server, which fails the request with it
        return _reply(stdout, FAILED, str(e).encode())
    text = AnswerText.of(exported.raw_ids, exported.titles)
    lowest_priority()
    _reply(stdout, OK, b"")
    try:
        while True:
            _pieces(stdin, stdout, exported, text, _read(stdin, _read_u64(stdin)), spec)
    except EOFError:
        return


if __name__ == "__main__":
    answers = os.dup(1)   # the protocol's own descriptor: whatever a library prints goes to stderr, not into it
    os.dup2(2, 1)
    serve(open(0, "rb", buffering=0, closefd=False), open(answers, "wb", buffering=0))
