"""/recommend/batch answered outside the server process: `BatchLane` runs the pieces of batch requests, model
call and JSON both, in one child process (`python -m distill.batch_lane`) at the lowest CPU priority.

A batch of 1,024 histories x every item is seconds of CPU (about 1.3 ms a history to rank every item and 2.7 ms
to write its JSON on the 2-core sandbox, 2026-12-02), all of it holding an interpreter lock. In the server
process a /recommend then waited for a piece's model call, or the event loop for the lock. In the child, nothing
of the server waits for it, and the kernel's scheduler gives it only the CPU the server leaves (SCHED_IDLE).

The child loads the export from the folder the server loaded it from (a private snapshot under `anyo serve`) and
refuses one whose manifest differs from the server's, so both answer from one model. It is fed raw arrays over
its stdin and stdout, no pickle:

    parent -> child   once: u64 length + JSON {"folder", "manifest_sha256", "runtime", "threads"}
    child -> parent   once: a reply (empty: ready)
    parent -> child   per piece: u64 n, u64 k, u64 exclude_seen, (n+1) int64 offsets, the histories' int64 ids
    child -> parent   per piece: a reply, each row's text after a comma (UTF-8, `AnswerText.piece`)
    a reply           u64 status (0 ok, 1 an error: the text is its message), u64 length, the text

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
from typing import Callable

import numpy as np
import torch

from distill.answer_text import AnswerText
from distill.errors import AnyoError, ArtifactError
from distill.exported import MANIFEST_DIGEST, load_export
from distill.histories import Histories

U64 = struct.Struct("<Q")
OK, FAILED = 0, 1
MAX_REPLY_BYTES = 1 << 32   # more than any piece's answer: a length beyond it is a broken stream, not a reply


class LaneError(RuntimeError):
    """The child could not answer a piece, or start: its message."""


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
    """A reply's text; an error reply raised as a LaneError with its message."""
    status, n = _read_u64(stream), _read_u64(stream)
    if status not in (OK, FAILED) or n > MAX_REPLY_BYTES:
        raise EOFError(f"batch lane: a broken reply (status {status}, {n:,} bytes)")
    text = _read(stream, n)
    if status != OK:
        raise LaneError(f"batch lane: {text.decode(errors='replace')}")
    return text


class BatchLane:
    """The pieces of batch requests, answered one after another in submission order by the child process; a
    thread of this process feeds it and hands each piece's text to `done(text, error)`. A piece whose `wanted()`
    is false by its turn is skipped. `waiting` counts the histories of pieces not yet answered or skipped. A child
    that dies fails the piece in flight and is started again for the next; after `close`, a piece is failed at
    once. The child starts with the first piece, or with `start()`."""

    def __init__(self, folder: Path, manifest: dict, runtime: str | None, threads: int,
                 on_call: Callable[[int], None] = lambda n: None):
        self._spec = json.dumps({"folder": str(folder), "manifest_sha256": manifest.get(MANIFEST_DIGEST),
                                 "runtime": runtime, "threads": threads}).encode()
        self.on_call = on_call      # told the number of histories of every piece answered (metrics)
        self.waiting = 0
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

    def submit(self, rows: list[np.ndarray], k: int, exclude_seen: bool, done: Callable,
               wanted: Callable[[], bool]) -> None:
        with self._lock:
            if not self._closed:
                self.waiting += len(rows)
                self._jobs.put((rows, k, exclude_seen, done, wanted))
                return
        done(None, LaneError("batch lane: shutting down"))

    def start(self) -> None:
        """Start the child now (it loads the export), not with the first piece; AnyoError if it cannot."""
        try:
            with self._child_lock:
                self._ensure_child()
        except (LaneError, OSError, EOFError) as e:
            raise AnyoError(str(e)) from None

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._jobs.put(None)
        self._thread.join(timeout=10)
        if self._thread.is_alive():   # a piece in flight on a child that does not answer: end it, and the thread
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
        if self._child is not None and self._child.poll() is not None:   # died between pieces: a new one
            self._child = None
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

    def _answer(self, rows: list[np.ndarray], k: int, exclude_seen: bool) -> bytearray:
        histories = Histories.from_rows(rows)
        with self._child_lock:
            self._ensure_child()
            child = self._child
            _write(child.stdin, U64.pack(len(rows)), U64.pack(k), U64.pack(int(exclude_seen)), histories.offsets,
                   histories.flat)
            return _reply_of(child.stdout)

    def _drop_child(self) -> None:
        with self._child_lock:
            if self._child is not None:
                self._child.kill()
                self._child.wait()
                self._child = None

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            rows, k, exclude_seen, done, wanted = job
            text, error = None, None
            if not wanted():
                pass
            elif not rows:                       # nothing to rank
                text = b""
            else:
                try:
                    text = self._answer(rows, k, exclude_seen)
                    self.on_call(len(rows))
                except LaneError as e:           # the child's own error: it goes on
                    error = e
                except Exception as e:  # noqa: BLE001 - the child died or broke the protocol: replaced, the thread goes on
                    self._drop_child()
                    error = LaneError(f"batch lane: {e}")
            with self._lock:                     # before the answer: its request may be followed at once
                self.waiting -= len(rows)
            if text is not None or error is not None:
                done(text, error)
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


def serve(stdin, stdout) -> None:
    """The child: load the export (at the server's priority: start-up waits for it), then answer pieces at the
    lowest until stdin closes."""
    for sig in (signal.SIGINT, signal.SIGTERM):   # the server's to handle: its pieces in flight still get answers
        signal.signal(sig, signal.SIG_IGN)
    spec = json.loads(_read(stdin, _read_u64(stdin)))
    try:
        torch.set_num_threads(spec["threads"])
        exported = load_export(spec["folder"], runtime=spec["runtime"])
        if exported.manifest.get(MANIFEST_DIGEST) != spec["manifest_sha256"]:
            raise ArtifactError(f"{spec['folder']}: not the export the server loaded (re-exported under it?)")
    except Exception as e:  # noqa: BLE001 - told to the server, which fails the piece with it
        return _reply(stdout, FAILED, str(e).encode())
    text = AnswerText.of(exported.raw_ids, exported.titles)
    recommender = exported.recommender
    lowest_priority()
    _reply(stdout, OK, b"")
    while True:
        try:
            n, k, exclude_seen = (_read_u64(stdin) for _ in range(3))
        except EOFError:
            return
        offsets = np.frombuffer(_read(stdin, (n + 1) * 8), np.int64)
        flat = np.frombuffer(_read(stdin, int(offsets[-1]) * 8), np.int64)
        try:
            ids, scores = recommender.top_k(Histories(flat, offsets), k, exclude_seen=bool(exclude_seen))
            out = text.piece(ids, scores)
        except Exception as e:  # noqa: BLE001 - this piece fails, the next is answered
            _reply(stdout, FAILED, f"{type(e).__name__}: {e}".encode())
            continue
        _reply(stdout, OK, out)


if __name__ == "__main__":
    answers = os.dup(1)   # the protocol's own descriptor: whatever a library prints goes to stderr, not into it
    os.dup2(2, 1)
    serve(open(0, "rb", buffering=0, closefd=False), open(answers, "wb", buffering=0))
