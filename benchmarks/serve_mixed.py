"""Small requests while large ones are in flight: `anyo serve`'s /recommend latency alone and beside
/recommend/batch requests of 1,024 histories at k = every item; writes its section of benchmarks/serving.md.

    python benchmarks/serve_mixed.py --export DIR [--clients 4] [--large-clients 1] [--seconds 20] [--runs 3]
                                     [--large-histories 1024] [--serve-args "--max-batch 64"]

Starts `anyo serve DIR --port 0 SERVE_ARGS` (a subprocess; the port is the one it prints), then, `--runs`
times, three phases of `--seconds` each: (1) `--clients` threads sending POST /recommend (k = 10, seeded
random histories of 5 to 50 catalogue items), each on its own keep-alive connection, one request after
another; (2) the same while `--large-clients` more threads send POST /recommend/batch with
`--large-histories` histories and k = the catalogue size, one after another; (3) the large requests alone
(the batch throughput). Reports, each the median over the runs, the small requests' p50/p95/p99/max and
count per phase, the large requests' count, mean time and histories/s, errors, and the machine's load
average before and after; stops the server.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BEGIN, END = "<!-- serve_mixed: begin -->", "<!-- serve_mixed: end -->"


def serve_env() -> dict:
    """The environment an `anyo serve` child runs in: this checkout's code first on its path."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def stop_server(proc: subprocess.Popen) -> None:
    """Terminate the server, killing it if it has not exited within 30 s."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def start(export: str, serve_args: list[str]) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "distill.cli", "serve", export, "--port", "0", *serve_args],
                            cwd=ROOT, env=serve_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    if " on http://" not in line:
        proc.kill()
        raise SystemExit(f"server did not start: {line}{proc.stdout.read()[-2000:]}")
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep its pipe drained
    return proc, int(line.split(" on http://")[1].split(" ")[0].rsplit(":", 1)[1])


def post(conn: http.client.HTTPConnection, path: str, body: bytes) -> tuple[int, float]:
    t = time.perf_counter()
    conn.request("POST", path, body, {"content-type": "application/json"})
    r = conn.getresponse()
    r.read()
    return r.status, time.perf_counter() - t


def phase(port: int, small: list[bytes], large: bytes | None, clients: int, large_clients: int,
          seconds: float) -> dict:
    stop = threading.Event()
    lock = threading.Lock()
    out = {"small": [], "large": [], "errors": {}}

    def loop(bodies: list[bytes], path: str, key: str, offset: int) -> None:
        conn, n, mine = http.client.HTTPConnection("127.0.0.1", port, timeout=600), offset, []
        while not stop.is_set():
            try:
                status, dt = post(conn, path, bodies[n % len(bodies)])
            except (OSError, http.client.HTTPException) as e:
                status, dt = type(e).__name__, 0.0
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            n += clients
            if status == 200:
                mine.append(dt)
            else:
                with lock:
                    out["errors"][f"{path} {status}"] = out["errors"].get(f"{path} {status}", 0) + 1
        conn.close()
        with lock:
            out[key].extend(mine)

    threads = [threading.Thread(target=loop, args=(small, "/recommend", "small", i)) for i in range(clients)]
    if large is not None:
        threads += [threading.Thread(target=loop, args=([large], "/recommend/batch", "large", 0))
                    for _ in range(large_clients)]
    for t in threads:
        t.start()
    stop.wait(seconds)
    stop.set()
    for t in threads:
        t.join()
    ms = np.asarray(out["small"] or [np.nan]) * 1000
    return {"small_requests": len(out["small"]), **{f"p{q}": float(np.percentile(ms, q)) for q in (50, 95, 99)},
            "max": float(ms.max()), "large_requests": len(out["large"]),
            "large_mean_s": float(np.mean(out["large"])) if out["large"] else float("nan"),
            "errors": sum(out["errors"].values()), "error_kinds": out["errors"]}


def median(results: list[dict]) -> dict:
    """Each figure's median over the runs (the error counts summed)."""
    out = {key: float(np.median([r[key] for r in results])) for key in results[0] if key != "error_kinds"}
    out["errors"] = int(sum(r["errors"] for r in results))
    return out


