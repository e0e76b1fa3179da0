"""The processes that train or score together: rank and world size as a launcher set them.

`torchrun --nproc-per-node N` and `deepspeed --num_gpus N` both start N copies of the command with
RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT in the environment; `world()` joins them into one
process group (gloo on CPU, nccl where CUDA is present) the first time it is asked, and answers a
one-process `World` when no launcher is involved. Only rank 0 writes; the others wait for it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """The rank that validates and writes."""
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """Where collective tensors live for this backend."""
        if self.size > 1 and torch.distributed.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def barrier(self) -> None:
        if self.size > 1:
            torch.distributed.barrier()

    def main_first(self, fn):
        """`fn()` on rank 0, then on the others (which then read what rank 0 wrote); its result on each rank."""
        for main_turn in (True, False):
            if self.main == main_turn:
                result = fn()
            self.barrier()
        return result

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Every rank's gradients summed into every rank; a parameter no rank gave a gradient keeps none (as
        in one process, so AdamW leaves it alone)."""
        if self.size == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        has = torch.tensor([p.grad is not None for p in params], dtype=grads[0].dtype if grads else torch.float32)
        flat = torch.cat([g.reshape(-1) for g in grads] + [has.to(grads[0].device)]).to(self.device)
        torch.distributed.all_reduce(flat)
        offset = 0
        touched = flat[-len(params):] > 0
        for p, g, t in zip(params, grads, touched.tolist()):
            part = flat[offset:offset + g.numel()].view_as(g).to(g.device)
            offset += g.numel()
            if not t:
                p.grad = None
            elif p.grad is None:
                p.grad = part.clone()
            else:
                p.grad.copy_(part)

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks (float64)."""
        if self.size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def gather(self, value: float) -> list[float]:
        """Every rank's `value`, in rank order, on every rank."""
        return self.sum([value if r == self.rank else 0.0 for r in range(self.size)])

    def from_main(self, value):
        """Rank 0's JSON-serialisable `value` on every rank (the others pass anything, e.g. None)."""
        if self.size == 1:
            return value
        data = json.dumps(value).encode() if self.main else b""
        length = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        torch.distributed.broadcast(length, 0)
        buf = torch.zeros(int(length), dtype=torch.uint8, device=self.device)
        if self.main:
            buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        torch.distributed.broadcast(buf, 0)
        return json.loads(bytes(buf.cpu().numpy()).decode())


ONE_PROCESS = World()


def world() -> World:
    """This process's place among the ranks its launcher started (joining their process group once)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return ONE_PROCESS
    if not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # "cuda" is then this rank's GPU
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return World(torch.distributed.get_rank(), size)
