"""Small requests while large ones are in flight: `anyo serve`'s /recommend latency alone and beside
/recommend/batch requests of 1,024 histories at k = every item; writes its section of benchmarks/serving.md.

    python benchmarks/serve_mixed.py --export DIR [--rate 100] [--clients 4] [--large-clients 1] [--seconds 20]
                                     [--runs 3] [--large-histories 1024] [--large-k 0] [--serve-args "--max-batch 64"]

Starts `anyo serve DIR --port 0 SERVE_ARGS` (a subprocess; the port is the one it prints), then, `--runs`
times, four phases of `--seconds` each: (1) small requests alone: POST /recommend (k = 10, seeded random
histories of 5 to 50 catalogue items) over `--clients` keep-alive connections; (2) the same while
`--large-clients` processes send POST /recommend/batch with `--large-histories` histories and k = the
catalogue size (or `--large-k`), one after another; (3) the large requests alone (the batch throughput); (4) the small requests
beside a process that only spins, at the batch lane's priority (SCHED_IDLE, nice 19): the control. What a core
busy at the lowest priority costs the small requests on this machine (the hypervisor, shared caches) no server
design removes; the batches over the control is what the server's handling of them adds.

With `--rate R` (open loop, what a service sees) the small requests arrive as a seeded Poisson process of R
per second, the same arrival times in every phase, and each one's latency runs from its arrival time, so a
request that waits for a free connection counts that wait (no coordinated omission). With `--rate 0`
(closed loop) each connection sends its next request as soon as the last is answered: the server is
saturated, and a latency beside the batches then measures the share of the cores the batches take as much
as the waiting. The large clients run in their own processes, so their 120 MB answers do not take the
small clients' interpreter lock.

Reports, each the median over the runs, the small requests' p50/p95/p99/max and count per phase, the large
requests' count, mean time and histories/s, errors, and the machine's load average before and after; then the
small requests' p99 and p50 beside the batches over alone and over the control, every run's latencies pooled,
with a 95% interval from resampling whole runs (`pooled_ratio`); stops the server.
"""

from __future__ import annotations

import argparse
import gc
import http.client
import json
import multiprocessing
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from serving_profile import write_section  # noqa: E402  (this folder's: one marker-section writer)

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


def post(conn: http.client.HTTPConnection, path: str, body: bytes, sink: memoryview) -> tuple[int, float]:
    """Send one request and read its whole answer into `sink`, a reused buffer: a remote client's copies of a
    120 MB answer would not take this machine's cores, so this one's take as few as they can."""
    t = time.perf_counter()
    conn.request("POST", path, body, {"content-type": "application/json"})
    r = conn.getresponse()
    while r.readinto(sink):
        pass
    return r.status, time.perf_counter() - t


def fresh(port: int) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", port, timeout=600)


def sender(port: int, path: str, errors: dict, lock: threading.Lock):
    """A keep-alive connection's `send(body) -> seconds or None` (None: an error, counted in `errors`)."""
    conn, sink = fresh(port), memoryview(bytearray(1 << 20))

    def send(body: bytes) -> float | None:
        nonlocal conn
        try:
            status, dt = post(conn, path, body, sink)
        except (OSError, http.client.HTTPException) as e:
            status, dt = type(e).__name__, None
            conn.close()
            conn = fresh(port)
        if status == 200:
            return dt
        with lock:
            errors[f"{path} {status}"] = errors.get(f"{path} {status}", 0) + 1
        return None
    return send


def on_connections(port: int, path: str, clients: int, work) -> tuple[list, dict]:
    """`work(send, i) -> latencies` on each of `clients` keep-alive connections at once (threads): every latency,
    and the errors counted."""
    lock, errors, times = threading.Lock(), {}, []

    def run(i: int) -> None:
        mine = work(sender(port, path, errors, lock), i)
        with lock:
            times.extend(mine)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return times, errors


