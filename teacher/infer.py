"""Teacher inference into the teacher cache, through DeepSpeed or plain transformers.

For every user: the last P training positions, plus the validation and test
queries. Users are cut into fixed shards; rank r of W (the `deepspeed` or
`torchrun` launcher sets RANK/WORLD_SIZE) scores shards r, r+W, ...; rank 0
completes the manifest after a barrier. Complete shards are skipped on rerun.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from distill.artifacts import read_json
from distill.cache import shard_metadata, shard_name, write_manifest, write_shard
from distill.config import Recipe
from distill.data import Split
from distill.errors import ArtifactError, ConfigError
from distill.resources import decoder_step_bytes, require_memory
from teacher.model import TeacherRetriever
from teacher.train import prefixes

def query_plan(split: Split, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """(users, t) of every query, grouped by user: last P training positions, then valid, then test."""
    lengths = split.sequences.lengths
    train_len = lengths - 2
    n_train = np.clip(train_len - 1, 0, positions)                # t in [max(1, L_tr - P), L_tr - 1]
    per_user = n_train + 2
    users = np.repeat(np.arange(split.n_users), per_user)
    within = np.arange(per_user.sum()) - np.repeat(np.cumsum(per_user) - per_user, per_user)
    first = np.repeat(train_len - n_train, per_user)
    t = first + within          # the last two land on L-2 (valid) and L-1 (test)
    return users, t


def wrap_backend(model: TeacherRetriever, backend: str) -> TeacherRetriever:
    """Put the decoder behind `deepspeed.init_inference` (or leave it as transformers runs it)."""
    if backend == "hf":
        return model
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    on_gpu = get_accelerator().device_name() == "cuda"
    dtype = next(model.backbone.parameters()).dtype
    inject = False
    if on_gpu and model.gate is None:
        # plain LoRA can be merged into the weights, which lets DeepSpeed inject its fused kernels
        model.backbone = model.backbone.merge_and_unload()
        inject = True
    engine = deepspeed.init_inference(model.backbone, dtype=dtype, replace_with_kernel_inject=inject)
    model.backbone = engine
    if on_gpu:
        model.to(get_accelerator().device_name())
    return model


def distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    return (torch.distributed.get_rank(), world) if world > 1 else (0, 1)


def score_shard(model: TeacherRetriever, histories: list[np.ndarray], k: int, batch_size: int, mask_history: bool,
                index: str, bar) -> dict[str, np.ndarray]:
    order = np.argsort(model.prompts.lengths(histories), kind="stable")
    n, D = len(histories), model.out_projector.out_features
    out = {"query": np.empty((n, D), np.float32), "topk_ids": np.empty((n, k), np.int32),
           "topk_scores": np.empty((n, k), np.float32)}
    for lo in range(0, n, batch_size):
        rows = order[lo:lo + batch_size]
        o = model.get_teacher_outputs([histories[i] for i in rows], k, mask_history, index)
        out["query"][rows] = o.query.numpy()
        out["topk_ids"][rows] = o.topk_ids.numpy()
        out["topk_scores"][rows] = o.topk_scores.numpy()
        bar.update(len(rows))
    return out


def run_inference(recipe: Recipe, split: Split, model: TeacherRetriever, teacher_hash: str, out: Path,
                  backend: str) -> dict | None:
    """Score this rank's shards into `out`; rank 0 writes the manifest. Returns the manifest (rank 0)."""
    d = recipe.distill
    if d.k > split.n_items:
        raise ConfigError(f"distill.k: {d.k} is larger than the catalogue ({split.n_items} items)")
    longest = model.prompts.longest()
    require_memory(decoder_step_bytes(recipe.teacher.eval_batch_size, longest, model.backbone.config, training=False),
                   f"an inference batch ({recipe.teacher.eval_batch_size} prompts of up to {longest} tokens)",
                   "teacher.eval_batch_size", model.device)
    rank, world = distributed()
    model = wrap_backend(model.eval(), backend)
    users, t = query_plan(split, d.positions)
    meta = {"split_hash": split.hash, "teacher_hash": teacher_hash, "k": d.k, "positions": d.positions,
            "shard_users": d.shard_users,
            "mask_history": recipe.eval.mask_history, "dim": model.out_projector.out_features,
            "n_items": split.n_items, "n_users": split.n_users}
    shard_users = d.shard_users
    n_shards = -(-split.n_users // shard_users)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (out / "manifest.json").unlink(missing_ok=True)  # the cache is incomplete until rank 0 rewrites it
    mine = [i for i in range(n_shards) if i % world == rank]
    todo = []
    for i in mine:
        path = out / shard_name(i)
        if path.is_file():
            try:
                if shard_metadata(path) == meta:
                    continue
            except ArtifactError:
                pass
        todo.append(i)
    rows_of = lambda i: np.flatnonzero((users >= i * shard_users) & (users < (i + 1) * shard_users))
    total = sum(len(rows_of(i)) for i in todo)
    start, tokens = time.perf_counter(), 0
    with tqdm(total=total, desc=f"teacher infer ({backend}, rank {rank})", unit="prompt") as bar:
        for i in todo:
            rows = rows_of(i)
            hist = prefixes(split, users[rows], t[rows])
            tokens += int(model.prompts.lengths(hist).sum())
            scored = score_shard(model, hist, d.k, recipe.teacher.eval_batch_size, recipe.eval.mask_history,
                                 recipe.eval.index, bar)
            write_shard(out / shard_name(i), {"user": users[rows], "position": t[rows], **scored}, meta)
    seconds = time.perf_counter() - start
    if world > 1:
        torch.distributed.barrier()
    if rank != 0:
        return None
    manifest = write_manifest(out, n_shards, meta, model.item_table.detach().float().cpu().numpy())
    size = sum(p.stat().st_size for p in out.iterdir())
    rate = total / seconds if total and seconds > 0 else float("nan")
    print(f"teacher cache: {sum(s['rows'] for s in manifest['shards'])} queries in {n_shards} shards, "
          f"{size / 2**20:.1f} MiB at {out}; scored {total} prompts in {seconds:.0f}s "
          f"({rate:.1f} prompts/s, {tokens / max(seconds, 1e-9):.0f} tokens/s, backend {backend})")
    return manifest


def merge(recipe: Recipe, split: Split, teacher_dir: Path, out: Path) -> dict:
    """Complete the manifest from shards written elsewhere (e.g. by several machines on a shared folder)."""
    meta_t = read_json(teacher_dir / "teacher.json")
    from safetensors.numpy import load_file
    heads = load_file(str(teacher_dir / "heads.safetensors"))
    first = out / shard_name(0)
    if not first.is_file():
        raise ArtifactError(f"{first}: no shards to merge")
    meta = shard_metadata(first)
    if meta.get("split_hash") != split.hash or meta.get("teacher_hash") != meta_t["checkpoint_hash"]:
        raise ArtifactError(f"{first}: shards were built from another split or teacher")
    return write_manifest(out, -(-split.n_users // meta["shard_users"]), meta, heads["item_table"])
