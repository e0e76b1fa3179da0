"""Teacher training on 2 gloo ranks (the environment torchrun sets, the ranks forked by the warm launcher):
the same optimiser steps as one rank with grad_accum 2, writes by rank 0 only, a kill of rank 1 mid-epoch
resumed to the uninterrupted result, and a 2-rank teacher that loads in one process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from distill.data import load_split
from distill.distributed import World
from distill.optimisers import OptimiserConfig
from helpers import RECIPE, sets
from teacher.checkpoint import load_teacher

# one epoch = 4 batches of 8 prompts; dropout off, so the two layouts see the same arithmetic
TRAIN = ["teacher.lora_dropout=0.0", "teacher.epochs=2", "teacher.patience=2"]


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def fresh_run(tiny_run, dest: Path) -> Path:
    run, _ = tiny_run
    for part in ("split", "student_alone"):
        shutil.copytree(run / part, dest / part)
    return dest


def argv(run: Path, overrides: list[str], *extra: str) -> list[str]:
    return ["teacher", "train", RECIPE, "--out", str(run)] + sets(overrides + TRAIN + list(extra))


def start_ranks(launcher, run: Path, overrides, logs: Path, kill_rank1_after: str | None = None) -> list[int]:
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": free_port()}
    logs.mkdir(parents=True, exist_ok=True)
    return [launcher.start(argv(run, overrides), logs / f"rank{r}.log", dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                           kill_after=kill_rank1_after if r == 1 else None,
                           read_only=run if r == 1 else None)        # rank 1 fails if it writes into the run
            for r in range(2)]


def wait_all(launcher, pids: list[int], logs: Path) -> None:
    for r, pid in enumerate(pids):
        log = logs / f"rank{r}.log"
        assert launcher.wait(pid, log, timeout=600) == 0, log.read_text()[-3000:]


def weights(run: Path) -> dict[str, np.ndarray]:
    teacher = run / "teacher"
    return {**load_file(str(teacher / "heads.safetensors")),
            **{f"adapter.{k}": v for k, v in load_file(str(teacher / "adapter" / "adapter_model.safetensors")).items()}}


@pytest.fixture(scope="module")
def one_rank(tiny_run, launcher, tmp_path_factory):
    """The reference: one process taking both ranks' batches of a step (grad_accum 2)."""
    _, overrides = tiny_run
    tmp = tmp_path_factory.mktemp("one")
    one = fresh_run(tiny_run, tmp / "run")
    pid = launcher.start(argv(one, overrides, "teacher.grad_accum=2"), tmp / "one.log")
    assert launcher.wait(pid, tmp / "one.log", timeout=600) == 0, (tmp / "one.log").read_text()[-3000:]
    return one


@pytest.fixture(scope="module", params=["ddp", "zero2"])
def two_ranks(request, tiny_run, launcher, tmp_path_factory):
    """A teacher trained on 2 ranks, uninterrupted, with each strategy."""
    _, overrides = tiny_run
    tmp = tmp_path_factory.mktemp(request.param)
    run = fresh_run(tiny_run, tmp / "run")
    overrides = overrides + [f"teacher.distributed={request.param}"]
    wait_all(launcher, start_ranks(launcher, run, overrides, tmp / "logs"), tmp / "logs")
    return run, request.param, overrides


def test_two_ranks_equal_one_rank_with_accumulation(one_rank, two_ranks):
    two, strategy, _ = two_ranks
    a, b = weights(one_rank), weights(two)
    assert a.keys() == b.keys()
    for k in a:   # the same steps; only the order of a float sum differs (rank 1's batches added by all-reduce)
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6, err_msg=k)
    one_rec, two_rec = (json.loads((r / "teacher" / "metrics.json").read_text()) for r in (one_rank, two))
    assert [c["examples"] for c in two_rec["curve"]] == [c["examples"] for c in one_rec["curve"]]
    assert two_rec["valid_metrics"]["NDCG@10"] == pytest.approx(one_rec["valid_metrics"]["NDCG@10"], abs=0.002)
    assert (one_rec["world_size"], two_rec["world_size"]) == (1, 2)
    assert (one_rec["strategy"], two_rec["strategy"]) == ("one process", strategy)
    assert len(two_rec["peak_rss_bytes_per_rank"]) == 2 and min(two_rec["peak_rss_bytes_per_rank"]) > 0
    whole = one_rec["optimizer_state_bytes_per_rank"][0]
    held = two_rec["optimizer_state_bytes_per_rank"]
    if strategy == "ddp":
        assert held == [whole, whole]             # every rank holds all of AdamW's moments
    else:                                         # ZeRO: each rank holds its half (up to alignment padding)
        assert sum(held) == pytest.approx(whole, rel=0.01) and max(held) < 0.51 * whole


def test_zero1_with_offload_in_one_process_equals_plain_adamw(one_rank, tiny_run, launcher, tmp_path):
    """ZeRO-Offload on one device (a process group of one, AdamW stepped on the CPU copy): the same steps."""
    _, overrides = tiny_run
    run = fresh_run(tiny_run, tmp_path / "run")
    pid = launcher.start(argv(run, overrides, "teacher.grad_accum=2", "teacher.distributed=zero1",
                              "teacher.offload_optimizer=true"), tmp_path / "zero1.log")
    assert launcher.wait(pid, tmp_path / "zero1.log", timeout=600) == 0, (tmp_path / "zero1.log").read_text()[-3000:]
    a, b = weights(one_rank), weights(run)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert json.loads((run / "teacher" / "metrics.json").read_text())["strategy"] == "zero1"