def write_section(path: Path, text: str) -> None:
    """Replace this script's section of `path` (between its markers), or append it."""
    old = path.read_text() if path.exists() else ""
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in old and END in old:
        new = old[:old.index(BEGIN)] + block + old[old.index(END) + len(END):]
    else:
        new = old.rstrip("\n") + ("\n\n" if old else "") + block + "\n"
    path.write_text(new)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", required=True, help="an `anyo export` folder")
    ap.add_argument("--clients", type=int, default=4, help="threads sending small /recommend requests")
    ap.add_argument("--large-clients", type=int, default=1, help="threads sending large /recommend/batch requests")
    ap.add_argument("--large-histories", type=int, default=1024, help="histories in one large request")
    ap.add_argument("--seconds", type=float, default=20, help="length of each phase")
    ap.add_argument("--runs", type=int, default=3, help="times the three phases are run (medians are reported)")
    ap.add_argument("--serve-args", default="", help="more flags for `anyo serve`, e.g. \"--max-batch 64\"")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "serving.md"))
    args = ap.parse_args()
    if not 1 <= args.clients <= 64 or not 1 <= args.large_clients <= 8 or not 0 < args.seconds <= 600 \
            or not 1 <= args.runs <= 9:
        raise SystemExit("--clients must be 1..64, --large-clients 1..8, --seconds in (0, 600] and --runs 1..9")
    if not 1 <= args.large_histories <= 1024:
        raise SystemExit("--large-histories must be 1..1024 (the server's limit per batch request)")
    from distill.exported import load_export
    exp = load_export(args.export)
    rng = np.random.default_rng(0)
    pick = lambda: [exp.raw_ids[i] for i in rng.choice(np.arange(1, exp.n_items + 1),  # noqa: E731
                                                       size=min(exp.n_items - 1, int(rng.integers(5, 51))),
                                                       replace=False)]
    small = [json.dumps({"history": pick(), "k": 10}).encode() for _ in range(512)]
    large = json.dumps({"histories": [pick() for _ in range(args.large_histories)], "k": exp.n_items}).encode()
    load0, started = os.getloadavg(), time.gmtime()
    proc, port = start(args.export, shlex.split(args.serve_args))
    runs = []
    try:
        phase(port, small, None, args.clients, 0, min(2.0, args.seconds))  # warm-up
        for _ in range(args.runs):
            runs.append({"alone": phase(port, small, None, args.clients, 0, args.seconds),
                         "beside": phase(port, small, large, args.clients, args.large_clients, args.seconds),
                         "large alone": phase(port, small, large, 0, args.large_clients, args.seconds)})
            print(json.dumps(runs[-1]), flush=True)
    finally:
        stop_server(proc)
    load1 = os.getloadavg()
    cmd = "python benchmarks/serve_mixed.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    tag = f"`{cmd}`, {time.strftime('%Y-%m-%d %H:%M UTC', started)}"
    rows = []
    for key, name in (("alone", "small alone"), ("beside", f"small beside {args.large_clients} client(s) sending "
                                                     f"{args.large_histories:,} histories x k = {exp.n_items:,}"),
                      ("large alone", "large alone")):
        r = median([run[key] for run in runs])
        large_col = (f"{r['large_requests']:g} ({r['large_mean_s']:.2f} s each, "
                     f"{args.large_histories / r['large_mean_s']:,.0f} histories/s)" if r["large_requests"] else "–")
        small_cols = (f"{r['small_requests']:,.0f} | {r['p50']:.2f} ms | {r['p95']:.2f} ms | {r['p99']:.2f} ms "
                      f"| {r['max']:.2f} ms" if r["small_requests"] else "– | – | – | – | –")
        rows.append(f"| {name} | {small_cols} | {large_col} | {r['errors']} |")
    text = "\n".join([
        "## Small requests while large ones are in flight (`anyo serve`, micro-batched)", "",
        f"{args.clients} threads send POST /recommend (k = 10) one after another for {args.seconds:g} s; then the "
        f"same beside POST /recommend/batch requests; then those alone. Each figure is the median of "
        f"{args.runs} run(s) (errors: the total). Server: `anyo serve {args.serve_args or '(defaults)'}`, "
        f"model `{exp.manifest['model']}`, {exp.n_items:,} items. Load average (1/5/15 min) "
        f"{'/'.join(f'{x:.1f}' for x in load0)} at the start, {'/'.join(f'{x:.1f}' for x in load1)} at the end, "
        f"{os.cpu_count()} cores shared with the clients and other jobs. ({tag})", "",
        "| phase | small requests answered | p50 | p95 | p99 | max | large requests answered | errors |",
        "|---|---|---|---|---|---|---|---|", *rows])
    write_section(Path(args.out), text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
