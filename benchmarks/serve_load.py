"""Load test of `anyo serve` plus the in-process serving path; writes its section of benchmarks/serving.md.

    python benchmarks/serve_load.py --export DIR [--clients 8] [--seconds 60] [--split RUN/split]
                                    [--runtime onnxruntime|onnxruntime-int8|torch] [--label NAME]

1. In process (the `Recommender` that `anyo recommend` and `anyo serve` use): users/s at
   batch 1, 32, 256 and 1,024 (encode + top-10 with the history masked; median of 3 passes),
   latency p50/p95 at batch 1, and the encoder's achieved FLOP/s against a torch matmul
   (2,048 x 2,048 x 2,048 sgemm) measured here with the same thread count.
2. Over HTTP: starts `anyo serve DIR` on 127.0.0.1 on a free port (a subprocess), drives
   POST /recommend from `--clients` threads, each with its own keep-alive `http.client`
   connection, for `--seconds` seconds (at most `--max-requests` requests in all), while one
   more thread sends the bad inputs of tests/test_server.py in turn; then stops the server.
   Reports requests/s, latency p50/p95/p99, errors among good requests, bad inputs answered
   4xx, and the server's RSS (all its processes) sampled every `RSS_EVERY_S` seconds during the
   load: at the start, at the end and the largest sample, so "flat" can be judged.

`--runtime` is the encoder runtime of both parts (the export's default when not given). Each run's
figures, with the UTC date and time and the load average (`uptime`) before and after each part, are
stored in `--json` under `--label` (default: the runtime), and the section between the markers in
`--out` is rewritten from that file, so runs of the other runtimes stay beside it.

Histories are the split's test histories with `--split` (raw ids from users' data), else
random histories of 5 to 100 catalogue items (seeded). Loopback only; stops by itself.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serve_mixed import serve_env, stop_server  # noqa: E402  (the benchmarks folder: the script's own)
from serving_profile import write_section  # noqa: E402

BEGIN, END = "<!-- serve_load.py: begin -->", "<!-- serve_load.py: end -->"
RSS_EVERY_S = 1.0


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def histories_for(exp, split_dir: str | None, n: int, seed: int = 0) -> list[list[str]]:
    if split_dir:
        from distill.data import load_split
        split = load_split(split_dir)
        if split.hash != exp.manifest["split_hash"]:
            raise SystemExit(f"--split {split_dir}: split {split.hash}, the export was built from {exp.manifest['split_hash']}")
        hist = split.history("test")
        return [[split.items[i] for i in hist.row(u % split.n_users)] for u in range(n)]
    rng = np.random.default_rng(seed)
    return [[exp.raw_ids[i] for i in rng.choice(np.arange(1, exp.n_items + 1), size=min(exp.n_items - 1, int(rng.integers(5, 101))),
                                                replace=False)] for _ in range(n)]


# ---------------------------------------------------------------- in process

def in_process(exp, hists: list[list[str]], threads: int) -> dict:
    import torch
    from distill.histories import Histories
    torch.set_num_threads(threads)
    rec = exp.recommender
    rows = [exp.to_internal(h) for h in hists]
    clock = time.perf_counter

    def batches(b):
        return [Histories.from_rows(rows[i:i + b]) for i in range(0, len(rows) - b + 1, b)]

    out = {"threads": threads, "throughput": {}, "cpu_throughput": {}}
    for b in (1, 32, 256, 1024):
        hs = batches(b)[: (256 if b == 1 else 2048) // b]
        rec.top_k(hs[0], 10, exclude_seen=exp.mask_history)  # warm-up
        passes, cpu = [], []
        for _ in range(3):
            t, c = clock(), time.process_time()
            for h in hs:
                rec.top_k(h, 10, exclude_seen=exp.mask_history)
            passes.append(clock() - t)
            cpu.append(time.process_time() - c)
        out["throughput"][b] = len(hs) * b / float(np.median(passes))
        out["cpu_throughput"][b] = len(hs) * b / float(np.median(cpu))  # users per CPU-second (all threads)
    lat, lat_cpu = [], []
    for h in batches(1)[:256]:
        t, c = clock(), time.thread_time()
        rec.top_k(h, 10, exclude_seen=exp.mask_history)
        lat.append((clock() - t) * 1000)
        lat_cpu.append((time.thread_time() - c) * 1000)
    out["latency_ms"] = {"p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
                         "cpu_p50": float(np.percentile(lat_cpu, 50))}
    # encoder alone at batch 1,024 (chunked as in serving), and FLOP/s
    hs = batches(1024)
    widths = [min(rec.max_len, int(h.lengths.max())) for h in hs]
    enc = []
    for _ in range(3):
        t = clock()
        for h in hs:
            rec.encode(h)
        enc.append(clock() - t)
    users = len(hs) * 1024
    flops = float(rec.model.encoder_flops(np.array(widths)).sum()) * 1024
    # per user, the histories' own widths (the batch is padded to its longest, so that is what runs)
    out["encode_users_per_s"] = users / float(np.median(enc))
    out["encode_gflops"] = flops / float(np.median(enc)) / 1e9
    out["flops_per_user"] = {"encode": float(rec.model.encoder_flops(max(widths))),
                             "score": 2.0 * rec.model.cfg.hidden_size * rec.n_rows}
    a, b_ = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b_)
    mm = []
    for _ in range(5):
        t = clock()
        torch.mm(a, b_)
        mm.append(clock() - t)
    out["matmul_gflops"] = 2 * 2048 ** 3 / float(np.median(mm)) / 1e9
    return out


# ---------------------------------------------------------------- over HTTP

def rss_bytes(pid: int) -> int:
    import psutil
    p = psutil.Process(pid)
    return sum(q.memory_info().rss for q in [p] + p.children(recursive=True))


def bad_requests(exp, max_history: int) -> list[tuple[str, bytes, str, str]]:
    """(path, body, content type, what) for each bad input the load test sends."""
    good = [exp.raw_ids[1], exp.raw_ids[2]]
    j = lambda o: json.dumps(o).encode()
    return [("/recommend", j({"history": good + ["no-such-item"]}), "application/json", "unknown id"),
            ("/recommend", j({"history": []}), "application/json", "empty history"),
            ("/recommend", j({"history": good, "k": 0}), "application/json", "k = 0"),
            ("/recommend", j({"history": good, "k": exp.n_items + 1}), "application/json", "k > catalogue"),
            ("/recommend", j({"history": good[0]}), "application/json", "history not a list"),
            ("/recommend", j({"history": list(range(1_000_000))}), "application/json", "a million ids"),
            ("/recommend", j({"history": ["1"] * (max_history + 1)}), "application/json", "history too long"),
            ("/recommend", b'{"history": [1, 2', "application/json", "malformed JSON"),
            ("/recommend", j({"history": good}), "text/plain", "wrong content type"),
            ("/recommend/batch", j({"histories": [good, []]}), "application/json", "empty history in a batch")]


def http_load(args, exp, hists: list[list[str]]) -> dict:
    from distill.server import MAX_HISTORY
    port = free_port()
    cmd = [sys.executable, "-m", "distill.cli", "serve", args.export, "--port", str(port),
           "--workers", str(args.workers), "--threads", str(args.threads), "--runtime", exp.recommender.runtime]
    server = subprocess.Popen(cmd, cwd=ROOT, env=serve_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    c.close()
                    break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start: {server.stderr.read().decode()[-2000:] if server.poll() is not None else 'timeout'}")
            time.sleep(0.2)
        rss_start = rss_bytes(server.pid)
        import psutil
        cpu0 = sum(sum(q.cpu_times()[:2]) for q in [psutil.Process(server.pid)] + psutil.Process(server.pid).children(recursive=True))
        bodies = [json.dumps({"history": h, "k": 10}).encode() for h in hists]
        stop = threading.Event()
        lock = threading.Lock()
        lat: list[float] = []
        errors: dict[str, int] = {}
        count = [0]

        def note_error(what):
            with lock:
                errors[what] = errors.get(what, 0) + 1

        def client(i: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            headers = {"content-type": "application/json"}
            mine, j = [], i
            while not stop.is_set():
                with lock:
                    if count[0] >= args.max_requests:
                        break
                    count[0] += 1
                body = bodies[j % len(bodies)]
                j += args.clients
                t = time.perf_counter()
                try:
                    conn.request("POST", "/recommend", body, headers)
                    r = conn.getresponse()
                    data = r.read()
                    dt = (time.perf_counter() - t) * 1000
                    if r.status != 200 or not json.loads(data)["items"]:
                        note_error(f"HTTP {r.status}")
                    else:
                        mine.append(dt)
                except (OSError, http.client.HTTPException) as e:
                    note_error(type(e).__name__)
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.close()
            with lock:
                lat.extend(mine)

        bad = bad_requests(exp, MAX_HISTORY)
        bad_results: list[tuple[str, int]] = []

        def bad_client() -> None:
            n = 0
            while not stop.is_set() and n < 20 * len(bad):
                path, body, ctype, what = bad[n % len(bad)]
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                try:
                    conn.request("POST", path, body, {"content-type": ctype})
                    bad_results.append((what, conn.getresponse().status))
                except (OSError, http.client.HTTPException):
                    bad_results.append((what, -1))
                finally:
                    conn.close()
                n += 1
                stop.wait(0.25)

        rss_samples = [rss_start]

        def rss_sampler() -> None:
            while not stop.wait(RSS_EVERY_S):
                rss_samples.append(rss_bytes(server.pid))

        workers = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        workers += [threading.Thread(target=bad_client), threading.Thread(target=rss_sampler)]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        stop.wait(args.seconds)
        stop.set()
        for w in workers:
            w.join(timeout=60)
        elapsed = time.perf_counter() - t0
        rss_end = rss_bytes(server.pid)
        cpu1 = sum(sum(q.cpu_times()[:2]) for q in [psutil.Process(server.pid)] + psutil.Process(server.pid).children(recursive=True))
        # the server still answers after everything
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("POST", "/recommend", bodies[0], {"content-type": "application/json"})
        after = c.getresponse().status
        c.close()
    finally:
        stop_server(server)
    ok = np.asarray(lat)
    return {"requests": len(ok), "seconds": elapsed, "rps": len(ok) / elapsed,
            "p50": float(np.percentile(ok, 50)), "p95": float(np.percentile(ok, 95)),
            "p99": float(np.percentile(ok, 99)), "errors": errors,
            "bad": {"sent": len(bad_results), "answered_4xx": sum(400 <= s < 500 for _, s in bad_results),
                    "kinds": sorted({what for what, _ in bad_results}),
                    "not_4xx": sorted({f"{w}: {s}" for w, s in bad_results if not 400 <= s < 500})},
            "rss_start": rss_start, "rss_end": rss_end, "rss_max": max(rss_samples + [rss_end]),
            "rss_samples": len(rss_samples) + 1, "after_status": after,
            "server_cpu_ms_per_request": (cpu1 - cpu0) * 1000 / max(1, len(ok) + len(bad_results))}


# ---------------------------------------------------------------- report

def section(results: dict) -> str:
    """The Markdown between the markers, from every stored run."""
    lines = [BEGIN, "## In process (`benchmarks/serve_load.py`: encode + top-10, history masked)", "",
             "Wall-clock users/s; in brackets users per CPU-second of this process (less sensitive to the other jobs "
             "on the machine). Latency p50 / p95 wall-clock at batch 1, p50 of the thread's CPU time in brackets. "
             "`load` is `uptime`'s 1/5/15-minute load average before -> after the part.", "",
             "| label | runtime | threads | batch 1 | batch 32 | batch 256 | batch 1,024 | p50 / p95 at batch 1 | "
             "encoder alone at 1,024 | encoder FLOP/s | matmul peak | share of peak | load | source |",
             "|---" * 14 + "|"]
    for label, r in results.items():
        for p in r["in_process"]:
            t, c = p["throughput"], p["cpu_throughput"]
            lines.append(f"| {label} | {r['runtime']} | {p['threads']} | "
                         + " | ".join(f"{t[b]:,.0f} ({c[b]:,.0f})" for b in ("1", "32", "256", "1024"))
                         + f" | {p['latency_ms']['p50']:.2f} / {p['latency_ms']['p95']:.2f} ms "
                         f"({p['latency_ms']['cpu_p50']:.2f} ms) | {p['encode_users_per_s']:,.0f} users/s | "
                         f"{p['encode_gflops']:.1f} GFLOP/s | {p['matmul_gflops']:.1f} GFLOP/s | "
                         f"{p['encode_gflops'] / p['matmul_gflops']:.0%} | {p['load']} | {r['source']} |")
    f = next((r["flops_per_user"] for r in results.values() if "flops_per_user" in r), {"encode": 0.0, "score": 0.0})
    lines += ["", f"FLOPs per user (2 x multiply-adds, the longest history of a batch): encoder {f['encode'] / 1e6:.2f} M, "
              f"scoring against the catalogue {f['score'] / 1e6:.2f} M (LayerNorm, GELU, softmax not counted); the "
              "share of peak is the encoder's FLOP/s against a 2,048^3 torch sgemm with the same threads, measured "
              "in the same run.", ""]
    http_runs = {label: r for label, r in results.items() if r.get("http")}
    if http_runs:
        lines += ["## Over HTTP (`anyo serve`, POST /recommend, k = 10)", "",
                  "| label | runtime | clients | workers x threads | seconds | requests | requests/s | p50 | p95 | p99 | "
                  "errors (good requests) | bad inputs answered 4xx | server RSS start / max / end | server CPU per "
                  "request | load | source |", "|---" * 16 + "|"]
        for label, r in http_runs.items():
            h, b = r["http"], r["http"]["bad"]
            lines.append(f"| {label} | {r['runtime']} | {r['clients']} | {r['workers']} x {r['threads']} | "
                         f"{h['seconds']:.1f} | {h['requests']:,} | {h['rps']:,.0f} | {h['p50']:.2f} ms | "
                         f"{h['p95']:.2f} ms | {h['p99']:.2f} ms | {sum(h['errors'].values())} | "
                         f"{b['answered_4xx']} of {b['sent']} | {h['rss_start'] / 2**20:.0f} / "
                         f"{h['rss_max'] / 2**20:.0f} / {h['rss_end'] / 2**20:.0f} MiB ({h['rss_samples']} samples) | "
                         f"{h['server_cpu_ms_per_request']:.2f} ms | {h['load']} | {r['source']} |")
        kinds = sorted({k for r in http_runs.values() for k in r["http"]["bad"]["kinds"]})
        notes = [f"{label}: not 4xx {', '.join(r['http']['bad']['not_4xx'])}" for label, r in http_runs.items()
                 if r["http"]["bad"]["not_4xx"]]
        notes += [f"{label}: errors {json.dumps(r['http']['errors'])}" for label, r in http_runs.items()
                  if r["http"]["errors"]]
        notes += [f"{label}: a good request after the load answered HTTP {r['http']['after_status']}"
                  for label, r in http_runs.items() if r["http"]["after_status"] != 200]
        lines += ["", f"Bad inputs sent during the load, in turn, each every 0.25 s: {', '.join(kinds)}. "
                  + (" ".join(notes) + "." if notes else "A good request after each load: HTTP 200.")
                  + f" RSS is sampled every {RSS_EVERY_S:g} s. The clients run in one Python process (threads, "
                  "`http.client`, keep-alive) on the same 2 cores as the server.", ""]
    lines += ["## Targets (issue 26)", "", "| target | measured | met | source |", "|---|---|---|---|"]
    procs = [(label, r, p) for label, r in results.items() for p in r["in_process"] if p["threads"] == 2]
    if procs:
        label, r, p = max(procs, key=lambda x: x[2]["throughput"]["1024"])
        lines.append(f"| in process, 2 threads: >= 15,000 users/s at batch 1,024 | {p['throughput']['1024']:,.0f} "
                     f"users/s ({label}) | {'yes' if p['throughput']['1024'] >= 15_000 else 'no'} | {r['source']} |")
        label, r, p = min(procs, key=lambda x: x[2]["latency_ms"]["p50"])
        lines.append(f"| in process, 2 threads: p50 <= 0.5 ms at batch 1 | {p['latency_ms']['p50']:.2f} ms ({label}) "
                     f"| {'yes' if p['latency_ms']['p50'] <= 0.5 else 'no'} | {r['source']} |")
    for label, r in http_runs.items():
        h = r["http"]
        lines += [f"| HTTP, {r['clients']} clients: p50 <= 3 ms, p99 <= 15 ms | p50 {h['p50']:.2f} ms, p99 "
                  f"{h['p99']:.2f} ms ({label}) | {'yes' if h['p50'] <= 3 and h['p99'] <= 15 and r['clients'] >= 8 else 'no'} "
                  f"| {r['source']} |",
                  f"| HTTP: 0 errors among good requests, every bad input 4xx | {sum(h['errors'].values())} errors, "
                  f"{h['bad']['answered_4xx']} of {h['bad']['sent']} 4xx ({label}) | "
                  f"{'yes' if not h['errors'] and h['bad']['answered_4xx'] == h['bad']['sent'] else 'no'} | {r['source']} |"]
    lines.append(END)
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", required=True, help="an `anyo export` folder")
    ap.add_argument("--split", default=None, help="RUN/split: use its test histories (else random histories)")
    ap.add_argument("--runtime", default=None, help="encoder runtime (default: the export's default)")
    ap.add_argument("--label", default=None, help="the name these figures are stored under (default: the runtime)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--max-requests", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each server worker")
    ap.add_argument("--in-process-threads", default="1,2", help="torch thread counts measured in process")
    ap.add_argument("--no-http", action="store_true")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "serve_load.json"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "serving.md"))
    args = ap.parse_args()
    if not 1 <= args.clients <= 64 or not 0 < args.seconds <= 600:
        raise SystemExit("--clients must be 1..64 and --seconds 0..600")
    from distill.exported import load_export
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    exp = load_export(args.export, runtime=args.runtime)
    hists = histories_for(exp, args.split, 2048)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}"
    cmd = "python benchmarks/serve_load.py " + " ".join(sys.argv[1:])
    entry = {"runtime": exp.recommender.runtime, "clients": args.clients, "workers": args.workers,
             "threads": args.threads, "machine": machine, "date": date, "source": f"`{cmd}`, {date}",
             "in_process": []}
    for t in [int(x) for x in args.in_process_threads.split(",") if x]:
        before = load_average()
        p = in_process(exp, hists, t)
        p["load"] = f"{before} -> {load_average()}"
        entry["flops_per_user"] = p.pop("flops_per_user")
        entry["in_process"].append(json.loads(json.dumps(p)))  # batch sizes as strings, as stored
        print(json.dumps(p), flush=True)
    if not args.no_http:
        before = load_average()
        entry["http"] = http_load(args, exp, hists)
        entry["http"]["load"] = f"{before} -> {load_average()}"
        print(json.dumps(entry["http"]), flush=True)
    store = Path(args.json)
    results = json.loads(store.read_text()) if store.is_file() else {}
    results[args.label or entry["runtime"]] = entry
    store.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    write_section(Path(args.out), section(results), BEGIN, END)
    print(f"wrote {args.out} and {store}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
