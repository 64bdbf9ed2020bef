"""Training checkpoints: trainable weights, optimizer, scheduler, every rank's RNG, data position, W&B id.

`checkpoints/step-N/` is written to a temporary folder and renamed, so the newest complete
folder is always a good one; `train.keep_checkpoints` of them are kept.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def latest_checkpoint(out_dir: Path) -> Path | None:
    steps = [(int(m.group(1)), p) for p in (out_dir / "checkpoints").glob("step-*") if (m := STEP_DIR.match(p.name))]
    return max(steps)[1] if steps else None


def save_checkpoint(out_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write `state` (torch-serialisable) as checkpoints/step-<step>, atomically; prune old ones."""
    root = out_dir / "checkpoints"
    target = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(state, tmp / "state.pt")
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    for old in sorted((p for p in root.glob("step-*") if STEP_DIR.match(p.name)),
                      key=lambda p: int(p.name.split("-")[1]))[:-keep]:
        shutil.rmtree(old)
    return target


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path / "state.pt", map_location="cpu", weights_only=False)
