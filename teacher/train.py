"""Contrastive training of the teacher: (history prefix -> next item) examples.

Each epoch samples `examples_per_epoch` training examples across users; AdamW
with linear warmup and cosine decay; gradient accumulation; early stopping on
validation NDCG@10 through the shared harness; test scored once at the end.
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
from student.model import SASRec
from teacher.model import TeacherRetriever, build_teacher, save_teacher


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


def stage_queries(model: TeacherRetriever, split: Split, stage: str, batch_size: int) -> np.ndarray:
    h = split.history(stage)
    return model.encode_many([h.row(u) for u in range(split.n_users)], batch_size, desc=f"teacher {stage} queries")


def teacher_loss(recipe: Recipe, split: Split) -> SoftmaxLoss:
    t = recipe.teacher
    if t.loss == "full":
        return SoftmaxLoss(t.temperature)
    pop = torch.from_numpy(split.item_popularity())
    return SoftmaxLoss(t.temperature, NegativeSampler(split.n_items, t.num_negatives, pop), in_batch=True)


def train_teacher(recipe: Recipe, split: Split, cf: SASRec, out: Path, seed: int, extra: dict) -> dict:
    cfg, ev = recipe.teacher, recipe.eval
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_teacher(cfg, cf, split.titles)
    loss_fn = teacher_loss(recipe, split)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(cfg.examples_per_epoch / (cfg.batch_size * cfg.grad_accum))
    total_steps = steps_per_epoch * cfg.epochs
    warmup = max(1, int(cfg.warmup_ratio * total_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, max(0, s - warmup) / max(1, total_steps - warmup)))))
    all_users, all_pos = training_examples(split)
    best, best_state, best_epoch, stale, curve = -1.0, None, 0, 0, []
    n_examples, n_tokens, train_time = 0, 0, 0.0
    start = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
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
            q = model.encode(hist)                                                 # (B, D)
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
        valid = stage_queries(model, split, "valid", cfg.eval_batch_size)
        ndcg = evaluate(split, valid, model.item_table.detach().float().cpu().numpy(), "valid", ev.ks, ev.mask_history,
                        index=ev.index).metrics["NDCG@10"]
        elapsed = time.perf_counter() - start
        curve.append({"epoch": epoch, "examples": n_examples, "seconds": round(elapsed, 2),
                      "train_loss": running / max(i, 1), "valid_NDCG@10": ndcg})
        print(f"teacher epoch {epoch}: loss {running / max(i, 1):.4f}  valid NDCG@10 {ndcg:.4f}  "
              f"({n_examples / train_time:.1f} examples/s, {elapsed:.0f}s)")
        if ndcg > best:
            best, best_epoch, stale = ndcg, epoch, 0
            best_state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in best_state:
                p.copy_(best_state[n])
    model.eval()
    results = evaluate_model(split, lambda stage: stage_queries(model, split, stage, cfg.eval_batch_size),
                             model.item_table.detach().float().cpu().numpy(), ev)
    digest = save_teacher(model, out, {"split_hash": split.hash, "seed": seed, **extra})
    np.save(out / "test_ranks.npy", results["test"].ranks)
    return metrics_record(results, split, best_epoch=best_epoch, seed=seed, curve=curve, checkpoint_hash=digest,
                          train_seconds=round(train_time, 2), examples_per_second=n_examples / train_time,
                          tokens_per_second=n_tokens / train_time, **extra)
