"""The server's answers as JSON text, and the process that writes the large ones.

`AnswerText` turns a Recommender's (B, k) ids and scores into `{"items":[...]}` texts from per-item fragments
made once. Formatting holds the interpreter lock, and a /recommend/batch of 1,024 histories x every item is
about 3 s of it (on the 2-core sandbox), which the event loop and the small requests need. So the rows of a
batch are formatted by `Formatter`: one child process (`python -m distill.answer_text`) at the lowest CPU
priority, fed over its stdin and stdout with raw arrays, no pickle. It uses only CPU the small requests leave,
and the server's interpreter lock waits for none of it.

    parent -> child   once: u64 length + the fragments as JSON; then per job: u64 n, u64 k,
                      n*k int64 ids, n*k float64 scores
    child -> parent   per job: u64 length + the rows' texts, comma-joined (UTF-8)

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
from typing import Callable

import numpy as np

U64 = struct.Struct("<Q")


class AnswerText:
    """Answers as JSON text from per-item fragments (`{"item":ID,"title":T,"score":`): the bytes json.dumps
    gives for the item dicts, several times faster."""

    def __init__(self, head: list[str]):
        self.head = head

    @classmethod
    def of(cls, raw_ids: list[str], titles: list[str]) -> "AnswerText":
        return cls([f'{{"item":{json.dumps(r)},"title":{json.dumps(t)},"score":' for r, t in zip(raw_ids, titles)])

    def rows(self, ids: np.ndarray, scores: np.ndarray) -> list[str]:
        """`{"items":[...]}` for each row of the Recommender's (B, k) ids and scores (the id -1 tail dropped)."""
        head = self.head
        return ['{"items":[' + ",".join([head[i] + repr(s) + "}" for i, s in zip(row_ids, row_scores) if i > 0])
                + "]}" for row_ids, row_scores in zip(ids.tolist(), scores.tolist())]

    def joined(self, ids: np.ndarray, scores: np.ndarray) -> bytes:
        """The rows' texts comma-joined, as the answer of a batch piece holds them."""
        return ",".join(self.rows(ids, scores)).encode()


def _read(stream, n: int) -> bytes:
    """Exactly n bytes (EOFError when the stream ends first); readinto waits outside the interpreter lock."""
    out = bytearray(n)
    view, got = memoryview(out), 0
    while got < n:
        m = stream.readinto(view[got:])
        if not m:
            raise EOFError("answer formatter: stream closed")
        got += m
    return bytes(out)


def _write(stream, *chunks: bytes) -> None:
    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        while view:
            view = view[stream.write(view):]


class Formatter:
    """Formats the rows of large answers in the child process, one job after another, in submission order; a
    thread of this process feeds it and hands each text to `done(text, error)`. A job whose `wanted()` is false
    by its turn is skipped. A child that dies fails the job in flight and is started again for the next one;
    after `close`, a job is failed at once."""

    def __init__(self, text: AnswerText):
        self._text = text
        self._head = json.dumps(text.head).encode()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._child: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="anyo-formatter", daemon=True)
        self._thread.start()

    def submit(self, ids: np.ndarray, scores: np.ndarray, done: Callable, wanted: Callable[[], bool]) -> None:
        with self._lock:
            if not self._closed:
                self._jobs.put((ids, scores, done, wanted))
                return
        done(None, RuntimeError("answer formatter: shutting down"))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._jobs.put(None)
        self._thread.join(timeout=10)

    def _start(self) -> subprocess.Popen:
        # the server's session: with autogroup scheduling (Linux's default) a new session is a new group that gets
        # an equal share of the CPU whatever its nice value; the child ignores the group's SIGINT and SIGTERM
        # instead (`serve`) and ends when the server closes its stdin or dies
        child = subprocess.Popen([sys.executable, "-m", "distill.answer_text"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, bufsize=0)
        _write(child.stdin, U64.pack(len(self._head)), self._head)
        return child

    def _stop(self) -> None:
        if self._child is not None:
            self._child.stdin.close()
            try:
                self._child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._child.kill()
                self._child.wait()
            self._child = None

    def _format(self, ids: np.ndarray, scores: np.ndarray) -> bytes:
        if not ids.size:                                  # nothing to send: a zero-length array cannot be cast
            return self._text.joined(ids, scores)
        if self._child is not None and self._child.poll() is not None:   # died between jobs: a new one
            self._child = None
        if self._child is None:
            self._child = self._start()
        n, k = ids.shape
        _write(self._child.stdin, U64.pack(n), U64.pack(k), np.ascontiguousarray(ids, np.int64),
               np.ascontiguousarray(scores, np.float64))
        return _read(self._child.stdout, U64.unpack(_read(self._child.stdout, U64.size))[0])

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            ids, scores, done, wanted = job
            if not wanted():
                continue
            try:
                text = self._format(ids, scores)
            except Exception as e:  # noqa: BLE001 - the job fails, the child is replaced, the thread goes on
                if self._child is not None:
                    self._child.kill()
                    self._child.wait()
                    self._child = None
                done(None, RuntimeError(f"answer formatter: {e}"))
            else:
                done(text, None)
        self._stop()


def serve(stdin, stdout) -> None:
    """The child: format jobs until stdin closes."""
    os.nice(19)
    for sig in (signal.SIGINT, signal.SIGTERM):   # the server's to handle: its jobs in flight still get answers
        signal.signal(sig, signal.SIG_IGN)
    text = AnswerText(json.loads(_read(stdin, U64.unpack(_read(stdin, U64.size))[0])))
    while True:
        try:
            n, k = (U64.unpack(_read(stdin, U64.size))[0] for _ in range(2))
        except EOFError:
            return
        ids = np.frombuffer(_read(stdin, n * k * 8), np.int64).reshape(n, k)
        scores = np.frombuffer(_read(stdin, n * k * 8), np.float64).reshape(n, k)     # float32 scores exactly
        out = text.joined(ids, scores)
        _write(stdout, U64.pack(len(out)), out)


if __name__ == "__main__":
    serve(open(0, "rb", buffering=0, closefd=False), open(1, "wb", buffering=0, closefd=False))
