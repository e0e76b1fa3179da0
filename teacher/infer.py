"""Teacher inference into the teacher cache, through DeepSpeed or plain transformers.

For every user: the last P training positions, plus the validation and test
queries. Users are cut into fixed shards; rank r of W (the `deepspeed` or
`torchrun` launcher sets RANK/WORLD_SIZE) scores shards r, r+W, ...; rank 0
completes the manifest after a barrier. Complete shards are skipped on rerun.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from distill.artifacts import read_record
from distill.cache import cache_key, complete_cache, shard_metadata, shard_name, staging_dir, write_shard
from distill.config import Recipe
from distill.data import Split
from distill.distributed import world
from distill.histories import Histories
from distill.errors import ArtifactError, ConfigError, StaleError
from distill.positions import prefixes, scored_positions
from distill.resources import decoder_step_bytes, require_memory
from teacher import guard
from teacher.model import TeacherRetriever


def wrap_backend(model: TeacherRetriever, backend: str) -> TeacherRetriever:
    """Put the decoder behind `deepspeed.init_inference` (or leave it as transformers runs it). Whether
    DeepSpeed's fused kernels were injected, and why not, is left in `model.kernel_injection` (the guard
    records it)."""
    if backend == "hf":
        model.kernel_injection = {"used": False, "why": "plain transformers: no DeepSpeed"}
        return model
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    on_gpu = get_accelerator().device_name() == "cuda"
    dtype = next(model.backbone.parameters()).dtype
    inject = on_gpu and model.gate is None and not model.cfg.inject_layer
    if inject:
        # plain LoRA can be merged into the weights, which lets DeepSpeed inject its fused kernels
        model.backbone = model.backbone.merge_and_unload()
    engine = deepspeed.init_inference(model.backbone, dtype=dtype, replace_with_kernel_inject=inject)
    model.backbone = engine
    if on_gpu:
        model.to(get_accelerator().device_name())
    model.kernel_injection = {"used": inject, "why": "fused kernels injected (plain LoRA merged into the weights)"
                              if inject else NO_INJECTION["cpu" if not on_gpu else "moe" if model.gate else "split"]}
    return model


NO_INJECTION = {
    "cpu": "not exercised: DeepSpeed kernel injection needs a GPU; on CPU init_inference runs the same "
           "transformers modules, so the guard compares like with like",
    "moe": "not exercised: the MoE-LoRA gate mixes each prompt's experts inside the LoRA layers, which fused "
           "kernels would replace (only plain LoRA can be merged first); init_inference runs the transformers modules",
    "split": "not exercised: teacher.inject_layer runs the decoder's layers in two ranges around the injection, "
             "which fused kernels would replace; init_inference runs the transformers modules",
}


def score_shard(teacher, histories: Histories, lengths: np.ndarray, dim: int, k: int, batch_size: int,
                mask_history: bool, index: str, bar) -> dict[str, np.ndarray]:
    """Any teacher's outputs (`get_teacher_outputs`) for `histories`, in batches of similar `lengths`."""
    order = np.argsort(lengths, kind="stable")
    n = len(histories)
    out = {"query": np.empty((n, dim), np.float32), "topk_ids": np.empty((n, k), np.int32),
           "topk_scores": np.empty((n, k), np.float32)}
    for lo in range(0, n, batch_size):
        rows = order[lo:lo + batch_size]
        o = teacher.get_teacher_outputs(histories.take(rows), k, mask_history, index)
        out["query"][rows] = o.query.numpy()
        out["topk_ids"][rows] = o.topk_ids.numpy()
        out["topk_scores"][rows] = o.topk_scores.numpy()
        bar.update(len(rows))
    return out


def score_shards(teacher, lengths_of, dim: int, recipe: Recipe, split: Split, users: np.ndarray, t: np.ndarray,
                 todo: list[int], staging: Path, meta: dict, desc: str) -> tuple[int, int, float]:
    """Score shards `todo` of the (user, position) pairs into `staging`; (prompts scored, sum of their
    lengths (tokens for the LLM), seconds). `lengths_of(histories)` orders each shard into batches."""
    d = recipe.distill
    rows_of = lambda i: np.flatnonzero((users >= i * d.shard_users) & (users < (i + 1) * d.shard_users))
    total = sum(len(rows_of(i)) for i in todo)
    start, tokens = time.perf_counter(), 0
    with tqdm(total=total, desc=desc, unit="prompt") as bar:
        for i in todo:
            rows = rows_of(i)
            hist = prefixes(split, users[rows], t[rows])
            lengths = lengths_of(hist)
            tokens += int(lengths.sum())
            scored = score_shard(teacher, hist, lengths, dim, d.k, recipe.teacher.eval_batch_size,
                                 recipe.eval.mask_history, recipe.eval.index, bar)
            write_shard(staging / shard_name(i), {"user": users[rows], "position": t[rows], **scored}, meta)
    return total, tokens, time.perf_counter() - start


