"""Shared fixtures: a small synthetic data set, a tiny random Llama, a tiny complete run (helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import RECIPE, Launcher, sets, tiny_recipe_overrides, write_dataset, write_tiny_llama


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def split(toy_data):
    """The toy split with histories of at most 10 items (test_harness.py has its own)."""
    from distill.config import DataConfig
    from distill.data import build_split
    return build_split(DataConfig(name="toy", path=str(toy_data), max_len=10))


@pytest.fixture(scope="module")
def cf(split):
    """A random SASRec on the toy split: the CF model a teacher reads."""
    import torch
    from student.model import SASRec, SASRecConfig
    torch.manual_seed(0)
    return SASRec(SASRecConfig(split.n_items, 10, hidden_size=16, num_layers=1, num_heads=2, dropout=0.0))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_causal_llama(tmp_path_factory) -> Path:
    """The tiny Llama with its LM head, for the generative (LLaRA-style) baseline."""
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-causal-llama"), causal=True)


@pytest.fixture
def tiny_recipe(toy_data, tiny_llama):
    from distill.config import load_recipe
    return load_recipe(Path(__file__).parents[1] / "recipes" / "ml100k.yaml",
                       tiny_recipe_overrides(toy_data, tiny_llama))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, toy_data, tiny_llama):
    """A complete `anyo run` of the tiny recipe (in process), shared by the pipeline tests."""
    from distill.cli import main
    run = tmp_path_factory.mktemp("run")
    overrides = tiny_recipe_overrides(toy_data, tiny_llama)
    assert main(["run", RECIPE, "--out", str(run)] + sets(overrides)) == 0
    return run, overrides


@pytest.fixture(scope="session")
def launcher():
    warm = Launcher()
    yield warm
    warm.close()
