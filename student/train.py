"""Training the SASRec student: alone (own loss) or distilled (own + teacher terms).

Every position of each training sequence is a prediction target. Long sequences
are cut into windows of `max_len` predictions from the most recent end, so no
interaction is wasted. Early stopping reads validation only; test is scored
once, with the best weights, at the end.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from distill.config import Recipe
from distill.data import Histories, Split
from distill.harness import evaluate, evaluate_model, metrics_record
from distill.losses import LossInputs, NegativeSampler, SoftmaxLoss, TeacherTargets, WeightedLoss
from distill.resources import require_memory, student_step_bytes
from distill.resume import (load_optimizer_state, load_resume, optimizer_state, resume_dir,
                           save_resume)
from student.model import SASRec, SASRecConfig, save_student

# (users (P,), positions (P,)) -> teacher outputs for the pairs found in the cache
TeacherLookup = Callable[[np.ndarray, np.ndarray], "TeacherTargets | None"]


@dataclass
class Windows:
    inputs: np.ndarray     # (W, T) left-padded input items
    targets: np.ndarray    # (W, T) next item at each slot, 0 = no prediction
    users: np.ndarray      # (W,) user row
    positions: np.ndarray  # (W, T) index of the target in the user's whole sequence


def training_windows(train: Histories, max_len: int) -> Windows:
    """Cut each user's (item_i -> item_{i+1}) pairs into windows of at most max_len, newest first."""
    pairs = np.maximum(train.lengths - 1, 0)                 # m_u predictions per user
    chunks = -(-pairs // max_len)                            # ceil
    first_window = np.concatenate([[0], np.cumsum(chunks)])[:-1]
    user = np.repeat(np.arange(len(train)), pairs)           # one entry per pair
    i = np.arange(pairs.sum()) - np.repeat(np.cumsum(pairs) - pairs, pairs)
    from_end = pairs[user] - 1 - i
    window = first_window[user] + from_end // max_len
    slot = max_len - 1 - from_end % max_len
    src = train.offsets[user] + i
    W = int(chunks.sum())
    inputs = np.zeros((W, max_len), dtype=np.int64)
    targets = np.zeros((W, max_len), dtype=np.int64)
    positions = np.full((W, max_len), -1, dtype=np.int64)
    inputs[window, slot] = train.flat[src]
    targets[window, slot] = train.flat[src + 1]
    positions[window, slot] = i + 1
    users = np.repeat(np.arange(len(train)), chunks)
    return Windows(inputs, targets, users, positions)


@torch.no_grad()
def encode(model: SASRec, histories: Histories, batch_size: int = 1024) -> np.ndarray:
    """(n_users, d) user vectors from the last max_len items of each history."""
    model.eval()
    padded = torch.from_numpy(histories.padded(model.cfg.max_len))
    return torch.cat([model.encode_users(padded[i:i + batch_size]) for i in range(0, len(padded), batch_size)]).numpy()


def own_loss(recipe: Recipe, split: Split) -> SoftmaxLoss:
    s = recipe.student
    if s.loss == "full":
        return SoftmaxLoss()
    pop = torch.from_numpy(split.item_popularity()) if s.negative_sampling == "popularity" else None
    return SoftmaxLoss(sampler=NegativeSampler(split.n_items, s.num_negatives, pop))


def fit(model: SASRec, split: Split, recipe: Recipe, loss: WeightedLoss, seed: int,
        teacher: TeacherLookup | None = None, desc: str = "student", epochs: int | None = None,
        resume: tuple[Path, dict] | None = None,
        on_epoch: Callable[[SASRec], dict] | None = None) -> tuple[dict, list[dict], int, float]:
    """Train with early stopping on validation NDCG@10; returns best state, curve, best epoch, seconds.

    resume=(out, inputs) saves the full training state after every epoch next to `out`
    and continues from it when a previous run with the same inputs was interrupted.
    on_epoch(model) adds its metrics to each curve entry (benchmarks use it to trace test).
    """
    cfg, ev = recipe.student, recipe.eval
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    win = training_windows(split.history("train"), model.cfg.max_len)
    m = model.cfg
    require_memory(student_step_bytes(min(cfg.batch_size, len(win.inputs)), m.max_len, m.n_items, m.hidden_size,
                                      m.num_layers), "a training step", "student.batch_size")
    params = list(model.parameters()) + list(loss.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    valid_hist = split.history("valid")
    best, best_state, best_epoch, stale, curve, done, spent = -1.0, None, 0, 0, [], 0, 0.0
    if resume is not None and (saved := load_resume(*resume)) is not None:
        groups, meta = saved
        model.load_state_dict(groups["model"])
        loss.load_state_dict(groups.get("loss", {}))
        load_optimizer_state(opt, groups.get("optim", {}), meta["optimizer"])
        torch.set_rng_state(groups["rng"]["torch"])
        gen.set_state(groups["rng"]["order"])
        best_state = groups["best"]
        best, best_epoch, stale, curve, done, spent = (meta[k] for k in
                                                      ("best", "best_epoch", "stale", "curve", "epoch", "seconds"))
        print(f"{desc}: resuming after epoch {done} from {resume_dir(resume[0])}")
    start = time.perf_counter() - spent
    for epoch in range(done + 1, (epochs or cfg.epochs) + 1):
        if stale >= cfg.patience:
            break
        model.train()
        order = torch.randperm(len(win.inputs), generator=gen).numpy()
        bar = tqdm(range(0, len(order), cfg.batch_size), desc=f"{desc} epoch {epoch}", leave=False)
        total = 0.0
        for step, lo in enumerate(bar, 1):
            rows = order[lo:lo + cfg.batch_size]
            tgt = torch.from_numpy(win.targets[rows])
            sel = tgt > 0
            h = model(torch.from_numpy(win.inputs[rows]))                    # (B, T, d)
            inputs = LossInputs(h[sel], tgt[sel], model.item_vectors())
            if teacher is not None and loss.needs_teacher:
                b, t = np.nonzero(sel.numpy())
                inputs.teacher = teacher(win.users[rows][b], win.positions[rows][b, t])
            value, _ = loss(inputs)
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            total += value.item()
            bar.set_postfix(loss=f"{total / step:.4f}")
        users = encode(model, valid_hist)
        ndcg = evaluate(split, users, model.item_vectors().detach().numpy(), "valid", ev.ks,
                        ev.mask_history, index=ev.index).metrics["NDCG@10"]
        elapsed = time.perf_counter() - start
        curve.append({"epoch": epoch, "seconds": round(elapsed, 2), "train_loss": total / max(step, 1),
                      "valid_NDCG@10": ndcg, **(on_epoch(model) if on_epoch else {})})
        print(f"{desc} epoch {epoch}: loss {total / max(step, 1):.4f}  valid NDCG@10 {ndcg:.4f}  ({elapsed:.0f}s)")
        if ndcg > best:
            best, best_state, best_epoch, stale = ndcg, copy.deepcopy(model.state_dict()), epoch, 0
        else:
            stale += 1
        if resume is not None:
            opt_tensors, opt_meta = optimizer_state(opt)
            save_resume(resume[0], {"model": model.state_dict(), "loss": loss.state_dict(), "best": best_state,
                                    "optim": opt_tensors,
                                    "rng": {"torch": torch.get_rng_state(), "order": gen.get_state()}},
                        {"inputs": resume[1], "epoch": epoch, "best": best, "best_epoch": best_epoch, "stale": stale,
                         "curve": curve, "seconds": time.perf_counter() - start, "optimizer": opt_meta})
    return best_state, curve, best_epoch, time.perf_counter() - start


def build_student(recipe: Recipe, split: Split) -> SASRec:
    s = recipe.student
    return SASRec(SASRecConfig(split.n_items, recipe.data.max_len, s.hidden_size, s.num_layers, s.num_heads, s.dropout))


def train_and_save(recipe: Recipe, split: Split, out: Path, seed: int, loss: WeightedLoss,
                   teacher: TeacherLookup | None = None, desc: str = "student", inputs: dict | None = None,
                   init: SASRec | None = None, epochs: int | None = None, extra: dict | None = None) -> dict:
    """Train (from `init`'s weights if given), keep the best checkpoint in `out`, score test once.

    With `inputs` (the stage's input hashes) training is resumable and the record carries them.
    """
    torch.manual_seed(seed)
    model = build_student(recipe, split)
    if init is not None:
        model.load_state_dict(init.state_dict())
    resume = (out, inputs) if inputs is not None else None
    state, curve, best_epoch, seconds = fit(model, split, recipe, loss, seed, teacher, desc, epochs, resume)
    model.load_state_dict(state)
    model.eval()
    items = model.item_vectors().detach().numpy()
    results = evaluate_model(split, lambda stage: encode(model, split.history(stage)), items, recipe.eval)
    record = metrics_record(results, split, best_epoch=best_epoch, train_seconds=round(seconds, 2), seed=seed,
                            curve=curve, **({"inputs": inputs} if inputs else {}), **(extra or {}))
    save_student(model, out, {"split_hash": split.hash, "seed": seed})
    np.save(out / "test_ranks.npy", results["test"].ranks)
    return record