def closed_loop(port: int, bodies: list[bytes], path: str, clients: int, until: float) -> tuple[list, dict]:
    """`clients` connections, each sending its next body as soon as the last is answered, until `until`."""
    def work(send, n: int) -> list[float]:
        mine = []
        while time.perf_counter() < until:
            dt = send(bodies[n % len(bodies)])
            n += clients
            if dt is not None:
                mine.append(dt)
        return mine
    return on_connections(port, path, clients, work)


def open_loop(port: int, bodies: list[bytes], clients: int, arrivals: np.ndarray) -> tuple[list, dict]:
    """Request n is due at `arrivals[n]` (perf_counter seconds); `clients` connections take them in turn, and
    a request's latency is from when it was due to its answer."""
    next_one = iter(range(len(arrivals)))

    def work(send, _) -> list[float]:
        mine = []
        while (n := next(next_one, None)) is not None:   # next() on a shared iterator is atomic under the GIL
            wait = arrivals[n] - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            if send(bodies[n % len(bodies)]) is not None:
                mine.append(time.perf_counter() - arrivals[n])
        return mine
    return on_connections(port, "/recommend", clients, work)


def large_client(port: int, body: bytes, seconds: float, nice: int, ready, go, out) -> None:
    """A process at `nice` sending `body` to /recommend/batch, one after another, for `seconds` from `go`: (times,
    errors) to `out`. It says `ready` once imported, so that its start-up is not measured beside the small
    requests."""
    os.nice(nice)
    ready.set()
    go.wait()
    out.put(closed_loop(port, [body], "/recommend/batch", 1, time.perf_counter() + seconds))


def spinner(ready) -> None:
    """The control: a process at the batch lane's priority that only takes CPU, until it is terminated."""
    from distill.batch_lane import lowest_priority   # here: every process this file spawns imports it, and torch with this
    lowest_priority()
    ready.set()
    while True:
        pass


def phase(port: int, small: list[bytes], large: bytes | None, clients: int, large_clients: int, seconds: float,
          rate: float, seed: int, large_nice: int = 0, spin: bool = False) -> dict:
    ctx = multiprocessing.get_context("spawn")
    results, go, ready = ctx.Queue(), ctx.Event(), [ctx.Event() for _ in range(large_clients)]
    procs = [ctx.Process(target=large_client, args=(port, large, seconds, large_nice, r, go, results)) for r in ready]
    spinning = ctx.Event()
    control = ctx.Process(target=spinner, args=(spinning,), daemon=True) if spin else None
    for p in procs + ([control] if control else []):
        p.start()
    for r in ready + ([spinning] if control else []):
        r.wait()
    go.set()
    start = time.perf_counter()
    if clients and rate:
        gaps = np.random.default_rng(seed).exponential(1 / rate, size=int(rate * seconds * 2) + 10)
        arrivals = start + np.cumsum(gaps)
        times, errors = open_loop(port, small, clients, arrivals[arrivals < start + seconds])
    elif clients:
        times, errors = closed_loop(port, small, "/recommend", clients, start + seconds)
    else:
        times, errors = [], {}
    large_times = []
    for _ in procs:
        got, their_errors = results.get()
        large_times += got
        for key, n in their_errors.items():
            errors[key] = errors.get(key, 0) + n
    for p in procs:
        p.join()
    if control is not None:
        control.terminate()
        control.join()
    ms = np.asarray(times or [np.nan]) * 1000
    return {"small_requests": len(times), **{f"p{q}": float(np.percentile(ms, q)) for q in (50, 95, 99)},
            "max": float(ms.max()), "large_requests": len(large_times),
            "large_mean_s": float(np.mean(large_times)) if large_times else float("nan"),
            "errors": sum(errors.values()), "error_kinds": errors, "ms": ms}


