"""`anyo serve`: a real server in a subprocess on a free loopback port, started once for the module."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from distill.cli import main  # noqa: E402
from distill.data import load_split  # noqa: E402
from distill.exported import load_export  # noqa: E402
from distill.server import MAX_HISTORY  # noqa: E402

ROOT = Path(__file__).parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    run, _ = tiny_run
    out = tmp_path_factory.mktemp("serve") / "export"
    assert main(["export", str(run), "--out", str(out)]) == 0
    port = free_port()
    log = open(out.parent / "server.log", "w")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "distill.cli", "serve", str(out), "--port", str(port)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    deadline = time.monotonic() + 120
    while True:
        try:
            if client.get("/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server did not start: {(out.parent / 'server.log').read_text()[-2000:]}")
        time.sleep(0.2)
    try:
        yield client, run, out
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_health_and_docs(server):
    client, run, out = server
    h = client.get("/health").json()
    split = load_split(run / "split")
    assert h == {"status": "ok", "model": "student_distilled", "split_hash": split.hash, "n_items": split.n_items}
    assert "/recommend" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200


def same(got: list[dict], want: list[dict]) -> bool:
    """Same items in the same order; scores equal up to float32 rounding (a batch is padded to its
    longest history and multiplied in other blocks than one history alone)."""
    return [(g["item"], g["title"]) for g in got] == [(w["item"], w["title"]) for w in want] and \
        [g["score"] for g in got] == pytest.approx([w["score"] for w in want], rel=1e-5, abs=1e-6)


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
