"""Training the SASRec student as a `TrainingTask`: alone (own loss) or distilled (own + teacher terms).

Every training position is a prediction target (the windows of distill.positions).
Early stopping reads validation only; test is scored once, with the best weights, at the end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from distill.artifacts import save_array
from distill.config import Recipe
from distill.data import Split
from distill.harness import evaluate, evaluate_model, metrics_record
from distill.losses import LossInputs, NegativeSampler, SoftmaxLoss, TeacherTargets, WeightedLoss
from distill.positions import training_windows
from distill.resources import require_memory, student_step_bytes
from distill.trainer import FitResult, StepOutput, Trainer, TrainerConfig
from student.model import SASRec, SASRecConfig, save_student

# (users (P,), positions (P,)) -> teacher outputs for the pairs found in the cache
TeacherLookup = Callable[[np.ndarray, np.ndarray], "TeacherTargets | None"]


def own_loss(recipe: Recipe, split: Split, exclude_unseen: bool = False) -> SoftmaxLoss:
    """The student's next-item softmax; exclude_unseen: the items never seen in training are no negatives."""
    s = recipe.student
    exclude = torch.from_numpy(split.item_popularity() == 0) if exclude_unseen else None
    if s.loss == "full":
        return SoftmaxLoss(exclude=exclude)
    pop = torch.from_numpy(split.item_popularity()) if s.negative_sampling == "popularity" else None
    return SoftmaxLoss(sampler=NegativeSampler(split.n_items, s.num_negatives, pop), exclude=exclude)


def build_student(recipe: Recipe, split: Split) -> SASRec:
    s = recipe.student
    return SASRec(SASRecConfig(split.n_items, recipe.data.max_len, s.hidden_size, s.num_layers, s.num_heads, s.dropout))


class StudentTask:
    """SASRec + a weighted loss over the training windows, validated by NDCG@10 on validation."""

    metric = "valid_NDCG@10"
    patience_metrics = (metric,)

    def __init__(self, model: SASRec, split: Split, recipe: Recipe, loss: WeightedLoss,
                 teacher: TeacherLookup | None = None):
        self.model, self.split, self.recipe, self.loss, self.teacher = model, split, recipe, loss, teacher
        self.windows = training_windows(split.history("train"), model.cfg.max_len)
        self.batch_size = recipe.student.batch_size
        m = model.cfg
        s = recipe.student
        scored = m.n_items + 1 if s.loss == "full" else s.num_negatives + 1
        require_memory(student_step_bytes(min(self.batch_size, len(self.windows.inputs)), m.max_len, scored,
                                          m.hidden_size, m.num_layers), "a training step", "student.batch_size")

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.model.parameters()) + list(self.loss.parameters())

    def num_batches(self) -> int:
        return -(-len(self.windows.inputs) // self.batch_size)

    def batches(self, rng: np.random.Generator, gen: torch.Generator) -> list[np.ndarray]:
        order = torch.randperm(len(self.windows.inputs), generator=gen).numpy()
        return [order[lo:lo + self.batch_size] for lo in range(0, len(order), self.batch_size)]

    def step(self, rows: np.ndarray) -> StepOutput:
        w = self.windows
        tgt = torch.from_numpy(w.targets[rows])
        sel = tgt > 0
        h = self.model(torch.from_numpy(w.inputs[rows]))                     # (B, T, d)
        inputs = LossInputs(h[sel], tgt[sel], self.model.item_table)
        if self.teacher is not None and self.loss.needs_teacher:
            b, t = np.nonzero(sel.numpy())
            inputs.teacher = self.teacher(w.users[rows][b], w.positions[rows][b, t])
            read = np.arange(w.inputs.shape[1])[None, :] <= t[:, None]            # slots up to each position
            inputs.history = torch.from_numpy(w.inputs[rows][b] * read)            # (P, T)
        value, _ = self.loss(inputs)
        return StepOutput(value, int(sel.sum()))

    def train(self) -> None:
        self.model.train()

    def eval(self) -> None:
        self.model.eval()

    def validate(self) -> dict[str, float]:
        ev = self.recipe.eval
        users = self.model.encode(self.split.history("valid"))
        ndcg = evaluate(self.split, users, self.model.item_vectors(), "valid", ev.ks, ev.mask_history,
                        index=ev.index).metrics["NDCG@10"]
        return {self.metric: ndcg}

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {**{f"model.{k}": v.detach().clone() for k, v in self.model.state_dict().items()},
                **{f"loss.{k}": v.detach().clone() for k, v in self.loss.state_dict().items()}}

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        for prefix, module in (("model.", self.model), ("loss.", self.loss)):
            module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})


def trainer_config(recipe: Recipe, epochs: int | None = None) -> TrainerConfig:
    s = recipe.student
    return TrainerConfig(epochs=epochs or s.epochs, patience=s.patience, lr=s.lr, weight_decay=s.weight_decay)


def fit(model: SASRec, split: Split, recipe: Recipe, loss: WeightedLoss, seed: int,
        teacher: TeacherLookup | None = None, desc: str = "student", epochs: int | None = None,
        resume: tuple[Path, dict] | None = None) -> FitResult:
    task = StudentTask(model, split, recipe, loss, teacher)
    return Trainer(task, trainer_config(recipe, epochs), seed, desc, resume).fit()


def train_and_save(recipe: Recipe, split: Split, out: Path, seed: int, loss: WeightedLoss,
                   teacher: TeacherLookup | None = None, desc: str = "student", inputs: dict | None = None,
                   init: SASRec | None = None, epochs: int | None = None, extra: dict | None = None,
                   item_prior: Callable[[], torch.nn.Module] | None = None) -> dict:
    """Train (from `init`'s weights if given), keep the best checkpoint in `out`, score test once.

    With `inputs` (the stage's input hashes) training is resumable and the record carries them.
    `item_prior` builds the map from the ID table to the item table used while training
    (student/embedding_distillation.py); it is folded into the table before the model is scored and saved.
    """
    torch.manual_seed(seed)
    model = build_student(recipe, split)
    if init is not None:
        model.load_state_dict(init.state_dict())
    if item_prior is not None:
        model.item_prior = item_prior()
    resume = (out, inputs) if inputs is not None else None
    result = fit(model, split, recipe, loss, seed, teacher, desc, epochs, resume)
    model.load_state_dict({k[len("model."):]: v for k, v in result.best_state.items() if k.startswith("model.")})
    model.fold_item_prior()
    model.eval()
    results = evaluate_model(split, lambda stage: model.encode(split.history(stage)), model.item_vectors(),
                             recipe.eval)
    record = metrics_record(results, split, best_epoch=result.best_epoch, train_seconds=round(result.seconds, 2),
                            seed=seed, curve=result.curve, **result.rates(),
                            **({"inputs": inputs} if inputs else {}), **(extra or {}))
    save_student(model, out, {"split_hash": split.hash, "seed": seed})
    save_array(out / "test_ranks.npy", results["test"].ranks)
    return record
