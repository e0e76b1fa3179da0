"""The shared training loop on a task small enough to reason about: a linear model, scripted validation."""

import numpy as np
import pytest
import torch

from distill.trainer import StepOutput, Trainer, TrainerConfig


class ScriptedTask:
    """Regression of y = 2x; validate() returns scripted scores (one per epoch)."""

    metric = "score"
    patience_metrics = ("score",)

    def __init__(self, scores, secondary=None, fail_at=None):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(1, 1)
        self.scores, self.secondary, self.fail_at, self.epoch = scores, secondary, fail_at, 0
        self.x = torch.linspace(-1, 1, 32)[:, None]

    def parameters(self):
        return list(self.model.parameters())

    def num_batches(self):
        return 4

    def batches(self, rng, gen):
        order = torch.randperm(32, generator=gen)
        return [order[i:i + 8] for i in range(0, 32, 8)]

    def step(self, rows):
        x = self.x[rows]
        return StepOutput(((self.model(x) - 2 * x) ** 2).mean(), len(rows))

    def train(self):
        self.model.train()

    def eval(self):
        self.model.eval()

    def validate(self):
        self.epoch += 1
        if self.epoch == self.fail_at:
            raise KeyboardInterrupt  # a kill after the previous epoch's state was saved
        record = {"score": self.scores[self.epoch - 1]}
        if self.secondary is not None:
            record["other"] = self.secondary[self.epoch - 1]
        return record

    def snapshot(self):
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def restore(self, state):
        self.model.load_state_dict(state)


def fit(task, epochs=6, patience=2, resume=None):
    return Trainer(task, TrainerConfig(epochs=epochs, patience=patience, lr=0.1), seed=0, desc="t", resume=resume).fit()


def test_keeps_the_best_epoch_and_stops_after_patience():
    result = fit(ScriptedTask([0.1, 0.3, 0.2, 0.25, 0.9, 1.0]))
    assert result.best_epoch == 2 and result.best_score == 0.3
    assert [c["epoch"] for c in result.curve] == [1, 2, 3, 4]      # two epochs without a better score
    assert result.examples == 4 * 32 and {"train_loss", "examples_per_second", "score"} <= set(result.curve[0])


def test_a_secondary_metric_that_improves_keeps_training_going():
    task = ScriptedTask([0.1, 0.3, 0.2, 0.25, 0.9, 1.0], secondary=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    task.patience_metrics = ("score", "other")
    result = fit(task)
    assert len(result.curve) == 6 and result.best_epoch == 6


def test_learning_rate_follows_the_transformers_schedule():
    task = ScriptedTask([0.1] * 4)
    trainer = Trainer(task, TrainerConfig(epochs=4, patience=9, lr=0.1, schedule="cosine", warmup_ratio=0.25), 0, "t")
    lrs = []
    sched, opt = trainer.optim.sched, trainer.optim.opt
    real = sched.step
    sched.step = lambda: (lrs.append(opt.param_groups[0]["lr"]), real())[1]
    trainer.fit()
    assert lrs[0] == 0.0 and max(lrs) == pytest.approx(0.1) and lrs[-1] < 0.01   # warm-up, peak, cosine decay
    assert np.argmax(lrs) == 4                                                      # 25% of 16 steps


def test_a_killed_fit_resumes_to_the_same_result(tmp_path):
    scores = [0.1, 0.3, 0.2, 0.5, 0.4, 0.45]
    clean = fit(ScriptedTask(scores), resume=(tmp_path / "clean", {"x": 1}))
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        fit(ScriptedTask(scores, fail_at=3), resume=(out, {"x": 1}))
    task = ScriptedTask(scores)
    task.epoch = 2                                   # the scripted scores continue after the saved epoch
    resumed = fit(task, resume=(out, {"x": 1}))
    assert resumed.best_epoch == clean.best_epoch == 4
    assert [c["train_loss"] for c in resumed.curve] == [c["train_loss"] for c in clean.curve]
    for k in clean.best_state:
        assert torch.equal(resumed.best_state[k], clean.best_state[k])


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_a_spent_time_budget_ends_training_at_the_first_optimiser_step_and_validates_it(grad_accum):
    task = ScriptedTask([0.1, 0.2, 0.3])
    cfg = TrainerConfig(epochs=3, patience=3, lr=0.1, grad_accum=grad_accum, max_seconds=1e-12)
    result = Trainer(task, cfg, seed=0, desc="t").fit()
    assert [e["epoch"] for e in result.curve] == [1]          # no second epoch once the budget is spent
    assert result.examples == 8 * grad_accum                   # one optimiser step's batches, not the epoch's 32
    assert result.best_epoch == 1 and task.epoch == 1          # the partial epoch was validated and kept
