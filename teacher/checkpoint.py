"""Saving and loading the two slot models: the dense teacher (teacher/model.py) and the generative baseline
(teacher/generative.py).

Both are written the same way, in an atomic folder:

    adapter/            the peft adapter (adapter_config.json with sorted target_modules: byte-reproducible)
    heads.safetensors   everything trained outside peft (SlotModel.heads_state; the teacher adds item_vectors)
    <record>.json       the model's settings, its checkpoint hash and the caller's meta (teacher.json, llara.json)

The checkpoint hash is sha256 over adapter/* and heads.safetensors, first 16 hex digits.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from distill.artifacts import atomic_dir, check_finite, read_json, read_record, sha256_file, sha256_files
from distill.checked import config_from_dict
from distill.config import LlaraConfig, TeacherConfig
from distill.data import Split
from distill.errors import ArtifactError, CorruptError, StaleError
from student.model import SASRec, load_student
from teacher.generative import GenerativeRecommender, build_generative
from teacher.model import TeacherRetriever, build_teacher
from teacher.slots import SlotModel


# ---------------------------------------------------------------- shared: adapter/ + heads + a JSON record

def save_adapter(backbone: nn.Module, folder: Path) -> None:
    """The peft adapter in `folder`, byte-for-byte reproducible."""
    backbone.save_pretrained(str(folder))
    # peft writes target_modules from a set, in an order that changes from process to process:
    # sort it so the same adapter always has the same bytes (and checkpoint hash)
    config = folder / "adapter_config.json"
    saved = json.loads(config.read_text())
    if isinstance(saved.get("target_modules"), list):
        saved["target_modules"] = sorted(saved["target_modules"])
    config.write_text(json.dumps(saved, indent=2, sort_keys=True))


def checkpoint_hash(folder: Path) -> str:
    files = sorted((folder / "adapter").glob("*")) + [folder / "heads.safetensors"]
    return sha256_files(files)[:16]


def write_checkpoint(folder: Path, model: SlotModel, heads: dict[str, torch.Tensor], record_name: str,
                     record: dict, meta: dict, extra_files: dict | None = None) -> str:
    """adapter/, heads.safetensors and `record_name` ({**record, checkpoint_hash, **meta}), plus extra JSON
    files, written atomically into `folder`; returns the checkpoint hash."""
    with atomic_dir(folder) as tmp:
        save_adapter(model.backbone, tmp / "adapter")
        save_file(heads, str(tmp / "heads.safetensors"))
        digest = checkpoint_hash(tmp)
        (tmp / record_name).write_text(json.dumps({**record, "checkpoint_hash": digest, **meta},
                                                  indent=2, sort_keys=True))
        for name, obj in (extra_files or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    return digest


def read_heads(folder: Path, model: SlotModel) -> tuple[dict[str, torch.Tensor], list[str]]:
    """heads.safetensors of `folder`, and the model's heads it lacks (sorted)."""
    heads = load_file(str(Path(folder) / "heads.safetensors"))
    return heads, sorted(set(model.heads_state()) - set(heads))


# ---------------------------------------------------------------- the dense teacher

def save_teacher(model: TeacherRetriever, folder: Path, meta: dict) -> str:
    """adapter/ (peft format), heads.safetensors (+ `item_vectors`, the retrieval item side, so a cache can be
    completed without loading the LLM), teacher.json; returns the checkpoint hash."""
    heads = {k: v.detach().contiguous() for k, v in model.heads_state().items()}
    heads["item_vectors"] = torch.from_numpy(model.item_vectors().copy())
    return write_checkpoint(folder, model, heads, "teacher.json",
                            {"teacher": asdict(model.cfg), "item_parts": model.item_parts()}, meta)


