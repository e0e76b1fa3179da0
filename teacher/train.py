"""Contrastive training of the teacher as a `TrainingTask`: (history prefix -> next item) examples.

Each epoch samples `examples_per_epoch` training positions across users (teacher.examples pooled), or
reads every training position once, as windows of max_history consecutive slots with an example at every
slot (per_slot, `TeacherRetriever.slot_queries`). The LLM retriever trains alone; after each epoch its
validation queries are blended with the CF retriever's at every weight in `teacher.cf_weights`; the best
blend's validation NDCG@10 (or the LLM alone's, teacher.select llm) picks the epoch kept, and training
stops once neither has improved for `patience` epochs (or at the `minutes` budget). Test is scored once
at the end.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

import numpy as np
import torch

from distill.artifacts import save_array
from distill.config import Recipe
from distill.data import Split
from distill.distributed import world
from distill.harness import evaluate, evaluate_model, metrics_record
from distill.losses import LossInputs, NegativeSampler, SoftmaxLoss
from distill.histories import Histories
from distill.positions import next_items, prefixes, training_positions, training_windows
from distill.resources import decoder_step_bytes, optimizer_bytes, require_memory
from distill.optimisers import llm_optimiser, strategy_name
from distill.trainer import StepOutput, Trainer, TrainerConfig
from student.model import SASRec
from teacher.checkpoint import save_teacher
from teacher.model import LowerStates, TeacherRetriever, blend_queries, build_teacher


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


class TeacherTask:
    """The LLM retriever's sampled (prefix -> next item) examples under the contrastive loss."""

    patience_metrics = ("valid_NDCG@10", "valid_NDCG@10_llm")  # training goes on while either improves

    def __init__(self, model: TeacherRetriever, split: Split, recipe: Recipe):
        self.model, self.split, self.recipe, self.cfg = model, split, recipe, recipe.teacher
        self.metric = {"blend": "valid_NDCG@10", "llm": "valid_NDCG@10_llm"}[self.cfg.select]  # picks the epoch
        self.loss = teacher_loss(recipe, split)
        self.trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if self.cfg.examples == "per_slot":   # every training position once per epoch, max_history to a window
            self.windows = training_windows(split.history("train"), self.cfg.max_history)
            self.n_prompts = len(self.windows.users)                   # one prompt per window
            self.lower = self.cache_lower_states() if self.cfg.inject_layer else None
        else:
            self.users, self.positions = training_positions(split)
            self.n_prompts = min(self.cfg.examples_per_epoch, len(self.users))
        self.cf_valid = model.cf.encode(split.history("valid"))    # q_CF, blended with each epoch's q_LLM
        self.valid, self.cf_weight = None, 0.0                     # the last validation's best blend
        longest = model.prompts.longest()
        batch = min(self.cfg.batch_size, self.n_prompts)
        require_memory(decoder_step_bytes(batch, longest, model.backbone.config, training=True)
                       + optimizer_bytes(model), f"a training step ({batch} prompts of up to {longest} tokens)",
                       "teacher.batch_size", model.device)

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.trainable.values())

    def num_batches(self) -> int:
        return -(-self.n_prompts // self.cfg.batch_size)

    def batches(self, rng: np.random.Generator, gen: torch.Generator) -> list[np.ndarray]:
        if self.cfg.examples == "per_slot":
            pick = rng.permutation(self.n_prompts)
        else:
            pick = rng.choice(len(self.users), size=self.n_prompts, replace=False)
        return [pick[lo:lo + self.cfg.batch_size] for lo in range(0, len(pick), self.cfg.batch_size)]

    def step(self, rows: np.ndarray) -> StepOutput:
        return self.slot_step(rows) if self.cfg.examples == "per_slot" else self.pooled_step(rows)

    def cache_lower_states(self) -> LowerStates:
        t0 = time.perf_counter()
        lower = LowerStates(self.model, self.window_items(np.arange(self.n_prompts)), self.cfg.eval_batch_size)
        print(f"teacher: the text-only states entering layer {self.cfg.inject_layer} of {self.n_prompts} windows "
              f"({lower.flat.numel() * lower.flat.element_size() / 2**20:.0f} MiB) in {time.perf_counter() - t0:.1f} s")
        return lower

    def window_items(self, rows: np.ndarray) -> Histories:
        """The items of windows `rows` (stored left-padded), one history each."""
        valid = self.windows.positions[rows] >= 0
        return Histories(self.windows.inputs[rows][valid], np.concatenate([[0], np.cumsum(valid.sum(1))]))

    def slot_step(self, rows: np.ndarray) -> StepOutput:
        """Windows `rows`: one causal pass each, an example at every slot (its next item)."""
        w = self.windows
        t = w.positions[rows]
        valid = t >= 0
        windows = self.window_items(rows)
        states = self.model.cf_slot_states(self.split.sequences, np.repeat(w.users[rows], valid.sum(1)), t[valid])
        lower = None if self.lower is None else self.lower.take(rows, self.model.device)
        q = self.model.slot_queries(windows, states, lower)                       # (S, D) q_LLM
        targets = torch.from_numpy(w.targets[rows][valid]).to(q.device)
        loss = self.loss(LossInputs(q, targets, self.model.items()))
        return StepOutput(loss, len(targets), int(self.model.prompts.lengths(windows).sum()))

    def pooled_step(self, rows: np.ndarray) -> StepOutput:
        users, pos = self.users[rows], self.positions[rows]
        hist = prefixes(self.split, users, pos)
        q = self.model.query(hist, blend=False)                                  # (B, D) q_LLM
        targets = torch.from_numpy(next_items(self.split, users, pos)).to(q.device)
        loss = self.loss(LossInputs(q, targets, self.model.items()))
        return StepOutput(loss, len(rows), int(self.model.prompts.lengths(hist).sum()))

    def train(self) -> None:
        self.model.train()

    def eval(self) -> None:
        self.model.eval()
        self.model.invalidate_index()

    def validate(self) -> dict[str, float]:
        items = self.model.item_vectors()
        llm = self.model.encode(self.split.history("valid"), desc="teacher valid queries", blend=False)
        ndcg, self.cf_weight, self.valid = best_blend(self.split, self.recipe, llm, self.cf_valid, items)
        return {"valid_NDCG@10": ndcg, "cf_weight": self.cf_weight,
                "valid_NDCG@10_llm": score_valid(self.split, self.recipe, llm, items)}

    def snapshot(self) -> dict[str, torch.Tensor]:
        state = {f"param.{n}": p.detach().clone() for n, p in self.trainable.items()}
        if self.valid is not None:
            state["valid.queries"] = torch.from_numpy(self.valid.copy())
            state["valid.cf_weight"] = torch.tensor(self.cf_weight, dtype=torch.float64)
        return state

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in self.trainable.items():
                p.copy_(state[f"param.{n}"])
        if "valid.queries" in state:
            self.valid, self.cf_weight = state["valid.queries"].numpy(), float(state["valid.cf_weight"])


def train_teacher(recipe: Recipe, split: Split, cf: SASRec, out: Path, seed: int, inputs: dict) -> dict | None:
    """Train, keep the best (epoch, CF weight) by validation NDCG@10, save to `out`, score test once.
    Resumable after every epoch (see distill.trainer). On N ranks (torchrun, deepspeed) every rank trains
    its share of each step and rank 0 saves what one process would save; the others return None."""
    c = recipe.teacher
    ranks = world()
    torch.manual_seed(seed)
    model = build_teacher(c, cf, split.titles, texts=split.texts)
    task = TeacherTask(model, split, recipe)
    cfg = TrainerConfig(epochs=c.epochs, patience=c.patience, **llm_optimiser(c), grad_accum=c.grad_accum,
                        max_seconds=None if c.minutes is None else 60 * c.minutes)
    result = Trainer(task, cfg, seed, "teacher", resume=(out, inputs), world=ranks).fit()
    peak_rss = ranks.gather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)   # bytes, per rank
    optimizer_bytes = ranks.gather(result.optimizer_state_bytes)
    if not ranks.main:
        return None
    task.restore(result.best_state)
    with torch.no_grad():
        model.cf_weight.fill_(task.cf_weight)
    task.eval()
    items = model.item_vectors()
    ev = recipe.eval
    llm = {stage: model.encode(split.history(stage), desc=f"teacher {stage} queries", blend=False)
           for stage in ("valid", "test")}                                   # q_LLM, encoded once per stage
    test = blend_queries(llm["test"], model.cf.encode(split.history("test")), task.cf_weight).astype(np.float32)
    results = evaluate_model(split, lambda stage: task.valid if stage == "valid" else test, items, recipe.eval)
    alone = {stage: evaluate(split, q, items, stage, ev.ks, ev.mask_history, index=ev.index)
             for stage, q in llm.items()}
    llm_alone = {**{stage: r.metrics for stage, r in alone.items()}, "by_popularity": alone["test"].by_popularity,
                 "cold": alone["test"].cold}
    trained_on = {"world_size": ranks.size, "strategy": strategy_name(c, ranks)}
    digest = save_teacher(model, out, {"split_hash": split.hash, "seed": seed, "inputs": inputs, **trained_on})
    save_array(out / "test_ranks.npy", results["test"].ranks)
    return metrics_record(results, split, best_epoch=result.best_epoch, cf_weight=task.cf_weight, seed=seed,
                          llm_alone=llm_alone, cf_weight_grid=list(c.cf_weights),
                          curve=result.curve, checkpoint_hash=digest, train_seconds=round(result.seconds, 2),
                          inputs=inputs, **trained_on, peak_rss_bytes_per_rank=[int(b) for b in peak_rss],
                          optimizer_state_bytes_per_rank=[int(b) for b in optimizer_bytes],
                          **result.rates())
