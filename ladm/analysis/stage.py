"""A cached analysis stage: tensors + a JSON summary under `cache_dir/<stage>/<key>/`, computed once (on the
main rank), written atomically, and computed again with a warning when the cache is unreadable."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ladm import LadmError
from ladm.files import read_json, write_atomic, write_json_atomic

log = logging.getLogger(__name__)
VERSION = 2  # bump when what a stage computes changes (2: answer-mean awareness loss, trainer's sequences)


def stage_key(identity: dict[str, Any]) -> str:
    """A short hash of everything that changes a stage's output (configs resolved to plain values)."""
    plain = json.loads(json.dumps(identity, default=lambda v: OmegaConf.to_container(v, resolve=True)
                                  if OmegaConf.is_config(v) else str(v), sort_keys=True))
    return hashlib.sha256(json.dumps({"version": VERSION, **plain}, sort_keys=True).encode()).hexdigest()[:16]


def _read(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    summary = read_json(folder / "summary.json", "the analysis summary", "it is computed again")
    tensors = load_file(folder / "tensors.safetensors")
    if not isinstance(summary, dict) or not all(torch.isfinite(t.float()).all() for t in tensors.values()):
        raise LadmError(f"{folder} holds a malformed summary or non-finite tensors")
    return tensors, summary


def cached_stage(folder: Path, compute: Callable[[], tuple[dict[str, torch.Tensor], dict]], is_main: bool = True,
                 barrier: Callable[[], None] = lambda: None) -> tuple[dict[str, torch.Tensor], dict]:
    """The stage's tensors and summary from `folder`, computed by `compute()` on the main rank when absent."""
    if is_main:
        try:
            cached = _read(folder) if (folder / "summary.json").is_file() else None
        except (LadmError, OSError, SafetensorError) as err:
            log.warning("analysis cache %s is unreadable (%s): computing it again", folder, err)
            cached = None
        if cached is None:
            tensors, summary = compute()
            write_atomic(folder / "tensors.safetensors", lambda tmp: save_file(tensors, tmp))
            write_json_atomic(folder / "summary.json", summary)  # written last: marks the folder complete
    barrier()
    return _read(folder)
