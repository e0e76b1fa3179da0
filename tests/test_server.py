"""`anyo serve`: the micro-batcher and the limits in process (the app over httpx's ASGI transport, the
Recommender held at chosen calls so that every ordering is forced, never timed), and a real server in a
subprocess on the port it picked itself (`--port 0`), started once for the module."""

import asyncio
import contextlib
import dataclasses
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from distill.answer_text import AnswerText  # noqa: E402
from distill.api import Backlog, histories_at_most  # noqa: E402
from distill.batch_lane import BatchLane  # noqa: E402
from distill.cli import main  # noqa: E402
from distill.data import load_split  # noqa: E402
from distill.errors import AnyoError  # noqa: E402
from distill.exported import MANIFEST_DIGEST, load_export  # noqa: E402
from distill.serve_config import MAX_HISTORY, ServeConfig  # noqa: E402
from distill import server as server_module  # noqa: E402
from distill.server import create_app, snapshot_export  # noqa: E402

ROOT = Path(__file__).parents[1]
WAIT = 60  # seconds: only ever reached when the behaviour under test is broken


@pytest.fixture(scope="module")
def export_dir(tiny_run, tmp_path_factory):
    run, _ = tiny_run
    out = tmp_path_factory.mktemp("serve") / "export"
    assert main(["export", str(run), "--out", str(out)]) == 0
    return out


