"""Writing artifacts safely: atomic files and folders, content hashes, JSON.

Every artifact is first written under a temporary name in the same folder, then
renamed, so a crash never leaves a half-written file behind under the real name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from distill.errors import ArtifactError, CorruptError


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_files(paths) -> str:
    """One hash over several files (in the given order), e.g. a checkpoint folder."""
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).name.encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def write_json(path: str | Path, obj) -> None:
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_array(path: str | Path, array) -> None:
    """np.save, atomically (a killed or failed write leaves no truncated .npy behind)."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(array), allow_pickle=False)


def load_array(path: str | Path) -> np.ndarray:
    """A .npy file, memory-mapped once its header's shape is checked against the bytes the file holds (a header
    claiming 2^40 rows is refused, never allocated); never unpickled. ArtifactError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found")
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0}.get(version, np.lib.format.read_array_header_2_0)
            shape, _, dtype = read(f)
            start = f.tell()
    except (ValueError, OSError, SyntaxError) as e:
        raise ArtifactError(f"{path}: not a readable .npy array ({' '.join(str(e).split())[:160]})") from None
    if dtype.hasobject:
        raise ArtifactError(f"{path}: holds Python objects (dtype {dtype}); expected numbers")
    claimed = int(np.prod(shape, dtype=object)) * dtype.itemsize
    held = path.stat().st_size - start
    if held != claimed:
        raise ArtifactError(f"{path}: holds {held:,} bytes of data, its header claims {shape} {dtype} "
                            f"({claimed:,} bytes): truncated or not written by numpy")
    return np.load(path, mmap_mode="r" if claimed else None, allow_pickle=False)


def json_digest(obj) -> str:
    """sha256 of a JSON-able object in canonical form (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptError(f"{path}: not valid JSON ({e})") from None


def read_record(path: str | Path, *keys: str) -> dict:
    """A JSON artifact that must be an object holding `keys` (CorruptError otherwise: a list, a number,
    a record missing a key is never read further)."""
    path = Path(path)
    record = read_json(path)
    if not isinstance(record, dict):
        raise CorruptError(f"{path}: expected a JSON object, found {type(record).__name__}")
    missing = [k for k in keys if k not in record]
    if missing:
        raise CorruptError(f"{path}: no {missing[0]!r} (truncated or edited)")
    return record


RECORD_DIGEST = "record_sha256"


def folder_files(folder: Path, *leave_out: str) -> list[Path]:
    """Every file under `folder` (its subfolders too), sorted, less the top-level names in `leave_out`: what a
    stage's record seals."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.relative_to(folder).parts[0] not in leave_out)


def write_record(path: str | Path, record: dict, files=()) -> dict:
    """Write a stage's JSON record sealed with its own sha256 and the sha256 of `files` (in its folder, named by
    their path from there), so an edited record or a swapped, edited or truncated file is found (check_record)
    instead of read as a result."""
    path = Path(path)
    sealed = {k: v for k, v in record.items() if k != RECORD_DIGEST}
    sealed["files"] = {Path(f).relative_to(path.parent).as_posix(): sha256_file(f) for f in files}
    sealed[RECORD_DIGEST] = json_digest(sealed)
    write_json(path, sealed)
    return sealed


def check_record(path: str | Path) -> dict:
    """A record written by write_record, if it and the files it lists are intact (CorruptError otherwise)."""
    path = Path(path)
    record = read_record(path)
    if json_digest({k: v for k, v in record.items() if k != RECORD_DIGEST}) != record.get(RECORD_DIGEST):
        raise CorruptError(f"{path}: does not match its own sha256 (edited, or written by an older anyo)")
    files = record.get("files")
    if not isinstance(files, dict):
        raise CorruptError(f"{path}: no 'files' list")
    for name, digest in files.items():
        f = path.parent / name
        if not f.is_file():
            raise CorruptError(f"{f}: missing")
        if sha256_file(f) != digest:
            raise CorruptError(f"{f}: sha256 does not match {path.name} (truncated or edited)")
    return record


def check_sealed_folder(path: str | Path) -> dict:
    """check_record, and no file of the record's folder is left out of its seal (TensorBoard logs in tb/ aside):
    a stage folder is whole as written, never a sealed record beside a file put there by hand or an older anyo."""
    path = Path(path)
    record = check_record(path)
    unsealed = [p for p in folder_files(path.parent, path.name, "tb")
                if p.relative_to(path.parent).as_posix() not in record["files"]]
    if unsealed:
        raise CorruptError(f"{unsealed[0]}: not sealed by {path} (added by hand, or the stage was written by an "
                           f"older anyo: rerun it)")
    return record


def check_finite(path: str | Path, tensors: dict | None = None) -> None:
    """CorruptError naming the first floating-point tensor of the safetensors file `path` (or of `tensors`, read
    from it) that holds NaN or inf: a model that trained into NaN is not a model, whatever its seal says."""
    for name, tensor in sorted((load_file(str(path)) if tensors is None else tensors).items()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CorruptError(f"{path}: tensor {name} holds NaN or inf")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_OS_ERROR_IN_MESSAGE = re.compile(r"os error (\d+)|code: (\d+)")


def as_os_error(e: BaseException, path: Path) -> BaseException:
    """A failed write as an OSError naming `path` (np.save's file object and safetensors' Rust writer
    report a full disk without a file name; safetensors not even as an OSError)."""
    if isinstance(e, OSError):
        if e.filename is None and e.errno:
            return OSError(e.errno, os.strerror(e.errno), str(path))
        return e
    if isinstance(e, Exception) and (m := _OS_ERROR_IN_MESSAGE.search(str(e))):
        code = int(m.group(1) or m.group(2))
        return OSError(code, os.strerror(code), str(path))
    return e


@contextlib.contextmanager
def atomic_file(path: str | Path):
    """Yield a temporary path next to `path`; on success it is flushed to disk and renamed to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except Exception as e:
        if (err := as_os_error(e, path)) is not e:
            raise err from e
        raise
    finally:
        tmp.unlink(missing_ok=True)


