"""The teacher cache: the hand-off between teacher inference and distillation.

    teacher_cache/
      manifest.json                   format, split & teacher hashes, K, dims, dtypes,
                                      positions scored, shard list (rows, sha256)
      shard-00000.safetensors ...     user, position, query, topk_ids (int32), topk_scores
      items.safetensors               the teacher's item vectors ([CF ; text] with a text item side: the
                                      manifest's item_parts names their column ranges)

A query is keyed by (user row, position t): the teacher read seq_u[:t] and its
target is seq_u[t]; validation and test queries are t = len-2 and len-1.
Shard i always holds the same users, whatever the number of ranks, so a cache
written by W processes equals one written by one. Shards are written
atomically and carry their inputs in the safetensors metadata, so a resumed
run keeps exactly the complete shards built from the same teacher.
Reading verifies every shard's sha256 and shape and memory-maps the tensors.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from distill.artifacts import atomic_file, json_digest, read_json, replace_dir, sha256_file, write_json
from distill.errors import ArtifactError, CorruptError, StaleError

CACHE_FORMAT = 1
FIELDS = {"user": np.int64, "position": np.int64, "query": np.float32, "topk_ids": np.int32, "topk_scores": np.float32}
_NP = {"I64": np.int64, "I32": np.int32, "F32": np.float32}


def cache_key(recipe, split, teacher_hash: str) -> dict:
    """The inputs a cache (its manifest and every shard) is built from; `dim` is added by the writer."""
    d = recipe.distill
    return {"split_hash": split.hash, "teacher_hash": teacher_hash, "k": d.k, "positions": d.positions,
            "shard_users": d.shard_users, "mask_history": recipe.eval.mask_history, "index": recipe.eval.index,
            "n_items": split.n_items, "n_users": split.n_users}


def staging_dir(folder: Path) -> Path:
    """Where shards are written until the cache is complete; then it replaces `folder` whole."""
    return folder.with_name(folder.name + ".partial")


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def read_header(path: Path) -> tuple[dict, int]:
    """The safetensors JSON header and the byte offset where tensor data starts."""
    try:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not a readable safetensors file ({e})") from None
    return header, 8 + n


def memmap_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a read-only memory map (nothing is loaded)."""
    header, start = read_header(path)
    size = path.stat().st_size
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        if start + e > size:
            raise CorruptError(f"{path}: truncated (tensor {name} ends past the end of the file)")
        out[name] = np.memmap(path, dtype=_NP[info["dtype"]], mode="r", offset=start + b, shape=tuple(info["shape"]))
    return out


def shard_metadata(path: Path) -> dict:
    """The inputs a shard was built from (split, teacher, K, positions, ...)."""
    raw = read_header(path)[0].get("__metadata__", {}).get("anyo", "{}")
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        raise ArtifactError(f"{path}: unreadable shard metadata") from None


def write_shard(path: Path, tensors: dict[str, np.ndarray], metadata: dict) -> None:
    with atomic_file(path) as tmp:
        save_file({k: np.ascontiguousarray(v, dtype=FIELDS[k]) for k, v in tensors.items()}, str(tmp),
                  metadata={"anyo": json.dumps(metadata, sort_keys=True)})


def complete_cache(staging: Path, folder: Path, n_shards: int, meta: dict, item_table: np.ndarray,
                   fields: dict | None = None) -> dict:
    """Check every shard is in `staging`, hash them, write items + manifest, then put the cache at `folder`
    (an older cache there stays whole until this one is complete); `fields` are added to the manifest."""
    shards = []
    for i in range(n_shards):
        p = staging / shard_name(i)
        if not p.is_file():
            raise ArtifactError(f"{p}: missing; run `anyo teacher infer` again to finish the cache")
        t = memmap_tensors(p)
        shards.append({"file": p.name, "rows": int(len(t["user"])), "sha256": sha256_file(p)})
    extra = [p for p in staging.glob("shard-*.safetensors") if p.name not in {s["file"] for s in shards}]
    for p in extra:  # left by an earlier run with another shard size
        p.unlink()
    with atomic_file(staging / "items.safetensors") as tmp:
        save_file({"item_table": np.ascontiguousarray(item_table, dtype=np.float32)}, str(tmp))
    manifest = {"format": CACHE_FORMAT, **meta, "shards": shards,
                "items": {"file": "items.safetensors", "sha256": sha256_file(staging / "items.safetensors")},
                "dtypes": {k: np.dtype(v).name for k, v in FIELDS.items()}, **(fields or {})}
    manifest["manifest_sha256"] = json_digest(manifest)
    write_json(staging / "manifest.json", manifest)
    replace_dir(staging, folder)
    return manifest


