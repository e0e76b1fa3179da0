"""The CF-only teacher as a standing control: a w = 1 cache from the CF model alone, distilled as the LLM's."""

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file

from distill.cache import TeacherCache
from distill.data import load_split
from distill.config import load_recipe
from distill.runs import CF_CACHE, CF_DISTILLED, cf_control_recipe
from distill.stages import distill as distill_stage


def arrays(folder):
    c = TeacherCache(folder)
    return {f"{i}/{k}": np.asarray(v) for i, t in enumerate(c.shards) for k, v in t.items()} | \
        {"items": np.asarray(c.item_table)}


def test_cf_only_cache_distils_exactly_as_a_w1_teacher_cache(tiny_run, tiny_recipe, tmp_path):
    from teacher.infer import run_inference
    from teacher.checkpoint import load_teacher
    run, _ = tiny_run
    split = load_split(run / "split")
    # the run's LLM teacher with its blend weight set to 1, through `teacher infer`'s own code path
    model, _ = load_teacher(run / "teacher", run / "student_alone", split)
    with torch.no_grad():
        model.cf_weight.fill_(1.0)
    w1 = tmp_path / "w1" / "teacher_cache"
    run_inference(tiny_recipe, split, model, "w1-teacher", w1, "hf")
    cf = run / CF_CACHE
    a, b = arrays(w1), arrays(cf)
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), key      # queries, top-K ids and scores, items: bit for bit
    manifest = TeacherCache(cf).manifest
    assert manifest["teacher"] == {"kind": "cf-only", "cf_weight": 1.0} and manifest["positions"] == \
        TeacherCache(run / "teacher_cache").manifest["positions"]
    # the same student seed distilled from either cache: the same model and the same test ranks
    from_w1 = distill_stage.run(tiny_recipe, run, split, tiny_recipe.seed, CF_DISTILLED, cache_dir=w1)
    control = json.loads((run / CF_DISTILLED / "metrics.json").read_text())
    assert from_w1["metrics"] == control["metrics"] and from_w1["valid_metrics"] == control["valid_metrics"]
    assert np.array_equal(np.load(w1.parent / CF_DISTILLED / "test_ranks.npy"),
                          np.load(run / CF_DISTILLED / "test_ranks.npy"))
    wa = load_file(str(w1.parent / CF_DISTILLED / "model.safetensors"))
    wb = load_file(str(run / CF_DISTILLED / "model.safetensors"))
    assert all(np.array_equal(wa[k], wb[k]) for k in wa) and wa.keys() == wb.keys()


def test_run_reports_the_cf_only_control(tiny_run):
    run, _ = tiny_run
    r = json.loads((run / "report" / "report.json").read_text())
    assert r["models"]["student_cf_distilled"]["seeds"] == 1
    c = r["comparisons"]["llm_vs_cf_teacher"]
    assert (c["a"], c["b"]) == ("student_distilled", "student_cf_distilled")
    md = (run / "report" / "report.md").read_text()
    assert "llm_vs_cf_teacher (distilled student minus distilled from the CF model alone)" in md
    assert "| distilled from the CF model alone | 1 |" in md and "The teacher was trained once" in md
    assert "The LLM's own share" in md


def test_every_shipped_recipe_has_a_control_the_cf_only_cache_accepts():
    """The control keeps the recipe's loss but drops what needs the teacher's text item side (cold_init, the
    text tower): `anyo run recipes/textdecides.yaml` once stopped with exit 2 at the control."""
    recipes = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
    assert any(load_recipe(r).distill.ced_text_rows != "none" for r in recipes)   # the case is shipped
    for path in recipes:
        recipe = load_recipe(path)
        control = cf_control_recipe(recipe).distill
        assert (control.cold_init, control.ced_text_rows) == (False, "none"), path.name
        assert control.ced_weight == recipe.distill.ced_weight and control.kd_weight == recipe.distill.kd_weight
