"""The table of benchmarks/text_teacher.md for one run: every model's test metrics beside its cold-target
metrics, and the data set's Bayes-optimal rates when the generator wrote them (NAME.bayes.json).

    python benchmarks/text_teacher.py runs/td [--name student_distilled-ced ...]

Reads RUN/mostpop, RUN/student_alone, RUN/teacher (the blend and `llm_alone`), RUN/student_distilled and any
extra distilled variants (`anyo distill --name N`), as their stages wrote them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

KEYS = ("HR@1", "HR@10", "NDCG@10")


def row(label: str, test: dict, cold: dict, note: str = "") -> str:
    cells = [f"{test[k]:.4f}" for k in KEYS] + [str(cold.get("users", 0))]
    cells += [f"{cold[k]:.4f}" if cold.get("users") else "–" for k in ("HR@10", "NDCG@10")]
    return f"| {label} | " + " | ".join(cells) + f" | {note} |"


def table(run: Path, names: list[str]) -> str:
    lines = ["| model | HR@1 | HR@10 | NDCG@10 | cold users | cold HR@10 | cold NDCG@10 | note |",
             "|---|---|---|---|---|---|---|---|"]
    read = lambda name: json.loads((run / name / "metrics.json").read_text())
    for name, label in (("mostpop", "MostPop"), ("student_alone", "student alone")):
        if (run / name / "metrics.json").is_file():
            r = read(name)
            valid = f", valid NDCG@10 {r['valid_metrics']['NDCG@10']:.4f}" if "valid_metrics" in r else ""
            lines.append(row(label, r["metrics"], r["cold"], f"best epoch {r.get('best_epoch', '–')}{valid}"))
    if (run / "teacher" / "metrics.json").is_file():
        t = read("teacher")
        lines.append(row("LLM alone (teacher, w = 0)", t["llm_alone"]["test"], t["llm_alone"]["cold"],
                         f"valid NDCG@10 {t['llm_alone']['valid']['NDCG@10']:.4f}"))
        lines.append(row(f"teacher (blend, w = {t['cf_weight']})", t["metrics"], t["cold"],
                         f"{t.get('train_seconds', 0):.0f} s, {t.get('examples_per_second', 0):.1f} examples/s"))
    for name in ["student_distilled"] + names:
        if (run / name / "metrics.json").is_file():
            r = read(name)
            lines.append(row(f"distilled ({name})", r["metrics"], r["cold"],
                             f"valid NDCG@10 {r['valid_metrics']['NDCG@10']:.4f}, item part "
                             f"{r.get('teacher_item_part', 'cf')}, cold rows init {r.get('cold_rows_initialised', 0)}, "
                             f"text rows {r.get('text_tower_rows', 0)}"))
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    data = recipe["data"]
    bayes = Path(data["path"] or "") / f"{data['name']}.bayes.json"
    if data["path"] and bayes.is_file():
        b = json.loads(bayes.read_text())["bayes_optimal"]["test"]
        lines.append(f"| Bayes-optimal (generator) | {b['HR@1']:.4f} | {b['HR@10']:.4f} | – | – | – | – | "
                     "every user, from the generative process |")
    split = json.loads((run / "split" / "manifest.json").read_text())
    lines.append(f"\nsplit {split['hash']}: {split['n_users']} users, {split['n_items']} items, "
                 f"{split['n_interactions']} interactions; cold: {split.get('cold_items', 'none')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--name", action="append", default=[], help="extra distilled variants (anyo distill --name)")
    a = p.parse_args(argv)
    print(table(a.run, a.name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
