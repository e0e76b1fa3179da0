"""TensorBoard event files of a training stage (the `tensorboard` extra; without it, none are written).

While a stage trains they go to RUN/NAME.events/ (beside its resume state, which is rewritten whole every
epoch); when the stage is complete they move to RUN/NAME/tb/ (`keep_events`). A stage that starts again
from epoch 1 starts its events afresh; one that resumes appends to them. Open them with
`tensorboard --logdir RUN`. They are logs: the sealed record of the stage is metrics.json (its `curve` holds
the same per-epoch figures).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

try:
    from torch.utils.tensorboard import SummaryWriter
except ImportError:  # the tensorboard extra is not installed
    SummaryWriter = None


class Events:
    """Scalars by optimiser step (loss, learning rate) and by epoch (validation metrics, examples/s)."""

    def __init__(self, out: Path | None, resumed: bool):
        self.writer = None
        if SummaryWriter is not None and out is not None:
            if not resumed:
                shutil.rmtree(events_dir(out), ignore_errors=True)
            self.writer = SummaryWriter(str(events_dir(out)))

    def step(self, step: int, loss: float, lr: float) -> None:
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/learning_rate", lr, step)

    def epoch(self, epoch: int, record: dict) -> None:
        if self.writer is None:
            return
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "epoch":
                self.writer.add_scalar(f"epoch/{key}", value, epoch)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def events_dir(out: Path) -> Path:
    return out.with_name(out.name + ".events")


def keep_events(out: Path) -> None:
    """Move the finished stage's events from beside its resume state into RUN/NAME/tb/."""
    if events_dir(out).is_dir():
        shutil.rmtree(out / "tb", ignore_errors=True)
        os.replace(events_dir(out), out / "tb")
