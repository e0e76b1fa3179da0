"""Recipes: one YAML file describes a whole run.

A recipe is parsed with a safe YAML loader (no aliases, no duplicate keys) into the
checked dataclasses below (distill.checked): every field declares its checks next to its
help text (`min=1`, `gt=0.0`, `choices=...`), so a bad value fails at load time with its
dotted key. `--set a.b=value` overrides any field (the value is parsed as YAML, so
`--set teacher.lora_r=16` gives an int). A recipe is found by path or, for the recipes
shipped with anyo, by name (`ml100k`).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from distill.checked import SEED_MAX, Section, config_from_dict, option, require
from distill.errors import ConfigError
from distill.search import check_index_string

DATA_FORMATS = ("recbole", "parquet", "csv", "jsonl")


@dataclass
class ColumnsConfig(Section):
    key: typing.ClassVar[str] = "data.columns"
    user: str = option("Column of the interactions holding the user token.", "user_id", nonempty=True)
    item: str = option("Column of the interactions (and of data.items) holding the item token.", "item_id",
                       nonempty=True)
    time: str = option("Column of the interactions holding the timestamp (a number or a date-time); optional "
                       "for RecBole files (file order then).", "timestamp", nonempty=True)
    title: str = option("Column of data.items holding the title (parquet, csv, jsonl; RecBole files use "
                        "data.title_field).", "title", nonempty=True)
    text: typing.Optional[list] = option("Columns of the item file that follow the title in each item's text (what "
                                         "the teacher's text item side reads, teacher.item_side), e.g. [release_year, "
                                         "class]; unset = every column of the item file besides the item and the "
                                         "title; [] = the title alone.", None, items=str)


@dataclass
class DataConfig(Section):
    key: typing.ClassVar[str] = "data"
    name: str = option("Data set name: `ml-100k` is the embedded copy; with `path` (format recbole), the file stem "
                       "of NAME.inter.", "ml-100k", nonempty=True)
    path: typing.Optional[str] = option("recbole: folder holding NAME.inter (and optionally NAME.item), unset = "
                                        "embedded data; parquet/csv/jsonl: the interactions file.", None, nonempty=True)
    format: str = option("Format of the data files: `recbole` (atomic .inter/.item), `parquet`, `csv` (with a "
                         "header) or `jsonl` (one JSON object a line), read with `datasets`.", "recbole",
                         choices=DATA_FORMATS)
    items: typing.Optional[str] = option("parquet/csv/jsonl: optional item file in the same format with the "
                                         "columns.item and columns.title columns.", None, nonempty=True)
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    title_field: typing.Optional[str] = option("Column of NAME.item holding the title; unset = first token_seq column.",
                                               None, nonempty=True)
    max_len: int = option("Longest history a model reads (older items are cut).", 50, min=2)
    min_interactions: int = option("k-core filter on users and items; 0 disables it.", 0, min=0)
    seed: int = option("Seed for the 19 negatives of the candidate protocol (and of the cold items).", 2024, min=0,
                       max=SEED_MAX)
    cold_items: float = option("Fraction of the catalogue made cold, drawn with data.seed: their training interactions "
                               "are removed (validation and test keep them as targets), recorded in the split and its "
                               "hash; every model's metrics.json then scores them under `cold`. 0 = off.", 0.0,
                               min=0.0, lt=1.0)

    def check(self):
        if self.format == "recbole":
            require(self.items is None, "data.items", "applies to parquet, csv and jsonl (a RecBole folder's "
                                                       "NAME.item is found next to NAME.inter)")
        else:
            require(self.path is not None, "data.path", f"required with data.format {self.format} "
                                                         f"(the interactions file)")


@dataclass
class StudentConfig(Section):
    key: typing.ClassVar[str] = "student"
    hidden_size: int = option("Width d of item embeddings and attention blocks.", 64, min=1)
    num_layers: int = option("Number of pre-LN self-attention blocks.", 2, min=1)
    num_heads: int = option("Attention heads per block; must divide hidden_size.", 2, min=1)
    dropout: float = option("Dropout on embeddings, attention and feed-forward.", 0.2, min=0.0, lt=1.0)
    loss: str = option("Own loss: `full` softmax over all items or `sampled` softmax.", "full",
                       choices=("full", "sampled"))
    num_negatives: int = option("Negatives per position for the sampled softmax.", 256, min=1)
    negative_sampling: str = option("`uniform` or `popularity` (with logQ correction).", "uniform",
                                    choices=("uniform", "popularity"))
    lr: float = option("AdamW learning rate.", 1e-3, gt=0.0)
    weight_decay: float = option("AdamW weight decay.", 0.0, min=0.0)
    batch_size: int = option("Sequences per optimisation step.", 128, min=1)
    epochs: int = option("Maximum number of epochs.", 200, min=1)
    patience: int = option("Stop after this many evaluations without a better validation NDCG@10.", 20, min=1)

    def check(self):
        require(self.hidden_size % self.num_heads == 0, "student.num_heads",
                 f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")


@dataclass
class TeacherConfig(Section):
    key: typing.ClassVar[str] = "teacher"
    model: str = option("`smollm2-135m` (embedded GGUF), a local Hugging Face folder, or a .gguf file.",
                        "smollm2-135m", nonempty=True)
    num_layers: typing.Optional[int] = option("Keep only the first L decoder layers; unset keeps all.", None, min=1)
    dtype: str = option("Backbone dtype: float32, bfloat16 or float16.", "float32",
                        choices=("float32", "bfloat16", "float16"))
    use_titles: bool = option("Write each history item's title before its [HistoryEmb] token.", True)
    max_title_tokens: int = option("Titles are cut to this many tokens.", 8, min=0)
    max_history: int = option("Most recent history items put in the prompt.", 10, min=1)
    instruction: str = option("Text before the history.", "A user watched these movies in order:")
    query_text: str = option("Text after the history; its last token is pooled.", " The next movie they will watch is",
                             nonempty=True)
    adapter: str = option("`lora` or `moe_lora` (iLoRA's instance-wise mixture of LoRA experts).", "moe_lora",
                          choices=("lora", "moe_lora"))
    cf_weights: list = option("Candidate weights w of the CF retriever in the query q = (1 - w) q_LLM + w q_CF. The LLM "
                              "retriever trains alone (in the CF item space when the item table is fixed); after each "
                              "epoch the w with the best validation NDCG@10 is kept, so w = 1 falls back to the CF "
                              "retriever. [0.0] = the LLM alone.", [0.0], items=float, nonempty=True)
    item_side: str = option("What an item's vector is made of: `cf` (the CF item table), `text` (its text alone: the "
                            "frozen backbone's mean states of the item text, data.columns.text, through a trained "
                            "head; the LLM's query scores only that part, so a cold item is found through its text) "
                            "or `both` (the LLM's query scores the CF row and the text part). "
                            "With text the vectors are [CF ; text] and the CF query scores only the CF part, so at "
                            "w = 1 the blend is the CF retriever exactly (teacher/item_text.py).", "cf",
                            choices=("cf", "text", "both"))
    item_depth: str = option("Layers that read the item texts (item_side text/both): `query` (the query side's cut, "
                             "teacher.num_layers) or `full` (every layer of teacher.model); the states are computed "
                             "once and cached by a hash of their inputs.", "query", choices=("query", "full"))
    max_text_tokens: int = option("Item texts are cut to this many tokens (item_side text/both).", 32, min=1)
    text_query: bool = option("Add to the LLM's query the last history item's own text vector (the item side's text "
                              "head, tied): a first-order text query beside the prompt's pooled state that scores "
                              "items with a text like the last one high from the start (item_side text or both).",
                              False)
    inject_layer: int = option("The decoder layer the CF items enter at the [HistoryEmb] slots: 0 = the input "
                               "embeddings (LLaRA, iLoRA). k > 0: the layers below k read the prompt's text alone "
                               "(a slot is a pad token there), are frozen and carry no LoRA, so per_slot training "
                               "computes their states once per window and a step runs only the L - k layers above; "
                               "the projected CF items replace the slot states entering layer k (teacher/decoder.py).",
                               0, min=0)
    train_item_table: bool = option("Train the item table (initialised from the CF model); false keeps the CF "
                                    "item space fixed, so the LLM only learns to place queries in it.", True)
    lora_r: int = option("LoRA rank (split into num_experts slices for moe_lora).", 8, min=1)
    lora_alpha: int = option("LoRA alpha; scaling = alpha / r.", 16, min=1)
    lora_dropout: float = option("Dropout on the LoRA input.", 0.05, min=0.0, lt=1.0)
    target_modules: list = option("Module names peft adapts.", ["q_proj", "k_proj", "v_proj", "o_proj"],
                                  items=str, nonempty=True)
    num_experts: int = option("Experts for moe_lora; must divide lora_r.", 4, min=1)
    temperature: float = option("Softmax temperature on inner-product scores (1.0 to blend with the CF "
                                "retriever, which was trained at 1.0).", 0.1, gt=0.0)
    loss: str = option("`full` softmax over the catalogue or `sampled` (in-batch + sampled negatives).", "full",
                       choices=("full", "sampled"))
    num_negatives: int = option("Sampled negatives per batch for the sampled loss.", 1024, min=1)
    lr: float = option("Peak AdamW learning rate (warmup then cosine decay).", 1e-3, gt=0.0)
    weight_decay: float = option("AdamW weight decay.", 0.0, min=0.0)
    warmup_ratio: float = option("Fraction of steps spent warming up.", 0.05, min=0.0, lt=1.0)
    batch_size: int = option("Prompts per forward pass (examples: per_slot: windows, each up to max_history "
                             "examples).", 16, min=1)
    grad_accum: int = option("Forward passes per optimiser step.", 1, min=1)
    examples: str = option("How training reads the data: `pooled` (one prompt per sampled (prefix -> next item) example, "
                           "pooled at the last query_text token, the MoE-LoRA gate set once per prompt from the CF "
                           "model's user vector) or `per_slot` (SASRec-style: one causal pass over a window of up to "
                           "max_history consecutive [HistoryEmb] slots after the instruction gives a next-item example "
                           "at every slot, every training position once per epoch; no query_text, a query is the state "
                           "at its last slot, and the gate is set per token from the CF model's state at the latest "
                           "slot at or before it, so no token sees a later item; inference scores the same way).",
                           "pooled", choices=("pooled", "per_slot"))
    examples_per_epoch: int = option("Training (prefix -> next item) examples sampled per epoch (examples: pooled; "
                                     "per_slot reads every training position each epoch).", 2000, min=1)
    epochs: int = option("Maximum number of epochs.", 2, min=1)
    minutes: typing.Optional[float] = option("Training budget in minutes (validation excluded): training stops at the "
                                             "first optimiser step past it and validates that epoch, partial or "
                                             "not; the learning-rate schedule still spans `epochs`. Unset = epochs "
                                             "alone.", None, gt=0.0)
    patience: int = option("Epochs in which neither the blend's nor the LLM alone's validation NDCG@10 improved "
                           "before stopping.", 2, min=1)
    select: str = option("Which validation NDCG@10 picks the epoch kept: `blend` (the best blend of q_LLM and q_CF "
                         "over cf_weights) or `llm` (the LLM retriever alone, w = 0; the kept epoch's w is still "
                         "its best blend on validation).", "blend", choices=("blend", "llm"))
    eval_batch_size: int = option("Prompts per forward pass at inference.", 32, min=1)
    max_grad_norm: typing.Optional[float] = option("Clip the global gradient norm of each optimiser step to this; "
                                                   "unset = no clipping.", None, gt=0.0)
    distributed: str = option("How N ranks (torchrun / deepspeed launchers) train the LLM (this teacher and the "
                              "llara baseline): `ddp` (gradients summed, AdamW on every rank; one process: plain "
                              "AdamW), `zero1` or `zero2` (DeepSpeed ZeRO stage 1 / 2: AdamW's moments, and at "
                              "stage 2 the gradients, partitioned across the ranks). Every strategy takes the "
                              "optimiser steps of one process with grad_accum x N and saves the same checkpoint "
                              "(distill/optimisers.py).", "ddp", choices=("ddp", "zero1", "zero2"))
    offload_optimizer: bool = option("ZeRO only: keep AdamW's state in CPU memory and step it there (ZeRO-Offload; "
                                     "it also runs in one process, on one GPU too small for the optimiser state).",
                                     False)
    deepspeed_config: typing.Optional[str] = option("ZeRO only: a DeepSpeed JSON file merged over the config the "
                                                    "recipe implies (communication, bucket sizes, offload "
                                                    "details); the keys the recipe sets (batch, accumulation, "
                                                    "optimizer, scheduler, precision, clipping) are refused. Its "
                                                    "content is part of the teacher's inputs.", None, nonempty=True)

    def check(self):
        require(self.distributed != "ddp" or not self.offload_optimizer, "teacher.offload_optimizer",
                "needs teacher.distributed zero1 or zero2")
        require(self.distributed != "ddp" or self.deepspeed_config is None, "teacher.deepspeed_config",
                "needs teacher.distributed zero1 or zero2")
        require(self.lora_r % self.num_experts == 0, "teacher.num_experts",
                 f"num_experts {self.num_experts} must divide lora_r {self.lora_r}")
        require(all(0 <= w <= 1 for w in self.cf_weights), "teacher.cf_weights",
                 f"must be a non-empty list of numbers in [0, 1], got {self.cf_weights!r}")
        for i, m in enumerate(self.target_modules):
            require(bool(m.strip()), f"teacher.target_modules[{i}]", "must not be empty")
        require(self.num_layers is None or self.inject_layer < self.num_layers, "teacher.inject_layer",
                f"must be below teacher.num_layers ({self.num_layers}), got {self.inject_layer}")
        require(self.item_side != "cf" or not self.text_query, "teacher.text_query",
                 "needs teacher.item_side text or both (it reads the item text states)")


@dataclass
class DistillConfig(Section):
    key: typing.ClassVar[str] = "distill"
    positions: int = option("Training positions per user scored by the teacher (the last P).", 5, min=1)
    k: int = option("Top-K teacher items kept per query in the cache.", 50, min=1)
    backend: str = option("Teacher inference backend: `deepspeed` or `hf`.", "deepspeed", choices=("deepspeed", "hf"))
    shard_users: int = option("Users per teacher-cache shard (the unit of resume and of work per rank).", 128, min=1)
    guard_samples: int = option("Prompts scored both by the inference backend and by the hf float32 reference "
                                "before a cache is written with any other backend or dtype (teacher/guard.py).", 64,
                                min=1)
    guard_tolerance: typing.Optional[float] = option("Largest relative difference of the LLM part of a query "
                                                     "(q_LLM, before the blend) the guard accepts; unset = by dtype "
                                                     "(float32 1e-4, bfloat16 2e-2, float16 1e-2).", None, gt=0.0)
    guard_top10_identical: float = option("Least fraction of the guard's sampled prompts whose ordered top-10 "
                                          "(the cache's ranking) must be identical to the reference's.", 0.95,
                                          min=0.0, max=1.0)
    guard_top50_overlap: float = option("Least mean overlap of the top-50 sets (|backend & reference| / 50) over "
                                        "the guard's sampled prompts.", 0.99, min=0.0, max=1.0)
    warm_start: bool = option("Start the distilled student from the student-alone checkpoint of the same seed.", False)
    cold_negatives: bool = option("The distilled student's own softmax counts the items never seen in training as "
                                  "negatives (true, as the student alone) or leaves them out (false): a cold item "
                                  "then moves only through the teacher's terms, so the vector it starts from "
                                  "(distill.cold_init, ced_weight) is not trained away by 'not this one' gradients.",
                                  True)
    cold_init: bool = option("Start the rows of the items never seen in training from the teacher's text item "
                             "vectors, mapped into the student's item space by a ridge regression fitted on the seen "
                             "items (student/cold_start.py); needs warm_start and a teacher with item_side text or "
                             "both.", False)
    epochs: typing.Optional[int] = option("Maximum epochs of the distilled training; unset = student.epochs.", None,
                                          min=1)
    own_weight: float = option("Weight of the student's own next-item loss.", 1.0, min=0.0)
    kd_weight: float = option("Weight of the temperature-scaled KL to the teacher's top-K.", 1.0, min=0.0)
    pairwise_weight: float = option("Weight of the pairwise (BPR) distillation of the teacher's top-K "
                                    "(distill/losses/pairwise.py).", 0.5, min=0.0)
    ird_weight: float = option("Weight of DLLM2Rec's importance-aware ranking distillation "
                               "(distill/losses/importance_ranking.py).", 0.0, min=0.0)
    align_weight: float = option("Weight of the user-vector to teacher-query alignment.", 0.1, min=0.0)
    ced_weight: float = option("Weight gamma of DLLM2Rec's collaborative embedding distillation: the item table is "
                               "e + gamma W e_teacher while training, folded into e after "
                               "(student/embedding_distillation.py); 0 = off.", 0.0, min=0.0)
    ced_text_rows: str = option("A text item tower: the rows that are the CED term gamma W e_teacher alone, their ID "
                                "part held at 0 while training and at the fold: `none`, `unseen` (the items never "
                                "seen in training: a cold item's row is what the shared W makes of its text) or "
                                "`all` (every item: no ID table, the student's items are their text); needs "
                                "ced_weight > 0 and a teacher with item_side text or both.", "none",
                                choices=("none", "unseen", "all"))
    temperature: float = option("Softening temperature T of the KL term (scaled by T^2).", 2.0, gt=0.0)
    pairwise_lambda: float = option("Decay of the pairwise term's rank weights exp(-rank / lambda).", 10.0, gt=0.0)
    pairwise_negatives: int = option("Uniform negatives per position for the pairwise term.", 20, min=1)
    ird_k: int = option("Teacher items the importance-aware term distils (its top ird_k of the cache's K).", 10,
                        min=1)
    ird_lambda: float = option("Position decay exp(-rank / lambda) of the importance-aware term.", 1.0, gt=0.0)
    ird_gammas: list = option("Importance-aware weights of the position, confidence and consistency terms "
                              "(DLLM2Rec's gamma_position, gamma_confidence, gamma_consistency).", [0.3, 0.5, 0.1],
                              items=float, min=0.0)
    ird_temperature: float = option("Temperature of the softmax of the teacher's scores (confidence weight).",
                                    1.0, gt=0.0)
    ird_negatives: int = option("Uniform negatives per position for the importance-aware term.", 1, min=1)
    align: str = option("Alignment loss: `cosine` or `infonce` over the batch.", "cosine", choices=("cosine", "infonce"))

    def check(self):
        weights = (self.own_weight, self.kd_weight, self.pairwise_weight, self.ird_weight, self.align_weight)
        require(any(w > 0 for w in weights), "distill.own_weight", "all loss weights are zero")
        require(self.warm_start or not self.cold_init, "distill.cold_init",
                 "needs distill.warm_start (the map is fitted on the student-alone's rows of the seen items)")
        text_rows = self.ced_text_rows != "none"
        require(self.ced_weight > 0 or not text_rows, "distill.ced_text_rows", "needs distill.ced_weight > 0")
        require(not (text_rows and self.cold_init), "distill.ced_text_rows",
                "the cold rows' ID part it holds at 0 is what distill.cold_init writes; turn one off")


@dataclass
class EvalConfig(Section):
    key: typing.ClassVar[str] = "eval"
    ks: list = option("Cut-offs K of HR/NDCG/MRR/Recall/coverage; must include 10 (early stopping and the "
                      "report read NDCG@10).", [1, 5, 10, 20], items=int, nonempty=True, min=1)
    mask_history: bool = option("Exclude every item of the user's history from the ranking (a target that repeats "
                                "one is a miss), as `anyo serve` does; false for data with repeat consumption: "
                                "seen items stay rankable, and the export serves them by default.", True)
    index: str = option("FAISS index_factory string; `Flat` is exact search. Search parameters follow a `?`: "
                        "`IVF1024,Flat?nprobe=32`, `HNSW32?efSearch=128`.", "Flat", nonempty=True)

    def check(self):
        require(10 in self.ks, "eval.ks", f"must include 10 (early stopping and the report use NDCG@10), "
                                           f"got {self.ks!r}")


@dataclass
class BenchConfig(Section):
    key: typing.ClassVar[str] = "bench"
    measure_cost: bool = option("Measure each model's serving cost for the report (peak RSS, latency, throughput), "
                                "each in its own process; takes minutes with a teacher. Off: quality only.", True)
    teacher_backends: list = option("Inference backends the teacher's serving cost is measured with "
                                    "(deepspeed, hf), each in its own process.", ["hf", "deepspeed"],
                                    items=str, nonempty=True, choices=("hf", "deepspeed"))
    users: typing.Optional[int] = option("Test users every model serves in the throughput sweep (the same users for "
                                         "every model); unset = all test users.", None, min=1)
    latency_users: int = option("Users timed one at a time (batch 1) for the latency percentiles, the same for "
                                "every model.", 100, min=1)
    batch_sizes: list = option("Batch sizes of the throughput sweep; the report's throughput is each model's best.",
                               [1, 32, 256, 1024], items=int, nonempty=True, min=1)
    passes: int = option("Passes per batch size; the median pass counts.", 3, min=1)


# ---------------------------------------------------------------- LLaRA-style generative baseline (issue 14)

LLARA_CANDIDATES = 20  # the split stores the target + 19 seeded negatives per user (distill.data.NUM_NEGATIVES)


@dataclass
class LlaraConfig(Section):
    """The generative recommender next to the dense teacher (teacher/generative.py). It shares the
    `teacher` section's backbone (model, num_layers, dtype) and adapter (adapter, lora_*, target_modules,
    num_experts), so the two differ only in their head and objective."""
    key: typing.ClassVar[str] = "llara"
    enabled: bool = option("Train the LLaRA-style generative baseline in `anyo run` (always available as "
                           "`anyo baseline llara`).", False)
    max_history: int = option("Most recent history items put in the prompt as `title [HistoryEmb]`.", 10, min=1)
    max_title_tokens: int = option("Titles are cut to this many tokens (before duplicates get ` (#ID)`).", 16, min=1)
    num_candidates: int = option("Candidates in the prompt: fixed at what the split stores (target + 19 "
                                 "negatives).", LLARA_CANDIDATES, choices=(LLARA_CANDIDATES,))
    instruction: str = option("Text before the history.", "A user watched these movies in order:")
    candidates_text: str = option("Text between the history and the candidates.",
                                  " Choose the next movie they will watch from these candidates:")
    answer_prefix: str = option("Text after the candidates; the answer (a title + EOS) is generated after it.",
                                " Answer:", nonempty=True)
    shuffle_seed: int = option("Seed of each user's candidate order in the prompt (and of the validation "
                               "users sampled when valid_users is set).", 0, min=0, max=SEED_MAX)
    examples_per_epoch: int = option("Training (prefix -> next item) examples sampled per epoch, each with 19 "
                                     "fresh uniform negatives outside the user's sequence.", 600, min=1)
    epochs: int = option("Maximum number of epochs.", 2, min=1)
    patience: int = option("Epochs without a better validation HR@1 before stopping.", 1, min=1)
    batch_size: int = option("Training prompts per forward pass.", 8, min=1)
    grad_accum: int = option("Forward passes per optimiser step.", 1, min=1)
    eval_batch_size: int = option("Prompts per generate() call at evaluation.", 16, min=1)
    lr: float = option("Peak AdamW learning rate (warmup then cosine decay).", 1e-3, gt=0.0)
    weight_decay: float = option("AdamW weight decay.", 0.0, min=0.0)
    warmup_ratio: float = option("Fraction of steps spent warming up.", 0.05, min=0.0, lt=1.0)
    max_new_tokens_margin: int = option("Generated tokens beyond the longest candidate title of the batch "
                                        "(its EOS included).", 2, min=0)
    valid_users: typing.Optional[int] = option("Validation users scored by generation after each epoch "
                                               "(a seeded sample); unset = all. Test always scores every user.",
                                               200, min=1)


@dataclass
class Recipe(Section):
    data: DataConfig = field(default_factory=DataConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    llara: LlaraConfig = field(default_factory=LlaraConfig)
    seed: int = option("Seed of every training run.", 0, min=0, max=SEED_MAX)

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


# where recipes are found by name: installed with the package (setup.cfg), or the checkout's recipes/
RECIPE_DIRS = (Path(__file__).parent / "recipes", Path(__file__).parents[1] / "recipes")


def recipe_names() -> list[str]:
    return sorted({p.stem for d in RECIPE_DIRS if d.is_dir() for p in d.glob("*.yaml")})


def find_recipe(path: str | Path) -> Path:
    """A recipe file, or a recipe shipped with anyo named without folder or suffix (`ml100k`)."""
    path = Path(path)
    if path.exists() or path.suffix or len(path.parts) > 1:
        return path
    for folder in RECIPE_DIRS:
        if (folder / f"{path}.yaml").is_file():
            return folder / f"{path}.yaml"
    raise ConfigError(f"{path}: no such recipe file, and no recipe of that name ships with anyo "
                      f"({', '.join(recipe_names())})")


def load_recipe(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read a recipe file or shipped recipe (or the defaults when `path` is None); apply `--set` overrides."""
    raw: dict = {}
    if path is not None:
        path = find_recipe(path)
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
