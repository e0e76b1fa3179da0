"""SIGKILL `anyo run` inside each stage, rerun, and compare with an uninterrupted run.

One chain kills the same run once per stage (prepare, student, teacher train,
teacher infer, distill, bench), relaunching each time: in CI at a fixed point
inside each stage whatever the machine's speed (each training stage right after
its first epoch's checkpoint, so resuming is always exercised); a last `anyo run`,
a fresh process from the shell, must complete and equal the uninterrupted
`tiny_run`: bit-identical split and teacher cache, the same metrics for the
training stages (which resume from their last epoch rather than start over). The
killed launches are forked from a warm process (tests/launcher.py) so each starts
in milliseconds instead of a minute of imports; the report skips its serving-cost
measurement. The chain runs once in CI; three more chains killed at random moments:
`pytest -m kill_matrix`.
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

from helpers import RECIPE, sets
from distill.artifacts import sha256_file

# stage, where the CI chain kills it (a function whose N-th return kills the process: each training
# stage after its first epoch's checkpoint, so the rerun must resume it; the teacher's launch first
# finishes the student's resumed epochs, hence a teacher-only function), and where the random
# chains start their clock (a file whose appearance means the stage is under way; None: process start)
STAGES = [
    ("prepare", "distill.data._finish:1", None),
    ("student", "distill.trainer.save_resume:1", "student_alone.resume/state.json"),
    ("teacher", "teacher.train.best_blend:2", "teacher.resume/state.json"),  # epoch 2's validation
    ("infer", "teacher.infer.write_shard:1", "teacher_cache.partial/shard-00000.safetensors"),
    ("distill", "distill.trainer.save_resume:1", "student_distilled.resume/state.json"),
    ("bench", "distill.report.collect_quality:1", "student_distilled/metrics.json"),
]


def kill_at(launcher, argv: list[str], kill_after: str, log: Path) -> str:
    """Launch; the command kills itself at `kill_after` (tests/launcher.py); returns the output."""
    pid = launcher.start(argv, log, kill_after=kill_after)
    assert launcher.wait(pid, log) == -9, f"{kill_after} was never reached:\n{log.read_text()}"
    return log.read_text()


def kill_during(launcher, argv: list[str], run: Path, marker: str | None, delay: float, log: Path) -> str:
    """Launch, wait for `marker`, sleep `delay`, SIGKILL the process group; returns the output."""
    pid = launcher.start(argv, log)
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


def kill_chain(tiny_run, launcher, tmp_path: Path, seed: int | None) -> None:
    """Kill each stage once (at its fixed kill point, or with `seed` at a random moment), then rerun."""
    reference, overrides = tiny_run
    overrides = overrides + ["bench.measure_cost=false"]
    run = tmp_path / "run"
    argv = ["run", RECIPE, "--out", str(run)] + sets(overrides)
    rng = random.Random(seed)
    logs = []
    for stage, point, marker in STAGES:
        log = tmp_path / f"{stage}.log"
        if seed is None:
            logs.append(kill_at(launcher, argv, point, log))
        else:
            delay = rng.uniform(0.0, 0.3) if marker is None else rng.uniform(0.0, 1.0)
            logs.append(kill_during(launcher, argv, run, marker, delay, log))
        # the stage's final folder is never half-written: it is complete or absent
        for done in ("student_alone", "teacher", "student_distilled"):
            folder = run / done
            assert not folder.exists() or (folder / "metrics.json").is_file() or not any(folder.iterdir())
    proc = subprocess.run([sys.executable, "-m", "distill.cli"] + argv, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout
    if seed is None:
        resumed = "\n".join(logs) + proc.stdout
        for desc in ("student seed 0", "teacher", "distilled seed 0"):
            assert f"{desc}: resuming after epoch 1" in resumed, f"{desc} did not resume from its checkpoint"

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
    kill_chain(tiny_run, launcher, tmp_path, seed=None)


@pytest.mark.kill_matrix
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_chain_at_more_random_points(tiny_run, launcher, tmp_path, seed):
    kill_chain(tiny_run, launcher, tmp_path, seed)
