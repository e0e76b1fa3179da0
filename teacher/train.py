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
from distill.resources import decoder_step_bytes, optimizer_bytes, require_memory
from distill.resume import load_optimizer_state, load_resume, optimizer_state, resume_dir, save_resume
from student.model import SASRec
from student.train import encode
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


def score_valid(split: Split, recipe: Recipe, queries: np.ndarray, items: np.ndarray) -> float:
    ev = recipe.eval
    return evaluate(split, queries, items, "valid", ev.ks, ev.mask_history, index=ev.index).metrics["NDCG@10"]


def train_teacher(recipe: Recipe, split: Split, cf: SASRec, out: Path, seed: int, inputs: dict) -> dict:
    """Train, keep the best epoch by validation NDCG@10 (epoch 0 = the CF retriever with cf_residual),
    save to `out`, score test once. Resumable after every epoch (see distill.resume)."""
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

    best, best_state, best_valid, best_epoch, stale, curve, done = -1.0, None, None, 0, 0, [], 0
    n_examples, n_tokens, train_time = 0, 0, 0.0
    if (saved := load_resume(out, inputs)) is not None:
        groups, meta = saved
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(groups["model"][n])
        best_state = groups["best"]
        load_optimizer_state(opt, groups.get("optim", {}), meta["optimizer"])
        sched.load_state_dict(meta["scheduler"])
        torch.set_rng_state(groups["rng"]["torch"])
        rng.bit_generator.state = meta["numpy_rng"]
        best, best_epoch, stale, curve, done, n_examples, n_tokens, train_time = (meta[k] for k in (
            "best", "best_epoch", "stale", "curve", "epoch", "examples", "tokens", "train_seconds"))
        print(f"teacher: resuming after epoch {done} from {resume_dir(out)}")
    elif cfg.cf_residual:
        # the zero-initialised LLM path makes the starting teacher exactly the CF retriever: it is epoch 0
        # of early stopping, scored with the CF model itself (the same queries, without running the LLM)
        best_valid = encode(cf, split.history("valid"))
        best, best_state = score_valid(split, recipe, best_valid, cf.item_vectors().detach().numpy()), snapshot()
        curve.append({"epoch": 0, "examples": 0, "seconds": 0.0, "valid_NDCG@10": best})
        print(f"teacher epoch 0 (CF retriever): valid NDCG@10 {best:.4f}")
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
        ndcg = score_valid(split, recipe, valid, model.item_table.detach().float().cpu().numpy())
        elapsed = time.perf_counter() - start
        curve.append({"epoch": epoch, "examples": n_examples, "seconds": round(elapsed, 2),
                      "train_loss": running / max(i, 1), "valid_NDCG@10": ndcg})
        print(f"teacher epoch {epoch}: loss {running / max(i, 1):.4f}  valid NDCG@10 {ndcg:.4f}  "
              f"({n_examples / train_time:.1f} examples/s, {elapsed:.0f}s)")
        if ndcg > best:
            best, best_state, best_valid, best_epoch, stale = ndcg, snapshot(), valid, epoch, 0
        else:
            stale += 1
        opt_tensors, opt_meta = optimizer_state(opt)
        save_resume(out, {"model": trainable, "best": best_state, "optim": opt_tensors,
                          "rng": {"torch": torch.get_rng_state()}},
                    {"inputs": inputs, "epoch": epoch, "best": best, "best_epoch": best_epoch, "stale": stale,
                     "curve": curve, "examples": n_examples, "tokens": n_tokens, "train_seconds": train_time,
                     "optimizer": opt_meta, "scheduler": sched.state_dict(),
                     "numpy_rng": rng.bit_generator.state})
    with torch.no_grad():
        for n, p in trainable.items():
            p.copy_(best_state[n])
    model.eval()
    model.invalidate_index()
    reuse = {"valid": best_valid} if best_valid is not None else {}  # the best epoch's queries, already computed
    results = evaluate_model(split, lambda stage: reuse[stage] if stage in reuse else
                             stage_queries(model, split, stage, cfg.eval_batch_size),
                             model.item_table.detach().float().cpu().numpy(), ev)
    digest = save_teacher(model, out, {"split_hash": split.hash, "seed": seed, "inputs": inputs})
    np.save(out / "test_ranks.npy", results["test"].ranks)
    rate = {"examples_per_second": n_examples / train_time, "tokens_per_second": n_tokens / train_time} \
        if train_time else {}
    return metrics_record(results, split, best_epoch=best_epoch, seed=seed, curve=curve, checkpoint_hash=digest,
                          train_seconds=round(train_time, 2), inputs=inputs, **rate)
