"""Contrastive training of the teacher: (history prefix -> next item) examples.

Each epoch samples `examples_per_epoch` training examples across users; AdamW
with linear warmup and cosine decay; gradient accumulation. The LLM retriever
trains alone; after each epoch its validation queries are blended with the CF
retriever's at every weight in `teacher.cf_weights`, and the best blend's
validation NDCG@10 drives early stopping. Test is scored once at the end.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from distill.config import Recipe
from distill.data import Split
from distill.harness import evaluate, evaluate_model, metrics_record
from distill.losses import LossInputs, NegativeSampler, SoftmaxLoss
from distill.resources import decoder_step_bytes, optimizer_bytes, require_memory
from distill.resume import load_optimizer_state, load_resume, optimizer_state, resume_dir, save_resume
from student.model import SASRec
from student.train import encode
from teacher.model import TeacherRetriever, blend_queries, build_teacher, save_teacher


def training_examples(split: Split) -> tuple[np.ndarray, np.ndarray]:
    """Every (user, t) with 1 <= t < len(train_u): history seq[:t] predicts seq[t]."""
    lengths = split.history("train").lengths
    pairs = np.maximum(lengths - 1, 0)
    users = np.repeat(np.arange(split.n_users), pairs)
    t = np.arange(pairs.sum()) - np.repeat(np.cumsum(pairs) - pairs, pairs) + 1
    return users, t


def prefixes(split: Split, users: np.ndarray, positions: np.ndarray) -> list[np.ndarray]:
    """Item histories seq_u[:t] for each (u, t)."""
    seq = split.sequences
    return [seq.flat[seq.offsets[u]: seq.offsets[u] + t] for u, t in zip(users.tolist(), positions.tolist())]


def stage_queries(model: TeacherRetriever, split: Split, stage: str, batch_size: int, blend: bool = True) -> np.ndarray:
    h = split.history(stage)
    return model.encode_many([h.row(u) for u in range(split.n_users)], batch_size, desc=f"teacher {stage} queries",
                             blend=blend)


def teacher_loss(recipe: Recipe, split: Split) -> SoftmaxLoss:
    t = recipe.teacher
    if t.loss == "full":
        return SoftmaxLoss(t.temperature)
    pop = torch.from_numpy(split.item_popularity())
    return SoftmaxLoss(t.temperature, NegativeSampler(split.n_items, t.num_negatives, pop), in_batch=True)


def score_valid(split: Split, recipe: Recipe, queries: np.ndarray, items: np.ndarray) -> float:
    ev = recipe.eval
    return evaluate(split, queries, items, "valid", ev.ks, ev.mask_history, index=ev.index).metrics["NDCG@10"]


def best_blend(split: Split, recipe: Recipe, q_llm: np.ndarray, q_cf: np.ndarray, items: np.ndarray):
    """(validation NDCG@10, w, blended queries) of the best w in teacher.cf_weights (the first on ties)."""
    best = None
    for w in recipe.teacher.cf_weights:
        q = blend_queries(q_llm, q_cf, w).astype(np.float32)
        ndcg = score_valid(split, recipe, q, items)
        if best is None or ndcg > best[0]:
            best = (ndcg, float(w), q)
    return best


def train_teacher(recipe: Recipe, split: Split, cf: SASRec, out: Path, seed: int, inputs: dict) -> dict:
    """Train, keep the best (epoch, CF weight) by validation NDCG@10, save to `out`, score test once.
    Resumable after every epoch (see distill.resume)."""
    cfg, ev = recipe.teacher, recipe.eval
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_teacher(cfg, cf, split.titles)
    loss_fn = teacher_loss(recipe, split)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    longest = model.prompts.longest()
    batch = min(cfg.batch_size, cfg.examples_per_epoch)
    require_memory(decoder_step_bytes(batch, longest, model.backbone.config, training=True) + optimizer_bytes(model),
                   f"a training step ({batch} prompts of up to {longest} tokens)", "teacher.batch_size", model.device)
    opt = torch.optim.AdamW(list(trainable.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(cfg.examples_per_epoch / (cfg.batch_size * cfg.grad_accum))
    total_steps = steps_per_epoch * cfg.epochs
    warmup = max(1, int(cfg.warmup_ratio * total_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, max(0, s - warmup) / max(1, total_steps - warmup)))))
    all_users, all_pos = training_examples(split)

    def snapshot() -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in trainable.items()}

    cf_valid = encode(cf, split.history("valid"))   # q_CF, blended with each epoch's q_LLM
    best, best_state, best_valid, best_epoch, best_weight, stale, curve, done = -1.0, None, None, 0, 0.0, 0, [], 0
    n_examples, n_tokens, train_time = 0, 0, 0.0
    if (saved := load_resume(out, inputs)) is not None:
        groups, meta = saved
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(groups["model"][n])
        best_state, best_valid = groups["best"], groups["best_valid"]["queries"].numpy()
        load_optimizer_state(opt, groups.get("optim", {}), meta["optimizer"])
        sched.load_state_dict(meta["scheduler"])
        torch.set_rng_state(groups["rng"]["torch"])
        rng.bit_generator.state = meta["numpy_rng"]
        best, best_epoch, best_weight, stale, curve, done, n_examples, n_tokens, train_time = (meta[k] for k in (
            "best", "best_epoch", "best_weight", "stale", "curve", "epoch", "examples", "tokens", "train_seconds"))
        print(f"teacher: resuming after epoch {done} from {resume_dir(out)}")
    start = time.perf_counter() - (curve[-1]["seconds"] if curve else 0.0)
    for epoch in range(done + 1, cfg.epochs + 1):
        if stale >= cfg.patience:
            break
        model.train()
        pick = rng.choice(len(all_users), size=min(cfg.examples_per_epoch, len(all_users)), replace=False)
        users, pos = all_users[pick], all_pos[pick]
        targets = split.sequences.flat[split.sequences.offsets[users] + pos]
        bar = tqdm(range(0, len(pick), cfg.batch_size), desc=f"teacher epoch {epoch}", leave=False)
        t0, running = time.perf_counter(), 0.0
        for i, lo in enumerate(bar, 1):
            sl = slice(lo, lo + cfg.batch_size)
            hist = prefixes(split, users[sl], pos[sl])
            batch_tokens = int(model.prompts.lengths(hist).sum())
            q = model.encode(hist, blend=False)                                    # (B, D) q_LLM
            loss = loss_fn(LossInputs(q, torch.from_numpy(targets[sl]).to(q.device), model.item_table))
            (loss / cfg.grad_accum).backward()
            if i % cfg.grad_accum == 0 or lo + cfg.batch_size >= len(pick):
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            running += loss.item()
            n_examples += len(hist)
            n_tokens += batch_tokens
            rate = n_examples / (train_time + time.perf_counter() - t0)
            bar.set_postfix(loss=f"{running / i:.3f}", ex_s=f"{rate:.1f}")
        train_time += time.perf_counter() - t0
        model.eval()
        model.invalidate_index()
        items = model.item_table.detach().float().cpu().numpy()
        llm_valid = stage_queries(model, split, "valid", cfg.eval_batch_size, blend=False)
        ndcg, weight, valid = best_blend(split, recipe, llm_valid, cf_valid, items)
        llm_alone = score_valid(split, recipe, llm_valid, items)
        elapsed = time.perf_counter() - start
        curve.append({"epoch": epoch, "examples": n_examples, "seconds": round(elapsed, 2),
                      "train_loss": running / max(i, 1), "valid_NDCG@10": ndcg, "cf_weight": weight,
                      "valid_NDCG@10_llm": llm_alone})
        print(f"teacher epoch {epoch}: loss {running / max(i, 1):.4f}  valid NDCG@10 {ndcg:.4f} at CF weight "
              f"{weight:g} (LLM alone {llm_alone:.4f})  ({n_examples / train_time:.1f} examples/s, {elapsed:.0f}s)")
        if ndcg > best:
            best, best_state, best_valid, best_epoch, best_weight, stale = ndcg, snapshot(), valid, epoch, weight, 0
        else:
            stale += 1
        opt_tensors, opt_meta = optimizer_state(opt)
        save_resume(out, {"model": trainable, "best": best_state, "optim": opt_tensors,
                          "best_valid": {"queries": torch.from_numpy(best_valid)},
                          "rng": {"torch": torch.get_rng_state()}},
                    {"inputs": inputs, "epoch": epoch, "best": best, "best_epoch": best_epoch,
                     "best_weight": best_weight, "stale": stale,
                     "curve": curve, "examples": n_examples, "tokens": n_tokens, "train_seconds": train_time,
                     "optimizer": opt_meta, "scheduler": sched.state_dict(),
                     "numpy_rng": rng.bit_generator.state})
    with torch.no_grad():
        for n, p in trainable.items():
            p.copy_(best_state[n])
        model.cf_weight.fill_(best_weight)
    model.eval()
    model.invalidate_index()
    results = evaluate_model(split, lambda stage: best_valid if stage == "valid" else  # already computed
                             stage_queries(model, split, stage, cfg.eval_batch_size),
                             model.item_table.detach().float().cpu().numpy(), ev)
    digest = save_teacher(model, out, {"split_hash": split.hash, "seed": seed, "inputs": inputs})
    np.save(out / "test_ranks.npy", results["test"].ranks)
    rate = {"examples_per_second": n_examples / train_time, "tokens_per_second": n_tokens / train_time} \
        if train_time else {}
    return metrics_record(results, split, best_epoch=best_epoch, cf_weight=best_weight, seed=seed, curve=curve,
                          checkpoint_hash=digest, train_seconds=round(train_time, 2), inputs=inputs, **rate)
