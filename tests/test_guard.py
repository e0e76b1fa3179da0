"""The inference guard (teacher/guard.py): a backend that drifts from the hf float32 reference writes nothing."""

import dataclasses

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


def test_a_backend_that_perturbs_its_output_is_refused_and_writes_nothing(tmp_path, tiny_recipe, split, cf,
                                                                        monkeypatch):
    import teacher.infer as infer
    real = infer.wrap_backend

    def perturbed(model, backend):
        model = real(model, "hf")
        model.out_projector.register_forward_hook(lambda m, i, o: o + 1e-3 * o.abs().max())
        return model

    monkeypatch.setattr(infer, "wrap_backend", perturbed)
    out = tmp_path / "run" / "teacher_cache"
    out.parent.mkdir()
    with pytest.raises(guard.GuardError, match=r"teacher cache refused: backend deepspeed \(float32\)") as e:
        infer.run_inference(tiny_recipe, split, teacher(tiny_recipe, split, cf), "t", out, "deepspeed")
    assert "tolerance 0.0001" in str(e.value) and "\n" not in str(e.value)
    assert list(out.parent.iterdir()) == []  # no cache, no staging folder, no shard
    assert not staging_dir(out).exists()


def test_deepspeed_cpu_backend_passes_and_the_manifest_records_the_guard(tmp_path, tiny_recipe, split, cf):
    from teacher.infer import run_inference
    out = tmp_path / "teacher_cache"
    manifest = run_inference(tiny_recipe, split, teacher(tiny_recipe, split, cf), "t", out, "deepspeed")
    g = manifest["guard"]
    assert g["checked"] is True and g["backend"] == "deepspeed" and g["dtype"] == "float32"
    assert g["sample"] == 64 and g["tolerance"] == 1e-4
    assert 0.0 <= g["max_rel_diff"] <= 1e-4 and "max_abs_diff" in g
    assert TeacherCache(out).manifest["guard"] == g


def test_the_reference_backend_is_not_checked(tmp_path, tiny_recipe, split, cf):
    from teacher.infer import run_inference
    manifest = run_inference(tiny_recipe, split, teacher(tiny_recipe, split, cf), "t", tmp_path / "c", "hf")
    assert manifest["guard"]["checked"] is False


def test_bfloat16_is_checked_against_float32_and_keeps_its_dtype(tmp_path, tiny_recipe, split, cf):
    t = teacher(tiny_recipe, split, cf, dtype="bfloat16")
    dtypes = {n: p.dtype for n, p in t.backbone.named_parameters()}
    assert guard.needs_guard("hf", guard.backbone_dtype(t))
    sample = guard.sample(split, *scored_positions(split, 2), n=16)
    ref = guard.reference(t, sample, 8)
    assert {n: p.dtype for n, p in t.backbone.named_parameters()} == dtypes  # the round trip gave bf16 back
    got = t.encode(sample, 8)
    record = guard.compare(got, ref, "hf", "bfloat16")
    assert 0 < record["max_rel_diff"] <= 2e-2  # bf16 really differs, within its tolerance
    with pytest.raises(guard.GuardError, match="tolerance 1e-06"):
        guard.compare(got, ref, "hf", "bfloat16", tolerance=1e-6)


def test_guard_sample_is_fixed():
    users, t = np.repeat(np.arange(50), 3), np.tile(np.arange(2, 5), 50)

    class S:  # prefixes() reads only the sequences
        from distill.data import Histories
        sequences = Histories(np.arange(1, 251) % 40 + 1, np.arange(0, 251, 5))
    a, b = guard.sample(S, users, t, 64), guard.sample(S, users, t, 64)
    assert np.array_equal(a.flat, b.flat) and len(a) == 64
