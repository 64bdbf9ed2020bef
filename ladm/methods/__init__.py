"""Fine-tuning methods behind one small seam (`Method`), one module each, found by `method.name`."""

from __future__ import annotations

from omegaconf import DictConfig

from ladm import LadmError
from ladm.distributed import DistEnv
from ladm.methods.base import Method
from ladm.methods.ladm import LaDM
from ladm.methods.landermt import LANDeRMT
from ladm.methods.lora import LoRA
from ladm.methods.mlas_lora import MLASLoRA
from ladm.methods.zero_shot import ZeroShot

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (ZeroShot, LoRA, LaDM, MLASLoRA, LANDeRMT)}


def build_method(cfg: DictConfig, dist: DistEnv | None = None) -> Method:
    """The method object named by `method.name` (the full config is passed for context)."""
    name = cfg.method.name
    if name not in METHODS:
        raise LadmError(f"unknown method '{name}': choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name](cfg, dist)


__all__ = ["METHODS", "Method", "build_method"]
