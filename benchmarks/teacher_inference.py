"""Teacher inference throughput: DeepSpeed (`init_inference`) vs plain transformers, same prompts.

    python benchmarks/teacher_inference.py [RECIPE] [--prompts 128] [--set key=value ...]

Builds the recipe's teacher (fresh adapter; speed does not depend on training)
over the recipe's data, scores the same validation prompts with both backends
and reports prompts/s, tokens/s, and achieved FLOP/s as a fraction of a matmul
peak measured in the same run. On a GPU machine DeepSpeed runs on CUDA (with
kernel injection when the adapter is plain LoRA).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from distill.config import load_recipe
from distill.data import build_split
from student.model import SASRec, SASRecConfig
from teacher.infer import wrap_backend
from teacher.model import build_teacher


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(n, n, device=dev)
    best = float("inf")
    for _ in range(repeats):
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ a
        if dev == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def decoder_flops_per_token(model) -> float:
    """2 x (parameters touched per token) for the decoder layers (attention scores excluded)."""
    layers = [p for n, p in model.backbone.named_parameters() if ".layers." in n]
    return 2.0 * sum(p.numel() for p in layers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", nargs="?", default="recipes/ml100k.yaml")
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    recipe = load_recipe(args.recipe, args.set)
    split = build_split(recipe.data)
    torch.manual_seed(0)
    s = recipe.student
    cf = SASRec(SASRecConfig(split.n_items, recipe.data.max_len, s.hidden_size, s.num_layers, s.num_heads, 0.0))
    h = split.history("valid")
    prompts = h.take(np.arange(min(args.prompts, split.n_users)))
    bs = recipe.teacher.eval_batch_size
    peak = matmul_peak()
    rows = {}
    reference = None
    for backend in ("hf", "deepspeed"):
        torch.manual_seed(0)
        model = wrap_backend(build_teacher(recipe.teacher, cf, split.titles, texts=split.texts).eval(), backend)
        tokens = int(model.prompts.lengths(prompts).sum())
        flops = decoder_flops_per_token(model) * tokens
        model.encode(prompts.take(np.arange(min(bs, len(prompts)))), bs)  # warm-up (fewer prompts than a batch: all)
        t = time.perf_counter()
        q = model.encode(prompts, bs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        sec = time.perf_counter() - t
        reference = q if reference is None else reference
        rows[backend] = (len(prompts) / sec, tokens / sec, flops / sec, float(np.abs(q - reference).max()))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"{len(prompts)} prompts, batch {bs}, {recipe.teacher.model} ({recipe.teacher.num_layers or 'all'} layers, "
          f"{recipe.teacher.dtype}), {device}; matmul peak {peak / 1e9:.1f} GFLOP/s\n")
    print("| backend | prompts/s | tokens/s | GFLOP/s | of peak | max |q - q_hf| |\n|---|---|---|---|---|---|")
    for b, (p, tk, fl, diff) in rows.items():
        print(f"| {b} | {p:.1f} | {tk:.0f} | {fl / 1e9:.1f} | {fl / peak:.0%} | {diff:.1e} |")
    print(f"\ndeepspeed / hf throughput ratio: {rows['deepspeed'][0] / rows['hf'][0]:.2f}")


if __name__ == "__main__":
    main()