def start_server(folder: Path, log_path: Path, *flags: str, env: dict | None = None):
    """`anyo serve FOLDER --port 0 FLAGS` (with `env` added to its environment): the process and the port it
    printed."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **(env or {}))
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "distill.cli", "serve", str(folder), "--port", "0", *flags],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        text = log_path.read_text()
        if " on http://127.0.0.1:" in text:
            port = int(text.split(" on http://127.0.0.1:")[1].split(" ")[0])
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    return proc, port
            except httpx.TransportError:
                pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not start: {log_path.read_text()[-2000:]}")


def stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def server(tiny_run, export_dir):
    run, _ = tiny_run
    proc, port = start_server(export_dir, export_dir.parent / "server.log", "--read-timeout-s", "5",
                              "--max-header-bytes", "4096", "--max-response-items", "1000")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:
        yield client, run, export_dir
    finally:
        client.close()
        stop(proc)


def same(got: list[dict], want: list[dict]) -> bool:
    """Same items in the same order; scores equal up to float32 rounding (a batch is padded to its
    longest history and multiplied in other blocks than one history alone)."""
    return [(g["item"], g["title"]) for g in got] == [(w["item"], w["title"]) for w in want] and \
        [g["score"] for g in got] == pytest.approx([w["score"] for w in want], rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------- in process, the Recommender held

class Held:
    """The export's Recommender; a call for which `hold(histories)` is true says so (`entered`) and waits
    for one `permits.release()`."""

    def __init__(self, rec, hold):
        self.rec, self.hold = rec, hold
        self.runtime = rec.runtime
        self.entered, self.permits = threading.Semaphore(0), threading.Semaphore(0)
        self.calls: list[int] = []

    def top_k(self, histories, k, exclude_seen=True):
        self.calls.append(len(histories))
        if self.hold(histories):
            self.entered.release()
            self.permits.acquire(timeout=WAIT)
        return self.rec.top_k(histories, k, exclude_seen=exclude_seen)


@pytest.fixture(scope="module")
def exp(export_dir):
    return load_export(export_dir)


@pytest.fixture(scope="module")
def hists(tiny_run, exp):
    split = load_split(tiny_run[0] / "split")
    return [[split.items[i] for i in split.history("test").row(u)] for u in range(split.n_users)]


def in_process(exp, hold, **settings):
    """Run `body(client, held, app.state)` against the app of `exp` with its Recommender held by `hold` (the
    batch lane's process has a Recommender of its own)."""
    held = Held(exp.recommender, hold)
    app = create_app(dataclasses.replace(exp, recommender=held), ServeConfig(**settings))

    def run(body):
        async def go():
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://anyo", timeout=WAIT) as client:
                try:
                    return await body(client, held, app.state)
                finally:
                    for _ in range(64):
                        held.permits.release()
        try:
            return asyncio.run(go())
        finally:
            app.state.batcher.close()
            app.state.lane.close()
    return run


async def until(cond) -> None:
    for _ in range(WAIT * 100):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("never happened")


@contextlib.asynccontextmanager
async def stopped(lane):
    """The batch lane's process started, then stopped (SIGSTOP) until the block ends: its pieces wait."""
    await asyncio.to_thread(lane.start)
    os.kill(lane.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(lane.pid, signal.SIGCONT)


def first_call():
    seen = []
    return lambda h: not seen and not seen.append(1)


def test_micro_batched_answers_equal_single_answers_under_concurrency(exp, hists):
    """40 concurrent requests (other histories, k and include_seen each) while the first call is held: the
    rest are answered together, at most max_batch a call, every answer the one a single call gives."""
    asks = [(hists[n % len(hists)][: 1 + n % 7] + hists[(n * 7) % len(hists)][:2], 1 + (n * 5) % exp.n_items,
             n % 3 == 0) for n in range(40)]

    async def body(client, held, state):
        post = lambda h, k, s: asyncio.create_task(client.post("/recommend", json={  # noqa: E731
            "history": h, "k": k, "include_seen": s}))
        tasks = [post(*asks[0])]
        await asyncio.to_thread(held.entered.acquire, timeout=WAIT)
        tasks += [post(*a) for a in asks[1:]]
        await until(lambda: state.backlog.n == len(asks))
        held.permits.release()
        return await asyncio.gather(*tasks)

    answers = in_process(exp, first_call(), max_batch=16, batch_wait_ms=0.0)(body)
    for (h, k, s), r in zip(asks, answers):
        assert r.status_code == 200, r.text
        assert same(r.json()["items"], exp.recommend(h, k, include_seen=s)), (h, k, s)


def test_micro_batches_are_bounded_and_shared(exp, hists):
    held_calls = []

    async def body(client, held, state):
        post = lambda n: asyncio.create_task(client.post("/recommend", json={"history": hists[n], "k": 5}))  # noqa: E731
        tasks = [post(0)]
        await asyncio.to_thread(held.entered.acquire, timeout=WAIT)
        tasks += [post(n) for n in range(1, 20)]
        await until(lambda: state.backlog.n == 20)
        held.permits.release()
        await asyncio.gather(*tasks)
        held_calls.extend(held.calls)

    in_process(exp, first_call(), max_batch=8, batch_wait_ms=0.0)(body)
    assert held_calls[0] == 1 and held_calls[1:] == [8, 8, 3], held_calls


def test_a_full_queue_answers_503_and_the_server_recovers(exp, hists):
    """A legal batch of 1,024 histories waits in the stopped batch lane and fills --max-queue at once (admitted for
    the histories its body may hold, before the lane has read it): the next /recommend and /recommend/batch are
    503 with Retry-After; once the lane goes on, the batch is answered and new requests are too."""
    async def body(client, held, state):
        async with stopped(state.lane):
            big = asyncio.create_task(client.post("/recommend/batch", json={
                "histories": [hists[n % len(hists)] for n in range(1024)], "k": 2}))
            await until(lambda: state.backlog.n == 1024)
            refused = [await client.post("/recommend", json={"history": hists[1], "k": 3}),
                       await client.post("/recommend/batch", json={"histories": hists[:2], "k": 3})]
        return refused, await big, [await client.post("/recommend", json={"history": hists[1], "k": 3}),
                                    await client.post("/recommend/batch", json={"histories": hists[:2], "k": 3})]

    refused, big, after = in_process(exp, lambda h: False, max_queue=1024)(body)
    for r, brings in zip(refused, (1, 3)):   # a 2-history body holds at most 3 lists
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert f"1,024 histories are waiting and this request brings {brings}," in r.json()["detail"]
        assert "--max-queue" in r.json()["detail"]
    assert big.status_code == 200 and len(big.json()["results"]) == 1024
    assert same(big.json()["results"][1023]["items"], exp.recommend(hists[1023 % len(hists)], 2))
    assert [r.status_code for r in after] == [200, 200]
    assert same(after[0].json()["items"], exp.recommend(hists[1], 3))
    assert all(same(got["items"], exp.recommend(h, 3)) for got, h in zip(after[1].json()["results"], hists[:2]))


def test_a_request_not_answered_in_time_is_503_and_its_answer_goes_to_nobody(exp, hists):
    async def body(client, held, state):
        late = await client.post("/recommend", json={"history": hists[0], "k": 3})  # held until the timeout
        held.permits.release()
        return late, await client.post("/recommend", json={"history": hists[2], "k": 4})

    late, next_one = in_process(exp, first_call(), request_timeout_s=0.2)(body)
    assert late.status_code == 503 and "--request-timeout-s" in late.json()["detail"] and late.headers["retry-after"]
    assert next_one.status_code == 200 and same(next_one.json()["items"], exp.recommend(hists[2], 4))


def test_small_requests_never_wait_for_a_batch_which_runs_outside_the_server_process(exp, hists, monkeypatch):
    """A batch of 24 histories x every item (pieces of 8) waits in the stopped batch lane while 30 concurrent
    /recommend (other histories, k and include_seen each) are answered, each the answer a single call gives.
    The server's own Recommender and JSON writer never see the batch, and once the lane goes on, its answers
    are the ones single calls give."""
    asks = [(hists[(n * 3) % len(hists)][: 1 + n % 6] + hists[(n * 5 + 1) % len(hists)][:2], 1 + (n * 7) % exp.n_items,
             n % 4 == 0) for n in range(30)]
    batch = [hists[(n * 11) % len(hists)] for n in range(24)]
    rows_written, calls = [], []
    rows = AnswerText.rows
    monkeypatch.setattr(AnswerText, "rows",
                        lambda self, ids, scores: rows_written.append(len(ids)) or rows(self, ids, scores))

    async def body(client, held, state):
        async with stopped(state.lane):
            big = asyncio.create_task(client.post("/recommend/batch", json={"histories": batch, "k": exp.n_items}))
            await until(lambda: state.lane.pending == 1)
            answers = await asyncio.gather(*(client.post("/recommend", json={"history": h, "k": k, "include_seen": s})
                                             for h, k, s in asks))
            assert not big.done()
            calls.extend(held.calls)
        return answers, await big

    answers, big = in_process(exp, lambda h: False, max_batch=16, piece_histories=8, batch_wait_ms=0.0)(body)
    assert sum(calls) == len(asks) and sum(rows_written) == len(asks), (calls, rows_written)
    for (h, k, s), r in zip(asks, answers):
        assert r.status_code == 200, r.text
        assert same(r.json()["items"], exp.recommend(h, k, include_seen=s)), (h, k, s)
    assert big.status_code == 200 and len(big.json()["results"]) == len(batch)
    assert all(same(got["items"], exp.recommend(h, exp.n_items)) for got, h in zip(big.json()["results"], batch))


def test_too_many_requests_in_progress_is_503_and_health_still_answers(exp, hists):
    async def body(client, held, state):
        first = asyncio.create_task(client.post("/recommend", json={"history": hists[0], "k": 3}))
        await asyncio.to_thread(held.entered.acquire, timeout=WAIT)
        refused = await client.post("/recommend", json={"history": hists[1], "k": 3})
        health = await client.get("/health")
        held.permits.release()
        return refused, health, await first, await client.post("/recommend", json={"history": hists[1], "k": 3})

    refused, health, first, after = in_process(exp, first_call(), max_concurrency=1)(body)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "--max-concurrency" in refused.json()["detail"]
    assert health.status_code == first.status_code == after.status_code == 200


def test_a_batch_not_answered_in_time_is_503_and_its_other_pieces_are_never_made(exp, hists):
    """It waits in the stopped batch lane past --request-timeout-s: 503, and once the lane goes on it reads the
    request (sent to the child before the timeout) but makes none of its four pieces."""
    async def body(client, held, state):
        async with stopped(state.lane):
            late = await client.post("/recommend/batch", json={"histories": hists[:16], "k": 3})
        await until(lambda: state.lane.pending == 0)
        return late, await client.get("/metrics")

    late, metrics = in_process(exp, lambda h: False, piece_histories=4, request_timeout_s=0.3)(body)
    assert late.status_code == 503 and "--request-timeout-s" in late.json()["detail"]
    made = [line for line in metrics.text.splitlines() if line.startswith("anyo_model_call_histories_count ")]
    assert made == ["anyo_model_call_histories_count 0"], made


def test_answers_are_the_json_of_the_item_dicts(exp, hists):
    from distill.histories import Histories
    rows = [exp.to_internal(h) for h in hists[:6]]
    ids, scores = exp.recommender.top_k(Histories.from_rows(rows), exp.n_items)  # with the -1 tail
    want = [json.dumps({"items": items}, separators=(",", ":")) for items in exp.recommend_many(hists[:6], exp.n_items)]
    assert AnswerText.of(exp.raw_ids, exp.titles).rows(ids, scores) == want


# children that answer the batch lane's start, then die reading their first request, or once they have said
# its size (one history in pieces of one), asked for its first piece
DIES_ON_NEXT = ("import struct, sys; i, o = sys.stdin.buffer, sys.stdout.buffer; "
                "i.read(struct.unpack('<Q', i.read(8))[0]); o.write(struct.pack('<QQ', 0, 0)); o.flush(); "
                "i.read(struct.unpack('<Q', i.read(8))[0]); o.write(struct.pack('<QQQQ', 0, 16, 1, 1)); o.flush(); "
                "i.read(8)")
DIES_IN_A_REQUEST = ("import struct, sys; i, o = sys.stdin.buffer, sys.stdout.buffer; "
                   "i.read(struct.unpack('<Q', i.read(8))[0]); o.write(struct.pack('<QQ', 0, 0)); o.flush(); i.read(8)")


class Collected:
    """A `distill.batch_lane.Answer` that keeps what the lane gives it; `on_piece(self)` runs on the lane's
    thread after each piece (it may block there, or stop wanting the rest)."""

    def __init__(self, on_piece=lambda answer: None, wanted: bool = True):
        self.pieces, self.ended, self.on_piece, self.wants = [], queue.SimpleQueue(), on_piece, wanted

    def wanted(self) -> bool:
        return self.wants

    def piece(self, text) -> None:
        self.pieces.append(bytes(text))
        self.on_piece(self)

    def end(self, error) -> None:
        self.ended.put(error)

    def results(self) -> list:
        """The answer's rows, once it ended whole."""
        error = self.ended.get(timeout=WAIT)
        assert error is None, error
        return json.loads(b"[" + b"".join(self.pieces)[1:] + b"]")


def test_the_batch_lane_answers_as_the_server_does_from_a_process_of_its_own(exp, hists):
    """The lane's process reads each request, refuses a bad one as the server does (its 4xx), answers a good one
    in pieces while it is wanted, and keeps its histories in the backlog until their pieces are answered (the
    bound admitted for it replaced by its count once read)."""
    want = exp.recommend_many(hists[:6], exp.n_items)
    backlog = Backlog(1024)
    lane = BatchLane(exp.folder, exp.manifest, None, 1, 2, 10 ** 6, backlog)

    def ask(histories, k=exp.n_items, answer=None, **extra) -> Collected:
        answer = answer or Collected()
        body = json.dumps({"histories": histories, "k": k, **extra}).encode()
        reserved = histories_at_most(body)
        backlog.admit(reserved)                    # as the server does
        lane.submit(body, reserved, answer)
        return answer

    def refusal(answer) -> tuple:
        error = answer.ended.get(timeout=WAIT)
        return type(error).__name__, getattr(error, "status", None), getattr(error, "detail", str(error))

    try:
        results = ask(hists[:6]).results()              # the server's own answers, in pieces of 2
        assert len(results) == 6 and all(same(r["items"], w) for r, w in zip(results, want))
        first = lane.pid
        # at the lowest priority (SCHED_IDLE, nice 19), in the server's session (a session of its own is a
        # scheduling group of its own, whose share of the CPU its nice value does not lower), deaf to Ctrl-C
        assert os.getpriority(os.PRIO_PROCESS, first) == 19 and os.getsid(first) == os.getsid(0)
        assert os.sched_getscheduler(first) == os.SCHED_IDLE
        os.kill(first, signal.SIGINT)
        # refused as the server refuses: unknown ids named, bad JSON, a k beyond the catalogue
        assert refusal(ask([hists[0], ["nope", hists[1][0]]])) == ("Problem", 422, "histories[1]: unknown item id 'nope'")
        bad_json = Collected()
        lane.submit(b'{"histories": [[1, 2', 0, bad_json)
        kind, status, detail = refusal(bad_json)
        assert (kind, status) == ("Problem", 400) and detail.startswith("body: malformed JSON ("), detail
        too_many = exp.n_items + 1
        assert refusal(ask(hists[:1], k=too_many))[1:] == (422, f"k: {too_many} is not in 1..{exp.n_items} (the catalogue size)")

        # mid-request: the histories not yet answered are waiting; a request no longer wanted stops there
        seen = []

        def held(answer):
            seen.append(backlog.n)
            answer.wants = len(answer.pieces) < 2
        stopped = ask(hists[:6], answer=Collected(held))     # admitted for 7 (its "[" count), read as 6
        for _ in range(WAIT * 100):
            if lane.pending == 0:
                break
            time.sleep(0.01)
        assert seen == [4, 2] and len(stopped.pieces) == 2 and stopped.ended.empty() and backlog.n == 0
        seen_too = ask(hists[:2], include_seen=True).results()                         # its next one is answered
        assert all(same(r["items"], w) for r, w in zip(seen_too, exp.recommend_many(hists[:2], exp.n_items, True)))
        skipped = ask(hists[:6], answer=Collected(wanted=False))                         # never read
        assert len(ask(hists[:1]).results()) == 1 and skipped.ended.empty() and lane.pid == first
        assert lane.pending == 0 and backlog.n == 0

        lane._child.kill()               # a child that died between requests is replaced before the next one
        lane._child.wait()
        assert len(ask(hists[:2]).results()) == 2 and lane.pid != first
        launch = lane._launch            # a child that dies during a request fails that request only
        lane._child.kill()
        lane._child.wait()
        for script in (DIES_IN_A_REQUEST, DIES_ON_NEXT):
            lane._launch = lambda script=script: subprocess.Popen([sys.executable, "-c", script],
                                                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                                  bufsize=0)
            failed = refusal(ask(hists[:2]))
            assert failed[0] == "LaneError" and "batch lane" in failed[2] and lane.pid is None, failed
            assert backlog.n == 0
        lane._launch = launch
        assert len(ask(hists[:2]).results()) == 2
        assert lane.pending == 0 and backlog.n == 0
    finally:
        lane.close()
    assert lane.pid is None
    assert refusal(ask(hists[:1]))[:2] == ("Busy", 503) and backlog.n == 0           # after close: failed at once


def test_the_batch_lane_refuses_an_export_that_is_not_the_servers(exp):
    """Its process loads the export folder again: one re-exported under the server is not served."""
    lane = BatchLane(exp.folder, {**exp.manifest, MANIFEST_DIGEST: "0" * 64}, None, 1, 2, 10 ** 6, Backlog(1024))
    try:
        with pytest.raises(AnyoError, match="not the export the server loaded"):
            lane.start()
        assert lane.pid is None
    finally:
        lane.close()


def test_metrics_count_requests_and_model_calls(exp, hists):
    async def body(client, held, state):
        await client.post("/recommend", json={"history": hists[0], "k": 3})
        await client.post("/recommend", json={"history": ["nope"], "k": 3})
        await client.post("/recommend/batch", json={"histories": hists[:5], "k": 3})
        return await client.get("/metrics")

    r = in_process(exp, lambda h: False)(body)
    text = r.text
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert 'anyo_requests_total{path="/recommend",status="200"} 1' in text
    assert 'anyo_requests_total{path="/recommend",status="422"} 1' in text
    assert 'anyo_request_seconds_count{path="/recommend/batch"} 1' in text
    assert "anyo_model_call_histories_count 2" in text and "anyo_model_call_histories_sum 6" in text


def test_the_settings_are_checked_and_named_by_their_flag(export_dir, capsys):
    assert main(["serve", str(export_dir), "--max-batch", "0"]) == 2
    assert capsys.readouterr().err.strip() == "anyo: error: --max-batch: must be >= 1, got 0"
    assert main(["serve", str(export_dir), "--max-queue", "10"]) == 2
    assert "--max-queue: must be >= 1024" in capsys.readouterr().err


def test_a_port_in_use_is_one_line(export_dir, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", str(export_dir), "--port", str(port)]) == 2
    assert capsys.readouterr().err.strip() == f"anyo: error: --host 127.0.0.1 --port {port}: address already in use"


def test_a_snapshot_is_one_whole_export_even_while_the_folder_is_replaced(tiny_run, export_dir, tmp_path,
                                                                          monkeypatch):
    """The folder is re-exported (another model) between reading its manifest and copying its files: the
    snapshot is read again and is the new export, whole."""
    other = tmp_path / "other"
    assert main(["export", str(tiny_run[0]), "--out", str(other), "--model", "student_alone"]) == 0
    served = tmp_path / "served"
    shutil.copytree(export_dir, served)
    copy, swapped = shutil.copyfile, []

    def copy_while_reexported(src, dst, **kwargs):
        if not swapped:
            swapped.append(1)
            shutil.rmtree(served)
            shutil.copytree(other, served)
        return copy(src, dst, **kwargs)

    monkeypatch.setattr(server_module.shutil, "copyfile", copy_while_reexported)
    sha = snapshot_export(served, tmp_path / "snap")
    assert swapped and load_export(tmp_path / "snap").manifest["model"] == "student_alone"
    assert (tmp_path / "snap" / "manifest.json").read_bytes() == (other / "manifest.json").read_bytes()
    assert len(sha) == 64


# ---------------------------------------------------------------- a real server

def test_health_head_and_docs_without_a_cdn(server):
    client, run, out = server
    h = client.get("/health").json()
    split = load_split(run / "split")
    sha = __import__("hashlib").sha256((out / "manifest.json").read_bytes()).hexdigest()
    assert h == {"status": "ok", "model": "student_distilled", "split_hash": split.hash, "n_items": split.n_items,
                 "manifest_sha256": sha}
    head = client.head("/health")
    assert head.status_code == 200 and head.content == b""
    paths = client.get("/openapi.json").json()["paths"]
    # the batch route reads its body raw (the batch lane parses it) and still documents its schema
    batch_body = paths["/recommend/batch"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "/recommend" in paths and set(batch_body["properties"]) == {"histories", "k", "include_seen"}
    docs = client.get("/docs")
    assert docs.status_code == 200 and "POST /recommend" in docs.text and "POST /recommend/batch" in docs.text
    assert "histories" in docs.text
    assert "<script" not in docs.text and "<link" not in docs.text and "cdn" not in docs.text.lower()


def test_recommend_matches_the_exported_model(server):
    client, run, out = server
    split = load_split(run / "split")
    exp = load_export(out)
    hists = [[split.items[i] for i in split.history("test").row(u)] for u in range(5)]
    r = client.post("/recommend", json={"history": hists[0], "k": 7})
    assert r.status_code == 200 and list(r.json()) == ["items"] and same(r.json()["items"], exp.recommend(hists[0], 7))
    r = client.post("/recommend/batch", json={"histories": hists, "k": 4})
    assert r.status_code == 200 and list(r.json()) == ["results"] and len(r.json()["results"]) == len(hists)
    assert all(same(got["items"], exp.recommend(h, 4)) for got, h in zip(r.json()["results"], hists))
    r = client.post("/recommend", json={"history": hists[0], "k": 3, "include_seen": True})
    assert same(r.json()["items"], exp.recommend(hists[0], 3, include_seen=True))


def test_concurrent_clients_get_their_own_answers(server, exp, hists):
    client, run, out = server
    asks = [(hists[n % len(hists)][: 2 + n % 5], 1 + n % 9) for n in range(32)]
    got = [None] * len(asks)

    def ask(n):
        h, k = asks[n]
        with httpx.Client(base_url=client.base_url, timeout=30) as c:
            try:
                got[n] = c.post("/recommend", json={"history": h, "k": k})
            except httpx.HTTPError as e:  # shown by the assertion below
                got[n] = e

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (h, k), r in zip(asks, got):
        assert isinstance(r, httpx.Response), repr(r)
        assert r.status_code == 200 and same(r.json()["items"], exp.recommend(h, k))


def test_integer_ids_are_matched_as_strings(tiny_run, server):
    client, run, out = server
    split = load_split(run / "split")  # the toy data's ids are "i12"; ask with a made-up integer id
    r = client.post("/recommend", json={"history": [split.items[1], 12], "k": 3})
    assert r.status_code == 422 and "'12'" in r.json()["detail"] and "history" in r.json()["detail"]


def test_bad_inputs_get_a_4xx_naming_the_field_and_the_server_keeps_serving(server):
    client, run, out = server
    split = load_split(run / "split")
    good = [split.items[3], split.items[5]]
    n = split.n_items
    JSON = {"content-type": "application/json"}
    bad = [
        ({"json": {"history": good + ["nope", "zilch"]}}, 422, ["history", "'nope'", "'zilch'"]),
        ({"json": {"history": []}}, 422, ["history", "empty"]),
        ({"json": {"history": good, "k": 0}}, 422, ["k", f"1..{n}"]),
        ({"json": {"history": good, "k": n + 1}}, 422, ["k"]),
        ({"json": {"history": good, "k": "ten"}}, 422, ["k"]),
        ({"json": {"history": good[0]}}, 422, ["history", "list"]),
        ({"json": {"history": [good[0], 1.5]}}, 422, ["history[1]"]),
        ({"json": {"items": good}}, 422, ["history"]),
        ({"json": {"history": list(range(1_000_000))}}, 413, ["body", "history"]),
        ({"json": {"history": ["1"] * (MAX_HISTORY + 1)}}, 422, ["history", "too long"]),
        ({"content": b'{"history": [1, 2', "headers": {"content-type": "application/json"}}, 400, ["body", "JSON"]),
        ({"content": json.dumps({"history": good}).encode(), "headers": {"content-type": "text/plain"}}, 415,
         ["content-type"]),
        ({"json": {"histories": [good, []]}, "url": "/recommend/batch"}, 422, ["histories[1]"]),
        ({"json": {"histories": [good, ["nope"]]}, "url": "/recommend/batch"}, 422, ["histories[1]", "'nope'"]),
        ({"json": {"histories": good}, "url": "/recommend/batch"}, 422, ["histories[0]"]),
        ({"json": {"histories": [good] * 101, "k": 10}, "url": "/recommend/batch"}, 422,
         ["k", "1,010 items", "--max-response-items"]),
        # a batch body is parsed by the batch lane's process: the same answers as the server's own parsing
        ({"content": b'{"histories": [[1, 2', "headers": JSON, "url": "/recommend/batch"}, 400,
         ["body: malformed JSON ("]),
        ({"content": b"", "headers": JSON, "url": "/recommend/batch"}, 400, ["body: empty"]),
        ({"content": b"", "headers": JSON, "url": "/recommend"}, 400, ["body: empty"]),
        ({"content": b'{"histories": "\xc3\x28"}', "headers": JSON, "url": "/recommend/batch"}, 400,
         ["body: malformed JSON", "UTF-8"]),
        ({"json": [good], "url": "/recommend/batch"}, 422, ["body: ", "dictionary"]),
        ({"json": [good], "url": "/recommend"}, 422, ["body: ", "dictionary"]),
        ({"json": {"histories": [[good[0]]] * 1025, "k": 1}, "url": "/recommend/batch"}, 422,
         ["histories: too long (1,025 items, at most 1,024)"]),
        ({"json": {"histories": [good], "k": 2, "extra": 1}, "url": "/recommend/batch"}, 422, ["extra"]),
    ]
    for kwargs, status, words in bad:
        url = kwargs.pop("url", "/recommend")
        r = client.post(url, **kwargs)
        assert r.status_code == status, (kwargs.get("json", kwargs.get("content"))[:200] if not isinstance(
            kwargs.get("json"), dict) else list(kwargs["json"]), r.status_code, r.text[:300])
        detail = r.json()["detail"]
        assert isinstance(detail, str) and all(w in detail for w in words), (detail, words)
        ok = client.post("/recommend", json={"history": good, "k": 5})
        assert ok.status_code == 200 and len(ok.json()["items"]) == 5
    # every refused history left the backlog (a batch is admitted for its bound before the lane reads it)
    assert "\nanyo_queue_histories 0\n" in client.get("/metrics").text


def raw(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    return s


def test_oversized_headers_are_400_and_slow_connections_are_closed(server):
    client, run, out = server
    port = client.base_url.port
    r = client.get("/health", headers={"x-big": "y" * 8192})
    assert r.status_code == 431 and "--max-header-bytes" in r.json()["detail"]
    s = raw(port)  # headers that never end: refused by the HTTP layer once they pass the limit
    s.sendall(b"GET /health HTTP/1.1\r\nx-big: " + b"y" * 8192)
    assert s.recv(100).startswith(b"HTTP/1.1 400")
    s.close()
    # a client that sends half a request line and then nothing is cut off after --read-timeout-s 5
    s = raw(port)
    s.sendall(b"GET /hea")
    assert s.recv(100) == b""
    s.close()
    # one that trickles its body in is cut off too
    s = raw(port)
    s.sendall(b"POST /recommend HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{")
    assert s.recv(100) == b""
    s.close()
    assert client.get("/health").status_code == 200


def test_workers_leave_no_orphan_when_their_master_is_killed(export_dir, tmp_path):
    psutil = pytest.importorskip("psutil")
    proc, port = start_server(export_dir, tmp_path / "workers.log", "--workers", "2")
    try:
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert len([w for w in workers if "python" in w.name().lower()]) >= 2
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
        snapshot = Path(workers[-1].environ()[server_module.ENV_DIR]).parent  # a killed master cannot remove it
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=WAIT)
        gone, alive = psutil.wait_procs(workers, timeout=WAIT)
        assert not alive, f"orphans: {alive}"
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # the port is free again
        shutil.rmtree(snapshot)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_terminated_server_removes_its_snapshot_and_ends_its_batch_lane(export_dir, hists, tmp_path):
    """The batch lane's process loads the server's snapshot of the export, so the snapshot stays while the server
    serves; SIGTERM (uvicorn's graceful shutdown) removes it and ends the lane."""
    psutil = pytest.importorskip("psutil")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc, port = start_server(export_dir, tmp_path / "serve.log", env={"TMPDIR": str(tmp)})
    try:
        r = httpx.post(f"http://127.0.0.1:{port}/recommend/batch", json={"histories": hists[:3], "k": 4}, timeout=WAIT)
        assert r.status_code == 200 and len(r.json()["results"]) == 3
        lanes = [c for c in psutil.Process(proc.pid).children() if "distill.batch_lane" in c.cmdline()]
        snapshots = lambda: list(tmp.glob("anyo-serve-*"))  # noqa: E731
        assert len(lanes) == 1 and len(snapshots()) == 1
        proc.terminate()
        proc.wait(timeout=WAIT)
        gone, alive = psutil.wait_procs(lanes, timeout=WAIT)
        assert not alive and snapshots() == []
    finally:
        if proc.poll() is None:
            proc.kill()


def streamed(rest: list, deadline_s: float = WAIT, leaves: bool = False) -> tuple[list[str], list[bytes], bool]:
    """A Streamed answer whose first piece is b",1" and later ones are `rest` (comma-led bytes, an exception, or None: never
    answered), sent to a socket that keeps up beside another task, from a client that stays (or `leaves` once
    the answer starts): the order of sends and other steps, the bytes sent, and whether the pieces were
    cancelled."""
    order, sent, stopped = [], [], []

    async def receive():
        if not leaves:
            await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    async def send(message):
        order.append(message["type"].rsplit(".", 1)[-1])   # never suspends, like a socket that keeps up
        sent.append(message.get("body", b""))

    async def other():
        for _ in range(30):
            order.append("other")
            await asyncio.sleep(0)

    async def both():
        loop = asyncio.get_running_loop()
        answer = server_module.BatchAnswer(loop)
        for r in rest:
            if r is None:         # never answered
                break
            if isinstance(r, Exception):
                answer.end(r)
                break
            answer.piece(r)
        else:
            answer.end(None)
        await asyncio.sleep(0)   # the pieces handed over
        streamed = server_module.Streamed(b",1", answer, loop.time() + deadline_s)
        await asyncio.wait_for(asyncio.gather(streamed({"type": "http"}, receive, send), other()), WAIT / 4)
        stopped.append(answer.cancelled)

    asyncio.run(both())
    return order, sent, stopped[0]


def test_a_batch_answer_streams_and_gives_the_event_loop_back_between_its_pieces():
    """A socket that keeps up never makes `send` wait: without a yield between pieces, a 120 MB answer would hold
    the event loop from its first byte to its last (72 ms measured), every other request waiting."""
    order, sent, stopped = streamed([b",2", b",3"])
    pieces = "".join("b" if step == "body" else "." if step == "other" else "" for step in order).rstrip(".")
    assert pieces.count("b") == 4 and "bb" not in pieces[:-1], order   # each piece after another task's step
    assert json.loads(b"".join(sent)) == {"results": [1, 2, 3]} and not stopped


def test_a_batch_piece_that_fails_or_is_late_ends_the_answer_unfinished():
    """The status went with the first piece: a later failure cannot become a 500, nor a shorter list; the answer
    ends without its closing bytes (uvicorn then closes the connection) and the other pieces are cancelled."""
    for rest, deadline_s in (([b",2", RuntimeError("lane died")], WAIT), ([b",2", None], 0.05)):
        order, sent, stopped = streamed(rest, deadline_s)
        assert b"".join(sent) == b'{"results":[1,2' and stopped, (order, sent)


def test_a_client_that_leaves_mid_batch_has_its_other_pieces_cancelled():
    order, sent, stopped = streamed([None, None], deadline_s=WAIT * 10, leaves=True)   # not by the deadline
    assert b"".join(sent) == b'{"results":[1' and stopped, (order, sent)
