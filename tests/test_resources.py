"""A recipe that cannot fit in memory fails at once, naming the setting to lower, and writes nothing."""

import shutil

import pytest

from helpers import RECIPE, sets
from distill import resources
from distill.cli import main


@pytest.fixture
def little_memory(monkeypatch):
    monkeypatch.setattr(resources, "available_memory", lambda device="cpu": 2**16)


@pytest.mark.parametrize("command, setting, folder", [
    (["student", "train"], "student.batch_size", "student_alone"),
    (["teacher", "train"], "teacher.batch_size", "teacher"),
    (["teacher", "infer"], "teacher.eval_batch_size", "teacher_cache"),
])
def test_too_large_for_memory_fails_early(tiny_run, tmp_path, little_memory, capsys, command, setting, folder):
    reference, overrides = tiny_run
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / folder)
    assert main(command + [RECIPE, "--out", str(run)] + sets(overrides)) == 2
    err = capsys.readouterr().err
    assert setting in err and "GiB" in err
    assert not (run / folder).exists() or not any((run / folder).iterdir())


def test_the_step_estimate_counts_the_items_the_loss_scores(toy_data, tiny_llama, monkeypatch):
    """A catalogue-sized full softmax is refused where a sampled softmax over 8 negatives fits."""
    from helpers import tiny_recipe_overrides
    from distill.config import load_recipe
    from distill.data import build_split
    from distill.errors import ConfigError
    from distill.losses import WeightedLoss
    from student.train import StudentTask, build_student, own_loss
    base = tiny_recipe_overrides(toy_data, tiny_llama)
    full = load_recipe(RECIPE, base)
    sampled = load_recipe(RECIPE, base + ["student.loss=sampled", "student.num_negatives=8"])
    split = build_split(full.data)
    batch, T, d, L = full.student.batch_size, full.data.max_len, full.student.hidden_size, full.student.num_layers
    between = (resources.student_step_bytes(batch, T, 9, d, L) + resources.student_step_bytes(batch, T, 61, d, L)) / 2
    monkeypatch.setattr(resources, "available_memory", lambda device="cpu": between / 0.9)
    StudentTask(build_student(sampled, split), split, sampled, WeightedLoss({"own": (1.0, lambda: own_loss(sampled, split))}))
    with pytest.raises(ConfigError, match="student.batch_size"):
        StudentTask(build_student(full, split), split, full, WeightedLoss({"own": (1.0, lambda: own_loss(full, split))}))
