"""Recipes: one YAML file describes a whole run.

A recipe is parsed with a safe YAML loader (no aliases, no duplicate keys) into the
dataclasses below. Every field declares its checks next to its help text (`min=1`,
`gt=0.0`, `choices=...`), and every section checks all of its fields when it is built,
so a bad value fails at load time with its dotted key (`student.epochs: must be >= 1,
got 0`), never deep inside a loop. Floats must be finite; a float field also accepts a
string that reads as one (YAML 1.1 reads `1e-3` as a string). `--set a.b=value`
overrides any field (the value is parsed as YAML, so `--set teacher.lora_r=16` gives
an int).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from distill.errors import ConfigError

INT_MAX = 2**31 - 1   # every int field: larger values overflow torch/numpy sizes long before they make sense
SEED_MAX = 2**32 - 1  # numpy's and torch's seeds both accept [0, 2^32)


def _help(text: str, default, **checks):
    """A field with help text and declarative checks, all run by `_Section.__post_init__`:

    min / max: inclusive bounds; gt / lt: exclusive bounds; choices: allowed values;
    nonempty: a non-empty string or list; items: element type of a list (bounds and
    choices then apply to every element).
    """
    meta = {"help": text, **checks}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _require(cond: bool, key: str, why: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {why}")


def _show(value) -> str:
    """A value for a one-line message, shortened."""
    text = repr(value)
    return text if len(text) <= 60 else text[:40] + "..." + text[-10:]


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _as_type(value, tp, key: str):
    """`value` checked against (and for floats converted to) the plain type `tp`."""
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                value = float(value.strip())
            except ValueError:
                raise ConfigError(f"{key}: expected float, got str {_show(value)}") from None
        elif isinstance(value, int) and not isinstance(value, bool):
            try:
                value = float(value)
            except OverflowError:
                raise ConfigError(f"{key}: {_show(value)} is too large for a float") from None
        if not isinstance(value, float):
            raise ConfigError(f"{key}: expected float, got {type(value).__name__} {_show(value)}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {_show(value)}")
        return value
    if tp is bool and isinstance(value, bool) or tp is not bool and isinstance(value, tp) and not isinstance(value, bool):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {_show(value)}")


def _bounds(value, meta: dict, key: str) -> None:
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{key}: must be {' or '.join(map(str, meta['choices']))}, got {_show(value)}")
    if isinstance(value, str) or not isinstance(value, (int, float)):
        return
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"{key}: must be >= {meta['min']}, got {_show(value)}")
    if "gt" in meta and not value > meta["gt"]:
        raise ConfigError(f"{key}: must be > {meta['gt']}, got {_show(value)}")
    if "lt" in meta and not value < meta["lt"]:
        raise ConfigError(f"{key}: must be < {meta['lt']}, got {_show(value)}")
    top = meta.get("max", INT_MAX if isinstance(value, int) else None)
    if top is not None and value > top:
        raise ConfigError(f"{key}: must be <= {top}, got {_show(value)}")


class _Section:
    """Base of every recipe section: checks each field's type and bounds, then `check()`."""

    key: typing.ClassVar[str] = ""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            key = f"{self.key}.{f.name}" if self.key else f.name
            tp, value = hints[f.name], getattr(self, f.name)
            if dataclasses.is_dataclass(tp):
                continue
            if typing.get_origin(tp) in (typing.Union, types.UnionType):  # Optional[X]
                if value is None:
                    continue
                tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
            value = _as_type(value, tp, key)
            if f.metadata.get("nonempty") and not (value.strip() if isinstance(value, str) else value):
                raise ConfigError(f"{key}: must not be empty")
            if isinstance(value, list) and "items" in f.metadata:
                # ints stay ints in a float list (1 and 1.0 hash differently: no needless reruns)
                value = [v if isinstance(v, int) and not isinstance(v, bool) and f.metadata["items"] is float
                         else _as_type(v, f.metadata["items"], f"{key}[{i}]") for i, v in enumerate(value)]
                for i, v in enumerate(value):
                    _bounds(v, f.metadata, f"{key}[{i}]")
            else:
                _bounds(value, f.metadata, key)
            setattr(self, f.name, value)
        self.check()

    def check(self) -> None:
        """Checks that involve more than one field."""


