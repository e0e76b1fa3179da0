"""The teacher's learning curve inside an epoch: `anyo teacher train` with a validation every N optimiser steps.

    python benchmarks/slot_curve.py RECIPE --out RUN --at 40,110,220 [--set KEY=VALUE ...] [--seed S]

Runs the `teacher train` stage unchanged (same seed, same example order, same learning-rate schedule, the
same RUN/teacher at the end), except that after each optimiser step count in `--at` the LLM retriever is validated as
the trainer does after an epoch (validation NDCG@10 of the LLM alone and of the best blend over
teacher.cf_weights). One line per point goes to RUN/teacher.curve.jsonl: optimiser steps, examples seen,
training seconds (the validations excluded), examples/s, both validation figures and w. For a teacher
whose epochs are longer than the CPU budget (per-slot training on a shared 2-core machine: ~100,000
examples an epoch) the per-epoch curve in teacher.json has one point; this gives several. Validation runs
in eval mode under no_grad and draws no random numbers, so training is the stage's own.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import teacher.train as teacher_train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--at", default="40,110,220",
                    help="comma-separated optimiser steps (counted over all epochs) to validate after; the "
                         "trainer validates at every epoch's end anyway")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()

    curve_file = args.out / "teacher.curve.jsonl"
    at = {int(s) + 1 for s in args.at.split(",") if s.strip()}   # hook before batch s+1's update = after s steps
    base = teacher_train.TeacherTask

    class CurveTask(base):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self._steps, self._examples, self._t0, self._valid_s = 0, 0, time.perf_counter(), 0.0

        def step(self, rows):
            out = super().step(rows)
            self._steps += 1
            self._examples += out.examples
            if self._steps in at:
                # called before this batch's optimiser update: the model has had `_steps - 1` updates
                self.point(self._steps - 1)
            return out

        def point(self, steps: int) -> None:
            v0 = time.perf_counter()
            train_s = v0 - self._t0 - self._valid_s
            was_training = self.model.training
            self.eval()
            with torch.no_grad():
                rec = base.validate(self)
            if was_training:
                self.train()
            self._valid_s += time.perf_counter() - v0
            line = {"steps": steps, "examples": self._examples, "train_seconds": round(train_s, 1),
                    "examples_per_second": round(self._examples / max(train_s, 1e-9), 1),
                    "valid_seconds": round(time.perf_counter() - v0, 1),
                    "utc": time.strftime("%H:%M:%S", time.gmtime()), **rec}
            print("CURVE", json.dumps(line), flush=True)
            with curve_file.open("a") as f:
                f.write(json.dumps(line) + "\n")

    teacher_train.TeacherTask = CurveTask
    from distill.cli import main as cli_main
    argv = ["teacher", "train", args.recipe, "--out", str(args.out)]
    for o in args.overrides:
        argv += ["--set", o]
    if args.seed is not None:
        argv += ["--seed", str(args.seed)]
    sys.exit(cli_main(argv))


if __name__ == "__main__":
    main()
