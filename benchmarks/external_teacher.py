"""A teacher anyo did not train, written in the public layout for `anyo teacher import`.

The frozen SmolLM2 (every layer; no adapter, nothing trained) reads each item's text (distill/item_text.py: the
title, then the item file's other columns); an item's vector is its mean last hidden state, standardised over the
catalogue (teacher/item_text.py, the same states the text item side reads). A user's query at position t is the
mean of the vectors of the last `--last` items they read. It writes

    OUT/queries.parquet   user, position, query    for the positions anyo's own teacher scores (distill.positions,
                                                    validation, test)
    OUT/items.npy         (N+1, H) item vectors, RUN/split/items.tsv order, row 0 padding

    python benchmarks/external_teacher.py RUN --out DIR [--model smollm2-135m] [--last 3]
    anyo teacher import RUN/recipe.yaml --out RUN --queries DIR/queries.parquet --items DIR/items.npy
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from distill.config import load_recipe
from distill.data import load_split
from distill.positions import scored_positions
from teacher.backbone import load_backbone
from teacher.item_text import item_states


def last_item_means(split, users: np.ndarray, t: np.ndarray, vectors: np.ndarray, last: int) -> np.ndarray:
    """(n, H) the mean vector of each prefix's last `last` items (t >= 1, so every prefix has one)."""
    seq = split.sequences
    back = np.arange(1, last + 1)                                   # 1 .. last items back
    idx = seq.offsets[users][:, None] + t[:, None] - back[None, :]  # (n, last)
    valid = back[None, :] <= t[:, None]
    items = np.where(valid, seq.flat[np.where(valid, idx, 0)], 0)   # row 0 is padding: zeros
    return vectors[items].sum(1) / valid.sum(1, keepdims=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a run folder with its split and recipe.yaml")
    p.add_argument("--out", type=Path, required=True, help="folder for queries.parquet and items.npy")
    p.add_argument("--model", default=None, help="the frozen decoder (default: the recipe's teacher.model)")
    p.add_argument("--last", type=int, default=3, help="the query is the mean of this many last items")
    args = p.parse_args()
    recipe = load_recipe(args.run / "recipe.yaml")
    split = load_split(args.run / "split")
    cfg = dataclasses.replace(recipe.teacher, model=args.model or recipe.teacher.model, num_layers=None,
                              item_depth="query")
    start = time.perf_counter()
    backbone, tokenizer, source = load_backbone(cfg.model, None, cfg.dtype)
    with torch.inference_mode():
        vectors = item_states(cfg, backbone.eval(), tokenizer, source, split.texts).numpy()
    print(f"item vectors: {vectors.shape} from {source} ({backbone.config.num_hidden_layers} layers, frozen) in "
          f"{time.perf_counter() - start:.0f}s")
    users, t = scored_positions(split, recipe.distill.positions)
    queries = last_item_means(split, users, t, vectors, args.last).astype(np.float32)
    args.out.mkdir(parents=True, exist_ok=True)
    np.save(args.out / "items.npy", vectors.astype(np.float32))
    query = pa.FixedSizeListArray.from_arrays(pa.array(queries.ravel()), queries.shape[1])
    pq.write_table(pa.table({"user": pa.array(np.asarray(split.users, dtype=object)[users], pa.string()),
                             "position": pa.array(t), "query": query.cast(pa.list_(pa.float32()))}),
                   args.out / "queries.parquet")
    print(f"{len(users)} queries to {args.out / 'queries.parquet'}, items to {args.out / 'items.npy'}")


if __name__ == "__main__":
    main()
