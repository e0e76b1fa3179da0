"""Resumable training: the state an epoch loop needs to continue after a kill, bit for bit.

A training stage writing RUN/NAME/ keeps RUN/NAME.resume/ while it runs:
state.safetensors (named groups of tensors: weights, optimizer moments, RNG
states; saved as GROUP/KEY) and state.json
(epoch, counters, curve, optimizer/scheduler hyper-parameters, numpy RNG, and
the stage's input hashes). It is rewritten atomically after every epoch and
removed once RUN/NAME/ is complete. A resume folder built from other inputs is
ignored (and replaced at the next epoch end). One that cannot be read (truncated,
edited, a group or key missing) is set aside as RUN/NAME.resume.broken-N with a
warning, and the stage starts again from epoch 1: it never blocks a rerun.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from distill.artifacts import atomic_dir, read_record


def resume_dir(out: Path) -> Path:
    return out.with_name(out.name + ".resume")


def optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state dict as (tensors keyed PARAM_INDEX.NAME, JSON-able param groups)."""
    sd = opt.state_dict()
    tensors = {f"{idx}.{name}": value.detach().contiguous().clone()
               for idx, per_param in sd["state"].items() for name, value in per_param.items()}
    return tensors, {"param_groups": sd["param_groups"]}


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_resume(out: Path, groups: dict[str, dict[str, torch.Tensor]], meta: dict) -> None:
    """Write named groups of tensors (e.g. model, best, optim, rng) and the JSON meta, atomically."""
    tensors = {f"{group}/{key}": t.detach().contiguous().cpu() for group, state in groups.items()
               for key, t in state.items()}
    with atomic_dir(resume_dir(out)) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta, sort_keys=True))


def set_aside(out: Path, why: str) -> Path:
    """Rename an unreadable OUT.resume/ to OUT.resume.broken-N (kept for inspection) and say so on stderr."""
    folder = resume_dir(out)
    n = 1
    while (broken := folder.with_name(f"{folder.name}.broken-{n}")).exists():
        n += 1
    os.replace(folder, broken)
    print(f"anyo: warning: {folder}: unreadable resume state ({why}); set aside as {broken.name}, "
          f"training starts again from epoch 1", file=sys.stderr)
    return broken


def load_resume(out: Path, inputs: dict, groups_needed=(), meta_needed=()) \
        -> tuple[dict[str, dict[str, torch.Tensor]], dict] | None:
    """The groups and meta saved for `out` if they were built from exactly `inputs`, else None.
    A state that cannot be read, or lacks one of `groups_needed` / `meta_needed`, is set aside (None)."""
    folder = resume_dir(out)
    if not folder.is_dir():
        return None
    try:
        meta = read_record(folder / "state.json", "inputs", *meta_needed)
        if meta["inputs"] != inputs:
            return None
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in load_file(str(folder / "state.safetensors")).items():
            group, name = key.split("/", 1)
            groups.setdefault(group, {})[name] = t
        missing = [g for g in groups_needed if g not in groups]
        if missing:
            raise ValueError(f"no group {missing[0]!r} in state.safetensors")
    except Exception as e:  # noqa: BLE001 — safetensors, JSON and key errors alike: the state is unusable
        set_aside(out, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None
    return groups, meta


def clear_resume(out: Path) -> None:
    shutil.rmtree(resume_dir(out), ignore_errors=True)
