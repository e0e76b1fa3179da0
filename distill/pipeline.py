"""The stages of a run, each reading and writing artifacts under one run folder.

RUN/split/            prepared leave-one-out split          (anyo prepare)
RUN/mostpop/          MostPop metrics                       (anyo mostpop)
RUN/student_alone/    SASRec trained alone (the CF model)   (anyo student train)
RUN/teacher/          LLM retriever: adapter + heads        (anyo teacher train)
RUN/teacher_cache/    teacher top-K for training positions  (anyo teacher infer)
RUN/student_distilled student trained from the cache        (anyo distill)
RUN/report/           teacher vs student                    (anyo bench)

A stage is skipped when its metrics file records the same input hash it would
be built from now.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from distill.artifacts import read_json, write_json
from distill.config import Recipe, load_recipe
from distill.data import Split, prepare
from distill.errors import AnyoError
from distill.harness import evaluate, evaluate_model, metrics_record


def print_table(rows: dict[str, dict], keys=("HR@10", "NDCG@10", "MRR@10", "HR@1(cand)")) -> None:
    width = max(len(n) for n in rows) + 2
    print(f"{'model':<{width}}" + "".join(f"{k:>12}" for k in keys))
    for name, m in rows.items():
        print(f"{name:<{width}}" + "".join(f"{m.get(k, float('nan')):>12.4f}" for k in keys))


def table_row(record: dict) -> dict:
    row = dict(record["metrics"])
    row["HR@1(cand)"] = record.get("candidates", {}).get("HR@1", float("nan"))
    return row


def stage_prepare(recipe: Recipe, run: Path) -> Split:
    split, built = prepare(recipe.data, run / "split")
    m = split.manifest
    print(f"split {'written to' if built else 'up to date in'} {run / 'split'}: {m['n_users']} users, "
          f"{m['n_items']} items, {m['n_interactions']} interactions, {m['dropped_users']} users dropped "
          f"(hash {split.hash})")
    return split


def stage_mostpop(recipe: Recipe, run: Path, split: Split) -> dict:
    from distill.baselines import MostPop
    path = run / "mostpop" / "metrics.json"
    inputs = {"split_hash": split.hash, "eval": recipe.section_hash("eval")}
    if (record := up_to_date(path, inputs)) is not None:
        return record
    model = MostPop(split)
    results = evaluate_model(split, lambda stage: model.encode_users(split.n_users), model.item_vectors(), recipe.eval)
    record = metrics_record(results, split, inputs=inputs)
    write_json(path, record)
    return record


def model_dir(run: Path, name: str, seed: int, recipe: Recipe) -> Path:
    """RUN/NAME for the recipe's seed, RUN/seeds/NAME-SEED for the others."""
    return run / name if seed == recipe.seed else run / "seeds" / f"{name}-{seed}"


def up_to_date(path: Path, inputs: dict) -> dict | None:
    """The metrics record at `path` if it was built from exactly `inputs`."""
    if path.is_file():
        record = read_json(path)
        if record.get("inputs") == inputs:
            return record
    return None


def stage_student(recipe: Recipe, run: Path, split: Split, seed: int) -> dict:
    from distill.losses import WeightedLoss
    from student.train import own_loss, train_and_save
    out = model_dir(run, "student_alone", seed, recipe)
    inputs = {"split_hash": split.hash, "recipe": recipe.section_hash("data", "student", "eval"), "seed": seed}
    if (record := up_to_date(out / "metrics.json", inputs)) is not None:
        print(f"student alone (seed {seed}) up to date in {out}")
        return record
    loss = WeightedLoss({"own": (1.0, own_loss(recipe, split))})
    record = train_and_save(recipe, split, out, seed, loss, desc=f"student seed {seed}", extra={"inputs": inputs})
    write_json(out / "metrics.json", record)
    return record


def cmd_evaluate(args) -> None:
    from distill.data import load_split
    split = load_split(args.split)
    vectors = []
    for path in (args.user_vectors, args.item_vectors):
        if not Path(path).is_file():
            raise AnyoError(f"{path}: file not found")
        try:
            vectors.append(np.load(path, allow_pickle=False))
        except (ValueError, OSError) as e:
            raise AnyoError(f"{path}: not a readable .npy array ({e})") from None
    res = evaluate(split, vectors[0], vectors[1], args.stage, mask_history=not args.no_mask_history,
                   protocol=args.protocol, index=args.index, names=(args.user_vectors, args.item_vectors))
    write_json(args.out, {"metrics": res.metrics, **res.options})
    print(json.dumps(res.metrics, indent=1))


def dispatch(args) -> int:
    if args.command == "evaluate":
        cmd_evaluate(args)
        return 0
    if args.command == "bench":
        from distill.report import cmd_bench
        return cmd_bench(args)
    recipe = load_recipe(args.recipe, args.set)
    run = Path(args.out)
    if args.command == "prepare":
        stage_prepare(recipe, run)
        return 0
    split = stage_prepare(recipe, run)
    if args.command == "mostpop":
        print_table({"MostPop": table_row(stage_mostpop(recipe, run, split))})
        return 0
    if args.command == "student":
        record = stage_student(recipe, run, split, args.seed if args.seed is not None else recipe.seed)
        print_table({"MostPop": table_row(stage_mostpop(recipe, run, split)), "student alone": table_row(record)})
        return 0
    raise AnyoError(f"unknown command {args.command}")
