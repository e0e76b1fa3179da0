"""The `anyo` command: the argument parser and the table from subcommand to handler (distill.commands)."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import sys
import typing

from distill import commands
from distill.checked import SEED_MAX
from distill.errors import AnyoError, ConfigError
from distill.serve_config import QUANTIZATIONS, RUNTIMES, ServeConfig

RECIPE_HELP = "recipe YAML file, or the name of a recipe shipped with anyo (ml100k, ml100k-cold, ...)"


def _recipe_args(p: argparse.ArgumentParser, seed: bool = False) -> None:
    p.add_argument("recipe", help=RECIPE_HELP)
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    if seed:
        p.add_argument("--seed", type=int, default=None, help="training seed (default: the recipe's)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anyo", description="Distil LLM retrievers into SASRec students.")
    sub = parser.add_subparsers(dest="command", required=True)
    _stage_commands(sub)
    _run_commands(sub)
    _serving_commands(sub)
    return parser


def _stage_commands(sub) -> None:
    """One subcommand per stage of a run."""
    p = sub.add_parser("prepare", help="prepare the leave-one-out split into RUN/split")
    _recipe_args(p)

    p = sub.add_parser("mostpop", help="evaluate the MostPop baseline into RUN/mostpop")
    _recipe_args(p)

    p = sub.add_parser("evaluate", help="evaluate user/item vectors with the shared harness")
    p.add_argument("--split", required=True, help="a prepared split folder (RUN/split)")
    p.add_argument("--user-vectors", required=True, help=".npy, one row per user in users.tsv order")
    p.add_argument("--item-vectors", required=True, help=".npy, N+1 rows, row 0 padding")
    p.add_argument("--stage", choices=["valid", "test"], default="test")
    p.add_argument("--no-mask-history", action="store_true", help="do not exclude history items")
    p.add_argument("--protocol", choices=["full", "candidates"], default="full")
    p.add_argument("--index", default="Flat", help="FAISS index_factory string (default exact Flat)")
    p.add_argument("--out", required=True, help="metrics JSON file")

    student = sub.add_parser("student", help="the SASRec student").add_subparsers(dest="action", required=True)
    p = student.add_parser("train", help="train the student alone into RUN/student_alone")
    _recipe_args(p, seed=True)

    teacher = sub.add_parser("teacher", help="the LLM teacher").add_subparsers(dest="action", required=True)
    p = teacher.add_parser("train", help="train the teacher into RUN/teacher")
    _recipe_args(p, seed=True)
    p = teacher.add_parser("infer", help="score users with the teacher into RUN/teacher_cache")
    _recipe_args(p)
    p.add_argument("--backend", choices=["deepspeed", "hf"], default=None, help="default: the recipe's")
    p.add_argument("--positions", type=int, default=None, help="last P training positions per user")
    p.add_argument("--k", type=int, default=None, help="top-K items kept per query")
    p.add_argument("--merge", action="store_true", help="only complete the manifest from existing shards")
    p.add_argument("--teacher-seed", type=int, default=None,
                   help="the teacher trained with this seed (default: the recipe's; others live in RUN/teachers/seed-T)")

    p = teacher.add_parser("import", help="turn another teacher's outputs into RUN/teacher_cache "
                                          "(the layout: README, Bring your own teacher)")
    _recipe_args(p)
    p.add_argument("--topk", default=None, help="top-K lists per (user, position): .parquet, .csv or .jsonl")
    p.add_argument("--queries", default=None, help="query vectors per (user, position): .parquet, .csv or .jsonl "
                                                   "(the top-K is searched over --items)")
    p.add_argument("--items", default=None, help="item vectors: .npy or .safetensors (items.tsv order) or a table")
    p = teacher.add_parser("export-cache", help="write RUN/teacher_cache in the public layout (FILE.parquet and "
                                                "FILE.items.parquet)")
    p.add_argument("run", help="run folder")
    p.add_argument("--out", required=True, help="FILE.parquet")

    p = sub.add_parser("distill", help="train the student from the teacher cache into RUN/student_distilled")
    _recipe_args(p, seed=True)
    p.add_argument("--name", default="student_distilled",
                   help="output folder inside RUN (e.g. one per ablation); default student_distilled")
    p.add_argument("--teacher-seed", type=int, default=None,
                   help="distil from the cache of the teacher trained with this seed (default: the recipe's)")
    p.add_argument("--cf-teacher", action="store_true",
                   help="distil from the CF model alone (a w = 1 cache, RUN/cf_teacher_cache, built if missing) "
                        "into RUN/student_cf_distilled (or --name): the control without the LLM")

    baseline = sub.add_parser("baseline", help="baselines beside the teacher").add_subparsers(dest="action",
                                                                                                required=True)
    p = baseline.add_parser("llara", help="train the LLaRA-style generative recommender into RUN/llara "
                                          "(needs RUN/student_alone)")
    _recipe_args(p, seed=True)


def _run_commands(sub) -> None:
    """Commands over a whole run folder."""
    p = sub.add_parser("bench", help="write the teacher-vs-student report")
    p.add_argument("run", help="run folder")
    p.add_argument("--out", default=None, help="report folder (default RUN/report)")
    p.add_argument("--no-cost", action="store_true", help="quality only: skip the serving-cost measurement")

    p = sub.add_parser("verify", help="check every artifact of a run: ok, stale or corrupt")
    p.add_argument("run", help="run folder")

    p = sub.add_parser("run", help="the whole pipeline, each stage skipped when up to date")
    p.add_argument("recipe", help=RECIPE_HELP)
    p.add_argument("--out", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--seeds", type=int, default=1, help="train student-alone and distilled over this many seeds")
    p.add_argument("--teacher-seeds", type=int, default=1,
                   help="train this many teachers (seeds recipe.seed, +1, ...), each with its cache and its "
                        "distilled students (RUN/teachers/seed-T for all but the first)")


def _serving_commands(sub) -> None:
    """Export a trained student, recommend from it, serve it over HTTP."""
    p = sub.add_parser("export", help="write RUN's student as a self-contained folder a service loads")
    p.add_argument("run", help="run folder")
    p.add_argument("--out", required=True, help="export folder (outside the run; new, empty or a previous export)")
    p.add_argument("--model", choices=["student_distilled", "student_alone"], default="student_distilled")
    p.add_argument("--quantize", choices=QUANTIZATIONS, default=None,
                   help="also write model.int8.onnx (ONNX Runtime dynamic int8 quantisation), sealed in the manifest "
                        "with its measured test NDCG@10 / HR@10 against model.onnx; served with --runtime "
                        "onnxruntime-int8")
    p = sub.add_parser("recommend", help="top-K next items for one history from an exported folder")
    p.add_argument("dir", help="an `anyo export` folder")
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--history", help="raw item ids as in your data, oldest first: ID,ID,... "
                                         "(--history=-5,7 for an id starting with -)")
    given.add_argument("--history-json", metavar="JSON",
                       help='the history as a JSON array of strings, exactly: \'["a, b", " 7", "-x"]\'')
    p.add_argument("-k", type=int, default=10, help="how many items (default 10)")
    p.add_argument("--json", action="store_true", help='print {"items": [{"item", "title", "score"}, ...]}')
    seen = p.add_mutually_exclusive_group()
    seen.add_argument("--include-seen", action="store_true", default=None,
                      help="keep the history's items rankable (default: the protocol the model was evaluated with, "
                           "eval.mask_history, recorded in the export)")
    seen.add_argument("--exclude-seen", dest="include_seen", action="store_false",
                      help="never return the history's items")
    p.add_argument("--runtime", choices=RUNTIMES, default=None,
                   help="encoder runtime: onnxruntime (model.onnx), onnxruntime-int8 (model.int8.onnx, an export "
                        "made with --quantize int8) or torch (default: onnxruntime when installed, the faster; "
                        "benchmarks/serving.md)")
    p = sub.add_parser("serve", help="serve an exported folder over HTTP (FastAPI + uvicorn)")
    p.add_argument("dir", help="an `anyo export` folder")
    hints = typing.get_type_hints(ServeConfig)
    for f in dataclasses.fields(ServeConfig):
        kind = next((t for t in typing.get_args(hints[f.name]) if t is not type(None)), hints[f.name])  # X | None
        p.add_argument(ServeConfig.flag(f.name), type=kind, default=f.default, choices=f.metadata.get("choices"),
                       help=f"{f.metadata['help']} (default {f.default})")


def _check_args(args) -> None:
    """Command-line numbers the recipe does not check (the others become `--set` overrides)."""
    for flag in ("seeds", "teacher_seeds"):
        if getattr(args, flag, None) is not None and getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')}: must be >= 1, got {getattr(args, flag)}")
    for flag in ("seed", "teacher_seed"):
        if getattr(args, flag, None) is not None and not 0 <= getattr(args, flag) <= SEED_MAX:
            raise ConfigError(f"--{flag.replace('_', '-')}: must be in [0, {SEED_MAX}], got {getattr(args, flag)}")


def handler(args):
    """The function in distill.commands that runs `args.command` (and its action, e.g. `teacher infer`)."""
    table = {
        "prepare": commands.cmd_prepare, "mostpop": commands.cmd_mostpop, "evaluate": commands.cmd_evaluate,
        "student train": commands.cmd_student_train, "teacher train": commands.cmd_teacher_train,
        "teacher infer": commands.cmd_teacher_infer,
        "teacher import": commands.cmd_teacher_import, "teacher export-cache": commands.cmd_teacher_export_cache,
        "distill": commands.cmd_distill, "bench": commands.cmd_bench,
        "verify": commands.cmd_verify, "run": commands.cmd_run,
        "export": commands.cmd_export, "recommend": commands.cmd_recommend, "serve": commands.cmd_serve,
        "baseline llara": commands.cmd_baseline_llara,
    }
    return table[" ".join(filter(None, (args.command, getattr(args, "action", None))))]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_args(args)
        return handler(args)(args) or 0
    except AnyoError as e:
        message = str(e).replace("\r", " ").replace("\n", " ")  # always one line
        print(f"anyo: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("anyo: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno not in DISK_ERRORS:
            raise
        print(f"anyo: error: {os_error_line(e)}", file=sys.stderr)
        return 2


# what the machine, not the program, can cause while writing or reading a run: one line, exit status 2
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO,
               errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.EMFILE, errno.ENFILE,
               errno.EXDEV, errno.ENOTEMPTY, errno.ELOOP}


def os_error_line(e: OSError) -> str:
    """`PATH: no space left on device` (the path the system call failed on, and what the system said)."""
    reason = os.strerror(e.errno).lower() if e.errno else str(e)
    path = e.filename if e.filename is not None else None
    if e.filename2 is not None:
        path = f"{e.filename} -> {e.filename2}"
    message = f"{path}: {reason}" if path is not None else reason
    return message.replace("\r", " ").replace("\n", " ")


if __name__ == "__main__":
    sys.exit(main())