@dataclass
class CacheRows:
    """Teacher outputs for the requested (user, position) pairs that the cache holds."""

    found: np.ndarray        # (n,) bool over the requested pairs
    query: np.ndarray        # (n_found, D)
    topk_ids: np.ndarray     # (n_found, K) int64
    topk_scores: np.ndarray  # (n_found, K)


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_manifest(path: Path, m: dict) -> None:
    """A manifest that matches its own sha256 can still be hand-made: K, dims, counts are counts, and every file
    it lists is a plain name inside the cache folder with its sha256; else CorruptError naming the key."""
    for key in ("k", "dim"):
        if not _count(m.get(key)):
            raise CorruptError(f"{path}: '{key}' is {m.get(key)!r}, expected a count")
    if not isinstance(m.get("shards"), list):
        raise CorruptError(f"{path}: 'shards' is {type(m.get('shards')).__name__}, expected a list")
    for where, entry in [(f"shards[{i}]", s) for i, s in enumerate(m["shards"])] + [("items", m.get("items"))]:
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or \
                not isinstance(entry.get("sha256"), str) or (where != "items" and not _count(entry.get("rows"))):
            raise CorruptError(f"{path}: '{where}' is not a file entry (file, sha256{', rows' if where != 'items' else ''})")
        if Path(entry["file"]).name != entry["file"] or entry["file"] in ("", ".", ".."):
            raise CorruptError(f"{path}: '{where}' names {entry['file']!r}, not a file of the cache folder")


def _check_numbers(path: Path, tensors: dict[str, np.ndarray], n_items: int) -> None:
    """A shard's sha256 says it is what was written, not that a NaN teacher did not write it: vectors are finite,
    top-K ids are items (0..n_items, or -1 with score -inf where fewer than K were left), scores are not NaN
    and -inf only there; else CorruptError naming the tensor and row."""
    ids = tensors.get("topk_ids")
    for name, t in tensors.items():
        if t.dtype.kind != "f":
            continue
        bad = ~np.isfinite(t)
        if name == "topk_scores":
            bad &= ~(np.isneginf(t) & (ids == -1))
        bad = bad.reshape(len(t), -1).any(axis=1)
        if bad.any():
            raise CorruptError(f"{path}: tensor {name} row {int(np.argmax(bad))} holds NaN or inf")
    if ids is not None and ids.size and (int(ids.min()) < -1 or int(ids.max()) > n_items):
        raise CorruptError(f"{path}: tensor topk_ids holds {int(ids.min())}..{int(ids.max())}, "
                           f"outside the items 0..{n_items}")


