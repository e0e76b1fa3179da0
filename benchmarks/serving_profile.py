"""Where the in-process serving time goes, and what the serving path reaches, on each runtime.

    python benchmarks/serving_profile.py --export DIR --split RUN/split [--threads 2] [--runs 3]
                                         [--label after] [--json benchmarks/serving_profile.json]
                                         [--out benchmarks/serving.md]

The path is `distill.exported.Exported` / `distill.recommender.Recommender`, what `anyo recommend` and
`anyo serve` run (HTTP excluded). For each runtime (onnxruntime, torch), with `--threads` threads:

1. Profile: the time per user of each stage at batch 1 and at batch 1,024: raw ids to internal ids, padding,
   the encoder, the exclusions of the ranking protocol, scoring + top-10, the answer as JSON (median of
   `--runs` passes over the same users).
2. In process: latency p50 at batch 1 (encode + top-10, history masked, internal ids: `Recommender.top_k`)
   over `--singles` users (default 256), and users/s at batch 1,024 over 2,048 users; median of `--runs` runs.

Histories are the split's test histories (raw ids, as a client sends them). Each run's figures are stored in
`--json` under `--label` (with the UTC date and time, the commit, `uptime`'s load before and after each runtime's
runs), so a profile taken before a change stays beside the one after it; the section between the markers in `--out`
is rewritten from that file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BEGIN, END = "<!-- serving_profile.py: begin -->", "<!-- serving_profile.py: end -->"
STAGES = ("ids", "pad", "encode", "mask", "top-10", "JSON")
clock = time.perf_counter


def _median_time(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t = clock()
        fn()
        times.append(clock() - t)
    return float(np.median(times))


def profile(exp, raw: list[list[str]], batch: int, runs: int, singles: int) -> dict:
    """Seconds per user of each stage, the batches of `raw` at size `batch` served one after the other (the
    first `singles` users at batch 1)."""
    from distill.histories import Histories
    from distill.search import ranking_exclusions
    rec = exp.recommender
    raw = raw[:singles] if batch == 1 else raw
    groups = [raw[i:i + batch] for i in range(0, len(raw) - batch + 1, batch)]
    rows = [[exp.to_internal(h) for h in g] for g in groups]
    hists = [Histories.from_rows(r) for r in rows]
    widths = [max(1, min(rec.max_len, int(h.lengths.max()))) for h in hists]
    users = [rec.encode(h) for h in hists]
    excl = [ranking_exclusions(h, rec.n_rows, exp.mask_history) for h in hists]
    import torch
    with torch.inference_mode():
        tops = [rec._torch_top_k(u, e, 10) for u, e in zip(users, excl)]
    titles, ids_of = exp.titles, exp.raw_ids

    def answer(ids, scores):
        return json.dumps({"results": [{"items": [{"item": ids_of[i], "title": titles[i], "score": s}
                                                   for i, s in zip(r, q) if i > 0]}
                                       for r, q in zip(ids.tolist(), scores.tolist())]}, separators=(",", ":"))

    def top10():
        with torch.inference_mode():
            for u, e in zip(users, excl):
                rec._torch_top_k(u, e, 10)

    stage = {
        "ids": lambda: [[exp.to_internal(h) for h in g] for g in groups],
        "pad": lambda: [Histories.from_rows(r).padded(w) for r, w in zip(rows, widths)],
        "encode": lambda: [rec.encode(h) for h in hists],
        "mask": lambda: [ranking_exclusions(h, rec.n_rows, True) for h in hists],
        "top-10": top10,
        "JSON": lambda: [answer(*t) for t in tops],
    }
    n = len(groups) * batch
    out = {name: _median_time(fn, runs) / n for name, fn in stage.items()}
    out["total"] = sum(out.values())
    out["served"] = _median_time(lambda: [exp.recommend_many(g, 10) for g in groups], runs) / n
    return out


def in_process(exp, raw: list[list[str]], runs: int, singles: int) -> dict:
    """Latency p50 at batch 1 (`singles` users, one at a time) and users/s at batch 1,024 (2,048 users)."""
    from distill.histories import Histories
    rec = exp.recommender
    rows = [exp.to_internal(h) for h in raw]
    singles = [Histories.from_rows([r]) for r in rows[:singles]]
    big = [Histories.from_rows(rows[i:i + 1024]) for i in range(0, 2048, 1024)]
    p50s, rates = [], []
    for _ in range(runs):
        rec.top_k(singles[0], 10, exclude_seen=exp.mask_history)
        lat = []
        for h in singles:
            t = clock()
            rec.top_k(h, 10, exclude_seen=exp.mask_history)
            lat.append(clock() - t)
        p50s.append(float(np.median(lat)) * 1000)
        rates.append(_users_per_s(rec, big, exp.mask_history))
    return {"p50_ms": float(np.median(p50s)), "users_per_s_1024": float(np.median(rates)),
            "p50_runs": p50s, "rate_runs": rates}


def _users_per_s(rec, batches, exclude_seen: bool) -> float:
    rec.top_k(batches[0], 10, exclude_seen=exclude_seen)
    t = clock()
    for h in batches:
        rec.top_k(h, 10, exclude_seen=exclude_seen)
    return sum(len(h) for h in batches) / (clock() - t)


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def commit() -> str:
    p = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return p.stdout.strip()


def section(results: dict) -> str:
    """The Markdown between the markers: per label and runtime, the profile and the in-process figures."""
    lines = [BEGIN, "## In process, profiled (`benchmarks/serving_profile.py`)", "",
             "Microseconds per user of each stage of `Exported.recommend_many` (`anyo serve` minus HTTP), test "
             "histories, top-10, history masked; `served` is the whole call timed on its own. Targets (issue 26): "
             "p50 <= 0.5 ms at batch 1, >= 15,000 users/s at batch 1,024, 2 threads.", "",
             "| label | runtime | threads | batch | " + " | ".join(STAGES) + " | total | served | source |",
             "|---" * (len(STAGES) + 7) + "|"]
    for label, r in results.items():
        for runtime, p in r["runtimes"].items():
            for batch in ("1", "1024"):
                f = p["profile"][batch]
                lines.append(f"| {label} | {runtime} | {r['threads']} | {int(batch):,} | "
                             + " | ".join(f"{f[s] * 1e6:.1f}" for s in STAGES)
                             + f" | {f['total'] * 1e6:.1f} | {f['served'] * 1e6:.1f} | {r['source']} |")
    lines += ["", "| label | runtime | threads | p50 at batch 1 | users/s at batch 1,024 | runs | load (uptime) | "
              "source |", "|---|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        for runtime, p in r["runtimes"].items():
            q = p["in_process"]
            load = p.get("load", r["load"])  # before -> after this runtime's runs; older entries: at the start
            lines.append(f"| {label} | {runtime} | {r['threads']} | {q['p50_ms']:.3f} ms | "
                         f"{q['users_per_s_1024']:,.0f} | {len(q['p50_runs'])} | {load} | {r['source']} |")
    lines += ["", "Each figure is the median of its runs; `load` is `uptime`'s 1/5/15-minute load average before -> "
              "after the runtime's runs (at the start of the whole run for the older entries; the machine's 2 cores "
              "are shared with other jobs).", END]
    return "\n".join(lines)


def write_section(path: Path, text: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the part of `path` between the markers `begin` and `end` by `text` (which carries them), or append
    it; the rest of the file (other scripts' sections, prose) is left as it is."""
    old = path.read_text() if path.is_file() else "# Serving benchmark\n"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + text + rest.split(end, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(new)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", required=True, help="an `anyo export` folder")
    ap.add_argument("--split", required=True, help="RUN/split the export was built from: its test histories")
    ap.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime threads")
    ap.add_argument("--runs", type=int, default=3, help="runs per figure (the median counts)")
    ap.add_argument("--runtimes", default="onnxruntime,torch")
    ap.add_argument("--singles", type=int, default=256, help="users timed one at a time (batch 1)")
    ap.add_argument("--label", default="after", help="the name these figures are stored under (before, after)")
    ap.add_argument("--date", default=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "serving_profile.json"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "serving.md"))
    args = ap.parse_args()
    if args.threads < 1 or args.runs < 1 or args.singles < 1:
        raise SystemExit("--threads, --runs and --singles must be >= 1")
    import torch
    from distill.data import load_split
    from distill.exported import load_export
    torch.set_num_threads(args.threads)
    split = load_split(args.split)
    hist = split.history("test")
    raw = [[split.items[i] for i in hist.row(u % split.n_users)] for u in range(2048)]
    cmd = "python benchmarks/serving_profile.py " + " ".join(sys.argv[1:])
    at = commit()
    entry = {"threads": args.threads, "load": load_average(), "commit": at,
             "source": f"`{cmd}`, {args.date}" + (f", commit {at}" if at else ""), "runtimes": {}}
    for runtime in [r for r in args.runtimes.split(",") if r]:
        exp = load_export(args.export, runtime=runtime)
        if exp.manifest["split_hash"] != split.hash:
            raise SystemExit(f"--split {args.split}: split {split.hash}, the export's is {exp.manifest['split_hash']}")
        before = load_average()
        entry["runtimes"][runtime] = {"profile": {str(b): profile(exp, raw, b, args.runs, args.singles)
                                                  for b in (1, 1024)},
                                      "in_process": in_process(exp, raw, args.runs, args.singles)}
        entry["runtimes"][runtime]["load"] = f"{before} -> {load_average()}"
        print(json.dumps({runtime: entry["runtimes"][runtime]}), flush=True)
    store = Path(args.json)
    results = json.loads(store.read_text()) if store.is_file() else {}
    results[args.label] = entry
    store.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    write_section(Path(args.out), section(results))
    print(f"wrote {args.out} and {store}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