def pending_shards(staging: Path, shards: list[int], meta: dict) -> list[int]:
    """The shards not yet complete in `staging` for exactly `meta` (a resumed run keeps the others)."""
    todo = []
    for i in shards:
        path = staging / shard_name(i)
        try:
            if path.is_file() and shard_metadata(path) == meta:
                continue
        except ArtifactError:
            pass
        todo.append(i)
    return todo


def run_inference(recipe: Recipe, split: Split, model: TeacherRetriever, teacher_hash: str, out: Path,
                  backend: str, recorded_valid: float | None = None) -> dict | None:
    """Score this rank's shards into OUT.partial/; rank 0 checks the validation rows against the teacher's
    `recorded_valid` NDCG@10 (guard.check_validation), completes the cache and puts it at `out`, replacing
    an older cache only then. Returns the manifest (rank 0)."""
    d = recipe.distill
    if d.k > split.n_items:
        raise ConfigError(f"distill.k: {d.k} is larger than the catalogue ({split.n_items} items)")
    longest = model.prompts.longest()
    require_memory(decoder_step_bytes(recipe.teacher.eval_batch_size, longest, model.backbone.config, training=False),
                   f"an inference batch ({recipe.teacher.eval_batch_size} prompts of up to {longest} tokens)",
                   "teacher.eval_batch_size", model.device)
    ranks = world()
    users, t = scored_positions(split, d.positions)
    model = model.eval()
    dtype = guard.backbone_dtype(model)
    if guard.needs_guard(backend, dtype):  # checked before anything is written, the staging folder included
        sample = guard.sample(split, users, t, model.prompts.lengths, d.guard_samples)
        k = min(max(guard.TOP_K), split.n_items)
        scored = lambda m: guard.outputs(m, sample, recipe.teacher.eval_batch_size, k, recipe.eval.mask_history,
                                         recipe.eval.index)
        ref = guard.reference(model, sample, recipe.teacher.eval_batch_size, k, recipe.eval.mask_history,
                              recipe.eval.index)
        model = wrap_backend(model, backend)
        checked = guard.compare(scored(model), ref, backend, dtype, d, model.kernel_injection)
        if not model.kernel_injection["used"]:
            print(f"teacher infer: DeepSpeed kernel injection {model.kernel_injection['why']}")
    else:
        model = wrap_backend(model, backend)
        checked = guard.unchecked(backend, dtype)
    meta = {**cache_key(recipe, split, teacher_hash), "dim": model.query_dim}
    n_shards = -(-split.n_users // d.shard_users)
    staging = staging_dir(out)
    staging.mkdir(parents=True, exist_ok=True)
    todo = pending_shards(staging, [i for i in range(n_shards) if i % ranks.size == ranks.rank], meta)
    total, tokens, seconds = score_shards(model, model.prompts.lengths, meta["dim"], recipe, split, users, t, todo,
                                          staging, meta, f"teacher infer ({backend}, rank {ranks.rank})")
    ranks.barrier()
    if not ranks.main:
        return None
    items = model.item_vectors()
    valid = guard.check_validation(staging, n_shards, split, items, recipe, recorded_valid, "the teacher")
    manifest = complete_cache(staging, out, n_shards, meta, items,
                              {"guard": checked, "valid_check": valid, "item_parts": model.item_parts()})
    rate = total / seconds if total and seconds > 0 else float("nan")
    print(f"teacher cache: {sum(s['rows'] for s in manifest['shards'])} queries in {n_shards} shards at {out}; "
          f"scored {total} prompts in {seconds:.0f}s ({rate:.1f} prompts/s, "
          f"{tokens / max(seconds, 1e-9):.0f} tokens/s, backend {backend})")
    return manifest


def merge(recipe: Recipe, split: Split, teacher_dir: Path, out: Path) -> dict:
    """Complete a cache whose shards were written into OUT.partial/ by separate jobs (e.g. machines
    sharing a folder); every shard must have been built from this run's split, teacher and options."""
    from safetensors.numpy import load_file
    teacher_hash = read_record(teacher_dir / "teacher.json", "checkpoint_hash")["checkpoint_hash"]
    staging = staging_dir(out)
    key = cache_key(recipe, split, teacher_hash)
    metas = {path: shard_metadata(path) for path in sorted(staging.glob("shard-*.safetensors"))}
    if not metas:
        raise ArtifactError(f"{staging}: no shards to merge; run `anyo teacher infer` first")
    for path, meta in metas.items():
        if {k: meta.get(k) for k in key} != key:
            wrong = sorted(k for k in key if meta.get(k) != key[k])
            raise StaleError(f"{path}: built with other {', '.join(wrong)} than this run's recipe and teacher")
    first = next(iter(metas.values()))
    if any(m != first for m in metas.values()):
        raise StaleError(f"{staging}: shards were built with different options")
    items = load_file(str(teacher_dir / "heads.safetensors"))["item_vectors"]
    parts = read_record(teacher_dir / "teacher.json", "item_parts")["item_parts"]
    return complete_cache(staging, out, -(-split.n_users // recipe.distill.shard_users), first, items,
                          {"guard": {"checked": None, "reason": "merged from shards written by separate jobs; "
                                     "each job's guard ran before it wrote its shards"}, "item_parts": parts})