def replace_dir(new: Path, path: Path) -> None:
    """Put the complete folder `new` at `path`; an old `path` is set aside first and removed only
    once the new one is in place, so a crash leaves one whole version, never none."""
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        os.replace(path, old / "old")
    os.replace(new, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary folder next to `path`; it replaces `path` on success (see replace_dir).

    On failure nothing is left: neither the temporary folder nor a partial `path`. A process
    killed inside the block cannot clean up, so the next writer of `path` removes its leftovers.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    leftover = re.compile(rf"\.{re.escape(path.name)}\.[A-Za-z0-9_]+\.tmp")
    for old in path.parent.iterdir():
        if old.is_dir() and leftover.fullmatch(old.name):
            if not path.exists() and (old / "old").is_dir():
                os.replace(old / "old", path)  # killed between setting the old version aside and renaming
            shutil.rmtree(old, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync(f)
        replace_dir(tmp, path)
    except Exception as e:
        if isinstance(e, OSError) and e.errno and str(e.filename or "").startswith(str(tmp)):
            # name the folder being written, not its temporary twin
            raise OSError(e.errno, os.strerror(e.errno), str(path) + str(e.filename)[len(str(tmp)):]) from e
        if (err := as_os_error(e, path)) is not e:
            raise err from e
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- id files (users.tsv, items.tsv)

_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_ESCAPE_TABLE = str.maketrans(_ESCAPES)
_UNESCAPES = {v[1]: k for k, v in _ESCAPES.items()}
_ESCAPED = re.compile(r"\\(.|$)", re.DOTALL)


def escape_field(text: str) -> str:
    """A TSV field that holds any string: backslash, tab, newline and carriage return written as `\\\\`, `\\t`,
    `\\n`, `\\r` (PostgreSQL's text format), everything else as it is, so no two ids are written alike."""
    return text.translate(_ESCAPE_TABLE)


def unescape_field(text: str, where: str) -> str:
    """escape_field's inverse; a backslash before anything else is a CorruptError naming `where`."""
    if "\\" not in text:
        return text

    def one(m: re.Match) -> str:
        if m.group(1) not in _UNESCAPES:
            raise CorruptError(f"{where}: unknown escape {m.group(0)} (fields escape only \\\\ \\t \\n \\r)")
        return _UNESCAPES[m.group(1)]
    return _ESCAPED.sub(one, text)


def read_tsv(path: Path, expected_rows: int) -> list[list[str]]:
    """The rows of a users.tsv / items.tsv after its header line, every field unescaped (escape_field)."""
    if not path.is_file():
        raise ArtifactError(f"{path}: not found")
    try:
        rows = path.read_text(encoding="utf-8").split("\n")[1:]
    except UnicodeDecodeError as e:
        raise CorruptError(f"{path}: not valid UTF-8 (byte offset {e.start})") from None
    rows = [r for r in rows if r]
    if len(rows) != expected_rows:
        raise CorruptError(f"{path}: {len(rows)} rows, manifest says {expected_rows}")
    return [[unescape_field(f, f"{path}:{n}") for f in r.split("\t")] for n, r in enumerate(rows, start=2)]
