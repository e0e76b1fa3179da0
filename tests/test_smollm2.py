"""Integration: the embedded SmolLM2-135M GGUF, dequantized once into the anyo cache."""

import time

import pytest
import torch

from teacher.backbone import dequantized_folder, embedded_gguf, load_backbone


@pytest.mark.slow
def test_real_smollm2_loads_through_the_cache_and_runs(tmp_path_factory):
    gguf = embedded_gguf()
    folder = dequantized_folder(gguf)
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    start = time.perf_counter()
    model, tokenizer, source = load_backbone("smollm2-135m", num_layers=2)
    cached_load = time.perf_counter() - start
    assert source == folder
    assert type(model).__name__ == "LlamaModel" and model.config.hidden_size == 576
    assert len(model.layers) == 2
    ids = torch.tensor([tokenizer("A user watched these movies in order:")["input_ids"]])
    with torch.inference_mode():
        h = model(input_ids=ids).last_hidden_state
    assert h.shape == (1, ids.shape[1], 576) and torch.isfinite(h).all()
    assert cached_load < 120
