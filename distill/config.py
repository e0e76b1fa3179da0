"""Recipes: one YAML file describes a whole run.

A recipe is parsed with `yaml.safe_load` into the dataclasses below. Unknown keys
and wrong types raise `ConfigError` naming the dotted key; `--set a.b=value`
overrides any field (the value is parsed as YAML, so `--set teacher.lora_r=16`
gives an int). Validation that concerns one component lives in that component's
`__post_init__`, so a bad recipe fails at load time, never deep inside a loop.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from distill.errors import ConfigError


def _help(text: str, default, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": text}, **kw)
    return field(default=default, metadata={"help": text}, **kw)


def _require(cond: bool, key: str, why: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {why}")


@dataclass
class DataConfig:
    name: str = _help("Data set name: `ml-100k` is the embedded copy; with `path`, the file stem of NAME.inter.", "ml-100k")
    path: typing.Optional[str] = _help("Folder holding NAME.inter (and optionally NAME.item); unset = embedded data.", None)
    title_field: typing.Optional[str] = _help("Column of NAME.item holding the title; unset = first token_seq column.", None)
    max_len: int = _help("Longest history a model reads (older items are cut).", 50)
    min_interactions: int = _help("k-core filter on users and items; 0 disables it.", 0)
    seed: int = _help("Seed for the 19 negatives of the candidate protocol.", 2024)

    def __post_init__(self):
        _require(self.max_len >= 2, "data.max_len", f"must be >= 2, got {self.max_len}")
        _require(self.min_interactions >= 0, "data.min_interactions", "must be >= 0")


@dataclass
class StudentConfig:
    hidden_size: int = _help("Width d of item embeddings and attention blocks.", 64)
    num_layers: int = _help("Number of pre-LN self-attention blocks.", 2)
    num_heads: int = _help("Attention heads per block; must divide hidden_size.", 2)
    dropout: float = _help("Dropout on embeddings, attention and feed-forward.", 0.2)
    loss: str = _help("Own loss: `full` softmax over all items or `sampled` softmax.", "full")
    num_negatives: int = _help("Negatives per position for the sampled softmax.", 256)
    negative_sampling: str = _help("`uniform` or `popularity` (with logQ correction).", "uniform")
    lr: float = _help("AdamW learning rate.", 1e-3)
    weight_decay: float = _help("AdamW weight decay.", 0.0)
    batch_size: int = _help("Sequences per optimisation step.", 128)
    epochs: int = _help("Maximum number of epochs.", 200)
    patience: int = _help("Stop after this many evaluations without a better validation NDCG@10.", 20)

    def __post_init__(self):
        _require(self.hidden_size > 0, "student.hidden_size", "must be > 0")
        _require(self.num_heads > 0 and self.hidden_size % self.num_heads == 0, "student.num_heads",
                 f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        _require(self.loss in ("full", "sampled"), "student.loss", f"must be full or sampled, got {self.loss!r}")
        _require(self.negative_sampling in ("uniform", "popularity"), "student.negative_sampling",
                 f"must be uniform or popularity, got {self.negative_sampling!r}")
        _require(0.0 <= self.dropout < 1.0, "student.dropout", "must be in [0, 1)")
        _require(self.batch_size > 0 and self.epochs > 0 and self.patience > 0, "student.batch_size",
                 "batch_size, epochs and patience must be > 0")


@dataclass
class TeacherConfig:
    model: str = _help("`smollm2-135m` (embedded GGUF), a local Hugging Face folder, or a .gguf file.", "smollm2-135m")
    num_layers: typing.Optional[int] = _help("Keep only the first L decoder layers; unset keeps all.", None)
    dtype: str = _help("Backbone dtype: float32, bfloat16 or float16.", "float32")
    use_titles: bool = _help("Write each history item's title before its [HistoryEmb] token.", True)
    max_title_tokens: int = _help("Titles are cut to this many tokens.", 8)
    max_history: int = _help("Most recent history items put in the prompt.", 10)
    instruction: str = _help("Text before the history.", "A user watched these movies in order:")
    query_text: str = _help("Text after the history; its last token is pooled.", " The next movie they will watch is")
    adapter: str = _help("`lora` or `moe_lora` (iLoRA's instance-wise mixture of LoRA experts).", "moe_lora")
    cf_weights: list = _help("Candidate weights w of the CF retriever in the query q = (1 - w) q_LLM + w q_CF. The LLM "
                             "retriever trains alone (in the CF item space when the item table is fixed); after each "
                             "epoch the w with the best validation NDCG@10 is kept, so w = 1 falls back to the CF "
                             "retriever. [0.0] = the LLM alone.", [0.0])
    train_item_table: bool = _help("Train the item table (initialised from the CF model); false keeps the CF "
                                   "item space fixed, so the LLM only learns to place queries in it.", True)
    lora_r: int = _help("LoRA rank (split into num_experts slices for moe_lora).", 8)
    lora_alpha: int = _help("LoRA alpha; scaling = alpha / r.", 16)
    lora_dropout: float = _help("Dropout on the LoRA input.", 0.05)
    target_modules: list = _help("Module names peft adapts.", ["q_proj", "k_proj", "v_proj", "o_proj"])
    num_experts: int = _help("Experts for moe_lora; must divide lora_r.", 4)
    temperature: float = _help("Softmax temperature on inner-product scores (1.0 to blend with the CF "
                               "retriever, which was trained at 1.0).", 0.1)
    loss: str = _help("`full` softmax over the catalogue or `sampled` (in-batch + sampled negatives).", "full")
    num_negatives: int = _help("Sampled negatives per batch for the sampled loss.", 1024)
    lr: float = _help("Peak AdamW learning rate (warmup then cosine decay).", 1e-3)
    weight_decay: float = _help("AdamW weight decay.", 0.0)
    warmup_ratio: float = _help("Fraction of steps spent warming up.", 0.05)
    batch_size: int = _help("Examples per forward pass.", 16)
    grad_accum: int = _help("Forward passes per optimiser step.", 1)
    examples_per_epoch: int = _help("Training (prefix -> next item) examples sampled per epoch.", 2000)
    epochs: int = _help("Maximum number of epochs.", 2)
    patience: int = _help("Epochs without a better validation NDCG@10 before stopping.", 2)
    eval_batch_size: int = _help("Prompts per forward pass at inference.", 32)

    def __post_init__(self):
        _require(self.adapter in ("lora", "moe_lora"), "teacher.adapter", f"must be lora or moe_lora, got {self.adapter!r}")
        _require(self.lora_r > 0, "teacher.lora_r", "must be > 0")
        _require(self.num_experts > 0 and self.lora_r % self.num_experts == 0, "teacher.num_experts",
                 f"num_experts {self.num_experts} must divide lora_r {self.lora_r}")
        _require(self.num_layers is None or self.num_layers > 0, "teacher.num_layers", "must be > 0")
        _require(self.dtype in ("float32", "bfloat16", "float16"), "teacher.dtype", f"unknown dtype {self.dtype!r}")
        _require(self.temperature > 0, "teacher.temperature", "must be > 0")
        weights_ok = all(isinstance(w, (int, float)) and not isinstance(w, bool) and 0 <= w <= 1 for w in self.cf_weights)
        _require(len(self.cf_weights) > 0 and weights_ok, "teacher.cf_weights",
                 f"must be a non-empty list of numbers in [0, 1], got {self.cf_weights!r}")
        _require(self.loss in ("full", "sampled"), "teacher.loss", f"must be full or sampled, got {self.loss!r}")
        _require(self.max_history > 0, "teacher.max_history", "must be > 0")
        _require(self.batch_size > 0 and self.grad_accum > 0, "teacher.batch_size", "batch_size and grad_accum must be > 0")


@dataclass
class DistillConfig:
    positions: int = _help("Training positions per user scored by the teacher (the last P).", 5)
    k: int = _help("Top-K teacher items kept per query in the cache.", 50)
    backend: str = _help("Teacher inference backend: `deepspeed` or `hf`.", "deepspeed")
    shard_users: int = _help("Users per teacher-cache shard (the unit of resume and of work per rank).", 128)
    warm_start: bool = _help("Start the distilled student from the student-alone checkpoint of the same seed.", False)
    epochs: typing.Optional[int] = _help("Maximum epochs of the distilled training; unset = student.epochs.", None)
    own_weight: float = _help("Weight of the student's own next-item loss.", 1.0)
    kd_weight: float = _help("Weight of the temperature-scaled KL to the teacher's top-K.", 1.0)
    rank_weight: float = _help("Weight of the position-weighted ranking distillation.", 0.5)
    align_weight: float = _help("Weight of the user-vector to teacher-query alignment.", 0.1)
    temperature: float = _help("Softening temperature T of the KL term (scaled by T^2).", 2.0)
    rank_lambda: float = _help("Decay of the rank weights exp(-rank / lambda).", 10.0)
    rank_negatives: int = _help("Uniform negatives per position for the ranking term.", 20)
    align: str = _help("Alignment loss: `cosine` or `infonce` over the batch.", "cosine")

    def __post_init__(self):
        _require(self.positions >= 1, "distill.positions", f"must be >= 1, got {self.positions}")
        _require(self.k >= 1, "distill.k", "must be >= 1")
        _require(self.shard_users >= 1, "distill.shard_users", "must be >= 1")
        _require(self.epochs is None or self.epochs >= 1, "distill.epochs", "must be >= 1")
        _require(self.backend in ("deepspeed", "hf"), "distill.backend", f"must be deepspeed or hf, got {self.backend!r}")
        _require(self.temperature > 0, "distill.temperature", f"must be > 0, got {self.temperature}")
        weights = (self.own_weight, self.kd_weight, self.rank_weight, self.align_weight)
        _require(all(w >= 0 for w in weights), "distill.own_weight", "loss weights must be >= 0")
        _require(any(w > 0 for w in weights), "distill.own_weight", "all loss weights are zero")
        _require(self.align in ("cosine", "infonce"), "distill.align", f"must be cosine or infonce, got {self.align!r}")


@dataclass
class EvalConfig:
    ks: list = _help("Cut-offs K of HR/NDCG/MRR/Recall/coverage.", [1, 5, 10, 20])
    mask_history: bool = _help("Exclude the user's history (never the target) from the ranking.", True)
    index: str = _help("FAISS index_factory string; `Flat` is exact search.", "Flat")

    def __post_init__(self):
        _require(len(self.ks) > 0 and all(isinstance(k, int) and k > 0 for k in self.ks), "eval.ks",
                 "must be a non-empty list of positive ints")


@dataclass
class BenchConfig:
    measure_cost: bool = _help("Measure each model's serving cost for the report (peak RSS, latency, throughput), "
                               "each in its own process; takes minutes with a teacher. Off: quality only.", True)
    teacher_backends: list = _help("Inference backends the teacher's serving cost is measured with "
                                   "(deepspeed, hf), each in its own process.", ["hf", "deepspeed"])

    def __post_init__(self):
        _require(len(self.teacher_backends) > 0 and set(self.teacher_backends) <= {"hf", "deepspeed"},
                 "bench.teacher_backends", f"must be a non-empty list of hf/deepspeed, got {self.teacher_backends!r}")


@dataclass
class Recipe:
    data: DataConfig = field(default_factory=DataConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    seed: int = _help("Seed of every training run.", 0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The resolved recipe as YAML; loading it gives the same section hashes."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def section_hash(self, *sections: str) -> str:
        """Hash of the named sections, so a stage reruns only when its inputs change."""
        import hashlib
        d = self.to_dict()
        blob = json.dumps({s: d[s] for s in sections}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _check_type(value, tp, key: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _check_type(value, inner, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    expected = origin or tp
    if expected is bool and not isinstance(value, bool) or (
            expected is not bool and (isinstance(value, bool) or not isinstance(value, expected))):
        raise ConfigError(f"{key}: expected {getattr(expected, '__name__', expected)}, got {type(value).__name__} {value!r}")
    return value


def config_from_dict(cls, raw: dict, prefix: str = ""):
    """Build dataclass `cls` from a mapping; unknown keys and wrong types name the dotted key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'recipe'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise ConfigError(f"{prefix}{key}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in raw.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = config_from_dict(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(value, tp, f"{prefix}{name}")
    return cls(**kwargs)


def _apply_override(raw: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment}: expected KEY=VALUE")
    key, text = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {p} is not a section")
    node[parts[-1]] = yaml.safe_load(text)


def load_recipe(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read a recipe file (or the defaults when `path` is None) and apply `--set` overrides."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: recipe file not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}".replace("\n", " ")) from None
    for a in overrides:
        _apply_override(raw, a)
    try:
        return config_from_dict(Recipe, raw, "")
    except ConfigError as e:
        raise ConfigError(f"{path or 'recipe'}: {e}") from None
