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
from distill.resume import clear_resume


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
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path.parent / "test_ranks.npy", results["test"].ranks)
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


def finished_training(out: Path, inputs: dict) -> dict | None:
    """The training stage's metrics if `out` was trained from exactly `inputs`. A resume folder beside a
    finished stage (the run was killed between writing metrics.json and removing it) is removed."""
    record = up_to_date(out / "metrics.json", inputs)
    if record is not None:
        clear_resume(out)
    return record


def finish_training(out: Path, record: dict) -> dict:
    write_json(out / "metrics.json", record)
    clear_resume(out)
    return record


def stage_student(recipe: Recipe, run: Path, split: Split, seed: int) -> dict:
    from distill.losses import WeightedLoss
    from student.train import own_loss, train_and_save
    out = model_dir(run, "student_alone", seed, recipe)
    inputs = {"split_hash": split.hash, "recipe": recipe.section_hash("data", "student", "eval"), "seed": seed}
    if (record := finished_training(out, inputs)) is not None:
        print(f"student alone (seed {seed}) up to date in {out}")
        return record
    loss = WeightedLoss({"own": (1.0, own_loss(recipe, split))})
    return finish_training(out, train_and_save(recipe, split, out, seed, loss, desc=f"student seed {seed}",
                                               inputs=inputs))


def stage_teacher(recipe: Recipe, run: Path, split: Split, seed: int) -> dict:
    from distill.artifacts import sha256_file
    from student.model import load_student
    from teacher.train import train_teacher
    cf_dir = run / "student_alone"
    cf, _ = load_student(cf_dir, split.hash, split.n_items)
    out = run / "teacher"
    inputs = {"split_hash": split.hash, "recipe": recipe.section_hash("data", "student", "teacher", "eval"),
              "seed": seed, "cf_sha256": sha256_file(cf_dir / "model.safetensors")}
    if (record := finished_training(out, inputs)) is not None:
        print(f"teacher up to date in {out}")
        return record
    return finish_training(out, train_teacher(recipe, split, cf, out, seed, inputs))


def stage_infer(recipe: Recipe, run: Path, split: Split, merge_only: bool = False) -> dict:
    from student.model import load_student
    from teacher.infer import merge, run_inference
    from teacher.model import load_teacher
    out, teacher_dir = run / "teacher_cache", run / "teacher"
    if merge_only:
        return merge(recipe, split, teacher_dir, out)
    teacher_meta = read_json(teacher_dir / "teacher.json")
    wanted = {"split_hash": split.hash, "teacher_hash": teacher_meta["checkpoint_hash"], "k": recipe.distill.k,
              "positions": recipe.distill.positions, "mask_history": recipe.eval.mask_history,
              "shard_users": recipe.distill.shard_users}
    if (out / "manifest.json").is_file():
        manifest = read_json(out / "manifest.json")
        if all(manifest.get(k) == v for k, v in wanted.items()):
            print(f"teacher cache up to date in {out}")
            return manifest
    cf, _ = load_student(run / "student_alone", split.hash, split.n_items)
    model, meta = load_teacher(teacher_dir, cf, split.titles, split.hash)
    return run_inference(recipe, split, model, meta["checkpoint_hash"], out, recipe.distill.backend)


