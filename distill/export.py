"""A trained student as a self-contained folder a service loads without the run.

    DIR/model.safetensors   the SASRec weights (as in RUN/MODEL)
    DIR/config.json         {"model": SASRecConfig, "split_hash", "seed"} (as in RUN/MODEL)
    DIR/items.tsv           item_id, item_token (the raw id in the user's data), title;
                            data row i is internal id i (1..N); id 0 is padding and has no row
    DIR/items.faiss         faiss.write_index of an IndexFlatIP over the item table (N+1 rows,
                            row 0 padding, never returned)
    DIR/metrics.json        the model's test metrics record (as in RUN/MODEL)
    DIR/README.md           the model card
    DIR/manifest.json       format, model, split hash, catalogue size, sha256 of every file above

`load_export` checks every listed hash before it reads anything and refuses a missing or
edited file with an ArtifactError naming it (the CLI prints it on one line and exits 2).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distill.artifacts import atomic_dir, read_json, sha256_file
from distill.errors import AnyoError, ArtifactError

EXPORT_FORMAT = 1
EXPORT_KIND = "anyo-export"
MODELS = {"student_distilled": "distilled student", "student_alone": "student alone"}  # folder -> report label
FILES = ("model.safetensors", "config.json", "items.tsv", "items.faiss", "metrics.json", "README.md")


# ---------------------------------------------------------------- export

def _is_previous_export(folder: Path) -> bool:
    """True when `folder` holds exactly an export's files (so replacing it deletes nothing else)."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or manifest.get("kind") != EXPORT_KIND:
        return False
    names = {p.name for p in folder.iterdir()}
    return names <= set(manifest.get("files", {})) | {"manifest.json"}


def check_out(run: Path, out: Path) -> None:
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