DATA_FORMATS = ("recbole", "parquet", "csv", "jsonl")


@dataclass
class ColumnsConfig(_Section):
    key: typing.ClassVar[str] = "data.columns"
    user: str = _help("Column of the interactions holding the user token.", "user_id", nonempty=True)
    item: str = _help("Column of the interactions (and of data.items) holding the item token.", "item_id",
                      nonempty=True)
    time: str = _help("Column of the interactions holding the timestamp (a number or a date-time); optional "
                      "for RecBole files (file order then).", "timestamp", nonempty=True)
    title: str = _help("Column of data.items holding the title (parquet, csv, jsonl; RecBole files use "
                       "data.title_field).", "title", nonempty=True)
    text: typing.Optional[list] = _help("Columns of the item file that follow the title in each item's text (what "
                                        "the teacher's text item side reads, teacher.item_side), e.g. [release_year, "
                                        "class]; unset = every column of the item file besides the item and the "
                                        "title; [] = the title alone.", None, items=str)


@dataclass
class DataConfig(_Section):
    key: typing.ClassVar[str] = "data"
    name: str = _help("Data set name: `ml-100k` is the embedded copy; with `path` (format recbole), the file stem "
                      "of NAME.inter.", "ml-100k", nonempty=True)
    path: typing.Optional[str] = _help("recbole: folder holding NAME.inter (and optionally NAME.item), unset = "
                                       "embedded data; parquet/csv/jsonl: the interactions file.", None, nonempty=True)
    format: str = _help("Format of the data files: `recbole` (atomic .inter/.item), `parquet`, `csv` (with a "
                        "header) or `jsonl` (one JSON object a line), read with `datasets`.", "recbole",
                        choices=DATA_FORMATS)
    items: typing.Optional[str] = _help("parquet/csv/jsonl: optional item file in the same format with the "
                                        "columns.item and columns.title columns.", None, nonempty=True)
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    title_field: typing.Optional[str] = _help("Column of NAME.item holding the title; unset = first token_seq column.",
                                              None, nonempty=True)
    max_len: int = _help("Longest history a model reads (older items are cut).", 50, min=2)
    min_interactions: int = _help("k-core filter on users and items; 0 disables it.", 0, min=0)
    seed: int = _help("Seed for the 19 negatives of the candidate protocol (and of the cold items).", 2024, min=0,
                      max=SEED_MAX)
    cold_items: float = _help("Fraction of the catalogue made cold, drawn with data.seed: their training interactions "
                              "are removed (validation and test keep them as targets), recorded in the split and its "
                              "hash; every model's metrics.json then scores them under `cold`. 0 = off.", 0.0,
                              min=0.0, lt=1.0)

    def check(self):
        if self.format == "recbole":
            _require(self.items is None, "data.items", "applies to parquet, csv and jsonl (a RecBole folder's "
                                                       "NAME.item is found next to NAME.inter)")
        else:
            _require(self.path is not None, "data.path", f"required with data.format {self.format} "
                                                         f"(the interactions file)")