class TeacherCache:
    """Verified, memory-mapped reader of a complete teacher cache."""

    def __init__(self, folder: str | Path, split_hash: str | None = None, n_items: int | None = None):
        self.folder = Path(folder)
        self.manifest = m = read_json(self.folder / "manifest.json")
        if not isinstance(m, dict) or json_digest({k: v for k, v in m.items() if k != "manifest_sha256"}) \
                != m.get("manifest_sha256"):
            raise CorruptError(f"{self.folder / 'manifest.json'}: does not match its own sha256 (edited or truncated)")
        if m.get("format") != CACHE_FORMAT:
            raise ArtifactError(f"{self.folder / 'manifest.json'}: unknown cache format {m.get('format')}")
        if split_hash is not None and m.get("split_hash") != split_hash:
            raise StaleError(f"{self.folder}: cache built from split {m.get('split_hash')}, this run's split is {split_hash}")
        if n_items is not None and m.get("n_items") != n_items:
            raise StaleError(f"{self.folder}: cache has {m.get('n_items')} items, the split has {n_items}")
        _check_manifest(self.folder / "manifest.json", m)
        self.k, self.dim = m["k"], m["dim"]
        items = self.folder / m["items"]["file"]
        if sha256_file(items) != m["items"]["sha256"]:
            raise CorruptError(f"{items}: sha256 does not match manifest.json")
        table = memmap_tensors(items).get("item_table")
        if table is None or table.ndim != 2:
            raise CorruptError(f"{items}: no 2-D tensor item_table")
        self.item_table = table
        _check_numbers(items, {"item_table": table}, 0)
        self.shards = []
        for s in m["shards"]:
            path = self.folder / s["file"]
            if not path.is_file():
                raise CorruptError(f"{path}: shard missing")
            if sha256_file(path) != s["sha256"]:
                raise CorruptError(f"{path}: sha256 does not match manifest.json (corrupt or tampered shard)")
            t = memmap_tensors(path)
            n = s["rows"]
            want = {"user": (n,), "position": (n,), "query": (n, self.dim), "topk_ids": (n, self.k),
                    "topk_scores": (n, self.k)}
            for name, shape in want.items():
                if name not in t or t[name].shape != shape:
                    raise CorruptError(f"{path}: tensor {name} has shape {t.get(name, np.empty(0)).shape}, expected {shape}")
            _check_numbers(path, t, len(self.item_table) - 1)
            self.shards.append(t)
        self.item_parts = m.get("item_parts", {"cf": [0, self.item_table.shape[1]]})
        # sorted (user, position) keys -> (shard, row)
        self.stride = int(max((int(t["position"].max()) for t in self.shards if len(t["position"])), default=0)) + 1
        keys = [t["user"] * self.stride + t["position"] for t in self.shards]
        where = [np.stack([np.full(len(k), i), np.arange(len(k))], 1) for i, k in enumerate(keys)]
        all_keys = np.concatenate(keys) if keys else np.empty(0, np.int64)
        order = np.argsort(all_keys)
        self.keys = all_keys[order]
        self.where = np.concatenate(where)[order] if where else np.empty((0, 2), np.int64)

    def __len__(self) -> int:
        return len(self.keys)

    def items(self, part: str | None = None) -> np.ndarray:
        """(N+1, D) the teacher's item vectors, or only their `part` ("cf" or "text", teacher.item_side)."""
        if part is None:
            return self.item_table
        lo, hi = self.item_parts[part]
        return self.item_table[:, lo:hi]

    def lookup(self, users: np.ndarray, positions: np.ndarray, k: int | None = None) -> CacheRows:
        """Rows for the pairs present (in request order); `k` keeps the first k of the top-K."""
        k = self.k if k is None else k
        if k > self.k:
            raise ArtifactError(f"distill.k = {k} is larger than the cache's K = {self.k} ({self.folder})")
        q = np.asarray(users, np.int64) * self.stride + np.asarray(positions, np.int64)
        valid = (np.asarray(positions) < self.stride) & (np.asarray(positions) >= 0)
        pos = np.searchsorted(self.keys, q).clip(max=max(len(self.keys) - 1, 0))
        found = valid & (len(self.keys) > 0) & (self.keys[pos] == q if len(self.keys) else False)
        loc = self.where[pos[found]]
        out = {f: np.empty((len(loc),) + self.shards[0][f].shape[1:], dtype=FIELDS[f])
               for f in ("query", "topk_ids", "topk_scores")} if self.shards else {}
        for s in np.unique(loc[:, 0]):
            sel = loc[:, 0] == s
            rows = loc[sel, 1]
            for f in out:
                out[f][sel] = self.shards[s][f][rows]
        return CacheRows(found, out["query"], out["topk_ids"][:, :k].astype(np.int64), out["topk_scores"][:, :k])
