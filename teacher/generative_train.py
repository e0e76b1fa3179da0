"""Training the generative baseline with the shared trainer (distill/trainer.py).

`GenerativeTask` is what the trainer sees: each epoch samples `llara.examples_per_epoch` training examples
(history prefix -> next item, as the dense teacher's), each with 19 fresh uniform negatives outside the user's
sequence, shuffled with the target, from the trainer's generator (so a resumed run draws the same); a step is
the answer-only LM loss of one batch of prompts; validation is the generative HR@1 on the validation split's
20 candidates (of `llara.valid_users` seeded users, all when unset). Test is scored once, at the end, with the
best epoch's weights, on every user.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from distill.config import Recipe
from distill.data import Split
from distill.distributed import world
from distill.positions import next_items, prefixes, training_positions
from distill.resources import decoder_step_bytes, optimizer_bytes, require_memory
from distill.optimisers import llm_optimiser, strategy_name
from distill.trainer import StepOutput, Trainer, TrainerConfig
from student.model import SASRec
from teacher.checkpoint import save_generative
from teacher.generative import GenerativeRecommender, build_generative, score_candidates, training_candidates


class GenerativeTask:
    metric = "valid_HR@1"   # the best epoch: validation HR@1 of the generated answers
    patience_metrics = (metric, "valid_ValidRatio")   # training goes on while it learns to name a candidate

    def __init__(self, model: GenerativeRecommender, split: Split):
        self.model, self.split, self.cfg = model, split, model.cfg
        self.users, self.positions = training_positions(split)
        self.per_epoch = min(self.cfg.examples_per_epoch, len(self.users))
        self.trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        n = self.cfg.valid_users
        self.valid_users = None if n is None or n >= split.n_users else \
            np.sort(np.random.default_rng(self.cfg.shuffle_seed).choice(split.n_users, n, replace=False))

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.trainable.values())

    def num_batches(self) -> int:
        return math.ceil(self.per_epoch / self.cfg.batch_size)

    def batches(self, rng: np.random.Generator, gen: torch.Generator) -> list[tuple[np.ndarray, ...]]:
        """(users, positions, targets, candidates in prompt order) per batch."""
        pick = rng.choice(len(self.users), size=self.per_epoch, replace=False)
        users, pos = self.users[pick], self.positions[pick]
        targets = next_items(self.split, users, pos)
        cands, _ = training_candidates(self.split, users, targets, rng, self.cfg.num_candidates)
        b = self.cfg.batch_size
        return [(users[lo:lo + b], pos[lo:lo + b], targets[lo:lo + b], cands[lo:lo + b])
                for lo in range(0, self.per_epoch, b)]

    def step(self, batch) -> StepOutput:
        users, pos, targets, cands = batch
        found = prefixes(self.split, users, pos)
        hist = [found.row(i) for i in range(len(found))]
        prompts = self.model.prompts(hist, cands, targets)
        loss, _ = self.model.loss(prompts, self.model.cf_histories(hist))
        return StepOutput(loss, len(users), int(prompts.attention_mask.sum()))

    def train(self) -> None:
        self.model.train()

    def eval(self) -> None:
        self.model.eval()

    def validate(self) -> dict[str, float]:
        m = score_candidates(self.model, self.split, "valid", self.cfg.eval_batch_size, self.valid_users,
                             desc="llara valid").metrics
        return {"valid_HR@1": m["HR@1"], "valid_ValidRatio": m["ValidRatio"],
                "valid_HR@1_valid": m["HR@1_valid"]}

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.trainable.items()}

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in self.trainable.items():
                p.copy_(state[n])


def trainer_config(recipe: Recipe) -> TrainerConfig:
    c = recipe.llara
    return TrainerConfig(epochs=c.epochs, patience=c.patience, **llm_optimiser(recipe.teacher, c),
                         grad_accum=c.grad_accum)


def train_generative(recipe: Recipe, split: Split, cf: SASRec, out: Path, seed: int, inputs: dict) -> dict | None:
    """Train (resumable after every epoch), keep the best epoch by validation HR@1, score test once, save to
    `out` (adapter/, heads.safetensors, llara.json, test_outputs.json); returns the metrics record (on N ranks,
    rank 0 scores and saves; the others return None)."""
    cfg = recipe.llara
    ranks = world()
    torch.manual_seed(seed)
    model = build_generative(cfg, recipe.teacher, cf, split.titles)
    longest = model.prompts.longest(0)
    batch = min(cfg.batch_size, cfg.examples_per_epoch)
    base = model.lm.config
    require_memory(decoder_step_bytes(batch, longest, base, training=True) + optimizer_bytes(model)
                   + 4 * 3 * batch * 32 * base.vocab_size,     # head logits over the answer tokens (+ grads)
                   f"a training step ({batch} prompts of up to {longest} tokens)", "llara.batch_size", model.device)
    task = GenerativeTask(model, split)
    fit = Trainer(task, trainer_config(recipe), seed, "llara", resume=(out, inputs), world=ranks).fit()
    if not ranks.main:
        return None
    task.restore(fit.best_state)
    model.eval()
    start = time.perf_counter()
    test = score_candidates(model, split, "test", cfg.eval_batch_size, desc="llara test")
    test_seconds = time.perf_counter() - start
    outputs = [{"user": int(u), "output": text, "named_item": int(item)}
               for u, text, item in zip(test.users, test.outputs, test.named)]
    trained_on = {"world_size": ranks.size, "strategy": strategy_name(recipe.teacher, ranks)}
    digest = save_generative(model, out, {"split_hash": split.hash, "seed": seed, "inputs": inputs, **trained_on},
                             {"test_outputs.json": outputs})
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in task.parameters())
    return {"candidates": test.metrics, "valid_ratio": test.metrics["ValidRatio"], "stage": "test",
            "protocol": "generative, the split's 20 candidates", "split_hash": split.hash, "seed": seed,
            "best_epoch": fit.best_epoch, "best_valid_HR@1": fit.best_score, "curve": fit.curve,
            "train_seconds": round(fit.seconds, 2), **fit.rates(),
            "test_seconds": round(test_seconds, 2), "test_users_per_second": len(test.users) / test_seconds,
            "params": params, "trainable_params": trainable, "checkpoint_hash": digest, "inputs": inputs,
            **trained_on}
