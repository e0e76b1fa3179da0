"""The package a user installs: every package listed, the recipes found by name, one version."""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest

import distill
from distill.config import RECIPE_DIRS, find_recipe, load_recipe
from distill.errors import ConfigError

ROOT = Path(__file__).parents[1]


def options() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def test_every_package_folder_is_listed_for_the_wheel():
    listed = set(options()["options"]["packages"].split())
    found = {".".join(p.parent.relative_to(ROOT).parts) for top in ("distill", "teacher", "student")
             for p in (ROOT / top).rglob("__init__.py")}
    assert listed == found | {"distill.recipes"}


def test_the_version_has_one_source():
    assert options()["metadata"]["version"] == "attr: distill.__version__"
    assert distill.__version__.count(".") == 2


def test_every_shipped_recipe_loads_by_name():
    names = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
    assert "ml100k" in names and RECIPE_DIRS[1] == ROOT / "recipes"
    for name in names:
        assert find_recipe(name) == ROOT / "recipes" / f"{name}.yaml"
        load_recipe(name)


def test_an_unknown_recipe_name_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match=r"no-such-recipe: no such recipe file.*ml100k"):
        load_recipe("no-such-recipe")
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe("missing/recipe.yaml")
