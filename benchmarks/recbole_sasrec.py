"""RecBole 1.2.1's SASRec on MovieLens-100K under a wall-clock budget (the reference for student_vs_recbole).

Runs in its own virtual environment; RecBole is never a dependency of anyo:

    python3 -m venv .venv-recbole
    .venv-recbole/bin/pip install torch==2.13.0 recbole==1.2.1 'numpy<2' 'setuptools<70'
    .venv-recbole/bin/python benchmarks/recbole_sasrec.py --budget-min 40 --out benchmarks/results/recbole_sasrec.jsonl

RecBole's own SASRec defaults (2 layers, 2 heads, 64 hidden, dropout 0.5, lr 1e-3,
train batch 2048), CE loss over all items, leave-one-out split by time (`LS`,
`TO`), full ranking, no history masking (RecBole does not mask). After every
epoch, validation and test HR@10, NDCG@10, MRR@10 are appended to the output
as one JSON line with the elapsed training seconds (evaluation time excluded).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-min", type=float, default=40.0, help="stop starting epochs after this many minutes")
    ap.add_argument("--out", type=Path, required=True, help="JSON-lines curve, one line per epoch")
    ap.add_argument("--seed", type=int, default=2020)
    args = ap.parse_args()

    import torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer
    from recbole.utils import init_seed

    data_path = Path(importlib.util.find_spec("recbole").origin).parent / "dataset_example"
    config = Config(model="SASRec", dataset="ml-100k", config_dict={
        "data_path": str(data_path),
        "checkpoint_dir": tempfile.mkdtemp(),
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "MAX_ITEM_LIST_LENGTH": 50,
        "loss_type": "CE",
        "train_neg_sample_args": None,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
        "metrics": ["Hit", "NDCG", "MRR"], "topk": [10], "valid_metric": "NDCG@10",
        "device": "cpu", "use_gpu": False, "show_progress": False, "seed": args.seed,
    })
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    model = SASRec(config, train_data.dataset).to(config["device"])
    trainer = Trainer(config, model)
    print(f"RecBole SASRec: {dataset.user_num - 1} users, {dataset.item_num - 1} items, "
          f"train batch {config['train_batch_size']}, torch threads {torch.get_num_threads()}", flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    train_seconds, epoch = 0.0, 0
    with args.out.open("w") as f:
        while train_seconds < args.budget_min * 60:
            t = time.perf_counter()
            loss = trainer._train_epoch(train_data, epoch, show_progress=False)
            train_seconds += time.perf_counter() - t
            valid = trainer.evaluate(valid_data, load_best_model=False, show_progress=False)
            test = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
            row = {"epoch": epoch + 1, "train_seconds": round(train_seconds, 1), "train_loss": float(loss),
                   **{f"valid_{k}": float(v) for k, v in valid.items()},
                   **{f"test_{k}": float(v) for k, v in test.items()}}
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(json.dumps(row), flush=True)
            epoch += 1


if __name__ == "__main__":
    main()