def check_teacher(folder: Path, cf_dir: Path, split_hash: str) -> dict:
    """teacher.json, if the teacher in `folder` is intact and was built on this split and the CF model in
    `cf_dir` (StaleError otherwise; CorruptError when its files do not match its record)."""
    folder, cf_dir = Path(folder), Path(cf_dir)
    meta = read_record(folder / "teacher.json", "teacher", "checkpoint_hash")
    if meta.get("split_hash") != split_hash:
        raise StaleError(f"{folder / 'teacher.json'}: teacher built from split {meta.get('split_hash')}, "
                         f"this run's split is {split_hash}")
    cf_sha = sha256_file(cf_dir / "model.safetensors") if (cf_dir / "model.safetensors").is_file() else None
    if not isinstance(meta.get("inputs"), dict) or meta["inputs"].get("cf_sha256") != cf_sha:
        raise StaleError(f"{folder / 'teacher.json'}: teacher built from another CF model than {cf_dir} "
                         f"(retrain the teacher: `anyo teacher train`)")
    if checkpoint_hash(folder) != meta.get("checkpoint_hash"):
        raise CorruptError(f"{folder}: adapter or heads do not match teacher.json (corrupt or edited)")
    for weights in [folder / "heads.safetensors"] + sorted((folder / "adapter").glob("*.safetensors")):
        check_finite(weights)
    return meta


def load_teacher(folder: Path, cf_dir: Path, split: Split) -> tuple[TeacherRetriever, dict]:
    """The teacher in `folder`, on the CF model in `cf_dir` it was trained with (see check_teacher)."""
    meta = check_teacher(folder, cf_dir, split.hash)
    cf, _ = load_student(cf_dir, split.hash, split.n_items)
    cfg = config_from_dict(TeacherConfig, meta["teacher"], "teacher.")
    model = build_teacher(cfg, cf, split.titles, Path(folder) / "adapter", trainable=False, texts=split.texts)
    heads, missing = read_heads(folder, model)
    if "text_head.weight" in heads:
        raise StaleError(f"{folder}/heads.safetensors: a text head saved by an older anyo (text_head.weight; now "
                         "text_head.proj.weight and text_head.gain): retrain the teacher (`anyo teacher train`)")
    if missing or heads["item_table"].shape != model.item_table.shape:
        raise CorruptError(f"{folder}/heads.safetensors: does not fit this split/teacher ({missing[:3]})")
    model.load_state_dict(heads, strict=False)
    return model.eval(), meta


# ---------------------------------------------------------------- the generative baseline

def save_generative(model: GenerativeRecommender, folder: Path, meta: dict, extra_files: dict | None = None) -> str:
    """adapter/ (peft), heads.safetensors, llara.json (+ extra JSON files); returns the checkpoint hash."""
    heads = {k: v.detach().contiguous().cpu() for k, v in model.heads_state().items()}
    return write_checkpoint(folder, model, heads, "llara.json",
                            {"llara": asdict(model.cfg), "teacher": asdict(model.adapter_cfg)}, meta, extra_files)


def load_generative(folder: Path, cf: SASRec, titles: list[str], split_hash: str) -> tuple[GenerativeRecommender, dict]:
    folder = Path(folder)
    meta = read_json(folder / "llara.json")
    if meta.get("split_hash") != split_hash:
        raise ArtifactError(f"{folder / 'llara.json'}: trained on split {meta.get('split_hash')}, "
                            f"this run's split is {split_hash}")
    if checkpoint_hash(folder) != meta.get("checkpoint_hash"):
        raise ArtifactError(f"{folder}: adapter or heads do not match llara.json (corrupt or edited)")
    cfg = config_from_dict(LlaraConfig, meta["llara"], "llara.")
    adapter_cfg = config_from_dict(TeacherConfig, meta["teacher"], "teacher.")
    model = build_generative(cfg, adapter_cfg, cf, titles, folder / "adapter", trainable=False)
    heads, missing = read_heads(folder, model)
    if missing:
        raise ArtifactError(f"{folder / 'heads.safetensors'}: does not fit this model ({missing[:3]})")
    model.load_state_dict(heads, strict=False)
    return model.eval(), meta
