"""SIGKILL `anyo run` inside each stage, rerun, and compare with an uninterrupted run.

One chain kills the same run once per stage (prepare, student, teacher train,
teacher infer, distill, bench) at a random moment after the stage has started,
relaunching each time; a last `anyo run`, a fresh process from the shell, must
complete and equal the uninterrupted `tiny_run`: bit-identical split and teacher
cache, the same metrics for the training stages (which resume from their last
epoch rather than start over). The killed launches are forked from a warm
process (tests/launcher.py) so each starts in milliseconds instead of a minute of
imports; the report skips its serving-cost measurement. The chain runs once in
CI; more random kill points: `pytest -m kill_matrix`.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import RECIPE, sets
from distill.artifacts import sha256_file

# stage -> file whose appearance means the stage is under way (None: from process start)
STAGE_MARKERS = [
    ("prepare", None),
    ("student", "student_alone.resume/state.json"),
    ("teacher", "teacher.resume/state.json"),
    ("infer", "teacher_cache/shard-00000.safetensors"),
    ("distill", "student_distilled.resume/state.json"),
    ("bench", "student_distilled/metrics.json"),
]


def kill_during(launcher, run: Path, overrides: list[str], marker: str | None, delay: float, log: Path) -> str:
    """Launch, wait for `marker`, sleep `delay`, SIGKILL the process group; returns the output."""
    pid = launcher.start(["run", RECIPE, "--out", str(run)] + sets(overrides), log)
    deadline = time.monotonic() + 600
    while marker is not None and not (run / marker).exists() and launcher.alive(pid):
        assert time.monotonic() < deadline, f"{marker} never appeared"
        time.sleep(0.02)
    time.sleep(delay)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # it finished first
    launcher.wait(pid, log)
    return log.read_text()


def training_metrics(run: Path) -> dict:
    return {stage: json.loads((run / stage / "metrics.json").read_text())["metrics"]
            for stage in ("student_alone", "teacher", "student_distilled")}


def files_digest(folder: Path) -> dict:
    return {p.name: sha256_file(p) for p in sorted(folder.glob("*")) if p.is_file()}


def kill_chain(tiny_run, launcher, tmp_path: Path, seed: int) -> None:
    reference, overrides = tiny_run
    overrides = overrides + ["bench.measure_cost=false"]
    run = tmp_path / "run"
    rng = random.Random(seed)
    logs = []
    for stage, marker in STAGE_MARKERS:
        delay = rng.uniform(0.0, 0.3) if marker is None else rng.uniform(0.0, 1.0)
        logs.append(kill_during(launcher, run, overrides, marker, delay, tmp_path / f"{stage}.log"))
        # the stage's final folder is never half-written: it is complete or absent
        for done in ("student_alone", "teacher", "student_distilled"):
            folder = run / done
            assert not folder.exists() or (folder / "metrics.json").is_file() or not any(folder.iterdir())
    cmd = [sys.executable, "-m", "distill.cli", "run", RECIPE, "--out", str(run)] + sets(overrides)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout
    assert "resuming after epoch" in "\n".join(logs) + proc.stdout, "no training stage resumed from its checkpoint"

    assert files_digest(run / "split") == files_digest(reference / "split")
    ref_cache = json.loads((reference / "teacher_cache" / "manifest.json").read_text())
    cache = json.loads((run / "teacher_cache" / "manifest.json").read_text())
    assert cache["shards"] == ref_cache["shards"]
    got, want = training_metrics(run), training_metrics(reference)
    for stage in want:
        assert got[stage] == pytest.approx(want[stage], abs=1e-6), stage
    report = json.loads((run / "report" / "report.json").read_text())
    assert set(report["models"]) == set(json.loads((reference / "report" / "report.json").read_text())["models"])
    assert not any("latency_ms" in m for m in report["models"].values())  # bench.measure_cost false
    assert not list(run.glob("*.resume")) and not list(run.glob(".*.tmp"))  # no leftovers of the killed runs


def test_kill_in_every_stage_then_rerun_equals_clean_run(tiny_run, launcher, tmp_path):
    kill_chain(tiny_run, launcher, tmp_path, seed=0)


@pytest.mark.kill_matrix
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_chain_at_more_random_points(tiny_run, launcher, tmp_path, seed):
    kill_chain(tiny_run, launcher, tmp_path, seed)
