"""The `anyo` subcommands: thin handlers that check their arguments, then call a stage.

Every command that takes a recipe resolves it (file + `--set` + flags) and records it as
RUN/recipe.yaml, so `anyo run RUN/recipe.yaml --out RUN` reproduces the run (ablation
variants written with `anyo distill --name` record theirs in their metrics.json only).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from distill import export, exported, verify
from distill.artifacts import atomic_file, load_array, write_record
from distill.config import Recipe, load_recipe
from distill.data import load_split
from distill.distributed import world
from distill.errors import ConfigError
from distill.harness import evaluate
from distill.runs import (CF_CACHE, CF_DISTILLED, STAGE_FOLDERS, STAGE_MARKERS, check_apart_from_inputs,
                          check_file_target, check_folder_target, check_no_symlinks, check_run_folder,
                          cf_control_recipe, current_records, teacher_root)
from distill.stages import cf_control, common, external
from distill.stages import distill as distill_stage
from distill.stages import infer, llara, mostpop, pipeline, prepare, report, student, teacher

EVALUATE = "anyo evaluate"   # the `command` its sealed output records: only such a file is ever replaced
FLAG_KEYS = {"backend": "distill.backend", "positions": "distill.positions", "k": "distill.k"}


def resolve(args, record: bool = True) -> tuple[Recipe, Path]:
    """The recipe with `--set` and flag overrides; RUN/recipe.yaml records it once the command has
    succeeded (a command that fails, e.g. on a bad --merge, leaves the run's recorded recipe alone)."""
    overrides = list(args.set) + [f"{key}={getattr(args, flag)}" for flag, key in FLAG_KEYS.items()
                                  if getattr(args, flag, None) is not None]
    recipe = load_recipe(args.recipe, overrides)
    run = Path(args.out)
    if run.exists() and not run.is_dir():
        raise ConfigError(f"--out {run}: is a file, expected a run folder")
    stage_files = [m for m in STAGE_MARKERS if m != "recipe.yaml" and (run / m).is_file()]
    if stage_files:
        raise ConfigError(f"--out {run}: is a stage folder (holds {stage_files[0]}), expected the run folder")
    check_apart_from_inputs(run, {"data.path": recipe.data.path, "data.items": recipe.data.items,
                                  "teacher.model": recipe.teacher.model})
    check_no_symlinks(run)
    if record:
        args.recipe_to_record = (run, recipe)
    return recipe, run


def records_recipe(command):
    """Write RUN/recipe.yaml after `command` succeeds (see resolve)."""
    @functools.wraps(command)
    def wrapper(args):
        result = command(args)
        if (pending := getattr(args, "recipe_to_record", None)) is not None and world().main:
            run, recipe = pending
            with atomic_file(run / "recipe.yaml") as tmp:
                tmp.write_text(recipe.to_yaml())
        return result
    return wrapper


def seed_of(args, recipe: Recipe) -> int:
    return args.seed if args.seed is not None else recipe.seed


@records_recipe
def cmd_prepare(args) -> None:
    recipe, run = resolve(args)
    prepare.run(recipe, run)


@records_recipe
def cmd_mostpop(args) -> None:
    recipe, run = resolve(args)
    split = prepare.run(recipe, run)
    common.print_table({"MostPop": common.table_row(mostpop.run(recipe, run, split))})


@records_recipe
def cmd_student_train(args) -> None:
    recipe, run = resolve(args)
    split = prepare.run(recipe, run)
    record = student.run(recipe, run, split, seed_of(args, recipe))
    common.print_table({"MostPop": common.table_row(mostpop.run(recipe, run, split)),
                        "student alone": common.table_row(record)})


@records_recipe
def cmd_teacher_train(args) -> None:
    recipe, run = resolve(args)
    record = teacher.run(recipe, run, prepare.run(recipe, run), seed_of(args, recipe))
    if world().main:                                  # N ranks under torchrun / deepspeed: rank 0 reports
        common.print_table({"teacher": common.table_row(record)})


@records_recipe
def cmd_teacher_infer(args) -> None:
    recipe, run = resolve(args)
    infer.run(recipe, run, prepare.run(recipe, run), merge_only=args.merge, teacher_seed=args.teacher_seed)


@records_recipe
def cmd_teacher_import(args) -> None:
    if (args.topk is None) == (args.queries is None):
        raise ConfigError("teacher import: give --topk FILE, or --queries FILE with --items FILE")
    if args.queries is not None and args.items is None:
        raise ConfigError("--queries: needs --items FILE (the item vectors the top-K is searched over)")
    recipe, run = resolve(args)
    paths = [None if p is None else Path(p) for p in (args.topk, args.queries, args.items)]
    external.run(recipe, run, prepare.run(recipe, run), *paths)


def cmd_teacher_export_cache(args) -> None:
    run, out = Path(args.run), Path(args.out)
    check_run_folder(run)
    external.export(run, load_split(run / "split"), out)


@records_recipe
def cmd_distill(args) -> None:
    name = args.name
    other_stage = name in STAGE_FOLDERS and name != "student_distilled"
    if not name or other_stage or any(c in name for c in "/\\:") or name.startswith(".") \
            or name.endswith((".resume", ".events")):
        raise ConfigError(f"--name {name!r}: must be a plain folder name, not another stage's "
                          f"({', '.join(f for f in STAGE_FOLDERS if f != 'student_distilled')})")
    if args.cf_teacher and args.teacher_seed is not None:
        raise ConfigError("--cf-teacher: distils from the CF model alone; it takes no --teacher-seed")
    recipe, run = resolve(args, record=name == "student_distilled")
    split = prepare.run(recipe, run)
    if args.cf_teacher:
        cf_control.build_cache(recipe, run, split)
        cache, trained_with = run / CF_CACHE, cf_control_recipe(recipe)
        name = CF_DISTILLED if name == "student_distilled" else name
    else:
        cache, trained_with = teacher_root(run, recipe, recipe.seed if args.teacher_seed is None
                                           else args.teacher_seed) / "teacher_cache", recipe
    record = distill_stage.run(trained_with, run, split, seed_of(args, recipe), name, cache_dir=cache)
    common.print_table({"distilled student": common.table_row(record)})


@records_recipe
def cmd_run(args) -> None:
    recipe, run = resolve(args)
    pipeline.run(recipe, run, prepare.run(recipe, run), args.seeds, args.teacher_seeds)


def cmd_bench(args) -> None:
    """The report stage on a finished run, with the recipe the run recorded."""
    run = Path(args.run)
    check_run_folder(run)
    recipe_file = run / "recipe.yaml"
    recipe = load_recipe(recipe_file if recipe_file.is_file() else None,
                         ["bench.measure_cost=false"] if args.no_cost else [])
    out = Path(args.out) if args.out else run / "report"
    check_folder_target(out, run, "--out", keep="report.json")
    check_no_symlinks(run)
    build_cf_control(recipe, run)
    report.run(recipe, run, out)


def build_cf_control(recipe: Recipe, run: Path) -> None:
    """The CF-only control for every student-alone seed the run holds, when it is missing or stale
    (a run made before the control existed gets it here: seconds for the cache, one short distillation
    per seed)."""
    split = load_split(run / "split")
    seeds = sorted(r.get("seed", recipe.seed) for _, r, _ in current_records(run, recipe, split, "student_alone")[0])
    if seeds:
        cf_control.run(recipe, run, split, seeds)


def cmd_evaluate(args) -> None:
    check_file_target(Path(args.out), "--out", {"--user-vectors": args.user_vectors,
                                                "--item-vectors": args.item_vectors}, EVALUATE)
    split = load_split(args.split)
    vectors = [load_array(path) for path in (args.user_vectors, args.item_vectors)]
    res = evaluate(split, vectors[0], vectors[1], args.stage, mask_history=not args.no_mask_history,
                   protocol=args.protocol, index=args.index, names=(args.user_vectors, args.item_vectors))
    write_record(args.out, {"command": EVALUATE, "metrics": res.metrics, "by_popularity": res.by_popularity,
                            "cold": res.cold, **res.options})
    print(json.dumps(res.metrics, indent=1))
    if res.cold["users"]:
        print(f"cold targets (never in training): {res.cold['users']} users, HR@10 {res.cold['HR@10']:.4f}, "
              f"NDCG@10 {res.cold['NDCG@10']:.4f}")


cmd_verify = verify.cmd_verify
cmd_export = export.cmd_export
cmd_recommend = exported.cmd_recommend


def cmd_serve(args) -> int:
    # The one first-party import below the top of a module: distill.server needs the `serve` extra
    # (FastAPI, uvicorn), which the other commands must not require.
    from distill.server import cmd_serve as serve
    return serve(args)


def cmd_baseline_llara(args) -> None:
    recipe, run = resolve(args)
    llara.run(recipe, run, prepare.run(recipe, run), seed_of(args, recipe))
