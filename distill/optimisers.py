"""How the Trainer's gradients become an optimiser step, on one rank or N: the training strategy.

`ddp`: AdamW on every rank over the gradients summed across the ranks (one process: plain AdamW).
`zero1` / `zero2`: DeepSpeed ZeRO stage 1 / 2, the same AdamW with its moments (and at stage 2 the
gradients) partitioned across the ranks, optionally offloaded to CPU memory.

Both take the same optimiser steps from the same gradients: the loss of each micro-batch is scaled by
the Trainer (1 / batches per step over all ranks) and the ranks' gradients are summed (`ddp`) or
averaged over the N ranks of a loss scaled N times up (ZeRO). Both save AdamW's own state dict, each
parameter's moments gathered whole (distill.resume.optimizer_state's layout), so a resume state and
the checkpoint do not depend on the world size or the strategy. ZeRO-3 (the base weights partitioned
too) is not offered: its forward needs DeepSpeed's parameter hooks on the whole model, which no test on
CPU can run (benchmarks/teacher_distributed.md gives the memory it would save).
"""

from __future__ import annotations

import json
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

from distill.config import LlaraConfig, TeacherConfig
from distill.distributed import World
from distill.errors import ConfigError
from distill.resume import load_optimizer_state, optimizer_state

ZERO_STAGES = {"zero1": 1, "zero2": 2}   # teacher.distributed -> DeepSpeed's zero_optimization.stage

# what anyo sets from the recipe, so a user's DeepSpeed JSON may not: the loop, the batch and the optimiser
OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
              "managed_gradient_accumulation", "optimizer", "scheduler", "gradient_clipping", "bf16", "fp16")


@dataclass(kw_only=True)
class OptimiserConfig:
    lr: float
    weight_decay: float = 0.0
    schedule: str = "constant"          # transformers scheduler name: constant, cosine, linear
    warmup_ratio: float = 0.0
    max_grad_norm: float | None = None  # clip the global gradient norm; None = no clipping
    strategy: str = "ddp"               # ddp, zero1 or zero2 (teacher.distributed)
    offload_optimizer: bool = False     # ZeRO: AdamW's state and step in CPU memory
    dtype: str = "float32"              # the trained weights' dtype (ZeRO keeps float32 masters of bf16/fp16)
    deepspeed_config: dict | None = None  # a user's DeepSpeed JSON (read by read_deepspeed_config), merged in


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimiserConfig, steps: int):
    """`cfg.schedule` over `steps` optimiser steps, warming up for the first `warmup_ratio` of them."""
    from transformers import get_scheduler
    warmup = math.ceil(cfg.warmup_ratio * steps) if cfg.warmup_ratio > 0 else 0
    return get_scheduler(cfg.schedule, opt, num_warmup_steps=warmup, num_training_steps=steps)


class DataParallel:
    """AdamW on every rank over gradients summed across the ranks."""

    lockstep = False   # ranks may run different numbers of backward passes in a step

    def __init__(self, params: list[torch.nn.Parameter], cfg: OptimiserConfig, world: World, steps: int):
        self.params, self.world, self.max_grad_norm = params, world, cfg.max_grad_norm
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = build_scheduler(self.opt, cfg, steps)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.world.sum_gradients(self.params)
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def held_bytes(self) -> int:
        """Optimiser state this rank holds (AdamW's moments of every parameter)."""
        return state_bytes(self.opt)

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, meta = optimizer_state(self.opt)
        return tensors, {"optimizer": meta, "scheduler": self.sched.state_dict()}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        load_optimizer_state(self.opt, tensors, meta["optimizer"])
        self.sched.load_state_dict(meta["scheduler"])


