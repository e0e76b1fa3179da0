"""The inference guard (teacher/guard.py): a backend whose queries or rankings drift from the hf float32
reference writes nothing; a cache whose validation rows do not give the teacher's NDCG@10 is refused."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from distill.cache import TeacherCache, staging_dir
from distill.positions import scored_positions
from teacher import guard
from teacher.model import build_teacher


def teacher(recipe, split, cf, **changes):
    cfg = dataclasses.replace(recipe.teacher, **{"lora_dropout": 0.0, "cf_weights": [0.0], **changes})
    torch.manual_seed(0)
    return build_teacher(cfg, cf, split.titles, texts=split.texts).eval()


def refused(tmp_path, recipe, split, cf, monkeypatch, backend_of, match: str) -> str:
    """Run inference with `backend_of(model)` standing in for the deepspeed backend; the guard must refuse it
    in one line and leave no cache, staging folder or shard. Returns the message."""
    import teacher.infer as infer
    real = infer.wrap_backend
    monkeypatch.setattr(infer, "wrap_backend", lambda model, backend: backend_of(real(model, "hf")))
    out = tmp_path / "run" / "teacher_cache"
    out.parent.mkdir()
    with pytest.raises(guard.GuardError, match=match) as e:
        infer.run_inference(recipe, split, teacher(recipe, split, cf), "t", out, "deepspeed")
    assert "\n" not in str(e.value)
    assert list(out.parent.iterdir()) == []  # no cache, no staging folder, no shard
    assert not staging_dir(out).exists()
    return str(e.value)


def test_a_backend_that_perturbs_its_output_is_refused_and_writes_nothing(tmp_path, tiny_recipe, split, cf,
                                                                        monkeypatch):
    def perturbed(model):
        model.out_projector.register_forward_hook(lambda m, i, o: o + 1e-3 * o.abs().max())
        return model

    message = refused(tmp_path, tiny_recipe, split, cf, monkeypatch, perturbed,
                      r"teacher cache refused: backend deepspeed \(float32\)")
    assert "tolerance 0.0001" in message


def test_a_backend_that_swaps_two_items_in_the_top10_is_refused(tmp_path, tiny_recipe, split, cf, monkeypatch):
    # every query vector is exact (all components within tolerance): only the rankings differ
    def swapping(model):
        outputs = model.get_teacher_outputs

        def swapped(*args, **kwargs):
            o = outputs(*args, **kwargs)
            o.topk_ids[:, [3, 4]] = o.topk_ids[:, [4, 3]]
            return o
        model.get_teacher_outputs = swapped
        return model

    message = refused(tmp_path, tiny_recipe, split, cf, monkeypatch, swapping,
                      r"ordered top-10 identical for 0\.0% of the prompts, at least 95%")
    assert "q_LLM" not in message and "top-50" not in message   # components and top-50 sets agree


def test_deepspeed_cpu_backend_passes_and_the_manifest_records_the_guard(tmp_path, tiny_recipe, split, cf):
    from teacher.infer import run_inference
    out = tmp_path / "teacher_cache"
    model = teacher(tiny_recipe, split, cf, cf_weights=[0.5])
    with torch.no_grad():
        model.cf_weight.fill_(0.5)
    manifest = run_inference(tiny_recipe, split, model, "t", out, "deepspeed")
    g = manifest["guard"]
    assert g["checked"] is True and g["backend"] == "deepspeed" and g["dtype"] == "float32"
    assert g["sample"] == 64 and g["tolerance"] == 1e-4 and g["compared"].startswith("q_LLM")
    assert 0.0 <= g["max_rel_diff"] <= 1e-4 and "max_abs_diff" in g
    assert g["top10_identical"] == 1.0 and g["top50_overlap"] == 1.0
    assert g["padded"] >= 32                   # mixed-length batches: most sampled prompts are padded
    assert 0 < g["prompt_lengths"][0] < g["prompt_lengths"][1]
    assert g["kernel_injection"]["used"] is False and "not exercised" in g["kernel_injection"]["why"]
    assert TeacherCache(out).manifest["guard"] == g


def test_guard_sample_is_stratified_by_prompt_length(split):
    users, t = scored_positions(split, 20)
    lengths_of = lambda h: np.minimum(h.lengths, 6)           # a prompt length that saturates, as max_history does
    every = lengths_of(guard.prefixes(split, users, t))
    s = guard.sample(split, users, t, lengths_of, n=36)
    got = lengths_of(s)
    assert len(s) == 36 and set(got) == set(every)               # every length drawn, the shortest included
    assert np.mean(every == 6) > 0.45 and np.mean(got == 6) == pytest.approx(1 / 6)   # an equal share each


def test_the_reference_backend_is_not_checked(tmp_path, tiny_recipe, split, cf):
    from teacher.infer import run_inference
    manifest = run_inference(tiny_recipe, split, teacher(tiny_recipe, split, cf), "t", tmp_path / "c", "hf")
    assert manifest["guard"]["checked"] is False


def test_bfloat16_is_checked_against_float32_and_keeps_its_dtype(tmp_path, tiny_recipe, split, cf):
    t = teacher(tiny_recipe, split, cf, dtype="bfloat16")
    dtypes = {n: p.dtype for n, p in t.backbone.named_parameters()}
    assert guard.needs_guard("hf", guard.backbone_dtype(t))
    sample = guard.sample(split, *scored_positions(split, 2), t.prompts.lengths, n=16)
    ref = guard.reference(t, sample, 8, 10, True, "Flat")
    assert {n: p.dtype for n, p in t.backbone.named_parameters()} == dtypes  # the round trip gave bf16 back
    got = guard.outputs(t, sample, 8, 10, True, "Flat")
    loose = dataclasses.replace(tiny_recipe.distill, guard_top10_identical=0.0, guard_top50_overlap=0.0)
    record = guard.compare(got, ref, "hf", "bfloat16", loose)
    assert 0 < record["max_rel_diff"] <= 2e-2  # bf16 really differs, within its tolerance
    with pytest.raises(guard.GuardError, match="tolerance 1e-06"):
        guard.compare(got, ref, "hf", "bfloat16", dataclasses.replace(loose, guard_tolerance=1e-6))


def test_guard_sample_is_fixed():
    users, t = np.repeat(np.arange(50), 3), np.tile(np.arange(2, 5), 50)

    class S:  # prefixes() reads only the sequences
        from distill.histories import Histories
        sequences = Histories(np.arange(1, 251) % 40 + 1, np.arange(0, 251, 5))
    lengths_of = lambda h: h.lengths
    a, b = guard.sample(S, users, t, lengths_of, 64), guard.sample(S, users, t, lengths_of, 64)
    assert np.array_equal(a.flat, b.flat) and len(a) == 64


def test_a_cache_whose_validation_rows_miss_the_recorded_ndcg_is_refused(tmp_path, tiny_recipe, split, cf):
    from teacher.infer import run_inference
    out = tmp_path / "run" / "teacher_cache"
    out.parent.mkdir()
    with pytest.raises(guard.GuardError, match=r"validation rows give NDCG@10 .*the teacher recorded 0\.9000"):
        run_inference(tiny_recipe, split, teacher(tiny_recipe, split, cf), "t", out, "hf", recorded_valid=0.9)
    assert list(out.parent.iterdir()) == []


def test_the_run_caches_give_their_teachers_validation_ndcg(tiny_run):
    run, _ = tiny_run
    for cache, record in (("teacher_cache", "teacher"), ("cf_teacher_cache", "student_alone")):
        check = TeacherCache(run / cache).manifest["valid_check"]
        recorded = json.loads((run / record / "metrics.json").read_text())["valid_metrics"]["NDCG@10"]
        assert check["checked"] and check["recorded"] == recorded
        assert abs(check["valid_NDCG@10"] - recorded) <= guard.VALID_NDCG_TOLERANCE
