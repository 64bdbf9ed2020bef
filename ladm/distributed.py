"""torch.distributed set-up from torchrun's (or SLURM/submitit's) environment; one process is world_size 1."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import torch
import torch.distributed as dist


def _export_slurm_environment() -> None:
    """Under SLURM (e.g. Hydra's submitit launcher) each task is one rank: set RANK, WORLD_SIZE, ..."""
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1 or "SLURM_PROCID" not in os.environ:
        return
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


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
        _export_slurm_environment()
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

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        boxes: list[Any] = [None] * self.world_size
        dist.all_gather_object(boxes, obj)
        return boxes

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        """All ranks meet, then leave the process group (a rank must not exit while peers still talk)."""
        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def run_stamp() -> str:
    """A time stamp every rank of one launch agrees on (for run folders).

    Under torchrun all ranks of a node share the agent process, so its start time is used;
    `LADM_RUN_STAMP` overrides. Across nodes, rank 0's folder is broadcast at start-up.
    """
    if os.environ.get("LADM_RUN_STAMP"):
        return os.environ["LADM_RUN_STAMP"]
    started = datetime.now()
    if "TORCHELASTIC_RUN_ID" in os.environ:
        try:
            ticks = int(open(f"/proc/{os.getppid()}/stat").read().rsplit(")", 1)[1].split()[19])
            boot = next(float(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime"))
            started = datetime.fromtimestamp(boot + ticks / os.sysconf("SC_CLK_TCK"))
        except (OSError, StopIteration, ValueError, IndexError):
            pass
    return started.strftime("%Y-%m-%d_%H-%M-%S")