class Zero:
    """DeepSpeed ZeRO stage 1 or 2 around the same AdamW (the client optimiser DeepSpeed wraps)."""

    lockstep = True    # stage 2 reduces gradients inside each backward pass: every rank runs as many

    def __init__(self, params: list[torch.nn.Parameter], cfg: OptimiserConfig, world: World, steps: int):
        import deepspeed    # the `train` extra; serving and student-only installs never reach this
        from deepspeed.utils import safe_get_full_optimizer_state, safe_set_full_optimizer_state
        self.get_moment, self.set_moment = safe_get_full_optimizer_state, safe_set_full_optimizer_state
        join_group_of_one(world)
        self.params = params
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = build_scheduler(opt, cfg, steps)      # steps the client optimiser's groups DeepSpeed keeps
        # the engine wraps the trained parameters only (shared with the task's model, which it never calls)
        self.engine, self.zero, _, _ = deepspeed.initialize(model=torch.nn.ParameterList(params), optimizer=opt,
                                                            config=deepspeed_config(cfg, world))
        self.base = self.zero.optimizer                    # the AdamW over this rank's flat partitions

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss * self.engine.dp_world_size, scale_wrt_gas=False)   # averaged over the ranks

    def step(self) -> None:
        self.engine.step()                                # reduce, step this rank's partition, gather, zero
        self.sched.step()

    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def held_bytes(self) -> int:
        """Optimiser state this rank holds: the moments of its partition (and of no other rank's)."""
        return state_bytes(self.base)

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """AdamW's state dict as one process holds it, each moment gathered from the ranks (collective)."""
        groups = [{k: v for k, v in g.items() if k != "params"} | {"params": list(range(len(self.params)))}
                  for g in self.base.param_groups]
        meta = {"optimizer": {"param_groups": groups}, "scheduler": self.sched.state_dict()}
        flat = self.base.param_groups[0]["params"][0]
        if not self.base.state.get(flat):
            return {}, meta                                # no step taken yet
        step = self.base.state[flat]["step"]
        tensors = {}
        for i, p in enumerate(self.params):
            tensors[f"{i}.step"] = torch.as_tensor(step, dtype=torch.float32).clone()
            for key in ("exp_avg", "exp_avg_sq"):
                tensors[f"{i}.{key}"] = self.get_moment(p, key).to(p.dtype).cpu()
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Restore `state()` (of any world size or strategy) into this rank's partitions, and the float32 master
        weights from the task's weights (restored just before). Local: no rank waits for another."""
        self.zero.refresh_fp32_params()
        self.base.state.clear()
        self.zero._hp_optimizer_states_linked = False
        self.sched.load_state_dict(meta["scheduler"])
        if not tensors:
            return
        steps = {float(tensors[f"{i}.step"]) for i in range(len(self.params))}
        if len(steps) != 1:
            raise ValueError(f"optimizer steps differ between parameters: {sorted(steps)}")
        step = steps.pop()
        for group in self.base.param_groups:
            flat = group["params"][0]
            self.base.state[flat] = {"step": torch.tensor(step, dtype=torch.float32),
                                     "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
        self.zero._lazy_init_hp_params_optimizer_state()   # link each parameter's fragment of the flat moments
        for i, p in enumerate(self.params):
            for key in ("exp_avg", "exp_avg_sq"):
                self.set_moment(p, tensors[f"{i}.{key}"].to(torch.float32), key)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for per_param in opt.state.values() for v in per_param.values()
               if torch.is_tensor(v) and v.dim() > 0)


def llm_optimiser(teacher: TeacherConfig, section: TeacherConfig | LlaraConfig | None = None) -> dict:
    """OptimiserConfig's fields for training an LLM: `section`'s AdamW and warmup (the teacher's or the llara
    baseline's, cosine decay) with the teacher section's strategy, clipping, dtype and DeepSpeed file."""
    s = section or teacher
    user = teacher.deepspeed_config
    return {"lr": s.lr, "weight_decay": s.weight_decay, "schedule": "cosine", "warmup_ratio": s.warmup_ratio,
            "max_grad_norm": teacher.max_grad_norm, "strategy": teacher.distributed,
            "offload_optimizer": teacher.offload_optimizer, "dtype": teacher.dtype,
            "deepspeed_config": None if user is None else read_deepspeed_config(Path(user), teacher.distributed)}


def strategy_name(teacher: TeacherConfig, world: World) -> str:
    """What a record says trained it: `one process`, `ddp`, `zero1` or `zero2`."""
    return "one process" if teacher.distributed == "ddp" and world.size == 1 else teacher.distributed


def build_optimiser(params: list[torch.nn.Parameter], cfg: OptimiserConfig, world: World, steps: int):
    """The strategy `cfg.strategy` over `params`, with a learning-rate schedule of `steps` optimiser steps."""
    return (DataParallel if cfg.strategy == "ddp" else Zero)(params, cfg, world, steps)


def deepspeed_config(cfg: OptimiserConfig, world: World) -> dict:
    """The DeepSpeed JSON a recipe implies (the Trainer owns accumulation: one engine step per optimiser step),
    with the user's own file merged over it."""
    zero = {"stage": ZERO_STAGES[cfg.strategy]}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "train_batch_size": world.size, "managed_gradient_accumulation": False,
              "zero_optimization": zero, "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
              "gradient_clipping": cfg.max_grad_norm or 0.0, "bf16": {"enabled": cfg.dtype == "bfloat16"},
              "fp16": {"enabled": cfg.dtype == "float16"}, "steps_per_print": 2 ** 62, "wall_clock_breakdown": False}
    user = cfg.deepspeed_config or {}
    for key, value in user.items():
        if key == "zero_optimization":
            config[key] = {**zero, **value}
        else:
            config[key] = value
    return config


def read_deepspeed_config(path: Path, strategy: str) -> dict:
    """A user's DeepSpeed JSON for `strategy`: a one-line ConfigError naming the file and key for anything anyo sets
    itself (batch, accumulation, optimiser, precision, clipping) or a ZeRO stage other than the strategy's."""
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: a DeepSpeed config must be a JSON object")
    for key in OWNED_KEYS:
        if key in config:
            raise ConfigError(f"{path}: key {key!r} is set by the recipe (teacher.batch_size, grad_accum, lr, "
                              f"max_grad_norm, dtype); remove it from the file")
    zero = config.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{path}: key 'zero_optimization' must be an object")
    want = ZERO_STAGES[strategy]
    if zero.get("stage", want) != want:
        raise ConfigError(f"{path}: zero_optimization.stage {zero['stage']!r} is not teacher.distributed "
                          f"{strategy}'s stage {want}")
    return config


def join_group_of_one(world: World) -> None:
    """ZeRO needs a process group; one process (ZeRO-Offload on one device) gets a group of one on a free port."""
    if world.size > 1 or torch.distributed.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
