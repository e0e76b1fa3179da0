"""A loaded `anyo export` folder: the serving side (`anyo recommend`, `anyo serve`), which needs neither the
run nor the teacher's packages.

`load_export` checks every hash listed in manifest.json before it reads anything and refuses a missing or
edited file with an ArtifactError naming it (the CLI prints it on one line and exits 2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from distill.artifacts import escape_field, json_digest, read_record, read_tsv, sha256_file
from distill.histories import Histories
from distill.errors import AnyoError, ArtifactError
from distill.search import ItemIndex
from distill.recommender import TORCH_MAX_ITEMS, Recommender, default_runtime
from student.model import load_student

EXPORT_FORMAT = 2  # 2: model.onnx, the ranking protocol and the ONNX parity check in the manifest
EXPORT_KIND = "anyo-export"
FILES = ("model.safetensors", "model.onnx", "config.json", "items.tsv", "items.faiss", "metrics.json", "README.md")
INT8_FILE = "model.int8.onnx"  # `anyo export --quantize int8`: listed in the manifest (and so sealed) when written
MANIFEST_DIGEST = "manifest_sha256"   # the manifest's own seal, over every other key


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
    recommender: Recommender
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

    @property
    def mask_history(self) -> bool:
        """The ranking protocol the model was evaluated with (distill.search.ranking_exclusions), served by
        default: True excludes the history's items, False keeps them rankable (repeat consumption)."""
        return bool(self.manifest["mask_history"])

    def excludes_seen(self, include_seen: bool | None) -> bool:
        """Whether an answer excludes the history's items: as asked, else the evaluated protocol (`mask_history`):
        served = published."""
        return self.mask_history if include_seen is None else not include_seen

    def internal_rows(self, histories: list, field: str = "histories") -> list[np.ndarray]:
        """Each history's internal ids; an unknown id is named by `field` (and the history's index for
        "histories")."""
        return [self.to_internal(h, f"{field}[{n}]" if field == "histories" else field)
                for n, h in enumerate(histories)]

    def recommend_many(self, histories: list, k: int = 10, include_seen: bool | None = None,
                       field: str = "histories") -> list[list[dict]]:
        """Top-k for each history of raw ids; include_seen None = the evaluated protocol (`mask_history`)."""
        ids, scores = self.recommender.top_k(Histories.from_rows(self.internal_rows(histories, field)), k,
                                             exclude_seen=self.excludes_seen(include_seen))
        out = []
        raw, titles = self.raw_ids, self.titles
        for row_ids, row_scores in zip(ids.tolist(), scores.tolist()):
            out.append([{"item": raw[i], "title": titles[i], "score": s}
                        for i, s in zip(row_ids, row_scores) if i > 0])
        return out

    def recommend(self, history: list, k: int = 10, include_seen: bool | None = None) -> list[dict]:
        return self.recommend_many([history], k, include_seen, field="history")[0]


def verify_export(folder: Path) -> dict:
    """The manifest, once it matches its own seal and every listed file is present with its hash."""
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: export folder not found")
    manifest = read_record(folder / "manifest.json")
    if manifest.get("kind") != EXPORT_KIND or manifest.get("format") != EXPORT_FORMAT:
        raise ArtifactError(f"{folder / 'manifest.json'}: not an anyo export of format {EXPORT_FORMAT}")
    if json_digest({k: v for k, v in manifest.items() if k != MANIFEST_DIGEST}) != manifest.get(MANIFEST_DIGEST):
        raise ArtifactError(f"{folder / 'manifest.json'}: does not match its own sha256 (edited, or exported by an "
                            f"older anyo: export again)")
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
    raw, titles = ["[PAD]"], [""]
    for n, f in enumerate(read_tsv(path, n_items), start=1):
        if len(f) < 2 or f[0] != str(n):
            raise ArtifactError(f"{path}:{n + 1}: expected item_id {n}")
        raw.append(f[1])
        titles.append(f[2] if len(f) > 2 else "")
    return raw, titles


def load_export(folder: str | Path, torch_max_items: int | None = None, runtime: str | None = None) -> Exported:
    """A verified export; `runtime` onnxruntime (model.onnx), onnxruntime-int8 (model.int8.onnx, when the export
    has it) or torch, default `default_runtime()`."""
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
        item_index = ItemIndex(items)
    runtime = default_runtime() if runtime is None else runtime
    onnx = None
    if runtime == "onnxruntime":
        onnx = (folder / "model.onnx").read_bytes()
    elif runtime == "onnxruntime-int8":
        if INT8_FILE not in manifest["files"]:
            raise AnyoError(f"--runtime onnxruntime-int8: {folder} has no {INT8_FILE} (exported without "
                            f"--quantize int8: export again with it, or serve --runtime onnxruntime)")
        onnx = (folder / INT8_FILE).read_bytes()
    rec = Recommender(model, torch_max_items=limit, index=item_index, runtime=runtime, onnx=onnx)
    id_of = {r: i for i, r in enumerate(raw) if i > 0}
    return Exported(folder, manifest, rec, raw, titles, id_of)



def parse_history(text: str | None, as_json: str | None) -> list[str]:
    """`--history ID,ID,...` (spaces around each id dropped) or `--history-json '["ID", ...]'` (any strings,
    exactly: commas, spaces, a leading `-`)."""
    if as_json is None:
        ids = [t.strip() for t in text.split(",")]
        if not text.strip() or any(t == "" for t in ids):
            raise AnyoError(f"--history {text!r}: expected comma-separated item ids, e.g. 12,7,301 "
                            "(--history-json for ids holding commas or spaces)")
        return ids
    try:
        ids = json.loads(as_json)
    except ValueError as e:
        raise AnyoError(f"--history-json: not valid JSON ({e})") from None
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise AnyoError(f"--history-json {as_json!r}: expected a non-empty JSON array of strings, e.g. [\"12\", \"7\"]")
    return ids


def cmd_recommend(args) -> int:
    exp = load_export(args.dir, runtime=args.runtime)
    history = parse_history(args.history, args.history_json)
    if not 1 <= args.k <= exp.n_items:
        raise AnyoError(f"-k {args.k}: expected 1..{exp.n_items} (the catalogue size)")
    items = exp.recommend(history, args.k, include_seen=args.include_seen)
    if args.json:
        print(json.dumps({"items": items}))
        return 0
    shown = [escape_field(it["item"]) for it in items]  # a tab or newline in an id must not break the table
    width = max([len(s) for s in shown] + [4])
    print(f"{'rank':>4}  {'item':<{width}}  {'score':>9}  title")
    for r, (it, item) in enumerate(zip(items, shown), start=1):
        print(f"{r:>4}  {item:<{width}}  {it['score']:>9.4f}  {escape_field(it['title'])}")
    return 0
