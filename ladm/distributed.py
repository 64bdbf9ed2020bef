"""torch.distributed set-up from torchrun's environment (a single process is world_size 1)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    @classmethod
    def from_environment(cls) -> DistEnv:
        """Read RANK/WORLD_SIZE/LOCAL_RANK and join the process group: nccl on GPU, gloo on CPU."""
        env = cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))
        if env.world_size > 1 and not dist.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(env.local_rank)
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return env

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value