def test_a_two_rank_teacher_loads_in_one_process(two_ranks):
    two, strategy, _ = two_ranks
    split = load_split(two / "split")
    model, meta = load_teacher(two / "teacher", two / "student_alone", split)
    assert (meta["world_size"], meta["strategy"]) == (2, strategy)
    q = model.encode(split.history("valid"), desc="valid", blend=False)
    assert q.shape == (split.n_users, model.query_dim) and np.isfinite(q).all()


@pytest.mark.parametrize("two_ranks", ["zero2"], indirect=True)   # the strategy whose state is gathered on save
def test_kill_of_rank_1_mid_epoch_then_rerun_equals_uninterrupted(tiny_run, two_ranks, launcher, tmp_path):
    two_ranks, _, overrides = two_ranks
    run = fresh_run(tiny_run, tmp_path / "run")
    # rank 1 builds 2 of epoch 1's 4 batches, so its 3rd prefix lookup is epoch 2's first batch
    pids = start_ranks(launcher, run, overrides, tmp_path / "killed", kill_rank1_after="teacher.train.prefixes:3")
    assert launcher.wait(pids[1], tmp_path / "killed" / "rank1.log", timeout=600) == -9
    if launcher.alive(pids[0]):
        os.killpg(pids[0], signal.SIGKILL)     # what torchrun does to the others when one rank dies
    launcher.wait(pids[0], tmp_path / "killed" / "rank0.log", timeout=60)
    assert (run / "teacher.resume" / "state.json").is_file()    # epoch 1 was saved before rank 1 died
    assert not (run / "teacher" / "metrics.json").exists()
    wait_all(launcher, start_ranks(launcher, run, overrides, tmp_path / "rerun"), tmp_path / "rerun")
    assert "resuming after epoch 1" in (tmp_path / "rerun" / "rank0.log").read_text()
    a, b = weights(run), weights(two_ranks)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_parameter_without_gradient_keeps_none():
    """As in one process (AdamW then leaves it alone, weight decay included), not a summed zero gradient."""
    import torch

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        used, unused = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
        (used * 2).sum().backward()
        World(0, 2).sum_gradients([used, unused])   # a 2-rank world whose other rank adds nothing
        assert unused.grad is None and torch.equal(used.grad, torch.full((3,), 2.0))
    finally:
        torch.distributed.destroy_process_group()


def test_a_users_deepspeed_json_is_merged_and_what_the_recipe_sets_is_refused(tmp_path):
    from distill.config import load_recipe
    from distill.errors import ConfigError
    from distill.optimisers import deepspeed_config, llm_optimiser, read_deepspeed_config

    good = tmp_path / "ds.json"
    good.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 5e7}, "communication_data_type": "fp32"}))
    recipe = load_recipe(RECIPE, ["teacher.distributed=zero2", f"teacher.deepspeed_config={good}",
                                  "teacher.max_grad_norm=1.0"])
    config = deepspeed_config(OptimiserConfig(**llm_optimiser(recipe.teacher)), World(0, 2))
    assert config["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 5e7}
    assert config["communication_data_type"] == "fp32" and config["gradient_clipping"] == 1.0
    assert config["train_batch_size"] == 2 and config["managed_gradient_accumulation"] is False
    for content, why in [({"gradient_accumulation_steps": 4}, "'gradient_accumulation_steps' is set by the recipe"),
                         ({"optimizer": {"type": "Adam"}}, "'optimizer' is set by the recipe"),
                         ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage 3 is not"),
                         ([1, 2], "must be a JSON object")]:
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(content))
        with pytest.raises(ConfigError, match=why) as e:
            read_deepspeed_config(bad, "zero2")
        assert str(bad) in str(e.value)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match="not a readable JSON file"):
        read_deepspeed_config(tmp_path / "broken.json", "zero1")
    for override in ("teacher.offload_optimizer=true", f"teacher.deepspeed_config={good}"):
        with pytest.raises(ConfigError, match="needs teacher.distributed zero1 or zero2"):
            load_recipe(RECIPE, [override])


def test_llara_on_two_zero2_ranks_equals_one_rank_with_accumulation(tiny_run, tiny_causal_llama, launcher, tmp_path):
    """The generative baseline is a TrainingTask too: the same strategies, the same steps."""
    _, overrides = tiny_run
    llara = overrides + [f"teacher.model={tiny_causal_llama}", "teacher.lora_dropout=0.0",
                         "llara.examples_per_epoch=32", "llara.batch_size=8", "llara.epochs=1", "llara.valid_users=8",
                         "llara.eval_batch_size=20", "llara.max_history=5"]
    runs = {}
    for name, extra, ranks in [("one", ["llara.grad_accum=2"], 1), ("two", ["teacher.distributed=zero2"], 2)]:
        run = fresh_run(tiny_run, tmp_path / name)
        cmd = ["baseline", "llara", RECIPE, "--out", str(run)] + sets(llara + extra)
        env = {"WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": free_port()}
        pids = [launcher.start(cmd, tmp_path / f"{name}{r}.log", dict(env, RANK=str(r), LOCAL_RANK=str(r)))
                for r in range(ranks)]
        for r, pid in enumerate(pids):
            assert launcher.wait(pid, tmp_path / f"{name}{r}.log", timeout=600) == 0, \
                (tmp_path / f"{name}{r}.log").read_text()[-3000:]
        runs[name] = {**load_file(str(run / "llara" / "heads.safetensors")),
                      **load_file(str(run / "llara" / "adapter" / "adapter_model.safetensors"))}
        record = json.loads((run / "llara" / "metrics.json").read_text())
        assert (record["world_size"], record["strategy"]) == (ranks, "one process" if ranks == 1 else "zero2")
    assert runs["one"].keys() == runs["two"].keys()
    for k in runs["one"]:
        np.testing.assert_allclose(runs["one"][k], runs["two"][k], rtol=1e-4, atol=1e-6, err_msg=k)