def model_card(model_name: str, cfg: dict, params: int, split_manifest: dict, metrics: dict,
               cost: dict | None, machine: dict | None, recipe: str | None) -> str:
    m = split_manifest
    data = Path(m.get("inputs", {}).get("inter") or "?").stem
    lines = [f"# anyo export: {model_name} ({MODELS[model_name]})", "",
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
             f"Full ranking over the whole catalogue, history items excluded "
             f"(mask_history={metrics.get('mask_history')}, index {metrics.get('index')}); "
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
    lines += ["## Files", "", "`manifest.json` lists the sha256 of every file; loading refuses a missing or edited one.", ""]
    return "\n".join(lines)


def export(run: str | Path, out: str | Path, model_name: str = "student_distilled") -> dict:
    """Write the export of RUN/MODEL into `out`; returns its manifest."""
    import faiss
    from distill.data import load_split
    from student.model import load_student

    run, out = Path(run), Path(out)
    if model_name not in MODELS:
        raise AnyoError(f"--model {model_name!r}: expected one of {', '.join(MODELS)}")
    if not run.is_dir():
        raise AnyoError(f"{run}: run folder not found")
    check_out(run, out)
    src = run / model_name
    if not (src / "model.safetensors").is_file():
        raise ArtifactError(f"{src / 'model.safetensors'}: not found (train {model_name} first)")
    split = load_split(run / "split")
    model, meta = load_student(src, split.hash, split.n_items)
    metrics = read_json(src / "metrics.json")
    items = model.item_vectors().astype(np.float32)

    cost = machine = None
    report_path = run / "report" / "report.json"
    if report_path.is_file():
        report = read_json(report_path)
        entry = report.get("models", {}).get(MODELS[model_name], {})
        if report.get("split_hash") == split.hash and "latency_ms" in entry:
            cost, machine = entry, report.get("machine")
    recipe_path = run / "recipe.yaml"
    recipe = recipe_path.read_text() if recipe_path.is_file() else None
    params = sum(p.numel() for p in model.parameters())

    with atomic_dir(out) as tmp:
        shutil.copyfile(src / "model.safetensors", tmp / "model.safetensors")
        shutil.copyfile(src / "config.json", tmp / "config.json")
        shutil.copyfile(src / "metrics.json", tmp / "metrics.json")
        shutil.copyfile(run / "split" / "items.tsv", tmp / "items.tsv")
        index = faiss.IndexFlatIP(items.shape[1])
        index.add(items)
        faiss.write_index(index, str(tmp / "items.faiss"))
        (tmp / "README.md").write_text(model_card(model_name, meta["model"], params, split.manifest, metrics,
                                                  cost, machine, recipe))
        manifest = {"kind": EXPORT_KIND, "format": EXPORT_FORMAT, "model": model_name,
                    "split_hash": split.hash, "n_items": split.n_items, "dim": int(items.shape[1]),
                    "source": {"run": str(run.resolve()), "seed": meta.get("seed")},
                    "files": {name: sha256_file(tmp / name) for name in FILES}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


# ---------------------------------------------------------------- load

class UnknownItems(AnyoError):
    """Raw item ids that are not in the exported catalogue."""

    def __init__(self, field: str, unknown: list[str]):
        self.unknown = unknown
        shown = ", ".join(repr(u) for u in unknown[:10]) + (f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else "")
        super().__init__(f"{field}: unknown item id{'s' if len(unknown) > 1 else ''} {shown}")


@dataclass
class Exported:
    """A loaded export: the model's recommender plus the raw-id catalogue."""

    folder: Path
    manifest: dict
    recommender: object          # distill.recommender.Recommender
    raw_ids: list[str]           # index = internal id; [0] = "[PAD]"
    titles: list[str]
    id_of: dict[str, int]

    @property
    def n_items(self) -> int:
        return len(self.raw_ids) - 1

    def to_internal(self, history, field: str = "history") -> np.ndarray:
        """Raw ids (strings or ints) -> internal ids; every unknown id is named, none dropped."""
        raw = [str(x) for x in history]
        get = self.id_of.get
        ids = [get(r, 0) for r in raw]
        if 0 in ids:
            seen, unknown = set(), []
            for r, i in zip(raw, ids):
                if i == 0 and r not in seen:
                    seen.add(r)
                    unknown.append(r)
            raise UnknownItems(field, unknown)
        return np.asarray(ids, dtype=np.int64)

    def recommend_many(self, histories: list, k: int = 10, include_seen: bool = False,
                       field: str = "histories") -> list[list[dict]]:
        from distill.data import Histories
        rows = [self.to_internal(h, f"{field}[{n}]" if field == "histories" else field)
                for n, h in enumerate(histories)]
        ids, scores = self.recommender.top_k(Histories.from_rows(rows), k, exclude_seen=not include_seen)
        out = []
        raw, titles = self.raw_ids, self.titles
        for row_ids, row_scores in zip(ids.tolist(), scores.tolist()):
            out.append([{"item": raw[i], "title": titles[i], "score": s}
                        for i, s in zip(row_ids, row_scores) if i > 0])
        return out

    def recommend(self, history: list, k: int = 10, include_seen: bool = False) -> list[dict]:
        return self.recommend_many([history], k, include_seen, field="history")[0]


def verify_export(folder: Path) -> dict:
    """The manifest, once every listed file is present with its hash and nothing else is there."""
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: export folder not found")
    manifest = read_json(folder / "manifest.json")
    if manifest.get("kind") != EXPORT_KIND or manifest.get("format") != EXPORT_FORMAT:
        raise ArtifactError(f"{folder / 'manifest.json'}: not an anyo export of format {EXPORT_FORMAT}")
    files = manifest.get("files", {})
    for name in FILES:
        if name not in files:
            raise ArtifactError(f"{folder / 'manifest.json'}: lists no {name}")
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"{path}: missing (listed in manifest.json)")
        if sha256_file(path) != digest:
            raise ArtifactError(f"{path}: content does not match manifest.json (corrupt or edited)")
    return manifest


def _read_items(path: Path, n_items: int) -> tuple[list[str], list[str]]:
    rows = [r for r in path.read_text(encoding="utf-8").split("\n")[1:] if r]
    if len(rows) != n_items:
        raise ArtifactError(f"{path}: {len(rows)} rows, manifest says {n_items}")
    raw, titles = ["[PAD]"], [""]
    for n, r in enumerate(rows, start=1):
        f = r.split("\t")
        if len(f) < 2 or f[0] != str(n):
            raise ArtifactError(f"{path}:{n + 1}: expected item_id {n}")
        raw.append(f[1])
        titles.append(f[2] if len(f) > 2 else "")
    return raw, titles


def load_export(folder: str | Path, torch_max_items: int | None = None) -> Exported:
    import faiss
    from distill.recommender import TORCH_MAX_ITEMS, Recommender
    from student.model import load_student

    folder = Path(folder)
    manifest = verify_export(folder)
    model, meta = load_student(folder, manifest["split_hash"], manifest["n_items"])
    raw, titles = _read_items(folder / "items.tsv", manifest["n_items"])
    index = faiss.read_index(str(folder / "items.faiss"))
    items = model.item_vectors()
    if index.ntotal != len(items) or index.d != items.shape[1]:
        raise ArtifactError(f"{folder / 'items.faiss'}: {index.ntotal} x {index.d}, the model's item table is "
                            f"{items.shape[0]} x {items.shape[1]}")
    if not np.array_equal(index.reconstruct_n(0, index.ntotal), items):
        raise ArtifactError(f"{folder / 'items.faiss'}: vectors differ from the model's item table")
    limit = TORCH_MAX_ITEMS if torch_max_items is None else torch_max_items
    item_index = None
    if len(items) > limit:
        from distill.harness import ItemIndex
        item_index = ItemIndex(items)
    rec = Recommender(model, torch_max_items=limit, index=item_index)
    id_of = {r: i for i, r in enumerate(raw) if i > 0}
    return Exported(folder, manifest, rec, raw, titles, id_of)


# ---------------------------------------------------------------- commands

def cmd_export(args) -> int:
    manifest = export(args.run, args.out, args.model)
    print(f"exported {manifest['model']} (split {manifest['split_hash']}, {manifest['n_items']:,} items) to {args.out}")
    return 0


def parse_history(text: str) -> list[str]:
    ids = [t.strip() for t in text.split(",")]
    if not text.strip() or any(t == "" for t in ids):
        raise AnyoError(f"--history {text!r}: expected comma-separated item ids, e.g. 12,7,301")
    return ids


def cmd_recommend(args) -> int:
    exp = load_export(args.dir)
    history = parse_history(args.history)
    if not 1 <= args.k <= exp.n_items:
        raise AnyoError(f"-k {args.k}: expected 1..{exp.n_items} (the catalogue size)")
    items = exp.recommend(history, args.k, include_seen=args.include_seen)
    if args.json:
        print(json.dumps({"items": items}))
        return 0
    width = max([len(it["item"]) for it in items] + [4])
    print(f"{'rank':>4}  {'item':<{width}}  {'score':>9}  title")
    for r, it in enumerate(items, start=1):
        print(f"{r:>4}  {it['item']:<{width}}  {it['score']:>9.4f}  {it['title']}")
    return 0