@dataclass
class StudentConfig(_Section):
    key: typing.ClassVar[str] = "student"
    hidden_size: int = _help("Width d of item embeddings and attention blocks.", 64, min=1)
    num_layers: int = _help("Number of pre-LN self-attention blocks.", 2, min=1)
    num_heads: int = _help("Attention heads per block; must divide hidden_size.", 2, min=1)
    dropout: float = _help("Dropout on embeddings, attention and feed-forward.", 0.2, min=0.0, lt=1.0)
    loss: str = _help("Own loss: `full` softmax over all items or `sampled` softmax.", "full",
                      choices=("full", "sampled"))
    num_negatives: int = _help("Negatives per position for the sampled softmax.", 256, min=1)
    negative_sampling: str = _help("`uniform` or `popularity` (with logQ correction).", "uniform",
                                   choices=("uniform", "popularity"))
    lr: float = _help("AdamW learning rate.", 1e-3, gt=0.0)
    weight_decay: float = _help("AdamW weight decay.", 0.0, min=0.0)
    batch_size: int = _help("Sequences per optimisation step.", 128, min=1)
    epochs: int = _help("Maximum number of epochs.", 200, min=1)
    patience: int = _help("Stop after this many evaluations without a better validation NDCG@10.", 20, min=1)

    def check(self):
        _require(self.hidden_size % self.num_heads == 0, "student.num_heads",
                 f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")


@dataclass
class TeacherConfig(_Section):
    key: typing.ClassVar[str] = "teacher"
    model: str = _help("`smollm2-135m` (embedded GGUF), a local Hugging Face folder, or a .gguf file.",
                       "smollm2-135m", nonempty=True)
    num_layers: typing.Optional[int] = _help("Keep only the first L decoder layers; unset keeps all.", None, min=1)
    dtype: str = _help("Backbone dtype: float32, bfloat16 or float16.", "float32",
                       choices=("float32", "bfloat16", "float16"))
    use_titles: bool = _help("Write each history item's title before its [HistoryEmb] token.", True)
    max_title_tokens: int = _help("Titles are cut to this many tokens.", 8, min=0)
    max_history: int = _help("Most recent history items put in the prompt.", 10, min=1)
    instruction: str = _help("Text before the history.", "A user watched these movies in order:")
    query_text: str = _help("Text after the history; its last token is pooled.", " The next movie they will watch is",
                            nonempty=True)
    adapter: str = _help("`lora` or `moe_lora` (iLoRA's instance-wise mixture of LoRA experts).", "moe_lora",
                         choices=("lora", "moe_lora"))
    cf_weights: list = _help("Candidate weights w of the CF retriever in the query q = (1 - w) q_LLM + w q_CF. The LLM "
                             "retriever trains alone (in the CF item space when the item table is fixed); after each "
                             "epoch the w with the best validation NDCG@10 is kept, so w = 1 falls back to the CF "
                             "retriever. [0.0] = the LLM alone.", [0.0], items=float, nonempty=True)
    item_side: str = _help("What an item's vector is made of: `cf` (the CF item table), `text` (its text alone: the "
                           "frozen backbone's mean states of the item text, data.columns.text, through a trained "
                           "head; the LLM's query scores only that part, so a cold item is found through its text) "
                           "or `both` (the LLM's query scores the CF row and the text part; the text head starts at 0). "
                           "With text the vectors are [CF ; text] and the CF query scores only the CF part, so at "
                           "w = 1 the blend is the CF retriever exactly (teacher/item_text.py).", "cf",
                           choices=("cf", "text", "both"))
    item_depth: str = _help("Layers that read the item texts (item_side text/both): `query` (the query side's cut, "
                            "teacher.num_layers) or `full` (every layer of teacher.model); the states are computed "
                            "once and cached by a hash of their inputs.", "query", choices=("query", "full"))
    max_text_tokens: int = _help("Item texts are cut to this many tokens (item_side text/both).", 32, min=1)
    text_query: bool = _help("Add to the LLM's query a trained projection of the last history item's text state "
                             "(the same cached states as the item side): a first-order text query beside the "
                             "prompt's pooled state, trained without backpropagating through the backbone "
                             "(item_side text or both).", False)
    train_item_table: bool = _help("Train the item table (initialised from the CF model); false keeps the CF "
                                   "item space fixed, so the LLM only learns to place queries in it.", True)
    lora_r: int = _help("LoRA rank (split into num_experts slices for moe_lora).", 8, min=1)
    lora_alpha: int = _help("LoRA alpha; scaling = alpha / r.", 16, min=1)
    lora_dropout: float = _help("Dropout on the LoRA input.", 0.05, min=0.0, lt=1.0)
    target_modules: list = _help("Module names peft adapts.", ["q_proj", "k_proj", "v_proj", "o_proj"],
                                 items=str, nonempty=True)
    num_experts: int = _help("Experts for moe_lora; must divide lora_r.", 4, min=1)
    temperature: float = _help("Softmax temperature on inner-product scores (1.0 to blend with the CF "
                               "retriever, which was trained at 1.0).", 0.1, gt=0.0)
    loss: str = _help("`full` softmax over the catalogue or `sampled` (in-batch + sampled negatives).", "full",
                      choices=("full", "sampled"))
    num_negatives: int = _help("Sampled negatives per batch for the sampled loss.", 1024, min=1)
    lr: float = _help("Peak AdamW learning rate (warmup then cosine decay).", 1e-3, gt=0.0)
    weight_decay: float = _help("AdamW weight decay.", 0.0, min=0.0)
    warmup_ratio: float = _help("Fraction of steps spent warming up.", 0.05, min=0.0, lt=1.0)
    batch_size: int = _help("Examples per forward pass.", 16, min=1)
    grad_accum: int = _help("Forward passes per optimiser step.", 1, min=1)
    examples_per_epoch: int = _help("Training (prefix -> next item) examples sampled per epoch.", 2000, min=1)
    epochs: int = _help("Maximum number of epochs.", 2, min=1)
    patience: int = _help("Epochs without a better validation NDCG@10 before stopping.", 2, min=1)
    eval_batch_size: int = _help("Prompts per forward pass at inference.", 32, min=1)

    def check(self):
        _require(self.lora_r % self.num_experts == 0, "teacher.num_experts",
                 f"num_experts {self.num_experts} must divide lora_r {self.lora_r}")
        _require(all(0 <= w <= 1 for w in self.cf_weights), "teacher.cf_weights",
                 f"must be a non-empty list of numbers in [0, 1], got {self.cf_weights!r}")
        for i, m in enumerate(self.target_modules):
            _require(bool(m.strip()), f"teacher.target_modules[{i}]", "must not be empty")
        _require(self.item_side != "cf" or not self.text_query, "teacher.text_query",
                 "needs teacher.item_side text or both (it reads the item text states)")


@dataclass
class DistillConfig(_Section):
    key: typing.ClassVar[str] = "distill"
    positions: int = _help("Training positions per user scored by the teacher (the last P).", 5, min=1)
    k: int = _help("Top-K teacher items kept per query in the cache.", 50, min=1)
    backend: str = _help("Teacher inference backend: `deepspeed` or `hf`.", "deepspeed", choices=("deepspeed", "hf"))
    shard_users: int = _help("Users per teacher-cache shard (the unit of resume and of work per rank).", 128, min=1)
    guard_samples: int = _help("Prompts scored both by the inference backend and by the hf float32 reference "
                               "before a cache is written with any other backend or dtype (teacher/guard.py).", 64,
                               min=1)
    guard_tolerance: typing.Optional[float] = _help("Largest relative query difference the guard accepts; unset = "
                                                    "by dtype (float32 1e-4, bfloat16 2e-2, float16 1e-2).", None,
                                                    gt=0.0)
    warm_start: bool = _help("Start the distilled student from the student-alone checkpoint of the same seed.", False)
    cold_negatives: bool = _help("The distilled student's own softmax counts the items never seen in training as "
                                 "negatives (true, as the student alone) or leaves them out (false): a cold item "
                                 "then moves only through the teacher's terms, so the vector it starts from "
                                 "(distill.cold_init, ced_weight) is not trained away by 'not this one' gradients.",
                                 True)
    cold_init: bool = _help("Start the rows of the items never seen in training from the teacher's text item "
                            "vectors, mapped into the student's item space by a ridge regression fitted on the seen "
                            "items (student/cold_start.py); needs warm_start and a teacher with item_side text or "
                            "both.", False)
    epochs: typing.Optional[int] = _help("Maximum epochs of the distilled training; unset = student.epochs.", None,
                                         min=1)
    own_weight: float = _help("Weight of the student's own next-item loss.", 1.0, min=0.0)
    kd_weight: float = _help("Weight of the temperature-scaled KL to the teacher's top-K.", 1.0, min=0.0)
    pairwise_weight: float = _help("Weight of the pairwise (BPR) distillation of the teacher's top-K "
                                   "(distill/losses/pairwise.py).", 0.5, min=0.0)
    ird_weight: float = _help("Weight of DLLM2Rec's importance-aware ranking distillation "
                              "(distill/losses/importance_ranking.py).", 0.0, min=0.0)
    align_weight: float = _help("Weight of the user-vector to teacher-query alignment.", 0.1, min=0.0)
    ced_weight: float = _help("Weight gamma of DLLM2Rec's collaborative embedding distillation: the item table is "
                              "e + gamma W e_teacher while training, folded into e after "
                              "(student/embedding_distillation.py); 0 = off.", 0.0, min=0.0)
    temperature: float = _help("Softening temperature T of the KL term (scaled by T^2).", 2.0, gt=0.0)
    pairwise_lambda: float = _help("Decay of the pairwise term's rank weights exp(-rank / lambda).", 10.0, gt=0.0)
    pairwise_negatives: int = _help("Uniform negatives per position for the pairwise term.", 20, min=1)
    ird_k: int = _help("Teacher items the importance-aware term distils (its top ird_k of the cache's K).", 10,
                       min=1)
    ird_lambda: float = _help("Position decay exp(-rank / lambda) of the importance-aware term.", 1.0, gt=0.0)
    ird_gammas: list = _help("Importance-aware weights of the position, confidence and consistency terms "
                             "(DLLM2Rec's gamma_position, gamma_confidence, gamma_consistency).", [0.3, 0.5, 0.1],
                             items=float, min=0.0)
    ird_temperature: float = _help("Temperature of the softmax of the teacher's scores (confidence weight).",
                                   1.0, gt=0.0)
    ird_negatives: int = _help("Uniform negatives per position for the importance-aware term.", 1, min=1)
    align: str = _help("Alignment loss: `cosine` or `infonce` over the batch.", "cosine", choices=("cosine", "infonce"))

    def check(self):
        weights = (self.own_weight, self.kd_weight, self.pairwise_weight, self.ird_weight, self.align_weight)
        _require(any(w > 0 for w in weights), "distill.own_weight", "all loss weights are zero")
        _require(self.warm_start or not self.cold_init, "distill.cold_init",
                 "needs distill.warm_start (the map is fitted on the student-alone's rows of the seen items)")


@dataclass
class EvalConfig(_Section):
    key: typing.ClassVar[str] = "eval"
    ks: list = _help("Cut-offs K of HR/NDCG/MRR/Recall/coverage; must include 10 (early stopping and the "
                     "report read NDCG@10).", [1, 5, 10, 20], items=int, nonempty=True, min=1)
    mask_history: bool = _help("Exclude the user's history (never the target) from the ranking.", True)
    index: str = _help("FAISS index_factory string; `Flat` is exact search. Search parameters follow a `?`: "
                       "`IVF1024,Flat?nprobe=32`, `HNSW32?efSearch=128`.", "Flat", nonempty=True)

    def check(self):
        _require(10 in self.ks, "eval.ks", f"must include 10 (early stopping and the report use NDCG@10), "
                                           f"got {self.ks!r}")


@dataclass
class BenchConfig(_Section):
    key: typing.ClassVar[str] = "bench"
    measure_cost: bool = _help("Measure each model's serving cost for the report (peak RSS, latency, throughput), "
                               "each in its own process; takes minutes with a teacher. Off: quality only.", True)
    teacher_backends: list = _help("Inference backends the teacher's serving cost is measured with "
                                   "(deepspeed, hf), each in its own process.", ["hf", "deepspeed"],
                                   items=str, nonempty=True, choices=("hf", "deepspeed"))
    users: typing.Optional[int] = _help("Test users every model serves in the throughput sweep (the same users for "
                                        "every model); unset = all test users.", None, min=1)
    latency_users: int = _help("Users timed one at a time (batch 1) for the latency percentiles, the same for "
                               "every model.", 100, min=1)
    batch_sizes: list = _help("Batch sizes of the throughput sweep; the report's throughput is each model's best.",
                              [1, 32, 256, 1024], items=int, nonempty=True, min=1)
    passes: int = _help("Passes per batch size; the median pass counts.", 3, min=1)


# ---------------------------------------------------------------- LLaRA-style generative baseline (issue 14)

LLARA_CANDIDATES = 20  # the split stores the target + 19 seeded negatives per user (distill.data.NUM_NEGATIVES)


@dataclass
class LlaraConfig(_Section):
    """The generative recommender next to the dense teacher (teacher/generative.py). It shares the
    `teacher` section's backbone (model, num_layers, dtype) and adapter (adapter, lora_*, target_modules,
    num_experts), so the two differ only in their head and objective."""
    key: typing.ClassVar[str] = "llara"
    enabled: bool = _help("Train the LLaRA-style generative baseline in `anyo run` (always available as "
                          "`anyo baseline llara`).", False)
    max_history: int = _help("Most recent history items put in the prompt as `title [HistoryEmb]`.", 10, min=1)
    max_title_tokens: int = _help("Titles are cut to this many tokens (before duplicates get ` (#ID)`).", 16, min=1)
    num_candidates: int = _help("Candidates in the prompt: fixed at what the split stores (target + 19 "
                                "negatives).", LLARA_CANDIDATES, choices=(LLARA_CANDIDATES,))
    instruction: str = _help("Text before the history.", "A user watched these movies in order:")
    candidates_text: str = _help("Text between the history and the candidates.",
                                 " Choose the next movie they will watch from these candidates:")
    answer_prefix: str = _help("Text after the candidates; the answer (a title + EOS) is generated after it.",
                               " Answer:", nonempty=True)
    shuffle_seed: int = _help("Seed of each user's candidate order in the prompt (and of the validation "
                              "users sampled when valid_users is set).", 0, min=0, max=SEED_MAX)
    examples_per_epoch: int = _help("Training (prefix -> next item) examples sampled per epoch, each with 19 "
                                    "fresh uniform negatives outside the user's sequence.", 600, min=1)
    epochs: int = _help("Maximum number of epochs.", 2, min=1)
    patience: int = _help("Epochs without a better validation HR@1 before stopping.", 1, min=1)
    batch_size: int = _help("Training prompts per forward pass.", 8, min=1)
    grad_accum: int = _help("Forward passes per optimiser step.", 1, min=1)
    eval_batch_size: int = _help("Prompts per generate() call at evaluation.", 16, min=1)
    lr: float = _help("Peak AdamW learning rate (warmup then cosine decay).", 1e-3, gt=0.0)
    weight_decay: float = _help("AdamW weight decay.", 0.0, min=0.0)
    warmup_ratio: float = _help("Fraction of steps spent warming up.", 0.05, min=0.0, lt=1.0)
    max_new_tokens_margin: int = _help("Generated tokens beyond the longest candidate title of the batch "
                                       "(its EOS included).", 2, min=0)
    valid_users: typing.Optional[int] = _help("Validation users scored by generation after each epoch "
                                              "(a seeded sample); unset = all. Test always scores every user.",
                                              200, min=1)


@dataclass
class Recipe(_Section):
    data: DataConfig = field(default_factory=DataConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    llara: LlaraConfig = field(default_factory=LlaraConfig)
    seed: int = _help("Seed of every training run.", 0, min=0, max=SEED_MAX)

    def check(self):
        check_index_string(self.eval.index, self.student.hidden_size)

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


def check_index_string(index: str, dim: int) -> None:
    """Refuse at load time a FAISS index_factory string that cannot build `dim`-dimensional vectors
    (whether it can be trained on the catalogue is checked when the harness builds it)."""
    if index in ("Flat", "brute"):
        return
    import faiss
    factory, params = split_index_string(index)
    try:
        built = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        if params:
            faiss.ParameterSpace().set_index_parameters(built, params)
    except RuntimeError as e:
        raise ConfigError(f"eval.index: cannot build {index!r} for {dim}-dimensional vectors "
                          f"(student.hidden_size): {faiss_reason(e)}") from None


def split_index_string(index: str) -> tuple[str, str]:
    """`FACTORY?PARAMS` -> (factory string, search parameters such as `nprobe=32` or `efSearch=128`)."""
    factory, _, params = index.partition("?")
    return factory.strip(), params.strip()


def faiss_reason(e: Exception) -> str:
    """The readable part of a FAISS C++ error ("Error in ... at file.cpp:66: Error: 'x' failed: REASON")."""
    line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    line = re.sub(r"^Error in .*? at \S+:\d+: ", "", line)
    return re.sub(r"^Error: '.*?' failed: ", "", line)


def config_from_dict(cls, raw: dict, prefix: str = ""):
    """Build dataclass `cls` from a mapping; unknown keys name the dotted key, the section's
    `__post_init__` checks every value (type, bounds) and names its key."""
    if raw is None and prefix:  # `student:` with every line commented out: the defaults
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'recipe'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise ConfigError(f"{prefix}{key}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {name: config_from_dict(hints[name], value, f"{prefix}{name}.") if dataclasses.is_dataclass(hints[name])
              else value for name, value in raw.items()}
    return cls(**kwargs)


class RecipeLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases (a recipe never needs one, and a few nested aliases
    expand to billions of nodes: the "billion laughs") and duplicate keys (the later one
    would silently win)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise ConfigError(f"line {mark.line + 1}: YAML aliases (*name) are not allowed in recipes")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: duplicate key {key!r}")
            seen.add(key) if isinstance(key, typing.Hashable) else None
        return super().construct_mapping(node, deep)


def _parse_yaml(text: str):
    try:
        return yaml.load(text, Loader=RecipeLoader)
    except RecursionError:
        raise ConfigError("nested too deeply") from None


def _apply_override(raw: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment}: expected KEY=VALUE")
    key, text = assignment.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"--set {assignment}: KEY must be dotted names such as student.lr")
    node = raw
    for p in parts[:-1]:
        if node.get(p) is None:
            node[p] = {}
        node = node[p]
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {p} is not a section")
    try:
        node[parts[-1]] = _parse_yaml(text)
    except (yaml.YAMLError, ConfigError) as e:
        raise ConfigError(f"--set {key}: value {text!r} is not valid YAML ({_one_line(e)})") from None


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def _read_recipe(path: Path):
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConfigError(f"{path}: starts with a UTF-16 byte-order mark; save the recipe as UTF-8")
    try:
        text = data.decode("utf-8")  # a UTF-8 byte-order mark is accepted (YAML allows one)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not valid UTF-8 at byte offset {e.start} (line {line})") from None
    if not text.lstrip("\ufeff").strip():
        raise ConfigError(f"{path}: empty recipe (expected sections such as `student:`)")
    try:
        raw = _parse_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {_one_line(e)}") from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if raw is None:  # only comments
        raise ConfigError(f"{path}: empty recipe (only comments; expected sections such as `student:`)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (data, student, ...), got {type(raw).__name__}")
    return raw


def load_recipe(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read a recipe file (or the defaults when `path` is None) and apply `--set` overrides."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: recipe file not found" if not path.exists() else f"{path}: not a file")
        try:
            raw = _read_recipe(path)
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the recipe ({e.strerror or e})") from None
    for a in overrides:
        _apply_override(raw, a)
    try:
        return config_from_dict(Recipe, raw, "")
    except ConfigError as e:
        raise ConfigError(f"{path or 'recipe'}: {e}") from None
