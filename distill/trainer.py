"""The one training loop: epochs, validation, early stopping, best snapshot, curve, resume.

Every trained model (the SASRec student, the LLM teacher, the generative baseline)
plugs in as a `TrainingTask`: it owns its model, batches and loss; the `Trainer`
owns everything around them. One epoch is

    for batch in task.batches(rng, gen):            # the task's batch specs for this epoch
        out = task.step(batch)                       # loss of one forward pass
        (out.loss / grad_accum).backward()           # optimiser + scheduler step every grad_accum batches
    record = task.validate()                         # {task.metric: validation NDCG@10 or HR@1, ...}

On N ranks (`distill.distributed.World`, set by torchrun or deepspeed) every rank draws the same
epoch of batch specs; of each optimiser step's grad_accum x N batches rank r takes every N-th from r,
and gradients are summed over the ranks before the step, so N ranks take the optimiser steps of one
rank with grad_accum x N. Rank 0 validates, keeps time and writes; the others receive its decisions.

The best epoch's `task.snapshot()` is kept. With a time budget (`max_seconds`) training stops at the
first optimiser step past it, and that (partial) epoch is validated and may be kept like any other.
With `resume=(out, inputs)` the whole state (current and best snapshots, optimiser, scheduler, RNGs,
curve) is saved to OUT.resume/ after every epoch and a killed run continues from it bit for bit
(see distill.resume).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from distill.distributed import ONE_PROCESS, World
from distill.events import Events
from distill.optimisers import OptimiserConfig, build_optimiser
from distill.resume import load_resume, resume_dir, save_resume, set_aside


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar
    examples: int       # training examples in the batch
    tokens: int = 0     # input tokens (LLM tasks), for tokens/s


class TrainingTask(Protocol):
    """What a model provides to be trained by `Trainer`."""

    metric: str                                                    # key of validate() that picks the best epoch
    patience_metrics: tuple[str, ...]                              # keys whose improvement resets the patience
    def parameters(self) -> list[torch.nn.Parameter]: ...        # optimised
    def num_batches(self) -> int: ...                              # batches per epoch
    def batches(self, rng: np.random.Generator, gen: torch.Generator) -> list[Any]: ...  # one epoch's batch specs
    def step(self, batch: Any) -> StepOutput: ...
    def train(self) -> None: ...
    def eval(self) -> None: ...
    def validate(self) -> dict[str, float]: ...                  # metric (higher is better) + curve fields
    def snapshot(self) -> dict[str, torch.Tensor]: ...           # everything needed to restore this epoch
    def restore(self, state: dict[str, torch.Tensor]) -> None: ...


@dataclass(kw_only=True)
class TrainerConfig(OptimiserConfig):
    epochs: int
    patience: int
    grad_accum: int = 1
    max_seconds: float | None = None   # training-time budget (validation excluded); None = epochs alone


@dataclass
class FitResult:
    best_state: dict[str, torch.Tensor]
    best_epoch: int
    best_score: float
    curve: list[dict] = field(default_factory=list)
    seconds: float = 0.0         # training time (validation excluded)
    examples: int = 0
    tokens: int = 0
    optimizer_state_bytes: int = 0   # held by this rank at the end (ZeRO: its partition)

    def rates(self) -> dict[str, float]:
        if not self.seconds:
            return {}
        rates = {"examples_per_second": self.examples / self.seconds}
        if self.tokens:
            rates["tokens_per_second"] = self.tokens / self.seconds
        return rates


@dataclass
class _Progress:
    epoch: int = 0
    best: float = -math.inf
    best_epoch: int = 0
    stale: int = 0
    best_seen: dict = field(default_factory=dict)  # best value so far of each patience metric
    examples: int = 0
    tokens: int = 0
    steps: int = 0               # optimiser steps
    train_seconds: float = 0.0
    curve: list[dict] = field(default_factory=list)


class Trainer:
    def __init__(self, task: TrainingTask, cfg: TrainerConfig, seed: int, desc: str,
                 resume: tuple[Path, dict] | None = None, world: World = ONE_PROCESS):
        self.task, self.cfg, self.desc, self.resume, self.world = task, cfg, desc, resume, world
        self.group = cfg.grad_accum * world.size                 # batches per optimiser step, all ranks together
        torch.manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.optim = build_optimiser(task.parameters(), cfg, world, cfg.epochs * math.ceil(task.num_batches() / self.group))

    def fit(self) -> FitResult:
        p, best_state = self._load()
        self.events = Events(self.resume[0] if self.resume is not None and self.world.main else None,
                             resumed=p.epoch > 0)
        for epoch in range(p.epoch + 1, self.cfg.epochs + 1):
            if p.stale >= self.cfg.patience or self._spent(p.train_seconds):
                break
            loss = self._epoch(epoch, p)
            self.task.eval()
            record = self.world.from_main(self.task.validate() if self.world.main else None)
            p.epoch = epoch
            p.curve.append({"epoch": epoch, "examples": p.examples, "seconds": round(p.train_seconds, 2),
                            "train_loss": loss, "examples_per_second": p.examples / max(p.train_seconds, 1e-9),
                            **record})
            if self.world.main:
                print(f"{self.desc} epoch {epoch}: loss {loss:.4f}  " + "  ".join(
                    f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())
                    + f"  ({p.examples / max(p.train_seconds, 1e-9):.1f} examples/s)")
            if record[self.task.metric] > p.best:
                p.best, p.best_epoch = record[self.task.metric], epoch
                best_state = self.task.snapshot() if self.world.main else {}
            improved = [k for k in self.task.patience_metrics if record[k] > p.best_seen.get(k, -math.inf)]
            p.best_seen.update({k: record[k] for k in improved})
            p.stale = 0 if improved else p.stale + 1
            self.events.epoch(epoch, p.curve[-1])
            self._save(p, best_state)
        self.events.close()
        return FitResult(best_state, p.best_epoch, p.best, p.curve, p.train_seconds, p.examples, p.tokens,
                         self.optim.held_bytes())

    def _epoch(self, epoch: int, p: _Progress) -> float:
        self.task.train()
        batches = self.task.batches(self.rng, self.gen)
        total, done, examples, tokens, t0 = 0.0, 0, 0, 0, time.perf_counter()
        bar = tqdm(total=len(batches), desc=f"{self.desc} epoch {epoch}", leave=False, disable=not self.world.main)
        for lo in range(0, len(batches), self.group):
            share = batches[lo + self.world.rank:lo + self.group:self.world.size]     # this rank's batches
            for batch in share:
                out = self.task.step(batch)
                self.optim.backward(out.loss / self.group)
                total, done = total + out.loss.item(), done + 1
                examples, tokens = examples + out.examples, tokens + out.tokens
            if self.optim.lockstep and len(share) < len(batches[lo:lo + self.group:self.world.size]):
                # a short share of the epoch's last step: rank 0's first batch again, weighted 0, so that every
                # rank runs as many backward passes (ZeRO-2 reduces inside each) and adds nothing
                self.optim.backward(self.task.step(batches[lo]).loss * 0.0)
            self.optim.step()
            p.steps += 1
            if self.world.main:                                   # rank 0 has a batch in every step
                self.events.step(p.steps, out.loss.item(), self.optim.lr())
            bar.update(min(self.group, len(batches) - lo))
            bar.set_postfix(loss=f"{total / max(done, 1):.4f}")
            if self.cfg.max_seconds is not None and self.world.from_main(
                    self._spent(p.train_seconds + time.perf_counter() - t0)):
                break                     # the budget ends this epoch early; it is validated as usual
        bar.close()
        total, done, examples, tokens = self.world.sum([total, done, examples, tokens])
        p.examples += int(examples)
        p.tokens += int(tokens)
        p.train_seconds = self.world.from_main(p.train_seconds + time.perf_counter() - t0)  # rank 0's clock
        return total / max(done, 1)

    def _spent(self, seconds: float) -> bool:
        return self.cfg.max_seconds is not None and seconds >= self.cfg.max_seconds

    # ---------------------------------------------------------------- resume
    def _save(self, p: _Progress, best_state: dict | None) -> None:
        if self.resume is None:
            return
        opt_tensors, opt_meta = self.optim.state()                # gathered from every rank (ZeRO)
        if self.world.main:
            out, inputs = self.resume
            save_resume(out, {"current": self.task.snapshot(), "best": best_state or {}, "optim": opt_tensors,
                              "rng": {"torch": torch.get_rng_state(), "order": self.gen.get_state()}},
                        {"inputs": inputs, "progress": vars(p), "optimizer": opt_meta,
                         "numpy_rng": self.rng.bit_generator.state})
        self.world.barrier()                                      # no rank runs ahead of a saved epoch

    def _load(self) -> tuple[_Progress, dict | None]:
        if self.resume is None:
            return _Progress(), None
        fresh = (self.task.snapshot(), self.optim.state(), torch.get_rng_state(), self.gen.get_state(),
                 self.rng.bit_generator.state)                    # before any rank reads: state() is collective
        return self.world.main_first(lambda: self._read_resume(fresh))  # a broken state is set aside once, by rank 0

    def _read_resume(self, fresh: tuple) -> tuple[_Progress, dict | None]:
        saved = load_resume(*self.resume, groups_needed=("current", "rng"),
                            meta_needed=("progress", "optimizer", "numpy_rng"))
        if saved is None:
            return _Progress(), None
        groups, meta = saved
        try:
            self.task.restore(groups["current"])
            self.optim.load_state(groups.get("optim", {}), meta["optimizer"])
            torch.set_rng_state(groups["rng"]["torch"])
            self.gen.set_state(groups["rng"]["order"])
            self.rng.bit_generator.state = meta["numpy_rng"]
            p = _Progress(**meta["progress"])
        except Exception as e:  # noqa: BLE001 — a state that does not fit: start again exactly as a fresh run
            self.task.restore(fresh[0])
            self.optim.load_state(*fresh[1])
            torch.set_rng_state(fresh[2])
            self.gen.set_state(fresh[3])
            self.rng.bit_generator.state = fresh[4]
            set_aside(self.resume[0], str(e).splitlines()[0] if str(e) else type(e).__name__)
            return _Progress(), None
        print(f"{self.desc}: resuming after epoch {p.epoch} from {resume_dir(self.resume[0])}")
        return p, groups.get("best") or None
