"""`anyo export`: a trained student of a run as a self-contained folder a service loads without the run.

    DIR/model.safetensors   the SASRec weights (as in RUN/MODEL)
    DIR/config.json         {"model": SASRecConfig, "split_hash", "seed"} (as in RUN/MODEL)
    DIR/items.tsv           item_id, item_token (the raw id in the user's data), title;
                            data row i is internal id i (1..N); id 0 is padding and has no row
    DIR/model.onnx          the encoder (left-padded int64 histories (B, T) -> (B, d) user vectors), batch and
                            length dynamic, for ONNX Runtime; checked against the torch model before it is written
    DIR/model.int8.onnx     with --quantize int8 only: model.onnx through ONNX Runtime's dynamic int8 quantisation,
                            its test NDCG@10 / HR@10 against model.onnx's measured first (distill.quantized)
    DIR/items.faiss         faiss.write_index of an IndexFlatIP over the item table (N+1 rows,
                            row 0 padding, never returned)
    DIR/metrics.json        the model's test metrics record (as in RUN/MODEL)
    DIR/README.md           the model card
    DIR/manifest.json       format, model, split hash, catalogue size, the ranking protocol the model was
                            evaluated with (served by default), the ONNX opset and parity check, the int8 encoder's
                            settings, parity and measured quality (`onnx.int8`, when written), sha256 of every file

The export is written only from a run `anyo verify` calls ok (`distill.verify.check_run`); the manifest seals
itself (`manifest_sha256`). `distill.exported.load_export` checks it and every listed hash before it reads
anything and refuses a missing or edited file with an ArtifactError naming it (the CLI prints it on one line and
exits 2).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import faiss
import numpy as np
import torch

from distill.artifacts import atomic_dir, json_digest, read_json, sha256_file
from distill.data import Split, load_split
from distill.errors import AnyoError, ArtifactError
from distill.exported import EXPORT_FORMAT, EXPORT_KIND, FILES, INT8_FILE, MANIFEST_DIGEST, verify_export
from distill.quantized import int8_quality
from distill.recommender import INT8_OPTIONS, int8_encoder, onnx_encoder, onnx_session
from distill.runs import MODELS
from distill.search import describe_protocol
from distill.serve_config import QUANTIZATIONS
from distill.verify import check_run
from student.model import load_student

EXPORTABLE = [name for name, entry in MODELS.items() if entry.exportable]
PARITY_USERS = 256       # test histories (seeded sample) encoded by both runtimes before model.onnx is written
PARITY_SEED = 0
PARITY_TOLERANCE = 1e-4  # largest |onnx - torch| of a user vector, relative to the largest |torch| component


def onnx_parity(model, onnx: bytes, split: Split, users: int = PARITY_USERS, seed: int = PARITY_SEED) -> dict:
    """Encode a seeded sample of test histories with torch and with ONNX Runtime, in batches of 1 and of the
    whole sample (each padded to its longest history, as served); the largest difference, relative."""
    hist = split.history("test")
    pick = np.sort(np.random.default_rng(seed).choice(len(hist), size=min(users, len(hist)), replace=False))
    rows = hist.take(pick)
    session = onnx_session(onnx, torch.get_num_threads())
    worst, scale = 0.0, 0.0
    for lo, hi in [(i, i + 1) for i in range(min(8, len(pick)))] + [(0, len(pick))]:
        batch = rows.take(np.arange(lo, hi))
        padded = batch.padded(max(1, min(int(model.cfg.max_len), int(batch.lengths.max()))))
        with torch.inference_mode():
            want = model.encode_users(torch.from_numpy(padded)).numpy()
        got = session.run(None, {"history": padded})[0]
        worst = max(worst, float(np.abs(got - want).max()))
        scale = max(scale, float(np.abs(want).max()))
    return {"users": int(len(pick)), "seed": seed, "max_abs_diff": worst,
            "relative_diff": worst / max(scale, 1e-12), "tolerance": PARITY_TOLERANCE}


def _is_previous_export(folder: Path) -> bool:
    """True when `folder` holds exactly an intact export's files (so replacing it deletes nothing else): a
    hand-made manifest.json does not make a folder an export."""
    try:
        manifest = verify_export(folder)
    except AnyoError:
        return False
    names = {p.name for p in folder.iterdir()}
    return names <= set(manifest["files"]) | {"manifest.json"}


def check_out(run: Path, out: Path) -> None:
    if out.is_symlink():
        raise AnyoError(f"--out {out}: is a symbolic link (to {os.readlink(out)}); export to a real folder")
    r, o = run.resolve(), out.resolve()
    if o == r or r in o.parents:
        raise AnyoError(f"--out {out}: inside the run folder {run}; export to a folder outside the run")
    if o in r.parents:
        raise AnyoError(f"--out {out}: contains the run folder {run}; export to a folder outside the run")
    if out.exists() and not out.is_dir():
        raise AnyoError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not _is_previous_export(out):
        raise AnyoError(f"--out {out}: an existing non-empty folder that is not an anyo export; "
                        "choose a new or empty folder (nothing was deleted)")


def _fmt(x) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def _repeats(metrics: dict, split_manifest: dict) -> str:
    n = metrics.get("repeated_targets")
    if n is None:
        return "repeat consumption not recorded by this run;"
    return f"{n:,} of {split_manifest.get('n_users', '?'):,} test targets repeat an item of their history;"


def model_card(model_name: str, cfg: dict, params: int, split_manifest: dict, metrics: dict,
               cost: dict | None, machine: dict | None, recipe: str | None, onnx: dict) -> str:
    m = split_manifest
    mask_history = bool(metrics.get("mask_history", True))
    data = Path(m.get("inputs", {}).get("inter") or "?").stem
    lines = [f"# anyo export: {model_name} ({MODELS[model_name].label})", "",
             "A SASRec next-item recommender (pre-LN causal self-attention, item table tied to the input "
             "embedding) exported by `anyo export`. Give it a user's history (raw item ids, oldest first) "
             "and it returns the top-K next items by inner product with the item table.", "",
             "```", "anyo recommend DIR --history ID,ID,... -k 10", "anyo serve DIR --port 8000", "```", "",
             "## Model", "",
             f"- hidden size {cfg['hidden_size']}, {cfg['num_layers']} layers, {cfg['num_heads']} heads, "
             f"reads the last {cfg['max_len']} items of a history",
             f"- {params:,} parameters; catalogue of {cfg['n_items']:,} items (`items.tsv`, `items.faiss`)", "",
             "## Data", "",
             f"- data set `{data}`: {m.get('n_users', '?'):,} users, {m.get('n_items', '?'):,} items, "
             f"{m.get('n_interactions', '?'):,} interactions",
             "- leave-one-out split by timestamp: last item = test target, second last = validation",
             f"- split hash `{m.get('hash')}` (options {json.dumps(m.get('options', {}), sort_keys=True)})", "",
             "## Test metrics", "",
             f"Full ranking over the whole catalogue, {describe_protocol(mask_history)} "
             f"(mask_history={mask_history}, index {metrics.get('index')}); {_repeats(metrics, m)} "
             f"`anyo recommend` and `anyo serve` rank the same way by default"
             f"{' (`--include-seen` / `include_seen: true` keeps seen items)' if mask_history else ''}. "
             f"HR@1(cand) is the 20-candidate protocol. Seed {metrics.get('seed')}, best epoch "
             f"{metrics.get('best_epoch')}.", ""]
    test = metrics.get("metrics", {})
    keys = [k for k in ("HR@1", "HR@5", "HR@10", "HR@20", "NDCG@10", "NDCG@20", "MRR@10") if k in test]
    cand = metrics.get("candidates", {}).get("HR@1")
    lines += ["| " + " | ".join(keys + ["HR@1(cand)"]) + " |", "|" + "---|" * (len(keys) + 1),
              "| " + " | ".join(_fmt(test[k]) for k in keys) + f" | {_fmt(cand) if cand is not None else '-'} |", ""]
    lines += ["## Serving cost", ""]
    if cost:
        lat = cost.get("latency_ms", {})
        lines += [f"From the run's report (`RUN/report/report.json`), machine: "
                  f"{json.dumps(machine, sort_keys=True) if machine else 'not recorded'}.", "",
                  "| params | checkpoint bytes | peak RSS | latency p50 | latency p95 | users/s |", "|---|---|---|---|---|---|",
                  f"| {cost.get('params', '-'):,} | {cost.get('checkpoint_bytes', '-'):,} | "
                  f"{cost.get('peak_rss_bytes', 0) / 2**20:.0f} MiB | {lat.get('p50', float('nan')):.2f} ms | "
                  f"{lat.get('p95', float('nan')):.2f} ms | {cost.get('throughput_users_per_s', float('nan')):,.0f} |", ""]
    else:
        lines += ["Not measured in this run (no `RUN/report/report.json` with this model's cost).", ""]
    if recipe is not None:
        lines += ["## Recipe", "", "```yaml", recipe.rstrip("\n"), "```", ""]
    lines += ["## Runtimes", "",
              f"`model.onnx` (opset {onnx['opset']}) is the encoder for ONNX Runtime (the default, `--runtime "
              f"onnxruntime`); `model.safetensors` the same weights for torch (`--runtime torch`). On "
              f"{onnx['parity']['users']} seeded test histories the two gave user vectors within "
              f"{onnx['parity']['relative_diff']:.1e} of each other (relative; the export refuses more than "
              f"{onnx['parity']['tolerance']:.0e}).", ""]
    if "int8" in onnx:
        lines += _int8_card(onnx["int8"], onnx["parity"]["users"])
    lines += ["## Files", "", "`manifest.json` lists the sha256 of every file; loading refuses a missing or edited one.", ""]
    return "\n".join(lines)


def _int8_card(int8: dict, parity_users: int) -> list[str]:
    q, o = int8["quality"], int8["options"]
    rows = [("model.onnx (fp32)", q["fp32"]), (f"{INT8_FILE} (int8)", q["int8"]), ("change", q["change"])]
    return ["## int8", "",
            f"`{INT8_FILE}` is `model.onnx` through ONNX Runtime's dynamic quantisation (`quantize_dynamic`: "
            f"{o['weight_type']} weights, per_channel={o['per_channel']}, reduce_range={o['reduce_range']}; "
            f"{int8['bytes']:,} bytes against {int8['fp32_bytes']:,}), served with `--runtime onnxruntime-int8`. "
            f"Measured when exported, on all {q['users']:,} test users ({describe_protocol(q['mask_history'])}, "
            "the item table kept in fp32):", "",
            "| encoder | " + " | ".join(q["change"]) + " |", "|---|" + "---|" * len(q["change"]),
            *[f"| {name} | " + " | ".join(f"{m[k]:+.4f}" if name == "change" else f"{m[k]:.4f}" for k in q["change"])
              + " |" for name, m in rows], "",
            f"On average {q['top10_overlap']:.1%} of a user's top-10 is the same with either encoder; on the "
            f"{parity_users} seeded parity histories the int8 user vectors are within "
            f"{int8['parity']['relative_diff']:.1e} of torch's (relative). Dynamic quantisation scales activations "
            f"by the whole batch's range, so an int8 answer moves a little with the requests `anyo serve` batches it "
            f"with: encoded alone instead of in a batch, the first {q['alone']['users']} test users' vectors moved "
            f"by up to {q['alone']['relative_diff']:.1e} (relative) and kept {q['alone']['top10_overlap']:.1%} of "
            "their top-10.", ""]


def export(run: str | Path, out: str | Path, model_name: str = "student_distilled", quantize: str | None = None) -> dict:
    """Write the export of RUN/MODEL into `out` (with model.int8.onnx when `quantize` is "int8"); returns its
    manifest."""
    run, out = Path(run), Path(out)
    if model_name not in EXPORTABLE:
        raise AnyoError(f"--model {model_name!r}: expected one of {', '.join(EXPORTABLE)}")
    if quantize not in (None, *QUANTIZATIONS):
        raise AnyoError(f"--quantize {quantize!r}: expected one of {', '.join(QUANTIZATIONS)}")
    if not run.is_dir():
        raise AnyoError(f"{run}: run folder not found")
    check_out(run, out)
    src = run / model_name
    if not (src / "model.safetensors").is_file():
        raise ArtifactError(f"{src / 'model.safetensors'}: not found (train {model_name} first)")
    check_run(run)  # only what `anyo verify` calls ok is published
    split = load_split(run / "split")
    model, meta = load_student(src, split.hash, split.n_items)
    metrics = read_json(src / "metrics.json")
    items = model.item_vectors().astype(np.float32)

    cost = machine = None
    report_path = run / "report" / "report.json"
    if report_path.is_file():
        report = read_json(report_path)
        entry = report.get("models", {}).get(model_name, {})
        if report.get("split_hash") == split.hash and "latency_ms" in entry:
            cost, machine = entry, report.get("machine")
    recipe_path = run / "recipe.yaml"
    recipe = recipe_path.read_text() if recipe_path.is_file() else None
    params = sum(p.numel() for p in model.parameters())
    try:
        import onnx as onnx_lib  # the `onnx` extra: the other commands (recommend, serve on torch) run without it
        import onnxruntime  # noqa: F401 - the parity check runs model.onnx
    except ImportError:
        raise AnyoError("anyo export writes and checks model.onnx: install the onnx extra "
                        "(pip install 'anyo-distill[onnx]': onnx and onnxruntime)") from None
    onnx_bytes = onnx_encoder(model)
    parity = onnx_parity(model, onnx_bytes, split)
    if not parity["relative_diff"] <= parity["tolerance"]:
        raise ArtifactError(f"{src / 'model.safetensors'}: the ONNX encoder differs from the torch model by "
                            f"{parity['relative_diff']:.2e} (relative) on {parity['users']} sampled test users, "
                            f"tolerance {parity['tolerance']:.0e}; nothing was exported")
    graph = onnx_lib.load_from_string(onnx_bytes)
    onnx_lib.checker.check_model(graph)
    onnx = {"opset": next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), "parity": parity}
    int8_bytes = None
    if quantize == "int8":
        int8_bytes = int8_encoder(onnx_bytes)
        int8_parity = {k: v for k, v in onnx_parity(model, int8_bytes, split).items() if k != "tolerance"}
        onnx["int8"] = {"file": INT8_FILE, "quantizer": "onnxruntime.quantization.quantize_dynamic",
                        "options": INT8_OPTIONS, "bytes": len(int8_bytes), "fp32_bytes": len(onnx_bytes),
                        "parity": int8_parity,
                        "quality": int8_quality(model, split, onnx_bytes, int8_bytes,
                                                bool(metrics.get("mask_history", True)), metrics.get("index", "Flat"))}

    with atomic_dir(out) as tmp:
        shutil.copyfile(src / "model.safetensors", tmp / "model.safetensors")
        shutil.copyfile(src / "config.json", tmp / "config.json")
        shutil.copyfile(src / "metrics.json", tmp / "metrics.json")
        shutil.copyfile(run / "split" / "items.tsv", tmp / "items.tsv")
        index = faiss.IndexFlatIP(items.shape[1])
        index.add(items)
        faiss.write_index(index, str(tmp / "items.faiss"))
        (tmp / "model.onnx").write_bytes(onnx_bytes)
        if int8_bytes is not None:
            (tmp / INT8_FILE).write_bytes(int8_bytes)
        (tmp / "README.md").write_text(model_card(model_name, meta["model"], params, split.manifest, metrics,
                                                  cost, machine, recipe, onnx))
        manifest = {"kind": EXPORT_KIND, "format": EXPORT_FORMAT, "model": model_name,
                    "split_hash": split.hash, "n_items": split.n_items, "dim": int(items.shape[1]),
                    "mask_history": bool(metrics.get("mask_history", True)), "onnx": onnx,
                    "source": {"run": str(run.resolve()), "seed": meta.get("seed")},
                    "files": {name: sha256_file(tmp / name)
                              for name in FILES + ((INT8_FILE,) if int8_bytes is not None else ())}}
        manifest[MANIFEST_DIGEST] = json_digest(manifest)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def cmd_export(args) -> int:
    manifest = export(args.run, args.out, args.model, args.quantize)
    print(f"exported {manifest['model']} (split {manifest['split_hash']}, {manifest['n_items']:,} items) to {args.out}")
    if "int8" in manifest["onnx"]:
        q = manifest["onnx"]["int8"]["quality"]
        print(f"{INT8_FILE}: test " + ", ".join(f"{k} {q['fp32'][k]:.4f} -> {q['int8'][k]:.4f} ({q['change'][k]:+.4f})"
                                                for k in q["change"])
              + f" on {q['users']:,} users; serve it with --runtime onnxruntime-int8")
    return 0
