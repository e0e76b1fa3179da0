from pathlib import Path

import pytest

from distill.config import load_recipe
from distill.errors import ConfigError

RECIPE = "recipes/ml100k.yaml"


def test_default_recipe_loads_and_overrides():
    r = load_recipe(RECIPE, ["teacher.lora_r=16", "eval.ks=[1, 10]", "data.path=/x"])
    assert r.teacher.lora_r == 16 and r.eval.ks == [1, 10] and r.data.path == "/x"


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[1].glob("recipes/*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path):
    load_recipe(path)


@pytest.mark.parametrize("override,key", [
    ("student.hiden_size=3", "student.hiden_size: unknown key"),
    ("student.hidden_size=abc", "student.hidden_size: expected int"),
    ("teacher.use_titles=3", "teacher.use_titles: expected bool"),
    ("data.max_len=1", "data.max_len: must be >= 2"),
    ("student.num_heads=3", "student.num_heads: hidden_size 64 is not divisible by num_heads 3"),
    ("teacher.num_experts=3", "teacher.num_experts"),
    ("distill.temperature=-1", "distill.temperature"),
    ("distill.positions=0", "distill.positions"),
    ("bench.teacher_backends=[vllm]", "bench.teacher_backends"),
    ("teacher.cf_weights=[0.5, 1.5]", "teacher.cf_weights: must be a non-empty list of numbers in \\[0, 1\\]"),
    ("teacher.cf_weights=[]", "teacher.cf_weights"),
    ("teacher.examples=stacked", "teacher.examples: must be pooled or per_slot"),
    ("teacher.minutes=0", "teacher.minutes: must be > 0"),
    ("teacher.select=best", "teacher.select: must be blend or llm"),
    ("teacher.inject_layer=4", r"teacher.inject_layer: must be below teacher.num_layers \(4\)"),
    ("teacher.inject_layer=-1", "teacher.inject_layer"),
])
def test_bad_recipes_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_recipe(RECIPE, [override])


def test_all_zero_weights_rejected():
    with pytest.raises(ConfigError, match="all loss weights are zero"):
        load_recipe(RECIPE, ["distill.own_weight=0", "distill.kd_weight=0", "distill.pairwise_weight=0",
                             "distill.align_weight=0"])


def test_missing_recipe(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe(tmp_path / "none.yaml")