def pooled_ratio(alone: list[np.ndarray], beside: list[np.ndarray], q: float = 99, draws: int = 2000,
                 seed: int = 0) -> tuple[float, float, float]:
    """The q-th percentile of every run's small-request latencies pooled, beside the batches over alone, and
    its 95% interval from resampling whole runs (a run's alone and beside phases together: the machine's
    drift from run to run is in the interval)."""
    ratio = lambda picks: (np.percentile(np.concatenate([beside[i] for i in picks]), q)  # noqa: E731
                           / np.percentile(np.concatenate([alone[i] for i in picks]), q))
    rng, n = np.random.default_rng(seed), len(alone)
    boots = [ratio(rng.integers(0, n, n)) for _ in range(draws)]
    return float(ratio(range(n))), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def median(results: list[dict]) -> dict:
    """Each figure's median over the runs (the error counts summed)."""
    out = {key: float(np.median([r[key] for r in results])) for key in results[0] if key not in ("error_kinds", "ms")}
    out["errors"] = int(sum(r["errors"] for r in results))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", required=True, help="an `anyo export` folder")
    ap.add_argument("--rate", type=float, default=100.0,
                    help="small requests per second, Poisson arrivals (open loop); 0: closed loop")
    ap.add_argument("--clients", type=int, default=4, help="connections sending small /recommend requests")
    ap.add_argument("--large-clients", type=int, default=1, help="processes sending large /recommend/batch requests")
    ap.add_argument("--large-histories", type=int, default=1024, help="histories in one large request")
    ap.add_argument("--large-k", type=int, default=0,
                    help="k of the large requests (default 0: the catalogue size); 10 isolates the cost of taking a "
                         "batch in from the cost of answering it")
    ap.add_argument("--seconds", type=float, default=20, help="length of each phase")
    ap.add_argument("--large-nice", type=int, default=0, choices=range(20),
                    help="the large clients' nice value: 19 stands for clients on other machines, whose receiving "
                         "of 120 MB answers is not this machine's CPU (a diagnosis, not a server figure)")
    ap.add_argument("--runs", type=int, default=3, help="times the four phases are run (medians are reported)")
    ap.add_argument("--serve-args", default="", help="more flags for `anyo serve`, e.g. \"--max-batch 64\"")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "serving.md"))
    args = ap.parse_args()
    if not 1 <= args.clients <= 64 or not 1 <= args.large_clients <= 8 or not 0 < args.seconds <= 600 \
            or not 1 <= args.runs <= 50 or not 0 <= args.rate <= 10_000:
        raise SystemExit("--clients must be 1..64, --large-clients 1..8, --seconds in (0, 600], --runs 1..50 and "
                         "--rate 0..10,000")
    if not 1 <= args.large_histories <= 1024:
        raise SystemExit("--large-histories must be 1..1024 (the server's limit per batch request)")
    from distill.exported import load_export
    exp = load_export(args.export)
    rng = np.random.default_rng(0)
    pick = lambda: [exp.raw_ids[i] for i in rng.choice(np.arange(1, exp.n_items + 1),  # noqa: E731
                                                       size=min(exp.n_items - 1, int(rng.integers(5, 51))),
                                                       replace=False)]
    small = [json.dumps({"history": pick(), "k": 10}).encode() for _ in range(512)]
    large_k = args.large_k or exp.n_items
    if not 1 <= large_k <= exp.n_items:
        raise SystemExit(f"--large-k must be 1..{exp.n_items:,} (the catalogue size)")
    large = json.dumps({"histories": [pick() for _ in range(args.large_histories)], "k": large_k}).encode()
    gc.collect()
    gc.freeze()   # this process's own full collections scan only what the phases make: no 100 ms client pauses
    load0, started = os.getloadavg(), time.gmtime()
    proc, port = start(args.export, shlex.split(args.serve_args))
    runs = []
    try:
        phase(port, small, None, args.clients, 0, min(2.0, args.seconds), args.rate, seed=-1 % 2**32)  # warm-up
        for run in range(args.runs):   # the same arrival times alone, beside the batches and the control
            runs.append({"alone": phase(port, small, None, args.clients, 0, args.seconds, args.rate, run),
                         "beside": phase(port, small, large, args.clients, args.large_clients, args.seconds,
                                         args.rate, run, args.large_nice),
                         "large alone": phase(port, small, large, 0, args.large_clients, args.seconds, args.rate,
                                              run, args.large_nice),
                         "control": phase(port, small, None, args.clients, 0, args.seconds, args.rate, run,
                                          spin=True)})
            print(json.dumps({key: {k: v for k, v in r.items() if k != "ms"} for key, r in runs[-1].items()}),
                  flush=True)
    finally:
        stop_server(proc)
    load1 = os.getloadavg()
    cmd = "python benchmarks/serve_mixed.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    tag = f"`{cmd}`, {time.strftime('%Y-%m-%d %H:%M UTC', started)}"
    rows = []
    for key, name in (("alone", "small alone"), ("beside", f"small beside {args.large_clients} client(s) sending "
                                                     f"{args.large_histories:,} histories x k = {large_k:,}"),
                      ("large alone", "large alone"),
                      ("control", "small beside a spinning process at the batch lane's priority (control)")):
        r = median([run[key] for run in runs])
        large_col = (f"{r['large_requests']:g} ({r['large_mean_s']:.2f} s each, "
                     f"{args.large_histories / r['large_mean_s']:,.0f} histories/s)" if r["large_requests"] else "–")
        small_cols = (f"{r['small_requests']:,.0f} | {r['p50']:.2f} ms | {r['p95']:.2f} ms | {r['p99']:.2f} ms "
                      f"| {r['max']:.2f} ms" if r["small_requests"] else "– | – | – | – | –")
        rows.append(f"| {name} | {small_cols} | {large_col} | {r['errors']} |")
    ms = {key: [run[key]["ms"] for run in runs] for key in ("alone", "beside", "control")}

    def ratio(over: str, of: str = "beside") -> str:
        p99, p50 = pooled_ratio(ms[over], ms[of]), pooled_ratio(ms[over], ms[of], q=50)
        per_run = ", ".join(f"{run[of]['p99'] / run[over]['p99']:.2f}" for run in runs)
        return (f"p99 **{p99[0]:.2f}x** [{p99[1]:.2f}, {p99[2]:.2f}], p50 {p50[0]:.2f}x [{p50[1]:.2f}, {p50[2]:.2f}]"
                f"; p99 per run: {per_run}")
    ratios = (f"Small requests, every run's latencies pooled (95% intervals from resampling whole runs), beside the "
              f"batches over alone: {ratio('alone')}. Beside the batches over beside the control (what the server's "
              f"handling of batches adds): {ratio('control')}. The control over alone (this machine's cost of a core "
              f"busy at the lowest priority): {ratio('alone', 'control')}.")
    arrivals = (f"arriving at {args.rate:g} per second (Poisson, open loop: latency from the arrival time) over "
                f"{args.clients} connections" if args.rate else
                f"from {args.clients} connections, each one after another (closed loop)")
    text = "\n".join([
        BEGIN, "## Small requests while large ones are in flight (`anyo serve`, micro-batched)", "",
        f"POST /recommend (k = 10) {arrivals} for {args.seconds:g} s; then the same beside POST /recommend/batch "
        f"requests from {args.large_clients} process(es){f' at nice {args.large_nice}' if args.large_nice else ''}; "
        f"then those alone; then the small ones beside the control. Each figure is the median of "
        f"{args.runs} run(s) (errors: the total). Server: `anyo serve {args.serve_args or '(defaults)'}`, "
        f"model `{exp.manifest['model']}`, {exp.n_items:,} items. Load average (1/5/15 min) "
        f"{'/'.join(f'{x:.1f}' for x in load0)} at the start, {'/'.join(f'{x:.1f}' for x in load1)} at the end, "
        f"{os.cpu_count()} cores shared with the clients and other jobs. ({tag})", "",
        "| phase | small requests answered | p50 | p95 | p99 | max | large requests answered | errors |",
        "|---|---|---|---|---|---|---|---|", *rows, "", ratios, END])
    write_section(Path(args.out), text, BEGIN, END)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