def stage_distill(recipe: Recipe, run: Path, split: Split, seed: int, name: str = "student_distilled") -> dict:
    from distill.artifacts import sha256_file
    from distill.cache import TeacherCache
    from distill.losses import (EmbeddingAlignment, RankingDistillation, SoftTargetKL, TeacherTargets,
                                WeightedLoss)
    from student.train import own_loss, train_and_save
    import torch
    d = recipe.distill
    cache = TeacherCache(run / "teacher_cache", split.hash, split.n_items)
    if d.k > cache.k:
        raise AnyoError(f"distill.k: {d.k} is larger than the cache's K = {cache.k} ({cache.folder})")
    out = model_dir(run, name, seed, recipe)
    inputs = {"split_hash": split.hash, "recipe": recipe.section_hash("data", "student", "distill", "eval"),
              "seed": seed, "cache_sha256": sha256_file(cache.folder / "manifest.json")}
    init = None
    if d.warm_start:
        from student.model import load_student
        alone = model_dir(run, "student_alone", seed, recipe)
        init, _ = load_student(alone, split.hash, split.n_items)
        inputs["init_sha256"] = sha256_file(alone / "model.safetensors")
    if (record := finished_training(out, inputs)) is not None:
        print(f"distilled student (seed {seed}) up to date in {out}")
        return record
    torch.manual_seed(seed)  # the alignment map's initial weights must not depend on what ran before
    loss = WeightedLoss({
        "own": (d.own_weight, own_loss(recipe, split)),
        "kd": (d.kd_weight, SoftTargetKL(d.temperature)),
        "rank": (d.rank_weight, RankingDistillation(split.n_items, d.rank_lambda, d.rank_negatives)),
        "align": (d.align_weight, EmbeddingAlignment(recipe.student.hidden_size, cache.dim, d.align)),
    })

    def lookup(users: np.ndarray, positions: np.ndarray) -> TeacherTargets:
        rows = cache.lookup(users, positions, d.k)
        return TeacherTargets(torch.from_numpy(np.flatnonzero(rows.found)), torch.from_numpy(rows.topk_ids),
                              torch.from_numpy(np.ascontiguousarray(rows.topk_scores)),
                              torch.from_numpy(np.ascontiguousarray(rows.query)))

    record = train_and_save(recipe, split, out, seed, loss, teacher=lookup, desc=f"distilled seed {seed}",
                            inputs=inputs, extra={"loss_weights": loss.weights}, init=init, epochs=d.epochs)
    return finish_training(out, record)


def stage_run(recipe: Recipe, run: Path, split: Split, seeds: int) -> dict:
    seed_list = [recipe.seed + i for i in range(seeds)]
    rows = {"MostPop": table_row(stage_mostpop(recipe, run, split))}
    alone = [stage_student(recipe, run, split, s) for s in seed_list]
    teacher = stage_teacher(recipe, run, split, recipe.seed)
    stage_infer(recipe, run, split)
    distilled = [stage_distill(recipe, run, split, s) for s in seed_list]
    rows["student alone"] = mean_row(alone)
    rows["teacher"] = table_row(teacher)
    rows["distilled student"] = mean_row(distilled)
    stage_report(run, recipe)
    print()
    print_table(rows)
    return rows


def stage_report(run: Path, recipe: Recipe) -> dict:
    """The report, rebuilt only when a model's metrics changed (cost measurements take minutes)."""
    from distill.artifacts import sha256_file
    from distill.report import write_report
    inputs = {str(p.relative_to(run)): sha256_file(p) for p in sorted(run.glob("**/metrics.json"))
              if "report" not in p.parts}
    inputs["bench"] = recipe.section_hash("bench")
    existing = run / "report" / "report.json"
    if existing.is_file() and read_json(existing).get("inputs") == inputs:
        print(f"report up to date in {run / 'report'}")
        return read_json(existing)
    return write_report(run, run / "report", recipe.bench.measure_cost, inputs, recipe.bench.teacher_backends)


def mean_row(records: list[dict]) -> dict:
    rows = [table_row(r) for r in records]
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


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
    if args.command == "verify":
        from distill.verify import cmd_verify
        return cmd_verify(args)
    if args.command == "bench":
        from distill.report import cmd_bench
        return cmd_bench(args)
    if args.command in ("export", "recommend", "serve"):  # serving: distill/export.py, distill/server.py
        from distill.export import cmd_serving
        return cmd_serving(args)
    overrides = list(args.set)
    for flag, key in (("backend", "distill.backend"), ("positions", "distill.positions"), ("k", "distill.k")):
        if getattr(args, flag, None) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    recipe = load_recipe(args.recipe, overrides)
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
    if args.command == "teacher" and args.action == "train":
        record = stage_teacher(recipe, run, split, args.seed if args.seed is not None else recipe.seed)
        print_table({"teacher": table_row(record)})
        return 0
    if args.command == "teacher" and args.action == "infer":
        stage_infer(recipe, run, split, merge_only=args.merge)
        return 0
    if args.command == "distill":
        record = stage_distill(recipe, run, split, args.seed if args.seed is not None else recipe.seed, args.name)
        print_table({"distilled student": table_row(record)})
        return 0
    if args.command == "run":
        stage_run(recipe, run, split, args.seeds)
        return 0
    raise AnyoError(f"unknown command {args.command}")
