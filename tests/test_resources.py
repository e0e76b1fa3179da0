"""A recipe that cannot fit in memory fails at once, naming the setting to lower, and writes nothing."""

import shutil

import pytest

from conftest import RECIPE, sets
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
