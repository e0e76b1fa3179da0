"""anyo's SASRec student against RecBole 1.2.1's SASRec on MovieLens-100K, same machine.

    python benchmarks/recbole_sasrec.py ...          # first, in .venv-recbole (see that file)
    python benchmarks/student_vs_recbole.py --seeds 0 1 2 \
        --recbole benchmarks/results/recbole_sasrec.jsonl --out benchmarks/student_vs_recbole.md

Both sides: leave-one-out by time, full ranking, history masking off (RecBole
does not mask). anyo trains with the embedded recipe's student section and
early stopping on validation; after every epoch it also records test HR@10,
NDCG@10, MRR@10 (for the curve only; early stopping never reads them). Also
measures encoding all users + searching all items at batch 1 and batch 1024.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from distill.config import load_recipe
from distill.data import prepare
from distill.harness import evaluate
from distill.search import ItemIndex
from distill.losses import WeightedLoss
from distill.trainer import Trainer
from student.train import StudentTask, build_student, own_loss, trainer_config

KEYS = ("HR@10", "NDCG@10", "MRR@10")


def anyo_curve(recipe, split, seed: int) -> tuple[list[dict], dict]:
    model = build_student(recipe, split)
    test = split.history("test")

    class TracedTask(StudentTask):  # validation plus test metrics for the curve (never for stopping)
        def validate(self) -> dict:
            res = evaluate(split, self.model.encode(test), self.model.item_vectors(), "test", (10,),
                           mask_history=False)
            return {**super().validate(), **{f"test_{k}": res.metrics[k] for k in KEYS}}

    loss = WeightedLoss({"own": (1.0, lambda: own_loss(recipe, split))})
    result = Trainer(TracedTask(model, split, recipe, loss), trainer_config(recipe), seed, f"anyo seed {seed}").fit()
    curve, best_epoch, seconds = result.curve, result.best_epoch, result.seconds
    best = next(c for c in curve if c["epoch"] == best_epoch)
    return curve, {"seed": seed, "best_epoch": best_epoch, "train_seconds": seconds,
                   **{k: best[f"test_{k}"] for k in KEYS}}


def serving_speed(recipe, split) -> dict:
    """Users/s for encoding test histories and searching the catalogue (top-10), batch 1 and 1024."""
    model = build_student(recipe, split).eval()
    index = ItemIndex(model.item_vectors())
    padded = torch.from_numpy(split.history("test").padded(recipe.data.max_len))
    out = {}
    for batch in (1, 1024):
        start = time.perf_counter()
        with torch.inference_mode():
            for lo in range(0, len(padded), batch):
                index.search(model.encode_users(padded[lo:lo + batch]).numpy(), 10)
        out[batch] = len(padded) / (time.perf_counter() - start)
    return out


def recbole_summary(path: Path) -> tuple[list[dict], dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    best = max(rows, key=lambda r: r["valid_ndcg@10"])           # RecBole's own model selection
    peak = max(rows, key=lambda r: r["test_ndcg@10"])            # the best test NDCG@10 it reached
    return rows, {"epochs": len(rows), "seconds": rows[-1]["train_seconds"], "best": best, "peak": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/ml100k.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--recbole", type=Path, required=True, help="curve written by recbole_sasrec.py")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/student_vs_recbole.md"))
    args = ap.parse_args()
    recipe = load_recipe(args.recipe, ["eval.mask_history=false"])
    split, _ = prepare(recipe.data, Path(tempfile.mkdtemp()) / "split")
    runs = [anyo_curve(recipe, split, s) for s in args.seeds]
    speed = serving_speed(recipe, split)
    rb_rows, rb = recbole_summary(args.recbole)
    target = rb["peak"]["test_ndcg@10"]
    reach = [next((c["seconds"] for c in curve if c["test_NDCG@10"] >= target), None) for curve, _ in runs]
    mean = {k: float(np.mean([s[k] for _, s in runs])) for k in KEYS}
    std = {k: float(np.std([s[k] for _, s in runs])) for k in KEYS}

    lines = ["# anyo student vs RecBole 1.2.1 SASRec (MovieLens-100K, this machine)", "",
             "Commands:", "```",
             f"OMP_NUM_THREADS={torch.get_num_threads()} .venv-recbole/bin/python benchmarks/recbole_sasrec.py "
             "--budget-min 40 --out benchmarks/results/recbole_sasrec.jsonl",
             f"OMP_NUM_THREADS={torch.get_num_threads()} python benchmarks/student_vs_recbole.py "
             f"--seeds {' '.join(map(str, args.seeds))} --recbole {args.recbole} --out {args.out}", "```", "",
             "Leave-one-out by time, full ranking over all items, history not masked on either side. "
             "Test metrics at the epoch each side selects on validation NDCG@10.", "",
             "| model | epochs | train time (s) | test HR@10 | test NDCG@10 | test MRR@10 |", "|---|---|---|---|---|---|"]
    b = rb["best"]
    lines.append(f"| RecBole SASRec (best valid epoch {b['epoch']} of {rb['epochs']}) | {rb['epochs']} | "
                 f"{rb['seconds']:.0f} | {b['test_hit@10']:.4f} | {b['test_ndcg@10']:.4f} | {b['test_mrr@10']:.4f} |")
    for _, s in runs:
        lines.append(f"| anyo student, seed {s['seed']} (best epoch {s['best_epoch']}) | - | {s['train_seconds']:.0f} | "
                     + " | ".join(f"{s[k]:.4f}" for k in KEYS) + " |")
    lines.append(f"| **anyo student, mean ± std of {len(runs)}** | | "
                 f"{np.mean([s['train_seconds'] for _, s in runs]):.0f} | "
                 + " | ".join(f"**{mean[k]:.4f}** ± {std[k]:.4f}" for k in KEYS) + " |")
    lines += ["", f"RecBole's best test NDCG@10 within its budget: {target:.4f} at epoch {rb['peak']['epoch']}, "
              f"after {rb['peak']['train_seconds']:.0f} s of training.",
              "anyo reached it after " + ", ".join("never" if r is None else f"{r:.0f} s" for r in reach)
              + " (one per seed; wall time including per-epoch validation).", "",
              f"Serving the {split.n_users} users (encode + top-10 search over {split.n_items} items): "
              f"{speed[1]:.0f} users/s at batch 1, {speed[1024]:.0f} users/s at batch 1024.", "",
              "## Curves", "", "RecBole (training seconds, evaluation excluded):", "",
              "| epoch | seconds | valid NDCG@10 | test HR@10 | test NDCG@10 | test MRR@10 |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['epoch']} | {r['train_seconds']:.0f} | {r['valid_ndcg@10']:.4f} | {r['test_hit@10']:.4f} | "
              f"{r['test_ndcg@10']:.4f} | {r['test_mrr@10']:.4f} |" for r in rb_rows]
    for curve, s in runs:
        lines += ["", f"anyo seed {s['seed']} (wall seconds including validation):", "",
                  "| epoch | seconds | valid NDCG@10 | test HR@10 | test NDCG@10 | test MRR@10 |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {c['epoch']} | {c['seconds']:.0f} | {c['valid_NDCG@10']:.4f} | "
                  + " | ".join(f"{c[f'test_{k}']:.4f}" for k in KEYS) + " |" for c in curve]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:20]))


if __name__ == "__main__":
    main()
